"""infra/compose read as Docker Compose would: every service runs a pinned image (or the project's
Dockerfile), is health-checked, waits for what it needs, and gets every credential from `.env`, whose
names `.env.example` lists with placeholders only; nothing the files refer to is missing."""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from tests.conftest import ROOT

COMPOSE = ROOT / "infra/compose"
FILE = COMPOSE / "docker-compose.yml"
VARIABLE = re.compile(r"\$\{(\w+)(?::?[-?]([^}]*))?\}")
ONE_SHOT = {"create-bucket"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(FILE.read_text())


def example_env() -> dict[str, str]:
    lines = (COMPOSE / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def test_every_service_runs_a_pinned_image_or_the_projects_dockerfile(compose):
    for name, service in compose["services"].items():
        image = service.get("image", "")
        if "build" in service:
            build = service["build"]
            assert (COMPOSE / build["context"] / build["dockerfile"]).is_file(), name
            assert image.startswith("tunegate:"), name
        else:
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), (name, image)


def test_long_running_services_are_health_checked_and_wait_for_healthy_dependencies(compose):
    services = compose["services"]
    for name, service in services.items():
        if name not in ONE_SHOT:
            check = service.get("healthcheck", {}).get("test")
            assert check and check[0] == "CMD", name
            assert service.get("restart") == "unless-stopped", name
        for needed, condition in (service.get("depends_on") or {}).items():
            assert needed in services, (name, needed)
            wanted = "service_completed_successfully" if needed in ONE_SHOT else "service_healthy"
            assert condition == {"condition": wanted}, (name, needed)
    # MLflow starts only once the bucket exists; workers only once both servers answer
    assert "create-bucket" in services["mlflow"]["depends_on"]
    assert {"prefect", "mlflow"} <= set(services["worker"]["depends_on"])


def test_the_pieces_are_wired_as_the_team_setup_needs(compose):
    services = compose["services"]
    mlflow = services["mlflow"]
    script = " ".join(mlflow["command"])
    assert "--serve-artifacts" in script and "--app-name basic-auth" in script
    assert mlflow["environment"]["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    assert services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    databases = re.findall(r"CREATE DATABASE (\w+)", (COMPOSE / "postgres-init.sql").read_text())
    assert {"mlflow_auth", "prefect"} <= set(databases) and services["postgres"]["environment"][
        "POSTGRES_DB"
    ] == "mlflow"
    assert "mb" in services["create-bucket"]["command"] and "--ignore-existing" in services["create-bucket"]["command"]
    for name, pool in (("worker", "WORK_POOL"), ("gpu-worker", "GPU_WORK_POOL")):
        command = services[name]["command"]
        assert command[:3] == ["prefect", "worker", "start"] and "process" in command and pool in " ".join(command)
        assert services[name]["environment"]["PREFECT_API_URL"] == "http://prefect:4200/api"
    gpu = services["gpu-worker"]
    assert gpu["profiles"] == ["gpu"] and gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert "cu" in gpu["build"]["args"]["TORCH_INDEX"]
    # the published ports are the three a team uses; the store and the database stay on the compose network
    published = {port for service in services.values() for port in service.get("ports", [])}
    assert published == {"5000:5000", "4200:4200", "127.0.0.1:9001:9001"}


def test_credentials_come_from_env_and_the_example_has_placeholders_only(compose):
    text, example = FILE.read_text(), example_env()
    used = {name for name, _ in VARIABLE.findall(text)}
    assert used <= set(example), used - set(example)  # every variable the file reads is documented
    for key in ("POSTGRES_PASSWORD", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_PASSWORD", "PREFECT_API_AUTH_STRING"):
        assert "change-me" in example[key], key  # placeholders, never a usable secret
        assert re.search(rf"\$\{{{key}:\?", text), key  # compose refuses to start without it
    for service in compose["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|SECRET|AUTH_STRING|TOKEN", key):
                assert "${" in str(value), key  # a secret is never written into the file itself
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/compose/.env"], cwd=ROOT).returncode
    assert ignored == 0


def test_the_image_installs_the_pinned_packages_with_the_team_extra():
    text = (COMPOSE / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11[\w.-]*$", text, re.M)
    for copied in re.findall(r"^COPY (\S+)", text, re.M):
        assert (ROOT / copied).exists(), copied
    assert 'pip install -c /tmp/constraints.txt ".[team]"' in text
    assert "TORCH_INDEX" in text


def test_accelerate_configs_are_the_ones_the_readme_names():
    names = {p.stem for p in (ROOT / "infra/accelerate").glob("*.yaml")}
    readme = (ROOT / "infra/README.md").read_text()
    assert names == {"single_gpu", "multi_gpu", "fsdp", "zero3"} and all(f"`{n}`" in readme for n in names)


# --- tunegate team up's credentials and the registry commands outside a project ---------------------------------


def test_team_credentials_are_made_once_private_and_the_environment_wins(tmp_path, monkeypatch):
    import os
    import stat

    from tunegate.team import SECRET_VARS, TEAM_VARS, TeamStack

    for key in TEAM_VARS:
        monkeypatch.delenv(key, raising=False)
    first = TeamStack(tmp_path / "team")
    path = tmp_path / "team/secrets.env"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and set(first.creds) == set(TEAM_VARS)
    assert len({first.creds[k] for k in SECRET_VARS}) == len(SECRET_VARS)  # each secret its own
    again = TeamStack(tmp_path / "team")
    assert again.creds == first.creds and again.ports == first.ports  # a restart keeps credentials and ports
    monkeypatch.setenv("POSTGRES_PASSWORD", "from-the-environment")
    assert TeamStack(tmp_path / "team").creds["POSTGRES_PASSWORD"] == "from-the-environment"
    client = first.client_env()  # a client gets the URLs and its own credentials, never the store's or the DB's
    assert set(client) == {
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "PREFECT_API_URL",
        "PREFECT_API_AUTH_STRING",
    }
    written = first.write_client_env()
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert first.creds["POSTGRES_PASSWORD"] not in written.read_text()
    assert os.environ.get("POSTGRES_PASSWORD") == "from-the-environment"


def test_registry_commands_work_from_any_folder_given_the_server(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tunegate.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("TUNEGATE_MODEL", raising=False)
    monkeypatch.delenv("TUNEGATE_PARAMS", raising=False)
    runner = CliRunner()
    missing = runner.invoke(app, ["status"])
    assert missing.exit_code == 2 and "--tracking-uri and --model" in missing.output
    uri = f"sqlite:///{tmp_path / 'team.db'}"
    ok = runner.invoke(app, ["status", "--tracking-uri", uri, "--model", "shared-model"])
    assert ok.exit_code == 0 and "shared-model: no versions registered yet" in ok.output, ok.output
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("TUNEGATE_MODEL", "shared-model")
    shown = runner.invoke(app, ["show", "3"])
    assert shown.exit_code == 2 and "shared-model v3: no such version" in shown.output
    assert not (tmp_path / "reports").exists()  # outside a project nothing is written besides the store


def test_kubernetes_workers_take_credentials_from_a_secret_and_the_gpu_one_asks_for_a_gpu():
    docs = list(yaml.safe_load_all((ROOT / "infra/k8s/workers.yaml").read_text()))
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert kinds == {
        ("ConfigMap", "tunegate-servers"),
        ("Deployment", "tunegate-worker"),
        ("Deployment", "tunegate-gpu-worker"),
    }
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    assert not any(re.search(r"PASSWORD|SECRET|AUTH|TOKEN", key) for key in config)  # secrets live in a Secret
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        spec = deployment["spec"]
        assert spec["selector"]["matchLabels"] == spec["template"]["metadata"]["labels"]
        (container,) = spec["template"]["spec"]["containers"]
        assert container["command"][:3] == ["prefect", "worker", "start"] and "process" in container["command"]
        assert {"secretRef": {"name": "tunegate-credentials"}} in container["envFrom"]
        assert container["livenessProbe"]["httpGet"]["port"] == 8080 and "--with-healthcheck" in container["command"]
        assert container["workingDir"] == config["PROJECT_DIR"]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert config["PROJECT_DIR"].startswith(mounts["project"])
        gpu = deployment["metadata"]["name"] == "tunegate-gpu-worker"
        assert ("nvidia.com/gpu" in container["resources"].get("limits", {})) == gpu
        assert container["image"].endswith(":gpu" if gpu else ":cpu")
        pool = container["command"][container["command"].index("--pool") + 1]
        assert pool == ("tunegate-gpu" if gpu else "tunegate")
