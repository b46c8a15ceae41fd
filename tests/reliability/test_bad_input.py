"""Bad input: one clear line, a non-zero exit, and nothing written. (tests/selfinstruct/test_cli.py has the
first cases of each kind; these are the ones it lacks.) Then adversarial model output against every parser.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from schemas import BootstrapConfig, CompletionRecord, Settings
from selfinstruct.cli import app
from tasks.resources.processes import free_port
from tasks.round.classify import parse_classification
from tasks.round.generate import parse_instructions
from tasks.round.instances import parse_instances
from tasks.round.records import PromptPlan, collect_candidates, collect_instances
from tasks.round.seeds import DEFAULT_SEEDS
from tests.support import factories
from tests.support.fake_openai import FakeOpenAI, FaultConfig
from tests.support.model_like import ModelLikeFake
from tests.support.processes import moto_process
from tests.support.s3 import ACCESS_KEY, SECRET_KEY

runner = CliRunner()


def _fails_cleanly(*args: str, code: int = 2) -> str:
    """Run the CLI; it must exit with `code` after one line that is not a traceback. Returns the line."""
    result = runner.invoke(app, list(args))
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.fixture
def store_dir(tmp_path: Path) -> Iterator[Path]:
    """A store folder that every failing command must leave uncreated."""
    path = tmp_path / "store"
    yield path
    assert not path.exists(), "a failing command wrote into the store"


@pytest.fixture
def llm() -> Iterator[str]:
    """A well-behaved fake LLM server, so that only the input under test is bad."""
    with ModelLikeFake() as fake:
        yield fake.url


# -- seed files, configs, arguments ---------------------------------------------------------------------


def _seed_lines(count: int = 5) -> list[dict[str, Any]]:
    return [json.loads(line) for line in DEFAULT_SEEDS.read_text().splitlines()[:count]]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "no seed tasks"),
        (b"\n\n  \n", "no seed tasks"),
        (b'{"id": "x"}\n\xff\xfe\n', ":2: not UTF-8 text"),
        (b"[1, 2]\n", ":1: field '<record>'"),
        ("DUP_ID", ":3: field 'id': duplicate of line 1"),
        ("BAD_TYPE", ":2: field 'is_classification'"),
        ("NO_INSTANCES", ":1: field 'instances'"),
    ],
)
def test_malformed_seed_files(
    tmp_path: Path, store_dir: Path, llm: str, content: bytes | str, message: str
) -> None:
    records = _seed_lines()
    if content == "DUP_ID":
        records[2]["id"] = records[0]["id"]
    elif content == "BAD_TYPE":
        records[1]["is_classification"] = "maybe"
    elif content == "NO_INSTANCES":
        records[0]["instances"] = []
    data = content if isinstance(content, bytes) else "\n".join(json.dumps(r) for r in records).encode()
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_bytes(data)
    line = _fails_cleanly("run", "--seeds", str(seeds), "--store", str(store_dir), "--llm-url", llm)
    assert str(seeds) in line and message in line


def test_seed_path_missing_or_a_folder(tmp_path: Path, store_dir: Path, llm: str) -> None:
    for path in (tmp_path / "absent.jsonl", tmp_path):
        line = _fails_cleanly("run", "--seeds", str(path), "--store", str(store_dir), "--llm-url", llm)
        assert f"{path}: cannot read" in line


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "expected a JSON object of BootstrapConfig fields"),
        ('{"instruction_sampling": {"max_tokens": "many"}}', "field 'instruction_sampling.max_tokens'"),
        ('{"instruction_sampling": {"top_q": 5}}', "field 'instruction_sampling.top_q': Extra inputs"),
        ('{"prompts_per_round": -3}', "field 'prompts_per_round'"),
        ('{"blacklist": "image"}', "field 'blacklist'"),
        ("", "invalid JSON"),
    ],
)
def test_malformed_configs(tmp_path: Path, store_dir: Path, llm: str, text: str, message: str) -> None:
    config = tmp_path / "round.json"
    config.write_text(text)
    line = _fails_cleanly("run", "--config", str(config), "--store", str(store_dir), "--llm-url", llm)
    assert message in line


def test_config_file_missing(tmp_path: Path, store_dir: Path, llm: str) -> None:
    missing = tmp_path / "nope.json"
    line = _fails_cleanly("run", "--config", str(missing), "--store", str(store_dir), "--llm-url", llm)
    assert f"{missing}: cannot read" in line


@pytest.mark.parametrize(
    "args",
    [
        ("run", "--prompts", "0"),
        ("run", "--rounds", "many"),
        ("run", "--rounds", "1001"),
        ("run", "--no-such-option"),
        ("verify", "--clean", "yes"),
    ],
)
def test_bad_arguments(store_dir: Path, args: tuple[str, ...]) -> None:
    """Click's own usage errors: exit 2 with a usage box, before any of our code runs."""
    result = runner.invoke(app, [*args, "--store", str(store_dir)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output


# -- store URLs and S3 credentials ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://Bad_Bucket/x", "'Bad_Bucket' is not a valid S3 bucket name"),
        ("s3://", "is not a valid S3 bucket name"),
        ("http://example.com/store", "unsupported scheme 'http'"),
    ],
)
def test_bad_store_urls(url: str, message: str) -> None:
    for command in ("run", "status", "verify"):
        assert message in _fails_cleanly(command, "--store", url)


