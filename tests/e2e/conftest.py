"""A throwaway copy of the project in which the real pipeline runs (`dvc repro`, real MLflow, CPU).

One copy per test session: the first `dvc repro` builds the demo base and everything after it;
later tests change params and re-run only what DVC says is stale.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

BIN = Path(sys.executable).parent


def env_for(project: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONPATH": str(project), **extra}
    env.pop("TUNEGATE_PARAMS", None)
    return env


def sh(project: Path, *args: str, check: bool = True, **extra: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), cwd=project, env=env_for(project, **extra), capture_output=True, text=True)
    if check and proc.returncode:
        raise AssertionError(
            f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def edit_params(project: Path, **changes) -> None:
    """edit_params(p, **{"mix.general_ratio": 0.0})"""
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 120) -> None:
    import requests

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not come up within {timeout}s")


def copy_project(dest: Path) -> Path:
    """The project's tracked and untracked-but-not-ignored files (what a fresh clone would have), as a git repo."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for args in (
        ["init", "-q"],
        ["add", "-A"],
        ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "snapshot"],
    ):
        subprocess.run(["git", *args], cwd=dest, check=True, capture_output=True)
    return dest


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Path:
    """The demo pipeline after one full `dvc repro` with the default params."""
    path = copy_project(tmp_path_factory.mktemp("project"))
    started = time.time()
    proc = sh(path, "dvc", "repro")
    (path / "first_repro.log").write_text(proc.stdout + proc.stderr)
    (path / "first_repro.seconds").write_text(f"{time.time() - started:.0f}")
    return path
