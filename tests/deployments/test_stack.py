"""The deployments file and the local stack: a real Prefect server, worker and LLM server on 127.0.0.1.

The slow tests bring the stack up once for the module with `python -m selfinstruct.cli_ops stack up` (what
`selfinstruct stack up` runs), run the bootstrap deployment through the worker against the embedded
llama.cpp server, watch `selfinstruct.data.ready` start the finetune deployment, read everything back
through the REST API, and finally check that `stack down` leaves no process behind.
"""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from selfinstruct.cli_ops import (
    ManagedProcess,
    StackError,
    StackLayout,
    StackState,
    check_not_running,
    check_ports,
    dry_run_prefect_file,
    is_running,
    spawn,
    stop_process_tree,
)

ROOT = Path(__file__).resolve().parents[2]
PREFECT_FILE = ROOT / "deployments" / "prefect.yaml"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

# -- the deployments file ----------------------------------------------------------------------------


def _deployments() -> dict[str, dict[str, Any]]:
    spec = yaml.safe_load(PREFECT_FILE.read_text())
    return {d["name"]: d for d in spec["deployments"]}


def test_prefect_yaml_declares_the_four_deployments() -> None:
    spec = yaml.safe_load(PREFECT_FILE.read_text())
    deployments = _deployments()
    assert set(deployments) == {"bootstrap-nightly", "finetune", "evaluate", "audit"}
    nightly = deployments["bootstrap-nightly"]
    assert nightly["entrypoint"] == "flows/bootstrap.py:bootstrap_round"
    assert nightly["concurrency_limit"] == 1
    (schedule,) = nightly["schedules"]
    assert schedule["cron"] == "0 2 * * *" and schedule["timezone"]
    assert {d["work_pool"]["name"] for d in deployments.values()} == {"selfinstruct-process"}
    assert "schedules" not in deployments["finetune"]
    (trigger,) = deployments["finetune"]["triggers"]
    assert trigger["expect"] == ["selfinstruct.data.ready"]
    assert trigger["parameters"]["params"] == {
        "store_url": "{{ event.payload.store_url }}",
        "rounds": "{{ event.payload.rounds }}",
        "dry_run": False,
    }
    (pull,) = spec["pull"]
    assert list(pull) == ["prefect.deployments.steps.set_working_directory"]
    (audit,) = deployments["audit"]["triggers"]
    assert audit["expect"] == ["selfinstruct.round.committed"]
    assert audit["parameters"]["params"] == {
        "store_url": "{{ event.payload.store }}",
        "round": "{{ event.payload.round }}",
    }


def test_trigger_parameters_fit_the_finetune_flow() -> None:
    from schemas.training import EvaluateParams, FinetuneParams

    rendered = {"store_url": "/data/store", "rounds": [1, 2], "dry_run": False}
    assert set(_deployments()["finetune"]["triggers"][0]["parameters"]["params"]) == set(rendered)
    FinetuneParams.model_validate(rendered)
    EvaluateParams.model_validate({"store_url": "/data/store", "finetune_id": "ft-1"})
    from schemas.audit import AuditParams

    # What publish_round puts in the round.committed payload, as the audit trigger renders it.
    AuditParams.model_validate({"store_url": "/data/store", "round": 3})


def test_dry_run_copy_flips_only_the_trigger(tmp_path: Path) -> None:
    copy = dry_run_prefect_file(PREFECT_FILE, tmp_path / "prefect.yaml")
    original, changed = yaml.safe_load(PREFECT_FILE.read_text()), yaml.safe_load(copy.read_text())
    finetune = next(d for d in changed["deployments"] if d["name"] == "finetune")
    assert finetune["triggers"][0]["parameters"]["params"]["dry_run"] is True
    finetune["triggers"][0]["parameters"]["params"]["dry_run"] = False
    assert changed == original


# -- process handling --------------------------------------------------------------------------------

STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
print(child.pid, flush=True)
time.sleep(600)
"""


def test_stop_escalates_and_reaches_descendants_in_other_sessions(tmp_path: Path) -> None:
    import psutil

    log = tmp_path / "stubborn.log"
    managed = spawn("stubborn", [sys.executable, "-c", STUBBORN], dict(os.environ), tmp_path, log)
    deadline = time.monotonic() + 30
    while not log.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(log.read_text().split()[0])
    assert is_running(managed)
    quick = ((signal.SIGINT, 1.0), (signal.SIGTERM, 1.0), (signal.SIGKILL, 5.0))
    assert stop_process_tree(managed, quick) == "SIGKILL"
    assert not is_running(managed)
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    assert stop_process_tree(managed, quick) == "not running"


def test_a_reused_pid_is_not_touched(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        impostor = ManagedProcess("old", sleeper.pid, create_time=1.0, log="", command=[])
        assert not is_running(impostor)
        assert stop_process_tree(impostor) == "not running"
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_stale_record_is_forgotten_and_live_one_refused(tmp_path: Path) -> None:
    layout = StackLayout(root=ROOT, data_dir=tmp_path)
    layout.state_dir.mkdir(parents=True)
    gone = ManagedProcess("server", 2**22 - 1, 1.0, "", [])
    state = StackState("http://x/api", "http://x", None, "p", str(ROOT), "", "now", [gone])
    layout.state_file.write_text(state.to_json())
    assert StackState.from_json(layout.state_file.read_text()) == state
    messages: list[str] = []
    check_not_running(layout, messages.append)
    assert not layout.state_file.exists() and "stale" in messages[0]

    me = spawn(
        "worker",
        [sys.executable, "-c", "import time; time.sleep(60)"],
        dict(os.environ),
        tmp_path,
        tmp_path / "w",
    )
    try:
        layout.state_file.write_text(StackState("a", "http://ui", None, "p", "", "", "", [me]).to_json())
        with pytest.raises(StackError, match=r"already running .*UI http://ui"):
            check_not_running(layout, messages.append)
    finally:
        stop_process_tree(me)
    layout.state_file.write_text("{broken")
    with pytest.raises(StackError, match="unreadable"):
        check_not_running(layout, messages.append)


def test_port_in_use_is_refused() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(
            StackError, match=f"port {port} on 127.0.0.1 is already in use: choose another with --port"
        ):
            check_ports({"--port": port})


# -- the stack, for real -----------------------------------------------------------------------------


def _cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_WORKER_QUERY_SECONDS": "2", "COLUMNS": "200"}  # pick up new runs quickly
    return subprocess.run(
        [sys.executable, "-m", "selfinstruct.cli_ops", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _free_port() -> int:
    from tasks.llm_server import free_port

    return free_port()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[StackState, Path]]:
    """The stack, up for the whole module; torn down (idempotently) at the end."""
    data_dir = tmp_path_factory.mktemp("stack")
    args = ("--data-dir", str(data_dir))
    up = _cli(
        "stack",
        "up",
        "--port",
        str(_free_port()),
        "--llm-port",
        str(_free_port()),
        "--dry-run-finetunes",
        *args,
    )
    layout = StackLayout(root=ROOT, data_dir=data_dir)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        state = StackState.from_json(layout.state_file.read_text())
        yield state, data_dir
    finally:
        _cli("stack", "down", *args, timeout=300)


def _api(state: StackState) -> httpx.Client:
    return httpx.Client(base_url=state.api_url, timeout=30.0)


def _deployment_ids(client: httpx.Client) -> dict[str, str]:
    return {d["name"]: d["id"] for d in client.post("/deployments/filter", json={}).json()}


def _wait_for_run(client: httpx.Client, run_id: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = client.get(f"/flow_runs/{run_id}").json()
        if run["state"]["type"] in TERMINAL:
            return dict(run)
        time.sleep(2)
    raise AssertionError(f"flow run {run_id} did not finish within {timeout_s} s")


def _runs_of(client: httpx.Client, deployment_id: str) -> list[dict[str, Any]]:
    body = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}}
    return list(client.post("/flow_runs/filter", json=body).json())


def _round_params(store_url: str, threshold: int) -> dict[str, Any]:
    """A round small enough for 2 shared CPU cores: two prompts, short completions."""
    return {
        "params": {
            "store_url": store_url,
            "config": {
                "prompts_per_round": 2,
                "instruction_sampling": {
                    "temperature": 0.7,
                    "top_p": 0.5,
                    "max_tokens": 128,
                    "presence_penalty": 2.0,
                    "stop": ["\n\n", "\n16", "16.", "16 ."],
                },
                "instance_sampling": {
                    "temperature": 0.0,
                    "top_p": 1.0,
                    "max_tokens": 128,
                    "presence_penalty": 1.5,
                    "stop": ["Example 4", "Task:"],
                },
                "max_instances": 3,
            },
            "data_ready_threshold": threshold,
        }
    }


def _run_round(client: httpx.Client, deployment_id: str, store_url: str, threshold: int) -> dict[str, Any]:
    created = client.post(
        f"/deployments/{deployment_id}/create_flow_run",
        json={"parameters": _round_params(store_url, threshold)},
    )
    assert created.status_code == 201, created.text
    run = _wait_for_run(client, created.json()["id"], 900)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    return run


@pytest.mark.slow
def test_stack_is_deployed_and_serving(stack: tuple[StackState, Path]) -> None:
    state, _ = stack
    assert state.ui_url.startswith("http://127.0.0.1:") and state.api_url == f"{state.ui_url}/api"
    with _api(state) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/work_pools/selfinstruct-process").json()["type"] == "process"
        assert client.post("/work_pools/selfinstruct-process/workers/filter", json={}).json()
        deployments = {d["name"]: d for d in client.post("/deployments/filter", json={}).json()}
        assert set(deployments) == {"bootstrap-nightly", "finetune", "evaluate", "audit"}
        nightly = deployments["bootstrap-nightly"]
        assert nightly["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
        assert nightly["global_concurrency_limit"]["limit"] == 1
        assert nightly["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
        ]
        automations = {a["name"]: a for a in client.post("/automations/filter", json={}).json()}
        trigger = automations["finetune__automation_1"]
        assert trigger["trigger"]["expect"] == ["selfinstruct.data.ready"]
        (action,) = trigger["actions"]
        assert action["deployment_id"] == deployments["finetune"]["id"]
        assert action["parameters"]["params"]["dry_run"] is True  # --dry-run-finetunes
    assert httpx.get(f"{state.llm_url}/models", timeout=10).status_code == 200
    again = _cli("stack", "up", "--data-dir", str(stack[1]))
    assert again.returncode == 1 and "already running" in again.stderr


@pytest.mark.slow
def test_rounds_through_the_worker_and_data_ready_starts_one_finetune(
    stack: tuple[StackState, Path], tmp_path: Path
) -> None:
    from tasks.store import Store

    state, _ = stack
    store = Store(str(tmp_path / "store"))
    with _api(state) as client:
        ids = _deployment_ids(client)
        first = _run_round(client, ids["bootstrap-nightly"], store.url, threshold=10**9)
        assert store.committed_rounds() == [1]
        assert (
            first["work_queue_name"] == "default" and first["parameters"]["params"]["store_url"] == store.url
        )

        # Artifacts of the run, found through the REST API.
        body = {"artifacts": {"flow_run_id": {"any_": [first["id"]]}}}
        keys = {a["key"] for a in client.post("/artifacts/filter", json=body).json()}
        assert {
            "selfinstruct-round-counts",
            "selfinstruct-round-samples",
            "selfinstruct-round-report",
        } <= keys
        report = client.post(
            "/artifacts/filter", json={"artifacts": {"key": {"any_": ["selfinstruct-round-report"]}}}
        ).json()
        assert any("rounds/round=00001/report.html" in a["data"] for a in report)
        assert (Path(store.location(1)) / "report.html").is_file()

        time.sleep(10)  # give a (wrong) trigger time to fire
        assert _runs_of(client, ids["finetune"]) == []  # below the threshold: no fine-tune

        # round.committed started an audit of round 1 through the worker, judged by the stack's LLM.
        deadline = time.monotonic() + 120
        while not (audits := _runs_of(client, ids["audit"])) and time.monotonic() < deadline:
            time.sleep(2)
        assert audits, "no audit run followed round.committed"
        audited = _wait_for_run(client, audits[0]["id"], 600)
        assert audited["state"]["type"] == "COMPLETED", audited["state"]
        assert audited["parameters"]["params"] == {"store_url": store.url, "round": 1}
        body = {"artifacts": {"flow_run_id": {"any_": [audited["id"]]}}}
        keys = {a["key"] for a in client.post("/artifacts/filter", json=body).json()}
        assert {"selfinstruct-round-audit", "selfinstruct-round-report"} <= keys
        assert [n for n in store.list_names("audits/round=00001") if n.endswith(".json")]
        assert "<h2>Quality audit</h2>" in (Path(store.location(1)) / "report.html").read_text()

        _run_round(client, ids["bootstrap-nightly"], store.url, threshold=1)
        assert store.committed_rounds() == [1, 2]
        instances = sum(store.read_manifest(n).counts["instances"] for n in (1, 2))
        assert instances >= 1, "the model produced no instance at all; the threshold cannot be crossed"

        deadline = time.monotonic() + 120
        while not (runs := _runs_of(client, ids["finetune"])) and time.monotonic() < deadline:
            time.sleep(2)
        time.sleep(10)  # a duplicate would show up by now
        runs = _runs_of(client, ids["finetune"])
        assert len(runs) == 1, runs
        assert runs[0]["parameters"] == {
            "params": {"store_url": store.url, "rounds": [1, 2], "dry_run": True}
        }

        events = client.post(
            "/events/filter", json={"filter": {"event": {"name": ["selfinstruct.data.ready"]}}, "limit": 50}
        ).json()["events"]
        ours = [e for e in events if e["payload"]["store_url"] == store.url]
        assert len(ours) == 1 and ours[0]["payload"]["new_instances"] == instances

        finetune = _wait_for_run(client, runs[0]["id"], 600)
        assert finetune["state"]["type"] == "COMPLETED", finetune["state"]
    manifests = store.list_names("finetunes")
    assert len(manifests) == 1
    assert json.loads(store.get_bytes(f"finetunes/{manifests[0]}/manifest.json"))["dry_run"] is True


@pytest.mark.slow
def test_stack_down_leaves_no_process(stack: tuple[StackState, Path]) -> None:
    import psutil

    state, data_dir = stack
    tree = {p.pid for p in state.processes}
    for managed in state.processes:
        if is_running(managed):
            tree |= {c.pid for c in psutil.Process(managed.pid).children(recursive=True)}
    down = _cli("stack", "down", "--data-dir", str(data_dir), timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stack down" in down.stdout
    survivors = [pid for pid in tree if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert survivors == []
    assert not StackLayout(ROOT, data_dir).state_file.exists()
    port = int(state.ui_url.rsplit(":", 1)[1])
    check_ports({"--port": port})  # free again
    assert _cli("stack", "down", "--data-dir", str(data_dir)).returncode == 0  # idempotent
