"""The deployments file and the local stack: a real Prefect server, worker and LLM server on 127.0.0.1.

The slow tests bring the stack up once for the module with `selfinstruct stack up` (a subprocess), run the
bootstrap deployment through the worker against the embedded llama.cpp server, watch
`selfinstruct.data.ready` start the finetune deployment, read everything back through the REST API (with the
stack's own retrying `api_request`), and finally check that `stack down` leaves no process behind.
"""

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from deployments.processes import ManagedProcess, StackError, is_running, spawn, stop_process_tree
from deployments.registration import render_prefect_file, zombie_automation
from deployments.server_api import TERMINAL_STATES, api_request
from deployments.stack import check_not_running, check_ports
from deployments.state import StackLayout, StackOptions, StackState
from tasks.resources.processes import free_port, poll_until
from tests.support.processes import ROOT
from tests.support.stack import round_in_progress, stack_cli

PREFECT_FILE = ROOT / "deployments" / "prefect.yaml"

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


def test_evaluate_trigger_skips_dry_runs_and_compare_arms() -> None:
    from typing import get_args

    from schemas.training import FinetuneParams

    # The compare flow evaluates its own arms (purpose "compare"); evaluating them again wastes GPU hours.
    (trigger,) = _deployments()["evaluate"]["triggers"]
    assert trigger["expect"] == ["selfinstruct.finetune.completed"]
    assert trigger["match"] == {
        "prefect.resource.id": "selfinstruct.store.*",
        "selfinstruct.dry-run": "false",
        "selfinstruct.finetune.purpose": "standalone",
    }
    assert set(get_args(FinetuneParams.model_fields["purpose"].annotation)) == {"standalone", "compare"}


def test_dry_run_copy_flips_only_the_trigger(tmp_path: Path) -> None:
    copy = render_prefect_file(PREFECT_FILE, tmp_path / "prefect.yaml", StackOptions(dry_run_finetunes=True))
    original, changed = yaml.safe_load(PREFECT_FILE.read_text()), yaml.safe_load(copy.read_text())
    finetune = next(d for d in changed["deployments"] if d["name"] == "finetune")
    assert finetune["triggers"][0]["parameters"]["params"]["dry_run"] is True
    finetune["triggers"][0]["parameters"]["params"]["dry_run"] = False
    assert changed == original
    assert render_prefect_file(PREFECT_FILE, tmp_path / "unused.yaml", StackOptions()) == PREFECT_FILE


def test_try_out_options_change_only_the_bootstrap_deployment(tmp_path: Path) -> None:
    options = StackOptions(every_s=120, round_config={"prompts_per_round": 2}, data_ready_threshold=7)
    copy = render_prefect_file(PREFECT_FILE, tmp_path / "prefect.yaml", options)
    original, changed = yaml.safe_load(PREFECT_FILE.read_text()), yaml.safe_load(copy.read_text())
    nightly = next(d for d in changed["deployments"] if d["name"] == "bootstrap-nightly")
    assert nightly["schedules"] == [{"interval": 120, "active": True}]
    assert nightly["parameters"]["params"]["config"]["prompts_per_round"] == 2
    assert nightly["parameters"]["params"]["data_ready_threshold"] == 7
    assert changed["deployments"][1:] == original["deployments"][1:]


def test_zombie_automation_is_the_documented_one() -> None:
    from prefect.events.schemas.automations import AutomationCore

    automation = AutomationCore.model_validate(zombie_automation())
    assert automation.trigger.posture == "Proactive"  # type: ignore[union-attr]
    assert automation.actions[0].type == "change-flow-run-state"


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
    child = int(poll_until(lambda: log.read_text().strip(), 30, "the child's pid in the log", 0.1).split()[0])
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

# Rounds small enough for 2 shared CPU cores: two prompts, short completions.
SMALL_ROUND = {
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
}