def test_store_path_that_is_a_file(tmp_path: Path) -> None:
    occupied = tmp_path / "store"
    occupied.write_text("not a folder")
    for command in ("status", "verify"):
        line = _fails_cleanly(command, "--store", str(occupied))
        assert f"store {occupied}: cannot read it" in line
    assert occupied.read_text() == "not a folder"


@pytest.fixture
def no_ambient_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No AWS credentials anywhere botocore looks: variables, files, instance metadata."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def test_s3_store_without_credentials(
    s3_endpoint: str, no_ambient_aws: None, monkeypatch: pytest.MonkeyPatch, llm: str
) -> None:
    """moto accepts any credentials by default, but botocore refuses to send a request with none."""
    admin = boto3.client(
        "s3", endpoint_url=s3_endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY
    )
    admin.create_bucket(Bucket="no-credentials")
    monkeypatch.setenv("SELFINSTRUCT_S3_ENDPOINT_URL", s3_endpoint)
    for command in ("run", "status"):
        extra = ["--llm-url", llm] if command == "run" else []
        line = _fails_cleanly(command, "--store", "s3://no-credentials/x", *extra)
        assert "cannot read it (NoCredentialsError: Unable to locate credentials)" in line
    assert admin.list_objects_v2(Bucket="no-credentials")["KeyCount"] == 0


