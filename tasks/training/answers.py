"""Answering the held-out tasks: the tasks as prompts; greedy answers of the base model or base + adapter.

Answers are decoded greedily, so they depend only on the held-out file, the model and the settings.
torch, transformers and peft are imported inside the functions that use them.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas import SeedTask
from tasks.publish.progress import ProgressUpdate, report
from tasks.training.models import load_base_model
from tasks.training.templates import template_by_name

DEFAULT_HELDOUT = Path(__file__).resolve().parents[2] / "seeds" / "heldout_tasks.jsonl"


@dataclass(frozen=True)
class HeldoutPrompt:
    """One held-out task as a prompt and its reference answer."""

    id: str
    prompt: str
    reference: str
    instruction: str = ""
    input: str = ""


def load_heldout(path: Path | None = None, limit: int | None = None) -> tuple[list[SeedTask], str]:
    """The first `limit` held-out tasks (all when None) and the sha256 of the whole file.

    One instruction may appear on several lines with different inputs; each line is one prompt.

    Raises:
        tasks.round.seeds.SeedFileError: When the file is missing or invalid.
    """
    from tasks.round.seeds import load_seeds

    tasks, sha256 = load_seeds(path or DEFAULT_HELDOUT, repeated_instructions=True)
    return tasks[:limit] if limit else tasks, sha256


def build_prompts(
    tasks: Sequence[SeedTask], prompt_format: str, template_name: str, tokenizer: Any = None
) -> list[HeldoutPrompt]:
    """Prompts for the first instance of each task.

    Args:
        tasks: Held-out tasks.
        prompt_format: "template" renders the named sft_*.txt template (the fine-tuning format); "chat"
            applies the tokenizer's chat template to the instruction and input as one user message.
        template_name: Template name, for "template".
        tokenizer: Needed for "chat".
    """
    template = template_by_name(template_name) if prompt_format == "template" else None
    prompts = []
    for task_ in tasks:
        instance = task_.instances[0]
        instruction, input_text = task_.instruction.strip(), instance.input.strip()
        if template is not None:
            prompt = template.render(instruction, input_text)
        else:
            content = f"{instruction}\n\n{input_text}" if input_text else instruction
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
        prompts.append(
            HeldoutPrompt(
                id=task_.id,
                prompt=prompt,
                reference=instance.output.strip(),
                instruction=instruction,
                input=input_text,
            )
        )
    return prompts


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Greedy answers to `prompts`, batched with left padding (prompts of similar length batched together).

    `on_progress(answered, total)` is called after each batch, when given.

    Returns:
        The decoded new tokens of each prompt, stripped, in the order of `prompts`.
    """
    import torch

    tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: dict[int, str] = {}
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = tokenizer(
                [prompts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False
            )
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
            new_tokens = output[:, batch["input_ids"].shape[1] :]
            for i, text in zip(
                chunk, tokenizer.batch_decode(new_tokens, skip_special_tokens=True), strict=True
            ):
                answers[i] = text.strip()
            if on_progress is not None:
                on_progress(len(answers), len(prompts))
    return [answers[i] for i in range(len(prompts))]


def load_finetuned(base_model: str | None, adapter_dir: Path) -> tuple[Any, Any]:
    """The base model with the adapter merged in (merging makes generation as fast as the base's)."""
    from peft import PeftModel

    model, tokenizer = load_base_model(base_model)
    return PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload(), tokenizer


def answered_progress(key: str) -> Callable[[int, int], None]:
    """Terminal progress of one model's answers (tasks answered of all), for `generate_answers`."""

    def hook(done: int, total: int) -> None:
        report(ProgressUpdate(key, done=done, total=total, unit="tasks"))

    return hook
