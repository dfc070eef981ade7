"""The Prefect flows under Prefect's test harness (a real temporary API): the watcher's decision and its
event, the retrain's pin and final state, retries for transient faults only, the flow-run id handed to
`register`, and the deployments `tunegate deploy` serves. The stages themselves are faked here; the real
pipeline under a real server is tests/e2e/test_retrain.py."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml
from prefect.testing.utilities import prefect_test_harness

from demo.model import build
from demo.publish import continue_pretraining, publish
from tests.conftest import ROOT
from tests.tiny import tiny
from tunegate.errors import UserError
from tunegate.io import read_jsonl
from tunegate.models import local_snapshot, revision_of

TINY = tiny(warmup_steps=100)
MODEL = "tunegate-demo"


@pytest.fixture(scope="module")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def events(monkeypatch):
    """The events the watcher emits (prefect.events.emit_event, recorded and passed on)."""
    import prefect.events

    emitted, emit = [], prefect.events.emit_event

    def record(**kwargs):
        emitted.append(kwargs)
        return emit(**kwargs)

    monkeypatch.setattr(prefect.events, "emit_event", record)
    return emitted


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-base")
    build(read_jsonl(ROOT / "data/pretrain/general.jsonl")[:300], TINY, 1, folder)
    return folder


@pytest.fixture
def project(tmp_path, root, tiny_base):
    """A project whose base.model is a local model repository with one published revision, and an empty
    SQLite registry."""
    repo = tmp_path / "hub"
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["base"]["model"] = str(repo)
    params["register"]["tracking_uri"] = "sqlite:///mlflow.db"  # relative: the flows resolve it against root
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return {"root": tmp_path, "repo": repo, "first": publish(tiny_base, repo)}


def register(root, revision: str, model: str, champion: bool, gate_passed: bool = True) -> str:
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if not c.search_registered_models(f"name = '{MODEL}'"):
        c.create_registered_model(MODEL)
    tags = {"base_model": model, "base_revision": revision, "gate_passed": str(gate_passed).lower()}
    version = c.create_model_version(MODEL, source=str(root / "artifacts"), tags=tags).version
    if champion:
        c.set_registered_model_alias(MODEL, "champion", version)
    return str(version)


def test_flow_modules_hold_no_stage_logic(root):
    for path in (root / "flows").glob("*.py"):
        text = path.read_text()
        assert "from stages" not in text and "import stages" not in text, path


# --- the demo base can move: a local model repository --------------------------------------------------------


def test_published_revisions_are_followed_by_branch_and_pinned_by_commit(project, tiny_base, root, tmp_path):
    repo, first = project["repo"], project["first"]
    assert revision_of(str(repo), "main") == first and len(first) == 40
    assert publish(tiny_base, repo) == first  # same files, same revision
    more = tmp_path / "more"
    continue_pretraining(tiny_base, read_jsonl(root / "data/pretrain/general.jsonl")[:300], TINY, 2, 5, more)
    second = publish(more, repo)
    assert second != first
    assert revision_of(str(repo), "main") == second  # the branch moved
    path, commit = local_snapshot(repo, str(repo), first)  # a commit still pins the old revision
    assert commit == first
    assert (path / "model.safetensors").read_bytes() == (tiny_base / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match=r"no revision 'nope' in .*branches: main"):
        revision_of(str(repo), "nope")


def test_plain_folder_revision_is_its_content(tiny_base, tmp_path):
    import shutil

    copy = shutil.copytree(tiny_base, tmp_path / "plain")
    before = revision_of(str(copy), "main")
    assert before == revision_of(str(tiny_base), "main")
    (copy / "model.safetensors").write_bytes(b"other weights")
    assert revision_of(str(copy), "main") != before


def test_hub_revision_check_offline_fails_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        revision_of("Qwen/Qwen2.5-0.5B-Instruct", "main")
    assert "\n" not in str(err.value) and "cannot ask the Hugging Face hub" in str(err.value)


# --- watcher --------------------------------------------------------------------------------------------------


def _events(emitted):
    return [e for e in emitted if e["event"] == "tunegate.base.updated"]


def test_watcher_announces_a_revision_the_champion_was_not_trained_on_once(
    harness, project, tiny_base, events, tmp_path, root
):
    from flows.watch import watch_base

    proj, repo, first = str(project["root"]), project["repo"], project["first"]
    register(project["root"], first, str(repo), champion=True)
    state = watch_base(root=proj, return_state=True)
    assert state.is_completed() and state.message.startswith("unchanged") and _events(events) == []

    more = tmp_path / "more"
    continue_pretraining(tiny_base, read_jsonl(root / "data/pretrain/general.jsonl")[:300], TINY, 2, 9, more)
    second = publish(more, repo)
    state = watch_base(root=proj, return_state=True)
    assert state.message.startswith("base moved"), state.message
    (event,) = _events(events)
    assert event["resource"] == {
        "prefect.resource.id": f"tunegate.base.{repo}",
        "prefect.resource.name": str(repo),
        "tunegate.project": proj,
    }
    assert event["payload"] == {"model": str(repo), "branch": "main", "old_revision": first, "new_revision": second}

    state = watch_base(root=proj, return_state=True)  # the next interval: announced already, not again
    assert "announced already" in state.message and len(_events(events)) == 1


def test_watcher_does_not_reannounce_a_revision_the_gate_rejected(harness, project, events):
    from flows.watch import watch_base

    register(project["root"], "0" * 40, str(project["repo"]), champion=True)
    rejected = register(project["root"], project["first"], str(project["repo"]), champion=False, gate_passed=False)
    state = watch_base(root=str(project["root"]), return_state=True)
    assert f"already trained as v{rejected}" in state.message and _events(events) == []


def test_watcher_on_the_demo_base_and_offline_hub(harness, project, events):
    from flows.watch import watch_base

    params = project["root"] / "params.yaml"
    doc = yaml.safe_load(params.read_text())
    doc["base"]["model"] = "demo"
    params.write_text(yaml.safe_dump(doc))
    state = watch_base(root=str(project["root"]), return_state=True)
    assert state.is_completed() and state.message.startswith("nothing to watch")

    doc["base"]["model"] = "Qwen/Qwen2.5-0.5B-Instruct"
    params.write_text(yaml.safe_dump(doc))
    state = watch_base(root=str(project["root"]), return_state=True)  # HF_HUB_OFFLINE=1 in tests
    assert state.is_failed() and "\n" not in state.message and "cannot ask the Hugging Face hub" in state.message
    assert _events(events) == []


# --- retrain --------------------------------------------------------------------------------------------------


def test_pin_changes_only_the_base_revision_line(root, tmp_path):
    from flows.retrain import pin_base_revision
    from tunegate.config import load_config

    params = tmp_path / "params.yaml"
    original = (root / "params.yaml").read_text()
    params.write_text(original)
    assert pin_base_revision(params, "a" * 40) == "main"
    changed = [(a, b) for a, b in zip(original.splitlines(), params.read_text().splitlines(), strict=True) if a != b]
    assert [b.split("#")[0].split() for _, b in changed] == [["revision:", "a" * 40]]
    assert "# hub branch" in changed[0][1] and load_config(params).base.revision == "a" * 40


def _fake_pipeline(monkeypatch, project, result: dict | None, fail: str | None = None):
    """The retrain's stages replaced by one that writes register's result (or fails like a stage)."""
    import flows.retrain as retrain_module
    from flows.pipeline import StageFailed

    seen = {}

    def fake(root, force_stages=None):
        seen["pinned"] = yaml.safe_load((project["root"] / "params.yaml").read_text())["base"]["revision"]
        if fail:
            raise StageFailed("train", 1, fail)
        out = project["root"] / "reports/register.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result))
        return {"base": "ran", "register": "ran"}

    monkeypatch.setattr(retrain_module, "run_stages", fake)
    return seen


RESULT = {"model_name": MODEL, "version": "2", "champion": "2", "gate_passed": True, "previous_champion": "1"}


def test_retrain_pins_the_revision_and_says_promoted(harness, project, monkeypatch):
    from flows.retrain import retrain

    seen = _fake_pipeline(monkeypatch, project, {**RESULT, "lines": [], "notes": [], "champion_check": "passed"})
    state = retrain(root=str(project["root"]), return_state=True)  # no revision: the branch's current commit
    assert seen["pinned"] == project["first"]
    assert state.name == "Promoted" and state.message.startswith(f"promoted: {MODEL} v2 is champion")
    assert f"@{project['first'][:12]}" in state.message and "was v1" in state.message


def test_retrain_rejected_by_the_gate_names_the_failed_checks(harness, project, monkeypatch):
    from flows.retrain import retrain

    fail = "FAIL support_gen/json_fields vs base: +0.010 < min_gain 0.200"
    result = {**RESULT, "gate_passed": False, "champion": "1", "previous_champion": None}
    _fake_pipeline(monkeypatch, project, {**result, "lines": ["PASS x", fail], "champion_check": "not run"})
    state = retrain(root=str(project["root"]), revision="b" * 40, return_state=True)
    assert state.is_completed() and state.name == "Rejected"
    base = f"{project['repo']}@{'b' * 12}"
    assert state.message == f"gate rejected {MODEL} v2 (base {base}): {fail}; champion stays at v1"


def test_retrain_that_lost_to_a_baseline_says_the_cheaper_path(harness, project, monkeypatch):
    from flows.retrain import retrain

    fail = "FAIL target  support_gen/json_fields vs retrieval-5: 0.812 -> 0.806 (...); fine-tuning does not beat ..."
    cheaper = "The cheaper path: prompting with retrieval of 5 examples gets 0.812 on support_gen/json_fields ..."
    result = {**RESULT, "gate_passed": False, "champion": "1", "previous_champion": None, "lines": [fail]}
    _fake_pipeline(monkeypatch, project, {**result, "champion_check": "not run", "recommendation": cheaper})
    state = retrain(root=str(project["root"]), revision="c" * 40, return_state=True)
    assert state.name == "Rejected" and state.message.endswith(f"{fail}; champion stays at v1. {cheaper}")


def test_retrain_failure_says_which_stage_and_why(harness, project, monkeypatch):
    from flows.retrain import retrain

    _fake_pipeline(monkeypatch, project, None, fail="tunegate train: error: train.args: no such key")
    state = retrain(root=str(project["root"]), revision="c" * 40, return_state=True)
    assert state.is_failed()
    assert state.message == "failed: stage train failed (exit 1): tunegate train: error: train.args: no such key"


# --- stage tasks: retries, the flow-run id --------------------------------------------------------------------


def _fake_dvc(monkeypatch, outcomes: list[tuple[int, str]]):
    import flows.pipeline as pipeline

    calls = []

    def run(args, cwd, env, capture_output, text):
        calls.append(env["TUNEGATE_ORCHESTRATOR"])
        code, err = outcomes[min(len(calls), len(outcomes)) - 1]
        return subprocess.CompletedProcess(args, code, stdout="", stderr=err)

    monkeypatch.setattr(pipeline.subprocess, "run", run)
    monkeypatch.setattr(pipeline, "dvc_stages", lambda root: ["register"])
    monkeypatch.setattr(pipeline.run_stage, "retry_delay_seconds", 0)
    return calls


def test_stage_retried_for_a_lost_server_and_run_id_reaches_register(harness, monkeypatch, tmp_path):
    from flows.pipeline import pipeline

    lost = "tunegate register: error: register.tracking_uri http://x: lost the MLflow server during registration"
    calls = _fake_dvc(monkeypatch, [(1, lost), (0, "")])
    state = pipeline(root=str(tmp_path), return_state=True)
    assert state.is_completed() and len(calls) == 2
    assert set(calls) == {f"prefect:{state.state_details.flow_run_id}"}  # the tag register records


def test_stage_not_retried_for_a_user_error(harness, monkeypatch, tmp_path):
    from flows.pipeline import pipeline

    calls = _fake_dvc(monkeypatch, [(1, "tunegate register: error: register.model_name: bad name")])
    state = pipeline(root=str(tmp_path), return_state=True)
    assert state.is_failed() and len(calls) == 1


# --- the deployments `tunegate deploy` serves -----------------------------------------------------------------


def test_deployments_watch_on_interval_and_retrain_on_event_and_cron(tmp_path):
    from flows.deploy import deployments
    from flows.watch import EVENT

    watcher, trainer = deployments(str(tmp_path), 30, "0 4 * * *", "main")
    assert watcher.name == "watch-base" and watcher.schedules[0].schedule.interval.total_seconds() == 30
    assert watcher.parameters == {"root": str(tmp_path), "track": "main"}
    assert trainer.name == "retrain" and trainer.schedules[0].schedule.cron == "0 4 * * *"
    assert trainer.concurrency_limit == 1
    (trigger,) = trainer.triggers
    assert trigger.expect == {EVENT} and trigger.match.model_dump()["tunegate.project"] == str(tmp_path)
    assert trigger.parameters["revision"] == "{{ event.payload.new_revision }}"


def test_deployments_go_to_a_work_pool_with_the_project_as_working_dir(harness):
    """`tunegate deploy --pool`: stored on the server for the pool's workers, loaded from the project
    folder, the same schedules and trigger as when served, plus the pipeline's own deployment."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.utilities.asyncutils import run_coro_as_sync

    from flows.deploy import to_pool

    async def pool_and_deployments(names: list[str]):
        async with get_client() as client:
            if not names:
                await client.create_work_pool(WorkPoolCreate(name="team", type="process"), overwrite=True)
                return []
            return [await client.read_deployment_by_name(name) for name in names]

    root = str(ROOT)
    with pytest.raises(
        UserError, match=r"^work pool team: not found on .*`prefect work-pool create team --type process`"
    ):
        to_pool(root, "team", 45, "0 5 * * *", "main")  # before the pool exists: one line, nothing stored
    run_coro_as_sync(pool_and_deployments([]))
    names = to_pool(root, "team", 45, "0 5 * * *", "main")
    assert names == ["tunegate-watch-base/watch-base", "tunegate-retrain/retrain", "tunegate-pipeline/pipeline"]
    watcher, trainer, pipeline = run_coro_as_sync(pool_and_deployments(names))
    for deployment in (watcher, trainer, pipeline):
        assert deployment.work_pool_name == "team"
        assert deployment.job_variables == {"working_dir": root, "env": {"PYTHONPATH": root}}
        assert deployment.parameters["root"] == root
    assert watcher.entrypoint == "flows/watch.py:watch_base" and pipeline.entrypoint == "flows/pipeline.py:pipeline"
    assert watcher.schedules[0].schedule.interval.total_seconds() == 45
    assert trainer.schedules[0].schedule.cron == "0 5 * * *" and not pipeline.schedules
    limits = [d.global_concurrency_limit.limit for d in (trainer, pipeline)]  # the server's form of concurrency_limit
    assert limits == [1, 1]