@dataclass
class Stack:
    """The module's stack: its recorded state, the `stack up` arguments and its store."""

    state: StackState
    up_args: tuple[str, ...]
    data_dir: Path
    store: Any

    def api(self, method: str, path: str, body: Any = None) -> Any:
        """One REST call to the stack's server, retried as the stack's own calls are (503 while busy)."""
        return api_request(self.state.api_url, method, path, body)

    def reload(self) -> None:
        self.state = StackState.from_json(StackLayout(ROOT, self.data_dir).state_file.read_text())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The stack, up for the whole module with a round every minute; torn down (idempotently) at the end."""
    from tasks.resources.store.rounds import Store

    data_dir = tmp_path_factory.mktemp("stack")
    config = tmp_path_factory.mktemp("config") / "round.json"
    config.write_text(json.dumps(SMALL_ROUND))
    store = Store(str(data_dir / "store"))
    ports = ("--port", str(free_port()), "--llm-port", str(free_port()), "--report-port", str(free_port()))
    up_args = (
        *ports,
        "--dry-run-finetunes",
        "--every",
        "60",
        "--round-config",
        str(config),
        "--store",
        store.url,
        "--data-dir",
        str(data_dir),
    )
    up = stack_cli("stack", "up", *up_args)
    layout = StackLayout(root=ROOT, data_dir=data_dir)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "DRY RUNS" in up.stdout and '{"config": {"prompts_per_round": 8}}' in up.stdout
        yield Stack(StackState.from_json(layout.state_file.read_text()), up_args, data_dir, store)
    finally:
        stack_cli("stack", "down", "--data-dir", str(data_dir), timeout=300)


def _deployment_ids(stack: Stack) -> dict[str, str]:
    return {d["name"]: d["id"] for d in stack.api("POST", "/deployments/filter", {})}


def _finished(stack: Stack, run_id: str) -> dict[str, Any] | None:
    run = stack.api("GET", f"/flow_runs/{run_id}")
    return dict(run) if run["state"]["type"] in TERMINAL_STATES else None


def _runs_of(stack: Stack, deployment_id: str, states: list[str] | None = None) -> list[dict[str, Any]]:
    body: dict[str, Any] = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}}
    if states:
        body["flow_runs"]["state"] = {"type": {"any_": states}}
    return list(stack.api("POST", "/flow_runs/filter", body))


def _run_round(stack: Stack, deployment_id: str, store_url: str, threshold: int) -> dict[str, Any]:
    params = {"params": {"store_url": store_url, "config": SMALL_ROUND, "data_ready_threshold": threshold}}
    created = stack.api("POST", f"/deployments/{deployment_id}/create_flow_run", {"parameters": params})
    run = poll_until(lambda: _finished(stack, created["id"]), 900, "a round through the worker", 2.0)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    return dict(run)


def _verify(store_url: str) -> subprocess.CompletedProcess[str]:
    return stack_cli("verify", "--store", store_url, timeout=300)


@pytest.mark.slow
def test_stack_is_deployed_and_serving(stack: Stack) -> None:
    state = stack.state
    assert state.ui_url.startswith("http://127.0.0.1:") and state.api_url == f"{state.ui_url}/api"
    assert stack.api("GET", "/health") is True
    assert stack.api("GET", "/work_pools/selfinstruct-process")["type"] == "process"
    assert stack.api("POST", "/work_pools/selfinstruct-process/workers/filter", {})
    deployments = {d["name"]: d for d in stack.api("POST", "/deployments/filter", {})}
    assert set(deployments) == {"bootstrap-nightly", "finetune", "evaluate", "audit"}
    nightly = deployments["bootstrap-nightly"]
    assert nightly["schedules"][0]["schedule"]["interval"] == 60  # --every 60
    assert nightly["global_concurrency_limit"]["limit"] == 1
    assert nightly["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
    ]
    # Where runs write and which LLM they use travel as job variables, never as parameters.
    env = nightly["job_variables"]["env"]
    assert env["SELFINSTRUCT_STORE_URL"] == stack.store.url and env["SELFINSTRUCT_LLM_URL"] == state.llm_url
    automations = {a["name"]: a for a in stack.api("POST", "/automations/filter", {})}
    assert set(automations) == {
        "selfinstruct-finetune-on-data-ready",
        "selfinstruct-evaluate-on-finetune",
        "selfinstruct-audit-on-round-committed",
        "selfinstruct-crash-zombie-flow-runs",
    }
    trigger = automations["selfinstruct-finetune-on-data-ready"]
    assert trigger["trigger"]["expect"] == ["selfinstruct.data.ready"]
    (action,) = trigger["actions"]
    assert action["deployment_id"] == deployments["finetune"]["id"]
    assert action["parameters"]["params"]["dry_run"] is True  # --dry-run-finetunes
    assert httpx.get(f"{state.llm_url}/models", timeout=10).status_code == 200
    assert httpx.get(f"{state.report_url}/health", timeout=10).status_code == 200
    again = stack_cli("stack", "up", "--data-dir", str(stack.data_dir))
    assert again.returncode == 1 and "already running" in again.stderr


@pytest.mark.slow
def test_the_servers_scheduler_starts_rounds_by_itself(stack: Stack) -> None:
    """No run is created by hand: the server's scheduler makes them from the deployment's schedule."""
    nightly = _deployment_ids(stack)["bootstrap-nightly"]
    done = poll_until(
        lambda: _runs_of(stack, nightly, ["COMPLETED"]), 900, "a scheduled round completing", 2.0
    )
    run = done[0]
    assert run["auto_scheduled"] is True and run["created_by"]["type"] == "SCHEDULE", run
    stack.api("POST", f"/deployments/{nightly}/pause_deployment")
    assert stack.store.committed_rounds()[:1] == [1]
    assert run["name"] == "round-00001"
    # Task runs are named by stage and chunk.
    tasks = stack.api("POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    names = {t["name"] for t in tasks}
    assert {"instructions-chunk-000", "classification-chunk-000", "instances-chunk-000"} <= names, names
    # The report link in the UI opens over HTTP.
    body = {
        "artifacts": {
            "flow_run_id": {"any_": [run["id"]]},
            "key": {"any_": ["selfinstruct-round-report"]},
        }
    }
    (link,) = stack.api("POST", "/artifacts/filter", body)
    url = link["data"].split("](", 1)[1].rstrip(")") if link["data"].startswith("[") else link["data"]
    assert url.startswith(f"{stack.state.report_url}/rounds/round=00001/"), url
    page = httpx.get(url, timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()
    verify = _verify(stack.store.url)
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.slow
def test_rounds_through_the_worker_and_data_ready_starts_one_finetune(stack: Stack, tmp_path: Path) -> None:
    from tasks.resources.store.rounds import Store

    store = Store(str(tmp_path / "store"))
    ids = _deployment_ids(stack)
    first = _run_round(stack, ids["bootstrap-nightly"], store.url, threshold=10**9)
    assert store.committed_rounds() == [1]
    assert first["work_queue_name"] == "default" and first["parameters"]["params"]["store_url"] == store.url

    # round.committed started an audit of round 1 through the worker, judged by the stack's LLM.
    def audit_of_round_1() -> list[dict[str, Any]]:
        runs = _runs_of(stack, ids["audit"])
        return [r for r in runs if r["parameters"]["params"] == {"store_url": store.url, "round": 1}]

    (audit,) = poll_until(audit_of_round_1, 120, "the round.committed trigger", 2.0)
    audited = poll_until(lambda: _finished(stack, audit["id"]), 600, "the audit of round 1", 2.0)
    assert audited["state"]["type"] == "COMPLETED", audited["state"]
    body = {"artifacts": {"flow_run_id": {"any_": [audited["id"]]}}}
    keys = {a["key"] for a in stack.api("POST", "/artifacts/filter", body)}
    assert {"selfinstruct-round-audit", "selfinstruct-round-report"} <= keys
    assert [n for n in store.list_names("audits/round=00001") if n.endswith(".json")]
    assert "<h2>Quality audit</h2>" in (Path(store.location(1)) / "report.html").read_text()

    _run_round(stack, ids["bootstrap-nightly"], store.url, threshold=1)
    assert store.committed_rounds() == [1, 2]
    instances = sum(store.read_manifest(n).counts["instances"] for n in (1, 2))
    assert instances >= 1, "the model produced no instance at all; the threshold cannot be crossed"

    runs = poll_until(lambda: _runs_of(stack, ids["finetune"]), 120, "the data.ready trigger", 2.0)
    assert len(runs) == 1, runs  # round 1, below its threshold, started none
    assert runs[0]["parameters"] == {"params": {"store_url": store.url, "rounds": [1, 2], "dry_run": True}}

    body = {"filter": {"event": {"name": ["selfinstruct.data.ready"]}}, "limit": 50}
    events = stack.api("POST", "/events/filter", body)["events"]
    ours = [e for e in events if e["payload"]["store_url"] == store.url]
    assert len(ours) == 1 and ours[0]["payload"]["new_instances"] == instances

    finetune = poll_until(lambda: _finished(stack, runs[0]["id"]), 600, "the dry-run fine-tune", 2.0)
    assert finetune["state"]["type"] == "COMPLETED", finetune["state"]
    assert finetune["name"].startswith("finetune-ft-")
    assert len(_runs_of(stack, ids["finetune"])) == 1
    manifests = store.list_names("finetunes")
    assert len(manifests) == 1
    assert json.loads(store.get_bytes(f"finetunes/{manifests[0]}/manifest.json"))["dry_run"] is True


@pytest.mark.slow
def test_stack_down_mid_round_then_up_completes_that_round(stack: Stack) -> None:
    """`stack down` interrupts a scheduled round; after `stack up` the schedule alone finishes it."""
    nightly = _deployment_ids(stack)["bootstrap-nightly"]
    stack.api("POST", f"/deployments/{nightly}/resume_deployment")
    number = poll_until(lambda: round_in_progress(stack.store), 600, "a scheduled round in progress", 0.5)
    running = _runs_of(stack, nightly, ["RUNNING"])
    assert [r["name"] for r in running] == [f"round-{number:05d}"]
    completed_before = {r["id"] for r in _runs_of(stack, nightly, ["COMPLETED"])}
    down = stack_cli("stack", "down", "--data-dir", str(stack.data_dir), timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
    assert f"cancelling flow run round-{number:05d}" in down.stdout
    assert number not in stack.store.committed_rounds()

    up = stack_cli("stack", "up", *stack.up_args)
    assert up.returncode == 0, up.stdout + up.stderr
    stack.reload()
    interrupted = stack.api("GET", f"/flow_runs/{running[0]['id']}")
    assert interrupted["state"]["type"] == "CANCELLED", interrupted["state"]
    nightly = _deployment_ids(stack)["bootstrap-nightly"]

    def redone() -> list[dict[str, Any]]:
        # Earlier tests' runs of this deployment (into other stores) may carry the same name: only a
        # scheduled run that completed after the restart counts.
        done = _runs_of(stack, nightly, ["COMPLETED"])
        return [
            r
            for r in done
            if r["name"] == f"round-{number:05d}" and r["auto_scheduled"] and r["id"] not in completed_before
        ]

    (run,) = poll_until(redone, 900, f"a run completing round {number} after the restart", 2.0)
    stack.api("POST", f"/deployments/{nightly}/pause_deployment")
    assert number in stack.store.committed_rounds() and run["auto_scheduled"] is True
    verify = _verify(stack.store.url)
    assert verify.returncode == 0, verify.stdout + verify.stderr


@pytest.mark.slow
def test_stack_down_leaves_no_process(stack: Stack) -> None:
    import psutil

    state, data_dir = stack.state, stack.data_dir
    tree = {p.pid for p in state.processes}
    for managed in state.processes:
        if is_running(managed):
            tree |= {c.pid for c in psutil.Process(managed.pid).children(recursive=True)}
    down = stack_cli("stack", "down", "--data-dir", str(data_dir), timeout=300)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stack down" in down.stdout
    survivors = [pid for pid in tree if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert survivors == []
    assert not StackLayout(ROOT, data_dir).state_file.exists()
    port = int(state.ui_url.rsplit(":", 1)[1])
    check_ports({"--port": port})  # free again
    assert stack_cli("stack", "down", "--data-dir", str(data_dir)).returncode == 0  # idempotent
