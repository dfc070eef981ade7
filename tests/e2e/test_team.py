"""The team setup for real, on 127.0.0.1 (`tunegate team up`'s services, started by the test): PostgreSQL,
`mlflow server` (PostgreSQL backend, basic auth, artifacts proxied to the stack's folder on disk),
`prefect server` on PostgreSQL and a process worker.

The demo pipeline runs as a deployment of the work pool, through the worker; then a teammate, in a
folder that shares nothing with the project but the server URLs and credentials in the environment,
reads the registry, has a tampered model refused, promotes, and loads the champion. The whole stack is
stopped and started again: every version still fetches, loads and promotes; with the store's files gone,
fetch and promote say they are missing (and the start check says so too). MLflow and PostgreSQL are
killed mid-registration and restarted: the next run registers exactly once. No credential reaches a
log, a tag, a description or an artifact.

Set TUNEGATE_UI_SHOTS=<folder> (and have chromium on PATH) to save screenshots of the MLflow UI there.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.e2e.conftest import BIN, edit_params, env_for, sh

pytestmark = [pytest.mark.slow, pytest.mark.team]

FINISHED = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from tunegate.team import TeamStack

    team = TeamStack(tmp_path_factory.mktemp("team"))
    try:
        yield team.start()
    finally:
        team.stop()


@pytest.fixture(scope="module")
def workspace(project, stack, tmp_path_factory) -> Path:
    """A copy of the session's built demo (outputs and DVC cache: only `register` is stale) whose
    params.yaml names the team's MLflow server, committed as a team would."""
    dest = tmp_path_factory.mktemp("team-project") / "project"
    shutil.copytree(project, dest, symlinks=True, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    edit_params(dest, **{"register.tracking_uri": stack.mlflow_url})
    subprocess.run(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "registry: the team's MLflow server"],
        cwd=dest,
        check=True,
    )
    return dest


def team_env(stack, project: Path | None = None, **extra: str) -> dict[str, str]:
    env = env_for(project or Path.cwd(), **stack.client_env(), **extra)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL", "PREFECT_HOME"):
        env.pop(key, None)  # a client needs no S3 credentials: the MLflow server proxies the artifacts
    if project is None:
        env.pop("PYTHONPATH")
    return env