def test_a_retrain_with_no_champion_says_so():
    from flows.retrain import outcome

    result = {"model_name": "m", "version": "1", "champion": None, "gate_passed": False, "lines": ["FAIL x"]}
    state, line = outcome({**result, "champion_check": "not run"}, "demo@r", ran=True)
    assert state == "Rejected" and line.endswith("FAIL x; no champion yet") and "v-" not in line
    assert (
        outcome(result, "demo@r", ran=False)[1] == "unchanged: nothing was stale; m has no champion yet (base demo@r)"
    )


SIGTERMED = """
import logging, os, signal, sys, time
from flows.deploy import stop_within
from prefect.runner.runner import Runner

stop_within(2.0)
runner = Runner.__new__(Runner)  # the handler needs only a logger and stop()
runner._logger, runner.stop = logging.getLogger("runner"), lambda: None
signal.signal(signal.SIGTERM, runner.handle_sigterm)  # as Runner.start installs it
started, sent = time.time(), False
while time.time() - started < 30:
    try:
        if not sent:
            sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    except SystemExit:
        if sys.argv[1] == "exit":
            raise
        # swallowed, as when the signal lands while Prefect starts a flow run: the runner would serve on
"""


@pytest.mark.parametrize("exit_reaches_the_runner, code", [(True, 0), (False, 143)])
def test_a_sigterm_stops_deploy_even_when_prefect_loses_the_exit(root, exit_reaches_the_runner, code):
    import subprocess
    import sys
    import time

    started = time.time()
    mode = "exit" if exit_reaches_the_runner else "swallow"
    proc = subprocess.run([sys.executable, "-c", SIGTERMED, mode], cwd=root, capture_output=True, timeout=60)
    assert proc.returncode == code, proc.stderr.decode()[-2000:]
    assert time.time() - started < 25  # the deadline (2 s here; 30 s in `tunegate deploy`), not the 30 s loop
