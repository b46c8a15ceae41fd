"""`verify` is strict and `verify --clean` never deletes data (findings 3 and 4 of issue 15); `export` and
`finetune` refuse a tampered round; commands refuse a store that does not exist."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from selfinstruct.cli import app
from tasks.resources.store.rounds import Store
from tasks.round.verify import verify_store
from tests.support.factories import SEEDS, commit_texts
from tests.support.s3 import ACCESS_KEY, SECRET_KEY

runner = CliRunner()

TEXTS = [
    ["List three uses for a paperclip.", "Explain why the sky looks blue at noon."],
    ["Name two rivers that flow through Germany.", "Describe how a bicycle gear works."],
    ["Summarize the plot of a fairy tale you know.", "Give an example of a prime number above ninety."],
    ["Compare a violin with a cello in two sentences.", "Suggest a name for a small bakery."],
    ["Translate good morning into French and Spanish.", "Rank these fruits by sweetness: lemon, mango."],
]


def _store_with_rounds(path: Path, count: int) -> Store:
    store = Store(str(path))
    for texts in TEXTS[:count]:
        commit_texts(store, texts)
    return store


def _seeds_file(path: Path) -> Path:
    seeds = path / "seeds.jsonl"
    seeds.write_text("\n".join(task.model_dump_json() for task in SEEDS))
    return seeds


def _verify(store: Path, *extra: str) -> tuple[int, str]:
    result = runner.invoke(
        app, ["verify", "--store", str(store), "--seeds", str(_seeds_file(store.parent)), *extra]
    )
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def _dead_claim(store: Store, number: int) -> None:
    """An uncommitted round left by a run whose lease has expired."""
    folder = Path(store.round_dir(number))
    folder.mkdir(parents=True, exist_ok=True)
    claim = {
        "run_id": "gone",
        "host": "worker-pod-1",
        "pid": 1,
        "claimed_at": "2026-01-01T00:00:00+00:00",
        "lease_expires_at": "2026-01-01T00:03:00+00:00",
    }
    (folder / "claim-0001.json").write_text(json.dumps(claim))
    (folder / "completions").mkdir()
    (folder / "completions" / "part.parquet").write_bytes(b"cached")


def test_clean_never_deletes_a_round_that_committed_rounds_follow(tmp_path: Path) -> None:
    """Rounds 1-5 committed, round 2's manifest removed, round 6 left by a dead run: round 2 is a gap (a
    problem, untouched), round 6 is moved to quarantine, nothing is deleted."""
    root = tmp_path / "store"
    store = _store_with_rounds(root, 5)
    round2 = Path(store.round_dir(2))
    (round2 / "manifest.json").unlink()
    files_of_round2 = sorted(p.name for p in round2.iterdir())
    _dead_claim(store, 6)

    code, output = _verify(root, "--clean")
    assert code == 1
    assert "round 2 is not committed but rounds after it are (a gap)" in output
    assert sorted(p.name for p in round2.iterdir()) == files_of_round2
    assert not Path(store.round_dir(6)).exists()
    quarantined = list((root / "quarantine").glob("round=00006-*"))
    assert (
        len(quarantined) == 1 and (quarantined[0] / "completions" / "part.parquet").read_bytes() == b"cached"
    )
    assert "round 6 moved to" in output


def test_clean_leaves_a_live_round_and_takes_an_empty_claim_file(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = _store_with_rounds(root, 1)
    live = Store(str(root))
    assert live.claim_next_round("live-run") == 2
    try:
        code, output = _verify(root, "--clean")
        assert code == 0 and "nothing moved (claims still live)" in output
        assert Path(store.round_dir(2)).exists()
    finally:
        live.end_claim(2, release=False)
    (Path(store.round_dir(2)) / "claim-0001.json").write_bytes(b"")
    code, output = _verify(root, "--clean")
    assert code == 0 and "round 2 moved to" in output, output


def _rewrite_manifest(store: Store, number: int, change: Callable[[dict], None]) -> None:
    path = Path(store.round_dir(number)) / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _drop_file(store: Store, name: str) -> Callable[[dict], None]:
    def change(manifest: dict) -> None:
        del manifest["files"][name]
        (Path(store.round_dir(1)) / name).unlink()

    return change


def _all_files_gone(store: Store) -> Callable[[dict], None]:
    def change(manifest: dict) -> None:
        for name in manifest["files"]:
            (Path(store.round_dir(1)) / name).unlink()
        manifest["files"] = {}

    return change


def _bump(key: str) -> Callable[[dict], None]:
    def change(manifest: dict) -> None:
        manifest["counts"][key] = manifest["counts"].get(key, 0) + 1

    return change


@pytest.mark.parametrize(
    ("tamper", "finding"),
    [
        ("rejected:instruction:too_short", "count rejected:instruction:too_short=2 but the files give 1"),
        ("rejected:dedup:rouge_l>0.7", "count rejected:dedup:rouge_l>0.7=1 but the files give 0"),
        ("classification", "count classification=2 but the files give 1"),
        ("prompts", "count prompts=2 but the files give 1"),
        ("generated", "count generated=4 but the files give 3"),
        ("drop instances", "instances.parquet is not in the manifest"),
        ("drop everything", "instructions.parquet is not in the manifest"),
    ],
)
def test_verify_checks_every_count_and_the_set_of_files(tmp_path: Path, tamper: str, finding: str) -> None:
    root = tmp_path / "store"
    store = _store_with_rounds(root, 1)
    assert verify_store(store, SEEDS).ok
    change = {
        "drop instances": _drop_file(store, "instances.parquet"),
        "drop everything": _all_files_gone(store),
    }.get(tamper) or _bump(tamper)
    _rewrite_manifest(store, 1, change)
    code, output = _verify(root)
    assert code == 1 and finding in output, output


def _inject_row(store: Store) -> None:
    """Replace round 1's instructions with a valid Parquet file holding one more, injected row."""
    path = Path(store.round_dir(1)) / "instructions.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    rows.append({**rows[0], "id": "r00001-99999", "instruction": "Injected instruction."})
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), buffer)
    path.write_bytes(buffer.getvalue())