def run(cwd: Path, env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode:
        raise AssertionError(
            f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def mlflow_api(stack, path: str, method: str = "GET", **kw):
    auth = (stack.creds["MLFLOW_TRACKING_USERNAME"], stack.creds["MLFLOW_TRACKING_PASSWORD"])
    response = requests.request(method, f"{stack.mlflow_url}/api/2.0/mlflow/{path}", auth=auth, timeout=15, **kw)
    response.raise_for_status()
    return response.json()


def test_the_servers_refuse_anonymous_clients(stack):
    assert (
        requests.get(f"{stack.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10).status_code
        == 401
    )
    assert requests.post(f"{stack.prefect_url}/flow_runs/filter", json={}, timeout=10).status_code == 401
    assert mlflow_api(stack, "experiments/search", params={"max_results": 1})


def test_pipeline_runs_as_a_deployment_through_the_worker(stack, workspace):
    env = team_env(stack, workspace)
    deployed = run(workspace, env, str(BIN / "tunegate"), "deploy", "--pool", stack.pool, "--root", str(workspace))
    for name in ("tunegate-pipeline/pipeline", "tunegate-retrain/retrain", "tunegate-watch-base/watch-base"):
        assert f"deployment {name} -> work pool {stack.pool}" in deployed.stdout
    deployment = stack.prefect_api("GET", "deployments/name/tunegate-pipeline/pipeline")
    assert deployment["work_pool_name"] == stack.pool and deployment["job_variables"]["working_dir"] == str(workspace)

    lock_before = yaml.safe_load((workspace / "dvc.lock").read_text())["stages"]
    flow_run = stack.prefect_api("POST", f"deployments/{deployment['id']}/create_flow_run", json={})
    deadline = time.time() + 900
    while (state := stack.prefect_api("GET", f"flow_runs/{flow_run['id']}"))["state_type"] not in FINISHED:
        assert time.time() < deadline, "the worker did not finish the pipeline's flow run in 15 minutes"
        time.sleep(3)
    logs = stack.prefect_api("POST", "logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run["id"]]}}})
    assert state["state_type"] == "COMPLETED", [entry["message"] for entry in logs][-20:]
    assert any("Worker" in entry["message"] or "process" in entry["message"].lower() for entry in logs) or logs

    from flows.pipeline import dvc_stages

    tasks = stack.prefect_api(
        "POST",
        "task_runs/filter",
        json={"flow_runs": {"id": {"any_": [flow_run["id"]]}}, "sort": "EXPECTED_START_TIME_ASC"},
    )
    order = dvc_stages(workspace)
    declared = yaml.safe_load((workspace / "dvc.yaml").read_text())["stages"]
    assert sorted(order) == sorted(declared)  # the flow's stages are exactly dvc.yaml's, never a hand-kept list
    assert order[0] == "base" and order[-1] == "register" and order.index("train") < order.index("gate")
    assert [t["name"] for t in tasks] == order  # one task run per stage, in DVC's order, run by the worker
    # only register was stale; the rest of dvc.lock is as a manual `dvc repro` left it, and DVC agrees
    lock_after = yaml.safe_load((workspace / "dvc.lock").read_text())["stages"]
    assert {k: v for k, v in lock_after.items() if k != "register"} == {
        k: v for k, v in lock_before.items() if k != "register"
    }
    assert "up to date" in sh(workspace, "dvc", "status").stdout

    result = json.loads((workspace / "reports/register.json").read_text())
    assert result["gate_passed"] and result["champion"] == result["version"] == "1"
    version = mlflow_api(stack, "model-versions/get", params={"name": result["model_name"], "version": "1"})
    tags = {t["key"]: t["value"] for t in version["model_version"]["tags"]}
    assert tags["orchestrated_by"] == f"prefect:{flow_run['id']}"
    assert version["model_version"]["description"].startswith("**Gate PASSED**")

    # the artifacts went where the server says: its proxy, into the stack's store (not the project's folder)
    experiment = mlflow_api(stack, "experiments/get-by-name", params={"experiment_name": "tunegate"})["experiment"]
    assert experiment["artifact_location"].startswith("mlflow-artifacts:")
    keys = stored(stack)
    assert any(k.endswith("adapter_model.safetensors") for k in keys), keys[:20]
    assert any("/base/" in k and k.endswith("model.safetensors") for k in keys), keys[:20]
    run_files = [k for k in keys if f"/{result['run_id']}/artifacts/" in k]
    assert {"reports/gate/chart.png", "reports/gate/report.md"} <= {k.split("/artifacts/", 1)[1] for k in run_files}
    assert not (workspace / "mlartifacts").exists()


def test_a_teammate_reads_promotes_and_loads_from_another_folder(stack, workspace, tmp_path):
    """Nothing shared with the project but the server URLs and credentials (client.env)."""
    mate = tmp_path / "teammate"
    mate.mkdir()
    env = team_env(stack, TUNEGATE_MODEL="tunegate-demo")
    assert set(stack.client_env()) <= set(env) and "AWS_SECRET_ACCESS_KEY" not in env
    tunegate = str(BIN / "tunegate")

    status = run(mate, env, tunegate, "status").stdout
    assert "tunegate-demo" in status and stack.mlflow_url in status and "pass" in status
    show = run(mate, env, tunegate, "show", "1").stdout
    assert "train_sha256" in show and "base_revision" in show and "orchestrated_by" in show
    assert not (mate / "reports").exists()  # a registry command outside a project writes nothing there

    # tamper with the adapter in the store: promote re-hashes what the artifact store holds and refuses
    path = Path(stack.artifacts) / next(k for k in stored(stack) if k.endswith("adapter_model.safetensors"))
    original = path.read_bytes()
    path.write_bytes(original[:-8] + b"tampered")
    try:
        refused = run(mate, env, tunegate, "promote", "1", check=False)
        assert refused.returncode == 2 and "tampered?" in refused.stderr and "Traceback" not in refused.stderr
        assert "present but no longer match" in refused.stderr and "missing" not in refused.stderr
    finally:
        path.write_bytes(original)
    assert "champion: v1 already" in run(mate, env, tunegate, "promote", "1").stdout

    fetched = run(mate, env, tunegate, "fetch", "champion", "--to", "fetched").stdout
    assert "sha256 checked" in fetched and str(workspace) not in fetched
    # the logged model itself names where its base is stored (MLflow keeps the registering machine's folder)
    metadata = yaml.safe_load(next((mate / "fetched").rglob("MLmodel")).read_text())["metadata"]
    assert metadata["base_artifact"].startswith("runs:/") and len(metadata["base_files_sha256"]) == 64
    load = (
        "import json, sys, torch\n"
        "from tunegate.registry import client, fetch, load\n"
        "import os\n"
        "got = fetch(client(os.environ['MLFLOW_TRACKING_URI']), 'tunegate-demo', 'champion', 'again')\n"
        "model, tok = load(got)\n"
        "ids = tok.apply_chat_template([{'role': 'user', 'content': 'Where is order 12345? The lamp never came.'}],"
        " add_generation_prompt=True, return_tensors='pt', return_dict=True)\n"
        "out = model.generate(**ids, max_new_tokens=24, do_sample=False)\n"
        "print(json.dumps({'reply': tok.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True)}))\n"
    )
    reply = json.loads(run(mate, env, sys.executable, "-c", load).stdout.strip().splitlines()[-1])["reply"]
    assert reply.strip().startswith("{")  # the champion writes a JSON ticket

    shots = os.environ.get("TUNEGATE_UI_SHOTS")
    if shots and shutil.which("chromium"):
        screenshots(stack, Path(shots), json.loads((workspace / "reports/register.json").read_text())["run_id"])


LOAD = (
    "import json, os\n"
    "from tunegate.registry import client, fetch, load\n"
    "got = fetch(client(os.environ['MLFLOW_TRACKING_URI']), 'tunegate-demo', 'champion', 'after-restart')\n"
    "model, tok = load(got)\n"
    "ids = tok.apply_chat_template([{'role': 'user', 'content': 'Where is order 12345? The lamp never came.'}],"
    " add_generation_prompt=True, return_tensors='pt', return_dict=True)\n"
    "out = model.generate(**ids, max_new_tokens=24, do_sample=False)\n"
    "print(json.dumps({'reply': tok.decode(out[0, ids['input_ids'].shape[1]:], skip_special_tokens=True)}))\n"
)


def test_a_restart_keeps_every_model_and_lost_files_are_named_missing(stack, workspace, tmp_path):
    """Stop the whole stack (as Ctrl-C on `tunegate team up` does) and start it again: the model files are
    on disk, so the champion fetches, loads and promotes from another folder. Then the store loses them
    (its folder moved away): the start check, fetch and promote each say so in one line, as missing files,
    not as tampering."""
    from tunegate.team import missing_files, store_line

    mate = tmp_path / "teammate"
    mate.mkdir()
    before = set(stored(stack))
    stack.stop()
    stack.start()
    assert set(stored(stack)) == before and before
    checked, gone = missing_files(stack)
    assert checked >= 1 and gone == [] and "files present" in store_line(stack)

    env = team_env(stack, TUNEGATE_MODEL="tunegate-demo")
    tunegate = str(BIN / "tunegate")
    assert "sha256 checked" in run(mate, env, tunegate, "fetch", "champion", "--to", "fetched").stdout
    reply = json.loads(run(mate, env, sys.executable, "-c", LOAD).stdout.strip().splitlines()[-1])["reply"]
    assert reply.strip().startswith("{")
    assert "champion: v1 already" in run(mate, env, tunegate, "promote", "1").stdout

    store, away = Path(stack.artifacts), Path(stack.artifacts + "-away")
    store.rename(away)
    store.mkdir()
    try:
        assert missing_files(stack)[1] == ["tunegate-demo v1"]
        assert "no longer holds the files of tunegate-demo v1" in store_line(stack)
        for args in (["fetch", "1", "--to", "lost"], ["promote", "1"]):
            refused = run(mate, env, tunegate, *args, check=False)
            lines = refused.stderr.strip().splitlines()
            assert refused.returncode == 2 and len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr
            assert "tunegate-demo v1: its model files are missing from the artifact store of" in lines[0], lines
            assert stack.mlflow_url in lines[0] and "tampered" not in lines[0]
    finally:
        shutil.rmtree(store)
        away.rename(store)
    assert "sha256 checked" in run(mate, env, tunegate, "fetch", "1", "--to", "back").stdout


def stored(stack) -> list[str]:
    """Every file in the stack's artifact store, relative to it."""
    root = Path(stack.artifacts)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_mlflow_and_postgres_killed_mid_registration_then_registered_exactly_once(stack, workspace):
    name = "team-cut"
    original = (workspace / "params.yaml").read_text()
    edit_params(workspace, **{"register.model_name": name, "register.experiment": name})
    env = team_env(stack, workspace, MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stages.register"],
            cwd=workspace,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 300
        while not started_runs(stack, name):
            assert proc.poll() is None and time.time() < deadline, "the registration ended before it could be cut"
            time.sleep(0.1)
        stack.stop("mlflow", hard=True)  # SIGKILL
        stack.stop("postgres", hard=True)  # immediate shutdown: recovery at the next start
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 2 and "Traceback" not in err, err[-3000:]
        assert "lost the MLflow server during registration" in err.strip().splitlines()[-1]

        stack.start()  # PostgreSQL recovers, MLflow comes back on the same port (Prefect reconnects)
        sh(workspace, sys.executable, "-m", "stages.register", **stack.client_env())
        result = json.loads((workspace / "reports/register.json").read_text())
        versions = mlflow_api(stack, "model-versions/search", params={"filter": f"name='{name}'"})["model_versions"]
        assert [v["version"] for v in versions] == [result["version"]] == ["1"]
        exp = mlflow_api(stack, "experiments/get-by-name", params={"experiment_name": name})["experiment"]
        runs = mlflow_api(stack, "runs/search", "POST", json={"experiment_ids": [exp["experiment_id"]]}).get("runs", [])
        marks = [{t["key"]: t["value"] for t in r["data"]["tags"]}.get("registration") for r in runs]
        assert marks == ["complete"], marks
        alias = mlflow_api(stack, "registered-models/alias", params={"name": name, "alias": "champion"})
        assert alias["model_version"]["version"] == "1"
    finally:
        (workspace / "params.yaml").write_text(original)


def started_runs(stack, experiment: str) -> list:
    try:
        exp = mlflow_api(stack, "experiments/get-by-name", params={"experiment_name": experiment})["experiment"]
    except requests.HTTPError:
        return []
    runs = mlflow_api(stack, "runs/search", "POST", json={"experiment_ids": [exp["experiment_id"]]}).get("runs", [])
    return [
        r for r in runs if {t["key"]: t["value"] for t in r["data"].get("tags", [])}.get("registration") == "started"
    ]


def test_no_credential_reaches_a_log_tag_description_or_artifact(stack, workspace, tmp_path):
    from tunegate.team import SECRET_VARS

    secrets = {stack.creds[key].split(":")[-1] for key in SECRET_VARS}
    seen = []
    for exp in mlflow_api(stack, "experiments/search", params={"max_results": 100})["experiments"]:
        runs = mlflow_api(stack, "runs/search", "POST", json={"experiment_ids": [exp["experiment_id"]]}).get("runs", [])
        seen.append(json.dumps(exp) + json.dumps(runs))
    for model in mlflow_api(stack, "registered-models/search")["registered_models"]:
        found = mlflow_api(stack, "model-versions/search", params={"filter": f"name='{model['name']}'"})
        seen.append(json.dumps(model) + json.dumps(found))
    # every artifact in the store, read straight from its files
    for key in stored(stack):
        path = Path(stack.artifacts) / key
        if path.stat().st_size < 5_000_000:
            seen.append(path.read_bytes().decode(errors="ignore"))
    logs = stack.prefect_api("POST", "logs/filter", json={"limit": 200})
    seen.append(json.dumps(logs) + json.dumps(stack.prefect_api("POST", "flow_runs/filter", json={})))
    seen += [p.read_text(errors="ignore") for p in (workspace / "reports").rglob("*") if p.is_file()]
    seen += [p.read_text(errors="ignore") for p in (stack.home / "logs").glob("*.log")]
    everything = "\n".join(seen)
    assert len(everything) > 100_000  # it did read the store
    for secret in secrets:
        assert secret not in everything


def screenshots(stack, folder: Path, run_id: str) -> None:
    """What a teammate sees in the MLflow UI: the version page (description, tags, alias) and its run's
    artifacts (gate report and chart). The browser gets the credentials from a proxy in front of MLflow."""
    from tests.e2e.proxy import AuthProxy
    from tests.e2e.test_retrain import screenshot

    port = int(stack.mlflow_url.rsplit(":", 1)[1])
    proxy = AuthProxy(port, stack.creds["MLFLOW_TRACKING_USERNAME"], stack.creds["MLFLOW_TRACKING_PASSWORD"])
    experiment = mlflow_api(stack, "runs/get", params={"run_id": run_id})["run"]["info"]["experiment_id"]
    try:
        screenshot(f"{proxy.url}/#/models/tunegate-demo/versions/1", folder / "mlflow-version.png")
        screenshot(
            f"{proxy.url}/#/experiments/{experiment}/runs/{run_id}/artifacts/reports/gate/chart.png",
            folder / "mlflow-run-artifacts.png",
        )
    finally:
        proxy.close()