def test_s3_store_with_wrong_credentials(
    no_ambient_aws: None, monkeypatch: pytest.MonkeyPatch, llm: str
) -> None:
    """moto checks signatures only in its IAM mode (INITIAL_NO_AUTH_ACTION_COUNT): the first three
    requests set up a user with a key, a policy and a bucket, every later one must be signed by that key."""
    with moto_process(env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"}) as moto:
        iam = boto3.client(
            "iam", endpoint_url=moto.url, aws_access_key_id="setup", aws_secret_access_key="setup"
        )
        iam.create_user(UserName="writer")
        key = iam.create_access_key(UserName="writer")["AccessKey"]
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="writer", PolicyName="all", PolicyDocument=json.dumps(policy))
        admin = moto.client(key["AccessKeyId"], key["SecretAccessKey"])
        admin.create_bucket(Bucket="guarded")
        monkeypatch.setenv("SELFINSTRUCT_S3_ENDPOINT_URL", moto.url)
        store = "s3://guarded/x"
        wrong_secret = "wrong-secret-5f2e8d"
        for key_id, secret, reason in (
            (key["AccessKeyId"], wrong_secret, "signature we calculated does not match"),
            ("AKIAUNKNOWN000000000", wrong_secret, "Access Key Id you provided does not exist"),
        ):
            monkeypatch.setenv("SELFINSTRUCT_S3_ACCESS_KEY_ID", key_id)
            monkeypatch.setenv("SELFINSTRUCT_S3_SECRET_ACCESS_KEY", secret)
            for command in ("run", "status"):
                extra = ["--llm-url", llm] if command == "run" else []
                line = _fails_cleanly(command, "--store", store, *extra)
                assert "cannot read it (PermissionError" in line and reason in line
                assert secret not in line and key["SecretAccessKey"] not in line
        assert admin.list_objects_v2(Bucket="guarded")["KeyCount"] == 0
        # The right key works, so the failures above were the credentials' doing.
        monkeypatch.setenv("SELFINSTRUCT_S3_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("SELFINSTRUCT_S3_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        result = runner.invoke(app, ["status", "--store", store])
        assert result.exit_code == 0 and "no committed rounds" in result.output, result.output


# -- the LLM server -------------------------------------------------------------------------------------


def test_unreachable_llm_server(store_dir: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    line = _fails_cleanly("run", "--store", str(store_dir), "--llm-url", url)
    assert line == f"error: LLM server {url} is unreachable (ClientConnectorError)"


def test_llm_url_that_is_not_a_url(store_dir: Path) -> None:
    line = _fails_cleanly("run", "--store", str(store_dir), "--llm-url", "localhost-8000")
    assert line == "error: LLM URL 'localhost-8000': expected http(s)://host[:port]/v1"


def test_model_the_server_does_not_have(store_dir: Path) -> None:
    """Like vLLM, the server answers 404 for a model it does not serve; the preflight reports it."""
    with FakeOpenAI(models=("known",)) as fake:
        line = _fails_cleanly("run", "--store", str(store_dir), "--llm-url", fake.url)
        assert "(HTTP 404): The model `smollm2-135m-instruct` does not exist." in line
        assert fake.requests == 1


def test_wrong_api_key(store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SELFINSTRUCT_API_KEY", "sk-wrong-3c9d1e")
    with FakeOpenAI(api_key="sk-right-77aa01") as fake:
        line = _fails_cleanly("run", "--store", str(store_dir), "--llm-url", fake.url)
    assert "(HTTP 401): Incorrect API key provided." in line
    assert "sk-wrong-3c9d1e" not in line and "sk-right-77aa01" not in line


def test_400_from_the_server_is_shown(store_dir: Path) -> None:
    faults = FaultConfig(script=deque(["400"]))
    with FakeOpenAI(faults=faults) as fake:
        line = _fails_cleanly("run", "--store", str(store_dir), "--llm-url", fake.url)
    assert "(HTTP 400): Invalid request: this is the fake server's 400 message" in line


def test_flaky_server_passes_the_preflight(tmp_path: Path) -> None:
    """A 500 or 429 on the one-token check is the retries' business, not a reason to refuse the run."""
    from selfinstruct.cli import check_llm_servers

    for fault in ("500", "429", "malformed"):
        faults = FaultConfig(script=deque([fault]))
        with FakeOpenAI(faults=faults) as fake:
            check_llm_servers([fake.url], "any-model", Settings(store_url=str(tmp_path)))
            assert fake.faults_injected[fault] == 1


# -- adversarial model output ---------------------------------------------------------------------------

FRAGMENTS = (
    "\n",
    "\n\n",
    "\r\n",
    " ",
    "\t",
    "1.",
    "9.",
    "10.",
    "10)",
    "10:",
    "3.5",
    "Input:",
    "Output:",
    "input :",
    "Class label:",
    "Label:",
    "Example 1",
    "Example #2:",
    "None",
    "N/A",
    "<noinput>",
    "Task:",
    "Is it classification?",
    "Yes",
    "No",
    "yes.",
    "\x00",
    "\u2028",
    "\ufeff",
    "\ud800",
    "{instruction}",
    "{{ __import__('os').system('id') }}",
    "../../etc/passwd",
    "é",
    "中文",
    "😀",
    ":",
    "-",
    "Write a program",
    "image",
    "x" * 300,
)
model_text = st.one_of(
    st.text(),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=12)), max_size=40).map("".join),
)
finish_reasons = st.sampled_from([None, "stop", "length", "abort", ""])
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _completion(i: int, text: str, finish: str | None, stage: Any) -> CompletionRecord:
    return factories.completion(text, key=f"k{i}", stage=stage, prompt=f"p{i}", finish_reason=finish)


