"""Registration against a real `mlflow server` (SQLite backend, local artifact root): idempotent, no secret
leaks, unreachable or dying server. The pipeline flow on a real Prefect server and worker is in test_team.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.e2e.conftest import BIN, edit_params, free_port, sh, wait_http

pytestmark = pytest.mark.slow

SECRET = "hf_" + "S3cr3tT0kenThatMustNeverLeak0123456789"


@pytest.fixture(scope="module")
def server_home(tmp_path_factory) -> Path:
    """The server's store; its artifacts (its default artifact root) are under artifacts/."""
    return tmp_path_factory.mktemp("mlflow_server")


@pytest.fixture(scope="module")
def mlflow_server(server_home):
    """One real server for the module; tests that need an empty registry use a model name of their own."""
    tmp_path = server_home
    port = free_port()
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--default-artifact-root",
            str(tmp_path / "artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_register_promote_status_over_http(project, mlflow_server, server_home, tmp_path):
    original = (project / "params.yaml").read_text()
    try:
        # register.artifact_root is for a local store: with a server, artifacts go where the server says
        edit_params(
            project, **{"register.tracking_uri": mlflow_server, "register.artifact_root": str(tmp_path / "art")}
        )
        # a token in the environment must never reach MLflow
        proc = sh(project, sys.executable, "-m", "stages.register", HF_TOKEN=SECRET, MY_API_KEY=SECRET)
        result = json.loads((project / "reports/register.json").read_text())
        again = sh(project, sys.executable, "-m", "stages.register")  # idempotent: same adapter, same version
        assert json.loads((project / "reports/register.json").read_text())["version"] == result["version"]
        assert "reusing it" in again.stderr
        assert_registered_once(mlflow_server, result, experiment="tunegate")  # what the MLflow UI shows

        api = f"{mlflow_server}/api/2.0/mlflow"
        versions = requests.get(
            f"{api}/model-versions/search", params={"filter": "name='tunegate-demo'"}, timeout=10
        ).json()["model_versions"]
        tags = {t["key"]: t["value"] for t in versions[0]["tags"]}
        assert tags["base_model"] == "demo" and tags["gate_passed"] == "true"

        run = requests.get(f"{api}/runs/get", params={"run_id": result["run_id"]}, timeout=10).json()["run"]
        everything = json.dumps(run) + json.dumps(versions) + proc.stdout + proc.stderr
        assert not (tmp_path / "art").exists()
        artifacts = list((server_home / "artifacts").rglob("*"))
        assert any(p.name == "adapter_model.safetensors" for p in artifacts)
        everything += "".join(
            p.read_text(errors="ignore") for p in artifacts if p.is_file() and p.stat().st_size < 5_000_000
        )
        assert SECRET not in everything

        status = sh(project, "tunegate", "status")
        assert "tunegate-demo" in status.stdout and "pass" in status.stdout
        show = sh(project, "tunegate", "show", result["version"])
        assert "train_sha256" in show.stdout and "hp.lora.r" in show.stdout
        assert sh(project, "tunegate", "promote", result["version"]).returncode == 0
    finally:
        (project / "params.yaml").write_text(original)


def test_unreachable_server_fails_cleanly(project):
    original = (project / "params.yaml").read_text()
    try:
        edit_params(project, **{"register.tracking_uri": f"http://127.0.0.1:{free_port()}"})
        proc = sh(project, sys.executable, "-m", "stages.register", check=False)
        assert proc.returncode == 2
        assert "MLflow server not reachable" in proc.stderr and "nothing was registered" in proc.stderr
        assert "Traceback" not in proc.stderr
    finally:
        (project / "params.yaml").write_text(original)


@pytest.mark.parametrize(
    "cut_after",
    [
        "runs/log-batch",  # the run exists, its params are half logged, no model version yet
        "model-versions/create",  # the version exists, the run is not marked complete, no alias
        "model-versions/set-tag",  # the promotion record is written, the alias has not moved
    ],
)
def test_server_dying_mid_registration_then_registers_exactly_once(project, mlflow_server, tmp_path, cut_after):
    """The real server is cut off (a proxy in front of it goes away) at three points of a registration:
    one clear line, no traceback; once it is back, the next run leaves exactly one version, with its
    provenance tags, the champion alias, one complete run, and no run left marked incomplete."""
    from tests.e2e.proxy import DyingProxy

    original = (project / "params.yaml").read_text()
    proxy = DyingProxy(int(mlflow_server.rsplit(":", 1)[1]), cut_after)
    fast_fail = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    name = "cut-" + cut_after.replace("/", "-")
    try:
        edit_params(
            project,
            **{
                "register.tracking_uri": proxy.url,
                "register.artifact_root": str(tmp_path / "art"),
                "register.model_name": name,
                "register.experiment": name,
            },
        )
        cut = sh(project, sys.executable, "-m", "stages.register", check=False, **fast_fail)
        assert proxy.dead.is_set() and any(cut_after in p for p in proxy.paths), (proxy.paths, cut.stderr[-2000:])
        assert cut.returncode == 2 and "Traceback" not in cut.stderr, cut.stderr[-3000:]
        last = cut.stderr.strip().splitlines()[-1]
        assert (
            last.startswith("tunegate register: error: register.tracking_uri")
            and "lost the MLflow server during registration" in last
        )

        edit_params(project, **{"register.tracking_uri": mlflow_server})
        sh(project, sys.executable, "-m", "stages.register")
        assert_registered_once(
            mlflow_server, json.loads((project / "reports/register.json").read_text()), experiment=name
        )
    finally:
        proxy.kill()
        (project / "params.yaml").write_text(original)


def test_lost_answers_leave_one_version_and_one_run(project, mlflow_server, tmp_path):
    """A blip: the server creates the run and the version but the answers are lost, so MLflow's HTTP
    layer retries the POSTs and creates each twice. The registration still ends with one version (the
    duplicate removed), one complete run (the orphan removed) and the champion alias."""
    from tests.e2e.proxy import DyingProxy

    original = (project / "params.yaml").read_text()
    proxy = DyingProxy(int(mlflow_server.rsplit(":", 1)[1]), lose_answers_to=("runs/create", "model-versions/create"))
    try:
        edit_params(
            project,
            **{
                "register.tracking_uri": proxy.url,
                "register.artifact_root": str(tmp_path / "art"),
                "register.model_name": "lost-answers",
                "register.experiment": "lost-answers",
            },
        )
        proc = sh(project, sys.executable, "-m", "stages.register", MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0")
        assert len(proxy.lost) == 2 and sum("model-versions/create" in p for p in proxy.paths) == 2, (
            proxy.paths
        )  # the retry happened
        assert "a duplicate of v1 made by a retried request" in proc.stderr
        assert_registered_once(
            mlflow_server, json.loads((project / "reports/register.json").read_text()), experiment="lost-answers"
        )
    finally:
        proxy.kill()
        (project / "params.yaml").write_text(original)


def assert_registered_once(server: str, result: dict, experiment: str) -> None:
    """Read through the REST endpoints the MLflow UI reads: exactly one version of the adapter, with its
    provenance tags, the champion alias, the logged model linked to it, and one run, complete."""
    api, name = f"{server}/api/2.0/mlflow", result["model_name"]
    get = lambda path, **params: requests.get(f"{api}/{path}", params=params, timeout=10).json()  # noqa: E731
    versions = get("model-versions/search", filter=f"name='{name}'")["model_versions"]
    assert [v["version"] for v in versions] == [result["version"]], versions
    tags = {t["key"]: t["value"] for t in versions[0]["tags"]}
    assert {
        "base_model",
        "base_revision",
        "train_sha256",
        "adapter_sha256",
        "git_commit",
        "dvc_lock_sha256",
        "gate_passed",
        "run_id",
    } <= set(tags)
    assert (
        tags["adapter_sha256"] == result["adapter_sha256"]
        and tags["previous_champion"] == ""
        and tags["run_id"] == result["run_id"]
    )
    model = get("registered-models/get", name=name)["registered_model"]
    assert model["aliases"] == [{"alias": "champion", "version": result["version"]}]
    assert get("registered-models/alias", name=name, alias="champion")["model_version"]["version"] == result["version"]
    logged = get(f"logged-models/{versions[0]['source'].removeprefix('models:/')}")["model"][
        "info"
    ]  # source: models:/<model id>
    links = json.loads({t["key"]: t["value"] for t in logged["tags"]}["mlflow.modelVersions"])
    assert {(link["name"], str(link["version"])) for link in links} == {(name, result["version"])}, links
    exp = get("experiments/get-by-name", experiment_name=experiment)["experiment"]
    runs = requests.post(f"{api}/runs/search", json={"experiment_ids": [exp["experiment_id"]]}, timeout=10).json()[
        "runs"
    ]
    assert [(r["info"]["run_id"], {t["key"]: t["value"] for t in r["data"]["tags"]}["registration"]) for r in runs] == [
        (result["run_id"], "complete")
    ]
