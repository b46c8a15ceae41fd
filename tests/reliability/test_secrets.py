"""Secrets stay secret, paths stay inside the store, and model output stays data.

A real round (the CLI as its own process, an LLM server that requires an API key, an S3 store on moto with
credentials), then every place a secret could end up is searched: every object of the bucket, Prefect's
flow-run parameters, logs, artifacts and events through its API, the Prefect database and home folder on
disk, and everything the CLI printed.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import boto3
import pytest
from typer.testing import CliRunner

from flows.bootstrap import bootstrap_round
from schemas import BootstrapConfig, RoundParams, SamplingParams, Settings
from selfinstruct.cli import app
from tasks.resources.llm.client import OpenAICompletionClient
from tasks.resources.llm.protocol import LLMError
from tasks.resources.processes import free_port
from tasks.resources.redact import redact_url
from tasks.resources.store.files import StoreError
from tasks.resources.store.records import records_to_table
from tasks.resources.store.rounds import Store
from tests.support.checks import assert_store_sound
from tests.support.fake_openai import Fault
from tests.support.model_like import ModelLikeFake
from tests.support.processes import cli_env, run_cli
from tests.support.s3 import ACCESS_KEY, SECRET_KEY

API_KEY = "sk-reliability-9b1f4c7e2d"
SECRETS = (API_KEY, SECRET_KEY)


def _leaks(text: str | bytes) -> list[str]:
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    return [secret for secret in SECRETS if secret.encode() in data]


def _bucket_objects(settings: Settings) -> dict[str, bytes]:
    bucket = settings.store_url.removeprefix("s3://").split("/", 1)[0]
    client = boto3.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
    )
    objects = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            objects[item["Key"]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return objects


def _prefect_records() -> dict[str, str]:
    """What Prefect's API holds about every flow run of the session: parameters, logs, artifacts, events."""
    from prefect.client.orchestration import get_client

    found: dict[str, str] = {}
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        for run in runs:
            found[f"flow run {run.name} parameters"] = json.dumps(run.parameters, default=str)
            found[f"flow run {run.name} state"] = str(run.state)
        logs: list[Any] = []
        while log_page := client.read_logs(offset=len(logs), limit=200):
            logs += log_page
        found["logs"] = "\n".join(f"{log.name} {log.message}" for log in logs)
        found["artifacts"] = "\n".join(json.dumps(a.model_dump(mode="json")) for a in client.read_artifacts())
        event_page = client.read_events(limit=50)
        events = list(event_page.events)
        while event_page.next_page and len(events) < 2000:
            event_page = client.read_events_page(str(event_page.next_page))
            events += event_page.events
        found["events"] = "\n".join(e.model_dump_json() for e in events)
    assert runs and logs
    return found


@pytest.mark.slow
def test_no_secret_in_store_prefect_or_output(
    prefect_server: None, s3_settings: Settings, tmp_path: Path
) -> None:
    """The API key and the S3 secret appear nowhere: not in the bucket, Prefect's API or files, or output."""
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME, PREFECT_SERVER_DATABASE_CONNECTION_URL

    assert s3_settings.s3_endpoint_url is not None
    env = cli_env(
        str(PREFECT_API_URL.value()),
        AWS_DEFAULT_REGION="us-east-1",
        SELFINSTRUCT_API_KEY=API_KEY,
        SELFINSTRUCT_S3_ENDPOINT_URL=s3_settings.s3_endpoint_url,
        SELFINSTRUCT_S3_ACCESS_KEY_ID=ACCESS_KEY,
        SELFINSTRUCT_S3_SECRET_ACCESS_KEY=SECRET_KEY,
    )
    store = s3_settings.store_url
    with ModelLikeFake(api_key=API_KEY) as fake:
        code, run_output = run_cli("run", "--store", store, "--llm-url", fake.url, "--prompts", "3", env=env)
        assert code == 0, run_output
        # The key refused by the server: the error message must not quote it.
        env_wrong = {**env, "SELFINSTRUCT_API_KEY": API_KEY + "-but-wrong"}
        code, refused_output = run_cli("run", "--store", store, "--llm-url", fake.url, env=env_wrong)
        assert code == 2 and "Incorrect API key" in refused_output
    _, status_output = run_cli("status", "--store", store, env=env)
    _, verify_output = run_cli("verify", "--store", store, env=env)
    assert "1 committed rounds" in verify_output, verify_output
    # The key was really used, and the round really went to the bucket: the searches below are not vacuous.
    assert f"Bearer {API_KEY}" in fake.authorization
    objects = _bucket_objects(s3_settings)
    assert any(key.endswith("/manifest.json") for key in objects) and len(objects) > 8

    places: dict[str, str | bytes] = {f"s3 object {key}": data for key, data in objects.items()}
    places.update(_prefect_records())
    places.update(run=run_output, refused=refused_output, status=status_output, verify=verify_output)
    database = Path(str(PREFECT_SERVER_DATABASE_CONNECTION_URL.value()).split(":///", 1)[1]).parent
    for folder in (database, Path(str(PREFECT_HOME.value()))):
        for path in folder.rglob("*"):
            if path.is_file():
                places[str(path)] = path.read_bytes()
    leaked = {place: _leaks(content) for place, content in places.items() if _leaks(content)}
    assert not leaked, leaked
    print(f"\nsearched {len(places)} places ({len(objects)} S3 objects) for the API key and S3 secret: none")