@FUZZ
@given(text=model_text, first=st.integers(0, 10_000), finish=finish_reasons)
def test_parse_instructions_takes_anything(text: str, first: int, finish: str | None) -> None:
    items = parse_instructions(text, first, finish)
    assert all(isinstance(i, str) and i and i == i.strip() for i in items)


@FUZZ
@given(text=model_text)
def test_parse_classification_takes_anything(text: str) -> None:
    assert isinstance(parse_classification(text), bool)


@FUZZ
@given(text=model_text, is_classification=st.booleans(), finish=finish_reasons)
def test_parse_instances_takes_anything(text: str, is_classification: bool, finish: str | None) -> None:
    pairs = parse_instances(text, is_classification, finish)
    assert all(isinstance(i, str) and isinstance(o, str) for i, o in pairs)


@FUZZ
@given(outputs=st.lists(st.tuples(model_text, finish_reasons), min_size=1, max_size=4))
def test_every_generated_instruction_is_kept_or_rejected_with_a_reason(
    outputs: list[tuple[str, str | None]],
) -> None:
    config = BootstrapConfig()
    plans = [PromptPlan(i, f"p{i}", ["seed_task_0"], 9) for i in range(len(outputs))]
    completions = [_completion(i, t, f, "instruction") for i, (t, f) in enumerate(outputs)]
    candidates, rejected = collect_candidates(plans, completions, config, 1)
    assert all(r.reason for r in rejected)
    for completion in completions:
        parsed = parse_instructions(completion.text, 9, completion.finish_reason)
        kept = [c.text for c in candidates if c.completion.key == completion.key]
        dropped = [r for r in rejected if r.request_key == completion.key]
        if parsed:
            assert sorted(kept + [r.text for r in dropped]) == sorted(parsed)
        else:
            assert not kept and [r.reason for r in dropped] == ["unparseable"]


@FUZZ
@given(outputs=st.lists(st.tuples(model_text, st.booleans(), finish_reasons), min_size=1, max_size=4))
def test_every_generated_instance_is_kept_or_rejected_with_a_reason(
    outputs: list[tuple[str, bool, str | None]],
) -> None:
    config = BootstrapConfig()
    accepted = [
        factories.instruction(
            1,
            i,
            f"Task number {i} of the fuzz test.",
            request_key=f"g{i}",
            in_context_ids=[],
            avg_similarity=0.0,
            is_classification=is_classification,
        )
        for i, (_, is_classification, _) in enumerate(outputs)
    ]
    completions = [_completion(i, t, f, "instance") for i, (t, _, f) in enumerate(outputs)]
    kept, instances, rejected = collect_instances(accepted, completions, config, 1)
    assert all(r.reason for r in rejected)
    for record, completion in zip(accepted, completions, strict=True):
        pairs = parse_instances(completion.text, bool(record.is_classification), completion.finish_reason)
        mine = [i for i in instances if i.instruction_id == record.id]
        dropped = [r for r in rejected if r.request_key == completion.key and r.reason != "no_valid_instance"]
        assert len(mine) + len(dropped) == len(pairs)
        given_up = [
            r for r in rejected if r.request_key == completion.key and r.reason == "no_valid_instance"
        ]
        assert (record in kept) != bool(given_up) and (record in kept) == bool(mine)
