"""Bad input on the command line: one clear line, a non-zero exit, and nothing written."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selfinstruct.cli import app
from tasks.round.seeds import DEFAULT_SEEDS

runner = CliRunner()


def _invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "store"


def test_corrupted_seed_file_names_line_17(tmp_path: Path, store_dir: Path) -> None:
    lines = DEFAULT_SEEDS.read_text().splitlines()[:30]
    lines[16] = lines[16].replace('"instruction":', '"instruction"', 1)
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("\n".join(lines) + "\n")
    code, output = _invoke("run", "--seeds", str(seeds), "--store", str(store_dir))
    assert code == 2
    assert f"{seeds}:17: invalid JSON" in output
    assert len(output.strip().splitlines()) == 1
    assert not store_dir.exists()


def test_seed_missing_field(tmp_path: Path, store_dir: Path) -> None:
    records = [json.loads(line) for line in DEFAULT_SEEDS.read_text().splitlines()[:5]]
    del records[3]["is_classification"]
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    code, output = _invoke("run", "--seeds", str(seeds), "--store", str(store_dir))
    assert code == 2
    assert "seeds.jsonl:4: field 'is_classification': Field required" in output
    assert not store_dir.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("run", "--store", "ftp://example/x"), "unsupported scheme 'ftp'"),
        (("run", "--store", "s3://user:topsecret@bucket/x"), "put S3 credentials in settings"),
        (("status", "--store", "gs://bucket"), "unsupported scheme 'gs'"),
    ],
)
def test_bad_store_urls(args: tuple[str, ...], message: str) -> None:
    code, output = _invoke(*args)
    assert code == 2
    assert message in output
    assert "topsecret" not in output


def test_bad_config_file(tmp_path: Path, store_dir: Path) -> None:
    config = tmp_path / "round.json"
    config.write_text('{"rouge_threshold": 1.5}')
    code, output = _invoke("run", "--config", str(config), "--store", str(store_dir))
    assert code == 2 and "field 'rouge_threshold'" in output
    config.write_text('{"rouge_threshold": 0.5,\n "typo_knob": 1}')
    code, output = _invoke("run", "--config", str(config), "--store", str(store_dir))
    assert code == 2 and "field 'typo_knob': Extra inputs are not permitted" in output
    config.write_text("{not json")
    code, output = _invoke("run", "--config", str(config), "--store", str(store_dir))
    assert code == 2 and "round.json:1: invalid JSON" in output
    assert not store_dir.exists()


def test_bad_settings_and_arguments(monkeypatch: pytest.MonkeyPatch, store_dir: Path) -> None:
    monkeypatch.setenv("SELFINSTRUCT_LLM_BATCH_SIZE", "lots")
    code, output = _invoke("run", "--store", str(store_dir))
    assert code == 2 and "SELFINSTRUCT_LLM_BATCH_SIZE" in output
    monkeypatch.delenv("SELFINSTRUCT_LLM_BATCH_SIZE")
    code, _ = _invoke("run", "--rounds", "0", "--store", str(store_dir))
    assert code == 2
    assert not store_dir.exists()


def test_status_and_verify_on_an_empty_store(store_dir: Path) -> None:
    code, output = _invoke("status", "--store", str(store_dir))
    assert code == 2 and "no such store" in output  # a mistyped path is not an empty store
    store_dir.mkdir()
    code, output = _invoke("status", "--store", str(store_dir))
    assert code == 0 and "no committed rounds" in output
    code, output = _invoke("verify", "--store", str(store_dir))
    assert code == 0 and "0 committed rounds" in output


def test_no_llm_url_means_the_embedded_server_and_nothing_to_preflight() -> None:
    """`make run` gives no URL: the run starts the embedded server after the check, so the check passes."""
    from schemas import Settings
    from selfinstruct.cli import check_llm_servers

    assert check_llm_servers([], "smollm2-135m-instruct", Settings()) is None


def test_status_shows_how_busy_each_round_kept_the_server(store_dir: Path) -> None:
    from schemas.records import GenerationLoad
    from tasks.resources.store.rounds import Store
    from tests.support import factories

    store = Store(str(store_dir))
    factories.commit_round(store, [], [], [])  # committed before loads were recorded
    load = GenerationLoad(
        concurrency=4, started_at=1.0, wall_s=10.0, busy_fraction=0.625, prompt_tokens=1, completion_tokens=1
    )
    factories.commit_round(store, [], [], [], load=load)
    code, output = _invoke("status", "--store", str(store_dir))
    assert code == 0 and "62%" in output
    rows = [line.split() for line in output.splitlines() if line.startswith(("│ 1", "│ 2"))]
    assert [row[-2] for row in rows] == ["-", "62%"]
