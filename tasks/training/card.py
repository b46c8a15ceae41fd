"""The dataset card (README.md) of an exported dataset folder: the YAML header the Hub reads, then how the
data was made, from the rounds' manifests.

The header holds `configs` (data files per split), `dataset_info` (features, split sizes), `license`,
`task_categories`, `language`, `size_categories` and `tags`. The body lists the rounds with the sha256 of
their manifest.json, the generator model and sampling, the filters and their rejection counts per reason, the
ROUGE-L threshold, what the export dropped, and audit rates where an audit of a round exists.

`read_lineage` reads the store; everything else is pure.
"""

import hashlib
import io
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import yaml

from schemas import RoundManifest, SamplingParams
from tasks.resources.store.layout import MANIFEST
from tasks.resources.store.rounds import Store

if TYPE_CHECKING:
    from tasks.training.dataset import BuiltSplits, DatasetSpec

AUDITS = "audits"
# Hub ids: https://huggingface.co/docs/hub/datasets-cards (task_categories, size_categories).
TASK_CATEGORIES = ["text-generation"]
LANGUAGE = ["en"]
TAGS = ["self-instruct", "synthetic", "instruction-tuning"]
_SIZE_BOUNDS = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")]
_ARROW_DTYPES = {pa.string(): "string", pa.bool_(): "bool", pa.int64(): "int64", pa.float64(): "float64"}
_SAMPLING_STAGES = (
    ("instructions", "instruction_sampling"),
    ("classification", "classify_sampling"),
    ("instances", "instance_sampling"),
)


@dataclass(frozen=True)
class AuditRates:
    """What the card shows of one round's newest audit: named rates in [0, 1], and how it was judged."""

    source: str
    rates: dict[str, float]
    sample: int | None = None
    judge: str | None = None


@dataclass(frozen=True)
class RoundLineage:
    """One committed round as the card describes it."""

    manifest: RoundManifest
    manifest_sha256: str
    audit: AuditRates | None = None


@dataclass(frozen=True)
class Lineage:
    """Every round a dataset was built from."""

    rounds: list[RoundLineage] = field(default_factory=list)


# -- reading --------------------------------------------------------------------------------------------


def read_lineage(store: Store, rounds: list[int]) -> Lineage:
    """Manifests (with the sha256 of their bytes) and audits of the given committed rounds."""
    return Lineage(
        [
            RoundLineage(
                manifest=store.read_manifest(number),
                manifest_sha256=store.file_checksum(number, MANIFEST),
                audit=read_audit(store, number),
            )
            for number in rounds
        ]
    )


def read_audit(store: Store, number: int) -> AuditRates | None:
    """The newest audit of a round under audits/round=NNNNN/, or None when there is none or it is unreadable.

    Audits are written by another part of the project; this reads them defensively: a JSON file's `rates`
    object (or its top-level numbers between 0 and 1 named like a rate), else the share of true values in
    each boolean column of a Parquet file.
    """
    folder = f"{AUDITS}/round={number:05d}"
    try:
        names = store.list_names(folder)
    except Exception:  # no such area in this store's layout, or unreadable: no audit to show
        return None
    for name in sorted(names, reverse=True):
        try:
            data = store.get_bytes(f"{folder}/{name}")
            found = _rates_from_json(name, data) if name.endswith(".json") else None
            if found is None and name.endswith(".parquet"):
                found = _rates_from_parquet(name, data)
        except Exception:
            continue
        if found is not None and found.rates:
            return found
    return None