def test_credentials_in_urls_are_refused_and_redacted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A password in an LLM URL is refused (and not shown), and redacted wherever a URL is shown."""
    url = f"http://user:pa55word@127.0.0.1:{free_port()}/v1"
    # On the command line and in SELFINSTRUCT_LLM_URL: the URLs would become Prefect flow parameters.
    for args in (["--llm-url", url], []):
        if not args:
            monkeypatch.setenv("SELFINSTRUCT_LLM_URL", url)
        result = CliRunner().invoke(app, ["run", "--store", str(tmp_path / "store"), *args])
        assert result.exit_code == 2 and "LLM URL http://127.0.0.1" in result.output, result.output
        assert "pa55word" not in result.output
    assert not (tmp_path / "store").exists()
    assert redact_url(url + "?token=abc#frag") == url.replace("user:pa55word@", "")

    # The client's own errors leave the password out too.
    async def attempt() -> None:
        client = OpenAICompletionClient([url], "m", max_retries=0, timeout_s=2)
        try:
            await client.complete(["hi"], SamplingParams(), None, "instruction")
        finally:
            await client.aclose()

    with pytest.raises(LLMError) as error:
        asyncio.run(attempt())
    assert "pa55word" not in str(error.value) and "127.0.0.1" in str(error.value)


def test_round_numbers_and_paths_cannot_leave_the_root(tmp_path: Path) -> None:
    """Round numbers and file names are validated before any path is built from them."""
    root = tmp_path / "root"
    store = Store(str(root))
    for number in (0, -1, 100_000, True, 1.0, "1"):
        with pytest.raises(StoreError, match="round must be an integer"):
            store.round_dir(number)  # type: ignore[arg-type]
    empty = records_to_table([], "instances")
    for name in ("../../escape", "instances/../../x", "/etc/passwd", "manifest.json/../x", "a\x00b"):
        with pytest.raises(StoreError, match="invalid store file name"):
            store.write_table(1, name, empty)
    for relative in (
        "../outside",
        "finetunes/../../outside",
        "/etc/passwd",
        "finetunes/a/../../../outside",
        "rounds/round=00001/manifest.json",  # rounds are written only through claim and commit
        "reports/x\x00y",
        "reports/..",
        "",
    ):
        with pytest.raises(StoreError, match="invalid store path"):
            store.put_bytes(relative, b"x")
    # Folder names that only look like rounds are ignored, not parsed into paths.
    other = Store(str(tmp_path / "other"))
    for odd in ("round=0000x", "round=00001.bak", "round=../../x", "round=123456"):
        (tmp_path / "other" / "rounds" / odd).mkdir(parents=True, exist_ok=True)
    assert other.committed_rounds() == [] and other.uncommitted_rounds() == []
    # The last round number is the end of the store, not a wrap-around.
    last = tmp_path / "other" / "rounds" / "round=99999"
    last.mkdir()
    (last / "manifest.json").write_text("{}")
    with pytest.raises(StoreError, match="round must be an integer"):
        other.claim_next_round("run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "root"]
    assert not [p for p in root.rglob("*") if p.is_file()], "a refused write left a file"


HOSTILE = (
    "Explain what ../../etc/passwd holds to a new administrator.",
    "Render {{ __import__('os').system('touch PWNED') }} as plain text for a template tutorial.",
    "Describe the {instruction} and {max_instances} placeholders of a prompt template.",
    "Summarize <script>alert(1)</script> for a web security class in two sentences.",
    "Print [bold red]this markup[/] literally and explain why a console might style it.",
    "Explain why '; DROP TABLE rounds; -- is dangerous in a login form.",
    "Describe the caf\ud800 menu of a small town in three sentences.",  # a lone surrogate, as JSON can send
)


class HostileModel(ModelLikeFake):
    """Answers every instruction prompt with the HOSTILE list; other prompts as a good model would."""

    def _result(self, body: dict[str, Any], prompts: list[str], fault: Fault | None) -> dict[str, Any]:
        result = super()._result(body, prompts, fault)
        for choice in result["choices"]:
            numbered = re.search(r"\n(\d+)\.$", prompts[choice["index"]])
            if numbered:
                first = int(numbered.group(1))
                choice["text"] = " " + "\n".join(
                    f"{first + i}. {text}" if i else text for i, text in enumerate(HOSTILE)
                )
        return result


@pytest.mark.slow
def test_model_output_is_data(prefect_server: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Paths, template syntax, HTML, console markup and SQL in model output are stored as plain text; no
    template fills them in, nothing is written where they point, and a lone surrogate cannot wedge a round."""
    monkeypatch.chdir(tmp_path)
    store_url = str(tmp_path / "store")
    with HostileModel() as fake:
        params = RoundParams(
            store_url=store_url,
            llm_urls=[fake.url],
            config=BootstrapConfig(prompts_per_round=2),
            store_slot=False,
        )
        assert bootstrap_round(params)["round"] == 1
        bodies = list(fake.bodies)
    store = Store(store_url)
    assert_store_sound(store)
    stored = store.read_table(1, "instructions").column("instruction").to_pylist()
    stored += store.read_table(1, "rejected").column("text").to_pylist()
    expected = [text.replace("\ud800", "\ufffd") for text in HOSTILE]
    assert set(expected) <= set(stored)
    # Each instruction reached the classification prompt exactly as written, braces included.
    classify_prompts = [p for body in bodies for p in body["prompt"] if p.endswith("Is it classification?")]
    assert any(p.endswith(f"Task: {HOSTILE[2]}\nIs it classification?") for p in classify_prompts)
    # Nothing was executed or written outside the store.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert not list(tmp_path.rglob("PWNED")) and not list(tmp_path.rglob("passwd"))
    report = tmp_path / "store" / "rounds" / "round=00001" / "report.html"
    if report.exists():
        assert "<script>alert(1)</script>" not in report.read_text()


