"""The Hugging Face dataset folder and its card: loaded by `datasets`, parsed by `huggingface_hub`."""

import hashlib
import io
import json
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from schemas import BootstrapConfig, RoundManifest
from selfinstruct.cli import app
from tasks.round.seeds import DEFAULT_SEEDS
from tasks.training.card import Lineage, RoundLineage, read_lineage, render_card
from tasks.training.dataset import (
    COLUMNS,
    DatasetSpec,
    build_dataset_folder,
    build_splits,
    fingerprint_of_folder,
)
from tasks.training.export import ExportError
from tasks.training.templates import load_templates
from tests.support.factories import two_round_store, write_seed_file


def _load(folder: Path, cache: Path) -> "object":
    import datasets

    return datasets.load_dataset(str(folder), cache_dir=str(cache))


def test_dataset_folder_loads_with_datasets(tmp_path: Path) -> None:
    store = two_round_store(tmp_path / "store")
    spec = DatasetSpec(
        include_seeds=True, seeds_path=write_seed_file(tmp_path / "s.jsonl"), seed=3, validation_fraction=0.25
    )
    result = build_dataset_folder(store, spec, tmp_path / "dataset")

    loaded = _load(tmp_path / "dataset", tmp_path / "cache")
    assert set(loaded) == {"train", "validation"}  # type: ignore[call-overload]
    train, validation = loaded["train"], loaded["validation"]  # type: ignore[index]
    assert train.column_names == COLUMNS.names
    assert (train.num_rows, validation.num_rows) == (result.rows["train"], result.rows["validation"])
    assert train.num_rows + validation.num_rows == result.stats.rows == 26
    assert not set(train["instruction"]) & set(validation["instruction"])
    assert sorted(set(train["round"]) | set(validation["round"])) == [0, 1, 2]
    renders = {t.render("Give the plural of the noun.", "mouse") for t in load_templates()}
    mice = [row for split in (train, validation) for row in split if row["output"] == "mice"]
    assert len(mice) == 1 and mice[0]["completion"] == "mice" and mice[0]["prompt"] in renders
    assert result.fingerprint == fingerprint_of_folder(tmp_path / "dataset")
    assert set(result.files) == {
        "README.md",
        "data/train-00000-of-00001.parquet",
        "data/validation-00000-of-00001.parquet",
    }
    for name, sha in result.files.items():
        assert hashlib.sha256((tmp_path / "dataset" / name).read_bytes()).hexdigest() == sha


def test_split_and_bytes_are_seeded(tmp_path: Path) -> None:
    store = two_round_store(tmp_path / "store")
    first = build_dataset_folder(store, DatasetSpec(seed=1), tmp_path / "a")
    again = build_dataset_folder(store, DatasetSpec(seed=1), tmp_path / "b")
    assert first.fingerprint == again.fingerprint and first.files == again.files
    splits = {
        tuple(
            sorted(
                set(build_splits(store, DatasetSpec(seed=s)).tables["validation"]["instruction"].to_pylist())
            )
        )
        for s in range(5)
    }
    assert len(splits) > 1  # the seed picks the validation instructions


def test_large_splits_are_sharded(tmp_path: Path) -> None:
    store = two_round_store(tmp_path / "store")
    result = build_dataset_folder(store, DatasetSpec(validation_fraction=0.0, shard_rows=10), tmp_path / "ds")
    assert result.rows == {"train": 25}
    assert sorted(n for n in result.files if n.startswith("data/")) == [
        f"data/train-0000{i}-of-00003.parquet" for i in range(3)
    ]
    loaded = _load(tmp_path / "ds", tmp_path / "cache")
    assert list(loaded) == ["train"] and loaded["train"].num_rows == 25  # type: ignore[index,call-overload]


def test_card_header_parses_with_huggingface_hub(tmp_path: Path) -> None:
    from huggingface_hub import DatasetCard

    store = two_round_store(tmp_path / "store")
    result = build_dataset_folder(store, DatasetSpec(validation_fraction=0.25), tmp_path / "ds")
    card = DatasetCard.load(tmp_path / "ds" / "README.md")
    data = card.data.to_dict()
    assert data["license"] == "unknown"  # the test rounds did not grow from the shipped seeds
    assert data["task_categories"] == ["text-generation"] and data["language"] == ["en"]
    assert data["size_categories"] == ["n<1K"]
    assert data["configs"] == [
        {
            "config_name": "default",
            "data_files": [
                {"split": "train", "path": "data/train-*"},
                {"split": "validation", "path": "data/validation-*"},
            ],
        }
    ]
    info = data["dataset_info"]
    assert [f["name"] for f in info["features"]] == COLUMNS.names
    assert {s["name"]: s["num_examples"] for s in info["splits"]} == result.rows
    # The body: each round's manifest checksum, computed here from the file itself.
    for number in (1, 2):
        manifest = (tmp_path / "store" / "rounds" / f"round={number:05d}" / "manifest.json").read_bytes()
        assert hashlib.sha256(manifest).hexdigest() in card.text
    assert "`smollm2`" in card.text and "above 0.7" in card.text
    assert "No round of this dataset has an audit yet." in card.text

    licensed = build_dataset_folder(store, DatasetSpec(), tmp_path / "cc", license_id="cc-by-4.0")
    assert DatasetCard(licensed.card).data.license == "cc-by-4.0"


def _manifest(number: int, seeds_sha256: str, counts: dict[str, int], threshold: float) -> RoundManifest:
    return RoundManifest(
        round=number,
        run_id=f"run-{number}",
        created_at=datetime(2026, 11, number, tzinfo=UTC),
        model="gen-model",
        seeds_sha256=seeds_sha256,
        pool_size_before=175,
        counts=counts,
        config=BootstrapConfig(rouge_threshold=threshold),
        files={},
    )