def _is_rate(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def _rates_from_json(name: str, data: bytes) -> AuditRates | None:
    document = json.loads(data)
    if not isinstance(document, dict):
        return None
    rates_obj = document.get("rates")
    if isinstance(rates_obj, dict):
        rates = {str(k): float(v) for k, v in rates_obj.items() if _is_rate(v)}
    else:
        rates = {
            str(k): float(v)
            for k, v in document.items()
            if _is_rate(v) and any(word in str(k) for word in ("rate", "valid", "correct", "appropriate"))
        }
    sample = document.get("sample_size", document.get("sample"))
    judge = document.get("judge_model", document.get("judge"))
    return AuditRates(
        source=name,
        rates=rates,
        sample=sample if isinstance(sample, int) and not isinstance(sample, bool) else None,
        judge=judge if isinstance(judge, str) else None,
    )


def _rates_from_parquet(name: str, data: bytes) -> AuditRates | None:
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(data))
    rates = {}
    for column in table.column_names:
        if table.schema.field(column).type == pa.bool_():
            values = [v for v in table.column(column).to_pylist() if v is not None]
            if values:
                rates[column] = sum(values) / len(values)
    return AuditRates(source=name, rates=rates, sample=table.num_rows)


# -- the header -----------------------------------------------------------------------------------------


def size_category(rows: int) -> str:
    """The Hub's size bucket for a row count."""
    for bound, name in _SIZE_BOUNDS:
        if rows < bound:
            return name
    return "n>1M"


def license_for(lineage: Lineage, license_id: str | None) -> str:
    """The card's license: as given, else the shipped seeds' when every round grew from them, else unknown."""
    from tasks.round.seeds import DEFAULT_SEEDS, SEEDS_LICENSE

    if license_id:
        return license_id
    shipped = hashlib.sha256(DEFAULT_SEEDS.read_bytes()).hexdigest()
    seeds = {r.manifest.seeds_sha256 for r in lineage.rounds}
    return SEEDS_LICENSE if seeds == {shipped} else "unknown"


def header(built: "BuiltSplits", license_id: str) -> dict[str, Any]:
    """The card's YAML metadata, in the shape the Hub and `datasets` read."""
    first = next(iter(built.tables.values()))
    sizes = {name: table.nbytes for name, table in built.tables.items()}
    return {
        "pretty_name": "Self-Instruct data from selfinstruct",
        "license": license_id,
        "language": LANGUAGE,
        "task_categories": TASK_CATEGORIES,
        "size_categories": [size_category(sum(t.num_rows for t in built.tables.values()))],
        "tags": TAGS,
        "configs": [
            {
                "config_name": "default",
                "data_files": [{"split": name, "path": f"data/{name}-*"} for name in built.tables],
            }
        ],
        "dataset_info": {
            "features": [
                {"name": f.name, "dtype": _ARROW_DTYPES[f.type]}
                for f in first.schema  # one owner: COLUMNS
            ],
            "splits": [
                {"name": name, "num_bytes": sizes[name], "num_examples": table.num_rows}
                for name, table in built.tables.items()
            ],
            "dataset_size": sum(sizes.values()),
        },
    }


# -- the body -------------------------------------------------------------------------------------------