QUERY_SECRET = "qs-secret-5e1d"


@pytest.mark.parametrize(
    "args",
    [
        ("run", "--llm-url", f"http://127.0.0.1:9/v1?api_key={QUERY_SECRET}"),
        ("run", "--llm-url", f"http://user:{QUERY_SECRET}@127.0.0.1:9/v1"),
        ("run", "--llm-url", f"http://127.0.0.1:9/v1#{QUERY_SECRET}"),
        ("run", "--store", f"s3://bucket/p?key={QUERY_SECRET}"),
        ("run", "--store", f"s3://b/p?key={QUERY_SECRET}"),
        ("status", "--store", f"s3://bucket/p?key={QUERY_SECRET}"),
        ("verify", "--store", f"s3://b/p?key={QUERY_SECRET}"),
        ("report", "--store", f"s3://bucket/p?key={QUERY_SECRET}"),
        ("export", "OUT", "--store", f"s3://bucket/p?key={QUERY_SECRET}"),
        ("finetune", "--store", f"s3://bucket/p#{QUERY_SECRET}"),
        ("evaluate", "--store", f"s3://user:{QUERY_SECRET}@bucket/p"),
    ],
)
def test_no_command_prints_a_query_string_secret(args: tuple[str, ...], tmp_path: Path) -> None:
    """A secret in a URL's query string, user info or fragment is refused and never printed."""
    extra = () if "--store" in args else ("--store", str(tmp_path / "store"))
    out = str(tmp_path / "out.jsonl")
    result = CliRunner().invoke(app, [out if a == "OUT" else a for a in (*args, *extra)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: "), result.output
    assert QUERY_SECRET not in result.output
    assert not (tmp_path / "store").exists()
    assert not (tmp_path / "out.jsonl").exists()