def test_card_body_says_how_the_data_was_made(tmp_path: Path) -> None:
    from huggingface_hub import DatasetCard

    built = build_splits(two_round_store(tmp_path / "store"), DatasetSpec())
    shipped = hashlib.sha256(DEFAULT_SEEDS.read_bytes()).hexdigest()
    lineage = Lineage(
        [
            RoundLineage(
                _manifest(1, shipped, {"prompts": 8, "kept": 6, "rejected:instruction:too_short": 3}, 0.7),
                "a" * 64,
            ),
            RoundLineage(
                _manifest(
                    2,
                    shipped,
                    {"kept": 6, "rejected:instruction:too_short": 2, "rejected:dedup:rouge_l>0.7": 4},
                    0.6,
                ),
                "b" * 64,
            ),
        ]
    )
    text = render_card(built, DatasetSpec(), lineage)
    card = DatasetCard(text)
    assert card.data.license == "apache-2.0"  # grown from the shipped seeds
    assert "| instruction | `too_short` | 5 |" in card.text
    assert "| dedup | `rouge_l>0.7` | 4 |" in card.text
    assert "ROUGE-L threshold (rounds 1)" in card.text and "above 0.7" in card.text
    assert "ROUGE-L threshold (rounds 2)" in card.text and "above 0.6" in card.text
    assert "Generator model (rounds 1-2): `gen-model`" in card.text
    assert "Sampling for instructions (rounds 1-2): temperature 0.7; top_p 0.5" in card.text
    assert f"`{'a' * 64}`" in card.text and f"`{'b' * 64}`" in card.text


def test_audits_are_read_when_present_and_skipped_when_not(tmp_path: Path) -> None:
    store = two_round_store(tmp_path / "store")
    document = {
        "judge": "judge-model",
        "sample_size": 20,
        "rates": {"valid_instruction": 0.9, "correct": 0.55},
    }
    store.put_bytes("audits/round=00001/audit-a.json", json.dumps(document).encode())
    store.put_bytes("audits/round=00001/audit-b.json", b"{not json")  # newest, unreadable: skipped
    table = pa.table({"id": ["x", "y", "z", "w"], "valid_input": [True, True, False, None]})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    store.put_bytes("audits/round=00002/audit-c.parquet", sink.getvalue())

    lineage = read_lineage(store, [1, 2])
    first, second = (r.audit for r in lineage.rounds)
    assert first is not None and first.rates == {"valid_instruction": 0.9, "correct": 0.55}
    assert first.judge == "judge-model" and first.sample == 20
    assert second is not None and second.rates == {"valid_input": pytest.approx(2 / 3)}
    text = render_card(build_splits(store, DatasetSpec()), DatasetSpec(), lineage)
    assert "| 1 | judge-model | 20 | 55.0% | - | 90.0% | `audit-a.json` |" in text
    assert read_lineage(two_round_store(tmp_path / "other"), [1]).rounds[0].audit is None


def test_folder_targets(tmp_path: Path) -> None:
    store = two_round_store(tmp_path / "store")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match=r"busy: not empty \(notes\.txt\)"):
        build_dataset_folder(store, DatasetSpec(), tmp_path / "busy")
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        build_dataset_folder(store, DatasetSpec(), tmp_path / "file")
    with pytest.raises(ExportError, match="rounds 7 are not committed"):
        build_dataset_folder(store, DatasetSpec(rounds=[7]), tmp_path / "new")
    assert not (tmp_path / "new").exists()
    (tmp_path / "looks-like-one" / "data").mkdir(parents=True)
    (tmp_path / "looks-like-one" / "data" / "raw.csv").write_text("a,b")
    with pytest.raises(ExportError, match=r"not empty \(data/raw\.csv\)"):
        build_dataset_folder(store, DatasetSpec(), tmp_path / "looks-like-one")
    first = build_dataset_folder(store, DatasetSpec(rounds=[1]), tmp_path / "ds")
    again = build_dataset_folder(store, DatasetSpec(rounds=[2]), tmp_path / "ds")  # replaces its own export
    assert first.fingerprint != again.fingerprint == fingerprint_of_folder(tmp_path / "ds")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left


def test_export_to_folder_cli(tmp_path: Path) -> None:
    store = two_round_store(tmp_path / "store")
    runner = CliRunner()
    result = runner.invoke(app, ["export", "--to", str(tmp_path / "ds"), "--store", store.url])
    assert result.exit_code == 0, result.output
    assert "dataset card" in result.output
    assert (tmp_path / "ds" / "README.md").is_file()
    same = runner.invoke(app, ["export", "--format", "hf", str(tmp_path / "ds2"), "--store", store.url])
    assert same.exit_code == 0, same.output
    assert fingerprint_of_folder(tmp_path / "ds") == fingerprint_of_folder(tmp_path / "ds2")

    refused = {
        "--to x --format alpaca": ["--to", str(tmp_path / "x"), "--format", "alpaca"],
        "both": [str(tmp_path / "y.jsonl"), "--to", str(tmp_path / "x")],
        "push without hf": ["--push-to-hub", "me/data", str(tmp_path / "y.jsonl")],
        "license without hf": ["--license", "mit", str(tmp_path / "y.jsonl")],
        "hf into a .json name": ["--format", "hf", str(tmp_path / "y.json")],
        "nothing": [],
    }
    for case, args in refused.items():
        bad = runner.invoke(app, ["export", *args, "--store", store.url])
        assert bad.exit_code == 2, (case, bad.output)
        assert bad.output.lstrip().startswith("error: "), (case, bad.output)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y.jsonl").exists()