def test_export_and_finetune_refuse_a_tampered_round(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = _store_with_rounds(root, 2)
    _inject_row(store)
    out = tmp_path / "export.jsonl"
    for args in (["export", str(out)], ["finetune", "--dry-run"]):
        result = runner.invoke(app, [*args, "--store", str(root)])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2, result.output
        assert len(lines) == 1 and lines[0].startswith("error: round 1: instructions.parquet does not match")
    assert not out.exists()
    code, output = _verify(root)
    assert code == 1 and "round 1: instructions.parquet checksum differs from the manifest" in output


def test_export_to_a_folder_is_one_line(tmp_path: Path) -> None:
    root = tmp_path / "store"
    _store_with_rounds(root, 1)
    result = runner.invoke(app, ["export", str(tmp_path), "--store", str(root)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output


def test_commands_refuse_a_store_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "mistyped"
    for args in (["status"], ["verify"], ["export", str(tmp_path / "x.jsonl")], ["unlock", "--round", "1"]):
        result = runner.invoke(app, [*args, "--store", str(missing)])
        assert result.exit_code == 2, (args, result.output)
        assert result.output.startswith(f"error: store {missing}: no such store"), result.output
    assert not missing.exists()


def test_commands_refuse_a_missing_bucket(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    admin = boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY
    )
    monkeypatch.setenv("SELFINSTRUCT_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("SELFINSTRUCT_S3_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("SELFINSTRUCT_S3_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for command in ("status", "verify", "run"):
        result = runner.invoke(app, [command, "--store", "s3://no-such-bucket/x"])
        assert result.exit_code == 2, result.output
        assert result.output.startswith(
            "error: store s3://no-such-bucket/x: bucket 'no-such-bucket' does not exist"
        )
    assert "no-such-bucket" not in [b["Name"] for b in admin.list_buckets()["Buckets"]]
