"""The retraining loop on a real Prefect server (127.0.0.1), on the session's demo project.

`tunegate deploy` serves the base watcher and the retrain deployment. A new revision of the demo base is
published (`tunegate demo-base`); the watcher announces it (`tunegate.base.updated`), the event triggers
the retrain, which runs every DVC stage as a task run and registers a version carrying the new base
revision and its flow run id; it becomes the champion because its gate passed (a registered model of its
own, so no earlier champion's comparison decides it). Then a base revision that
already does the support task (the champion folded into its base) gives a candidate that gains nothing
on the target tasks: the gate rejects it and the champion stays.

Set TUNEGATE_UI_SHOTS=<folder> (and have chromium on PATH) to save screenshots of the Prefect UI there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
import requests
import yaml

from tests.e2e.conftest import BIN, edit_params, env_for, free_port, sh, wait_http

pytestmark = pytest.mark.slow

MODEL = "tunegate-retrain"  # a registered model of its own: its first champion is this loop's to make
HUB = "models/demo-hub"  # the local model repository the demo base revisions are published into
NEW_BASE_STEPS = "150"  # more pretraining of the demo base: a new revision in ~30 s
# The loop's own run, shorter than the default and what it does not judge left out: 120 steps at 3x the
# learning rate pass the gate over a base (support_gen 0.003 -> 0.550, general within its margins); no
# export to check; the prompt baseline only (the demo's context has no room for examples anyway).
LOOP_PARAMS = {
    "base.model": HUB,
    "register.model_name": MODEL,
    "train.args.max_steps": 120,
    "train.args.learning_rate": 0.003,
    "export.formats": [],
    "baselines.few_shot": 0,
    "baselines.retrieval": 0,
}
FINISHED = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def client(project):
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def post(api: str, path: str, body: dict) -> list | dict:
    response = requests.post(f"{api}/{path}", json=body, timeout=10)
    response.raise_for_status()
    return response.json()


def runs_of(api: str, flow: str) -> list[dict]:
    return post(api, "flow_runs/filter", {"flows": {"name": {"any_": [flow]}}, "sort": "EXPECTED_START_TIME_ASC"})


def events(api: str) -> list[dict]:
    return post(api, "events/filter", {"filter": {"event": {"name": ["tunegate.base.updated"]}}, "limit": 50})["events"]


def wait_for(what: str, check, timeout: float, loop: dict):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = check()
        if found:
            return found
        if loop["deploy"].poll() is not None:
            break
        time.sleep(3)
    log = Path(loop["log"]).read_text()[-4000:]
    raise AssertionError(f"{what}: not within {timeout:.0f}s; tunegate deploy's output:\n{log}")


def retrain_finished(loop: dict, count: int):
    runs = runs_of(loop["api"], "tunegate-retrain")
    done = [r for r in runs if r["state_type"] in FINISHED]
    return done if len(done) >= count else None


def newest_version(c):
    return max(c.search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version))


def publish(project: Path, *args: str) -> str:
    out = sh(project, "tunegate", "demo-base", "--into", HUB, *args).stdout
    return out.split(f"{HUB}@")[1].split()[0]


@pytest.fixture(scope="module")
def loop(project, tmp_path_factory):
    """A Prefect server, a first published revision of the demo base, params following it, `tunegate deploy`."""
    tmp = tmp_path_factory.mktemp("retrain_loop")
    started = time.time()
    original = (project / "params.yaml").read_text()
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **env_for(project),
        "PREFECT_HOME": str(tmp / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOCAL_STORAGE_PATH": str(tmp / "results"),
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
    }
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deploy = None
    try:
        wait_http(f"{api}/health", timeout=180)
        first = publish(project, "--steps", NEW_BASE_STEPS, "--seed", "2")
        edit_params(project, **LOOP_PARAMS)
        log = tmp / "deploy.log"
        with log.open("w") as out:
            deploy = subprocess.Popen(
                [str(BIN / "tunegate"), "deploy", "--interval", "20"],
                cwd=project,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        yield {"api": api, "port": port, "deploy": deploy, "log": log, "first": first, "tmp": tmp}
    finally:
        (project / "params.yaml").write_text(original)  # first: the tests after this module read the default run
        running = [proc for proc in (deploy, server) if proc is not None]
        for proc in running:
            proc.terminate()
        stopped = []
        for proc in running:  # `tunegate deploy` must stop on SIGTERM (within its 30 s deadline at worst)
            try:
                stopped.append(proc.wait(timeout=60) is not None)
            except subprocess.TimeoutExpired:
                proc.kill()
                stopped.append(False)
        sh(project, "dvc", "repro")  # back to the default run: restored from DVC's run cache
        assert all(stopped), "a SIGTERM did not stop `tunegate deploy` or the Prefect server within 60 s"
        (project / "retrain_loop.seconds").write_text(f"{time.time() - started:.0f}")


def test_new_base_revision_is_announced_retrained_and_promoted_by_its_gate(project, loop):
    from flows.pipeline import dvc_stages

    c = client(project)
    assert c.search_model_versions(f"name = '{MODEL}'") == []
    (run,) = wait_for("the triggered retrain", lambda: retrain_finished(loop, 1), 1800, loop)
    message = run["state"]["message"]
    assert run["state_name"] == "Promoted", message

    (event,) = [e for e in events(loop["api"]) if e["payload"]["new_revision"] == loop["first"]]  # announced once
    assert event["resource"]["prefect.resource.id"] == f"tunegate.base.{HUB}"
    assert event["payload"]["model"] == HUB and "old_revision" in event["payload"]
    assert run["parameters"]["revision"] == loop["first"]  # the event's revision, through the trigger
    assert any(r["state_type"] == "COMPLETED" for r in runs_of(loop["api"], "tunegate-watch-base"))

    tasks = post(loop["api"], "task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    assert sorted(t["name"] for t in tasks) == sorted(dvc_stages(project))  # one task run per DVC stage
    assert all(t["state_type"] == "COMPLETED" for t in tasks)

    newest = newest_version(c)
    tags = newest.tags
    assert tags["base_model"] == HUB and tags["base_revision"] == loop["first"]
    assert tags["orchestrated_by"] == f"prefect:{run['id']}"
    assert tags["gate_passed"] == "true"
    assert c.get_model_version_by_alias(MODEL, "champion").version == newest.version
    assert message.startswith(f"promoted: {MODEL} v{newest.version} is champion (base {HUB}@{loop['first'][:12]}")
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lock["stages"]["base"]["params"]["params.yaml"]["base"]["revision"] == loop["first"]  # pinned

    # a watcher run started after the retrain ended: the champion's base is current, nothing is announced again
    ended = datetime.fromisoformat(run["end_time"])
    later = lambda: [
        r
        for r in runs_of(loop["api"], "tunegate-watch-base")
        if r["state_type"] == "COMPLETED" and r["start_time"] and datetime.fromisoformat(r["start_time"]) > ended
    ]
    wait_for("a watcher run after the retrain", later, 120, loop)
    assert len(events(loop["api"])) == 1
    started = [r for r in runs_of(loop["api"], "tunegate-retrain") if r["state_type"] != "SCHEDULED"]  # not the cron's
    assert len(started) == 1


def test_base_that_already_does_the_task_is_rejected_and_the_champion_stays(project, loop):
    from transformers import AutoTokenizer

    from tunegate.models import load_manifest, load_with_adapter

    c = client(project)
    champion = c.get_model_version_by_alias(MODEL, "champion")
    merged = loop["tmp"] / "merged"  # the champion folded into its base: a base that already knows the task
    load_with_adapter(
        load_manifest(project / "models/base"), project / "models/candidate/adapter", merge=True
    ).save_pretrained(merged, safe_serialization=True)
    AutoTokenizer.from_pretrained(project / "models/candidate/adapter").save_pretrained(merged)
    # what is trained on it does not matter here (the base already scores what fine-tuning could add): 30 steps
    edit_params(project, **{"train.args.max_steps": 30})
    second = publish(project, "--steps", "0", "--source", str(merged))

    runs = wait_for("the second retrain", lambda: retrain_finished(loop, 2), 1800, loop)
    run = runs[-1]
    message = run["state"]["message"]
    assert run["state_name"] == "Rejected" and run["parameters"]["revision"] == second, message
    assert message.startswith(f"gate rejected {MODEL} v") and "FAIL target  support_" in message, message
    assert message.endswith(f"champion stays at v{champion.version}")

    newest = newest_version(c)
    assert newest.tags["base_revision"] == second and newest.tags["gate_passed"] == "false"
    assert newest.tags["eval.baseline.prompt.support_gen.json_fields"]  # the new base's baselines, scored again
    assert newest.tags["orchestrated_by"] == f"prefect:{run['id']}"
    assert c.get_model_version_by_alias(MODEL, "champion").version == champion.version

    shots = os.environ.get("TUNEGATE_UI_SHOTS")
    if shots and shutil.which("chromium"):
        promoted = runs[0]["id"]
        ui = f"http://127.0.0.1:{loop['port']}"
        for name, url in (
            ("prefect-deployments", f"{ui}/deployments"),
            ("prefect-retrain-run", f"{ui}/runs/flow-run/{promoted}"),
        ):
            screenshot(url, Path(shots) / f"{name}.png")


def screenshot(url: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1440,900",
            "--virtual-time-budget=15000",
            f"--screenshot={out}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
