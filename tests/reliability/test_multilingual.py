"""Length filters count words with the configured tokenizer (second half of finding 8 of issue 15): Chinese
seed tasks under the multilingual tokenizer commit a round that keeps Chinese instructions, where counting
by spaces rejected every one as too short."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

import pytest

from flows.bootstrap import bootstrap_round
from schemas import BootstrapConfig, RoundParams
from tasks.resources.store.rounds import Store
from tests.support.fake_openai import Fault
from tests.support.model_like import ModelLikeFake

pytestmark = pytest.mark.slow

VERBS = ("请解释", "请总结", "请比较", "请描述", "请列出", "请改写", "请翻译", "请评价")
CHARACTERS = (
    "春夏秋冬山水花鸟风云雨雪江河湖海天地日月星辰金木火土书画琴棋诗酒茶人心手口耳目城市乡村道路桥梁车船"
)
SEEDS = [
    ("写一首关于秋天的短诗。", "秋风起，落叶黄。"),
    ("把下面的句子翻译成英文：我喜欢读书。", "I like reading."),
    ("列出三种常见的水果。", "苹果、香蕉、橙子。"),
    ("解释什么是光合作用。", "植物利用阳光把二氧化碳和水变成糖和氧气。"),
    ("给一家小面包店起一个名字。", "麦香小屋"),
    ("判断这句话的情感是积极还是消极：今天真开心。", "积极"),
]


class ChineseModel(ModelLikeFake):
    """The model-like fake, answering instruction prompts with numbered Chinese instructions."""

    def _result(self, body: dict[str, Any], prompts: list[str], fault: Fault | None) -> dict[str, Any]:
        result = super()._result(body, prompts, fault)
        n = int(body.get("n") or 1)
        for choice in result["choices"]:
            prompt = prompts[choice["index"] // n]
            numbered = re.search(r"\n(\d+)\.$", prompt)
            if numbered and choice["text"]:
                rng = random.Random(hashlib.sha256(prompt.encode()).digest())
                items = [
                    rng.choice(VERBS) + "".join(rng.sample(CHARACTERS, 10)) + "的特点。" for _ in range(3)
                ]
                first = int(numbered.group(1))
                choice["text"] = (
                    " " + items[0] + "".join(f"\n{first + i}. {t}" for i, t in enumerate(items[1:], 1))
                )
        return result


def test_chinese_seed_tasks_commit_a_round(prefect_server: None, tmp_path: Path) -> None:
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(
        "\n".join(
            json.dumps(
                {
                    "id": f"zh_{i}",
                    "name": f"zh_{i}",
                    "instruction": instruction,
                    "instances": [{"input": "", "output": output}],
                    "is_classification": False,
                },
                ensure_ascii=False,
            )
            for i, (instruction, output) in enumerate(SEEDS)
        )
    )
    store_url = str(tmp_path / "store")
    config = BootstrapConfig(prompts_per_round=4, num_in_context=4, tokenizer="multilingual")
    with ChineseModel() as fake:
        summary = bootstrap_round(
            RoundParams(
                store_url=store_url,
                seeds_path=str(seeds),
                llm_urls=[fake.url],
                config=config,
                store_slot=False,
            )
        )
    counts = summary["counts"]
    assert counts["kept"] > 0, counts
    assert "rejected:instruction:too_short" not in counts, counts
    kept = Store(store_url).read_committed("instructions").column("instruction").to_pylist()
    assert kept and all(re.search(r"[\u4e00-\u9fff]", text) for text in kept)
