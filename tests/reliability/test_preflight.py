"""A strict preflight before anything is written, and one line instead of a traceback (findings 6, 7 and
the first half of 8 of issue 15): every bad input here ends with one `error:` line, exit 2, and an untouched
store."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from selfinstruct.cli import app
from tasks.resources.store.rounds import Store
from tasks.round.seeds import DEFAULT_SEEDS, MAX_SEED_FILE_BYTES
from tests.support.factories import commit_texts
from tests.support.fake_openai import FakeOpenAI
from tests.support.model_like import ModelLikeFake

runner = CliRunner()
HTML = "<!DOCTYPE html><html><head><title>Welcome to nginx!</title></head><body>" + "<p>filler</p>" * 400


def _one_line(*args: str, code: int = 2) -> str:
    result = runner.invoke(app, list(args))
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def store_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "store"
    yield path
    assert not path.exists(), "a refused command wrote into the store"


@pytest.fixture
def llm() -> Iterator[str]:
    with ModelLikeFake() as fake:
        yield fake.url


class _HtmlServer:
    """Answers every request with an HTML page and a chosen status, like a web server at the wrong port."""

    def __init__(self, status: int) -> None:
        self.posts = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                body = HTML.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                self._answer()

            def do_POST(self) -> None:
                owner.posts += 1
                self._answer()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("status", [200, 501])
def test_a_server_that_answers_html_is_refused(store_dir: Path, status: int) -> None:
    server = _HtmlServer(status)
    try:
        line = _one_line("run", "--store", str(store_dir), "--llm-url", server.url)
    finally:
        server.close()
    assert f"GET /models did not answer like an OpenAI-compatible server (HTTP {status}, text/html)" in line
    assert len(line) < 400 and "filler" in line and line.count("filler") < 20
    assert server.posts == 0


def test_a_url_without_v1_is_refused(store_dir: Path) -> None:
    with FakeOpenAI() as fake:
        base = fake.url.removesuffix("/v1")
        line = _one_line("run", "--store", str(store_dir), "--llm-url", base)
        assert "ends in /v1" in line and fake.requests == 0


@pytest.mark.parametrize("how", ["flag", "env"])
def test_the_chat_api_is_checked_on_the_chat_endpoint(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    flag = ["--llm-api", "chat"] if how == "flag" else []
    if how == "env":
        monkeypatch.setenv("SELFINSTRUCT_LLM_API", "chat")
    with FakeOpenAI(models=("served-model",)) as fake:
        line = _one_line("run", "--store", str(store_dir), "--llm-url", fake.url, *flag)
        assert "does not exist" in line and "it serves: served-model" in line
        assert fake.paths == {"/v1/chat/completions": 1}


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://[::1/v1", "is not a valid URL"),
        ("localhost-8000", "expected http(s)://host[:port]/v1"),
        ("ftp://127.0.0.1/v1", "expected http(s)://host[:port]/v1"),
        ("http://127.0.0.1:99999/v1", "is not a valid URL"),
    ],
)
def test_malformed_llm_urls(store_dir: Path, url: str, message: str) -> None:
    assert message in _one_line("run", "--store", str(store_dir), "--llm-url", url)


def _seed_record(**change: object) -> str:
    record = json.loads(DEFAULT_SEEDS.read_text().splitlines()[0])
    record.update(change)
    return json.dumps(record)


def test_deeply_nested_seed_line(tmp_path: Path, store_dir: Path, llm: str) -> None:
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(_seed_record() + "\n" + '{"id": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    line = _one_line("run", "--seeds", str(seeds), "--store", str(store_dir), "--llm-url", llm)
    assert f"{seeds}:2: JSON nested too deeply" in line


def test_seed_file_over_the_size_limit(tmp_path: Path, store_dir: Path, llm: str) -> None:
    seeds = tmp_path / "seeds.jsonl"
    with seeds.open("wb") as handle:
        handle.truncate(MAX_SEED_FILE_BYTES + 1)  # sparse: no 16 MB written to disk
    line = _one_line("run", "--seeds", str(seeds), "--store", str(store_dir), "--llm-url", llm)
    assert "a seed file is at most" in line


def test_instruction_too_long_for_the_models_context(tmp_path: Path, store_dir: Path) -> None:
    seeds = tmp_path / "seeds.jsonl"
    lines = [_seed_record(id=f"t{i}", instruction=f"Task number {i} of the test.") for i in range(3)]
    lines.insert(2, "")
    lines.append(_seed_record(id="long", instruction="Summarize this: " + "word " * 5000))
    seeds.write_text("\n".join(lines))
    with ModelLikeFake(context_length=2048) as fake:
        line = _one_line("run", "--seeds", str(seeds), "--store", str(store_dir), "--llm-url", fake.url)
    assert f"{seeds}:5: field 'instruction'" in line and "too long for the model's context" in line


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"min_words": 50, "max_words": 10}', "min_words (50) must be less than max_words (10)"),
        (b'{"num_in_context": 2, "num_machine_in_context": 3}', "cannot exceed num_in_context"),
        (b'{"seed": 1, "model": "\xff\xfe"}', "not UTF-8 text"),
        (b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    ],
)
def test_bad_configs(tmp_path: Path, store_dir: Path, llm: str, content: bytes, message: str) -> None:
    config = tmp_path / "round.json"
    config.write_bytes(content)
    assert message in _one_line("run", "--config", str(config), "--store", str(store_dir), "--llm-url", llm)


def test_read_only_store_folder(tmp_path: Path, llm: str) -> None:
    store = tmp_path / "store"
    store.mkdir()
    store.chmod(0o555)
    try:
        if os.access(store, os.W_OK):  # root: the mode bits do not stop writes; a read-only mount does
            store = Path("/proc/sys/selfinstruct-store")
            if os.access("/proc/sys", os.W_OK):
                pytest.skip("no read-only folder available to this user")
        line = _one_line("run", "--store", str(store), "--llm-url", llm)
        assert "is not writable" in line
    finally:
        (tmp_path / "store").chmod(0o755)
    assert list((tmp_path / "store").iterdir()) == []


@pytest.mark.parametrize("command", ["status", "report"])
def test_corrupt_manifest(tmp_path: Path, command: str) -> None:
    store = Store(str(tmp_path / "store"))
    commit_texts(store, ["List three uses for a paperclip."])
    manifest = Path(store.round_dir(1)) / "manifest.json"
    manifest.write_text('{"round": 1, "files": ')
    line = _one_line(command, "--store", str(tmp_path / "store"))
    assert "round 1: manifest unreadable" in line