def _table(columns: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def _sampling(params: SamplingParams) -> str:
    parts = [
        f"temperature {params.temperature:g}",
        f"top_p {params.top_p:g}",
        f"max_tokens {params.max_tokens}",
        f"presence_penalty {params.presence_penalty:g}",
        f"frequency_penalty {params.frequency_penalty:g}",
    ]
    if params.stop:
        parts.append("stop " + ", ".join(json.dumps(s) for s in params.stop))
    return "; ".join(parts)


def _grouped(values: list[tuple[int, str]]) -> list[tuple[str, str]]:
    """(rounds, value) pairs for values shared by several rounds, so identical settings print once."""
    from tasks.training.export import format_rounds

    by_value: dict[str, list[int]] = {}
    for number, value in values:
        by_value.setdefault(value, []).append(number)
    return [(format_rounds(numbers), value) for value, numbers in by_value.items()]


def _rounds_section(lineage: Lineage) -> list[str]:
    rows = []
    for entry in lineage.rounds:
        m = entry.manifest
        rejected = sum(v for k, v in m.counts.items() if k.startswith("rejected:"))
        rows.append(
            [
                m.round,
                m.created_at.strftime("%Y-%m-%d %H:%M:%S UTC"),
                f"`{m.model}`",
                m.counts.get("prompts", "-"),
                m.counts.get("kept", 0),
                m.counts.get("instances", 0),
                rejected,
                f"`{entry.manifest_sha256}`",
            ]
        )
    columns = ["round", "committed", "generator", "prompts", "kept", "instances", "rejected"]
    return [
        "### Rounds",
        "",
        "Each round's manifest.json lists its files with their sha256; the checksum below is of the manifest "
        "itself, so it pins every file of the round.",
        "",
        *_table([*columns, "manifest.json sha256"], rows),
        "",
    ]


def _generation_section(lineage: Lineage) -> list[str]:
    lines = ["### Generation", ""]
    for rounds, model in _grouped([(r.manifest.round, r.manifest.model) for r in lineage.rounds]):
        lines.append(f"- Generator model (rounds {rounds}): `{model}`")
    for stage, attribute in _SAMPLING_STAGES:
        for rounds, text in _grouped(
            [(r.manifest.round, _sampling(getattr(r.manifest.config, attribute))) for r in lineage.rounds]
        ):
            lines.append(f"- Sampling for {stage} (rounds {rounds}): {text}")
    for rounds, text in _grouped(
        [
            (
                r.manifest.round,
                f"{r.manifest.config.num_in_context} in-context instructions, "
                f"{r.manifest.config.num_machine_in_context} of them machine-generated; base seed "
                f"{r.manifest.config.seed}",
            )
            for r in lineage.rounds
        ]
    ):
        lines.append(f"- Prompts (rounds {rounds}): {text}")
    for rounds, sha in _grouped([(r.manifest.round, r.manifest.seeds_sha256) for r in lineage.rounds]):
        lines.append(f"- Seed file sha256 (rounds {rounds}): `{sha}`")
    return [*lines, ""]


def _filters_section(lineage: Lineage) -> list[str]:
    lines = ["### Filters", ""]
    for rounds, text in _grouped(
        [
            (
                r.manifest.round,
                f"more than {r.manifest.config.min_words} and at most {r.manifest.config.max_words} words; "
                f"blacklist (whole words): {', '.join(r.manifest.config.blacklist) or 'none'}; "
                f"instance fields at most {r.manifest.config.max_field_chars} characters; "
                f"at most {r.manifest.config.max_instances} instances per instruction",
            )
            for r in lineage.rounds
        ]
    ):
        lines.append(f"- Instruction and instance filters (rounds {rounds}): {text}")
    for rounds, threshold in _grouped(
        [(r.manifest.round, f"{r.manifest.config.rouge_threshold:g}") for r in lineage.rounds]
    ):
        lines.append(
            f"- ROUGE-L threshold (rounds {rounds}): a candidate is rejected when its ROUGE-L F against any "
            f"instruction already in the pool (seeds and earlier rounds) is above {threshold}"
        )
    reasons: Counter[tuple[str, str]] = Counter()
    for r in lineage.rounds:
        for key, value in r.manifest.counts.items():
            if key.startswith("rejected:"):
                _, stage, reason = [*key.split(":", 2), "", ""][:3]
                reasons[(stage, reason)] += value
    lines += ["", "Rejections over these rounds, per stage and reason:", ""]
    rows = [[stage, f"`{reason}`", count] for (stage, reason), count in sorted(reasons.items())]
    lines += _table(["stage", "reason", "count"], rows) if rows else ["None."]
    return [*lines, ""]


def _export_section(built: "BuiltSplits", spec: "DatasetSpec") -> list[str]:
    stats = built.stats
    seeds = "included as round 0" if spec.include_seeds else "not included"
    return [
        "### Export",
        "",
        f"- Seed tasks: {seeds}" + (f" (sha256 `{built.seeds_sha256}`)" if built.seeds_sha256 else ""),
        f"- Instances read: {stats.instances_read}; at most {spec.max_instances} per instruction "
        f"({stats.over_cap} left out); {stats.empty_output} with an empty output and {stats.duplicates} "
        f"duplicates (same instruction, input and output up to case and spacing) dropped",
        f"- Shuffled, templates picked and the split drawn with seed {spec.seed}; validation holds about "
        f"{spec.validation_fraction:.0%} of the instructions"
        + (
            f" (at most {spec.validation_max_instructions})"
            if spec.validation_max_instructions is not None
            else ""
        )
        + ", none of which appears in train",
        "",
    ]


def _audit_section(lineage: Lineage) -> list[str]:
    lines = ["### Audit", ""]
    if all(r.audit is None for r in lineage.rounds):
        return [*lines, "No round of this dataset has an audit yet.", ""]
    audits = [(r.manifest.round, r.audit) for r in lineage.rounds if r.audit is not None]
    names = sorted({name for _, audit in audits for name in audit.rates})
    rows = []
    for number, audit in audits:
        rows.append(
            [
                number,
                audit.judge or "-",
                audit.sample if audit.sample is not None else "-",
                *(f"{audit.rates[n]:.1%}" if n in audit.rates else "-" for n in names),
                f"`{audit.source}`",
            ]
        )
    lines.append("Share of a judged sample of each round's instructions that passed each check:")
    return [*lines, "", *_table(["round", "judge", "sample", *names, "file"], rows), ""]


def _contents_section(built: "BuiltSplits") -> list[str]:
    from tasks.training.dataset import COLUMN_DOCS

    rows = [[name, t.num_rows, built.instructions[name]] for name, t in built.tables.items()]
    sources = ", ".join(
        f"{'seeds' if source == 'seeds' else 'round ' + source}: {count}"
        for source, count in built.stats.rows_per_source.items()
    )
    return [
        "## Contents",
        "",
        *_table(["split", "rows", "instructions"], rows),
        "",
        f"Rows per source: {sources}.",
        "",
        *[f"- `{name}`: {text}" for name, text in COLUMN_DOCS.items()],
        "",
    ]


def render_card(
    built: "BuiltSplits", spec: "DatasetSpec", lineage: Lineage, license_id: str | None = None
) -> str:
    """The README.md of a dataset folder: YAML header, then contents and lineage in Markdown."""
    from tasks.training.export import format_rounds

    chosen = license_for(lineage, license_id)
    total = sum(t.num_rows for t in built.tables.values())
    meta = yaml.safe_dump(header(built, chosen), sort_keys=False, allow_unicode=True, width=1000)
    if license_id:
        seeds_note = f"License: {chosen}."
    elif chosen == "unknown":
        seeds_note = (
            "The rounds did not grow from the seed tasks shipped with selfinstruct, so the license of their "
            "seeds is unknown here; give it with `selfinstruct export --license`."
        )
    else:
        seeds_note = (
            "The seed tasks were written by the selfinstruct team and ship under Apache-2.0 "
            "(seeds/README.md); the data grown from them carries that license."
        )
    body = [
        "# Self-Instruct data from selfinstruct",
        "",
        f"{total} instruction-following examples made by the Self-Instruct bootstrap (Wang et al., 2022, "
        f"arXiv:2212.10560) over rounds {format_rounds(built.rounds)}: a language model wrote new "
        "instructions from in-context examples, which were filtered, deduplicated by ROUGE-L against the "
        "growing pool, classified, and given input/output instances by the same model. " + seeds_note,
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        'dataset = load_dataset("path/to/this/folder")  # or the Hub repository id',
        "```",
        "",
        *_contents_section(built),
        "## How the data was made",
        "",
        *_rounds_section(lineage),
        *_generation_section(lineage),
        *_filters_section(lineage),
        *_export_section(built, spec),
        *_audit_section(lineage),
        "## Limitations",
        "",
        "Machine-generated and unreviewed unless an audit above says otherwise: instructions can be vague "
        "and outputs wrong. Use it to study or bootstrap instruction tuning, not as ground truth.",
    ]
    return f"---\n{meta}---\n\n" + "\n".join(body) + "\n"
