"""The base model: specs resolved to their source, and the embedded GGUF loaded with transformers."""

from pathlib import Path

import pytest

from tasks.resources.servers.models import embedded_model_path
from tasks.training.models import FinetuneError, load_base_model, resolve_base_model
from tasks.training.templates import load_templates


def test_base_model_specs(tmp_path: Path) -> None:
    embedded = resolve_base_model(None)
    assert embedded == resolve_base_model("embedded")
    shipped = embedded_model_path()  # the same file the embedded llama.cpp server loads
    assert embedded.gguf_file == shipped.name and Path(embedded.location) == shipped.parent
    assert resolve_base_model(str(shipped)) == embedded
    single = tmp_path / "one-gguf"
    single.mkdir()
    (single / "model.Q8_0.gguf").write_bytes(b"")
    assert resolve_base_model(str(single)).gguf_file == "model.Q8_0.gguf"
    (single / "config.json").write_text("{}")
    assert resolve_base_model(str(single)).gguf_file is None  # a transformers folder wins
    assert (
        resolve_base_model("HuggingFaceTB/SmolLM2-135M-Instruct").location
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    with pytest.raises(FinetuneError, match="no such file or folder"):
        resolve_base_model(str(tmp_path / "missing.gguf"))


def test_every_template_prompt_is_a_token_prefix_of_prompt_plus_answer() -> None:
    # Otherwise TRL cannot separate prompt from completion cleanly and the model trains on a shifted context.
    _, tokenizer = load_base_model(None)
    for template in load_templates():
        for prompt in (template.render("Name the capital.", "France"), template.render("Name a fruit.", "")):
            alone = tokenizer(prompt)["input_ids"]
            assert tokenizer(prompt + "Paris is the answer")["input_ids"][: len(alone)] == alone, (
                template.name
            )
