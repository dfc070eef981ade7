"""A throwaway copy of the project in which the real pipeline runs (`dvc repro`, real MLflow, CPU).

One copy per test session: the first `dvc repro` builds the demo base and everything after it;
later tests change params and re-run only what DVC says is stale.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, WARM  # WARM: the warm runner this worker's stages fork from
from tunegate.runtime import free_port  # noqa: F401 - the e2e tests import it from here

BIN = Path(sys.executable).parent

# On two workers (`-n 2`, as `make test` runs the suite) each process computes on one thread: two workers with
# torch's default of one thread per core would run four busy threads on two cores, and OpenMP's spinning threads
# then slow both down several times over. Set before torch loads here; every stage and server inherits it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _threads in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[_threads] = "1"
# The environment the stages, servers and the warm runner get: this worker's as it starts. Unit tests run in the
# same worker and their libraries set variables as they go (transformers' determinism sets PYTHONHASHSEED and
# CUDA_LAUNCH_BLOCKING, Ray PYTHONBREAKPOINT): copied into a stage's environment, they would make the runner decline
# it (its imports saw other values) and the stage differ from the one a user's `dvc repro` runs.
START_ENV = dict(os.environ)


def env_for(project: Path, **extra: str) -> dict[str, str]:
    env = {**START_ENV, "PATH": f"{BIN}{os.pathsep}{START_ENV.get('PATH', '')}", "PYTHONPATH": str(project)}
    env.update({"TUNEGATE_WARM": WARM["socket"]} if WARM else {}, **extra)
    env.pop("TUNEGATE_PARAMS", None)
    env.pop("TUNEGATE_VERBOSE", None)  # the console the tests read is the default one
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


def _lookup(params: dict, dotted: str):
    node = params
    for key in dotted.split("."):
        node = node[key]
    return node


def pipeline_outputs(root: Path) -> set[str]:
    """Project-relative paths a pipeline run writes, derived from the project's own files: every `outs`,
    `metrics` and `plots` entry of dvc.yaml (with `${paths.*}` interpolated from params.yaml), what an
    earlier run's dvc.lock recorded, every `paths:` folder no stage reads, the local MLflow store and
    artifact root, and the run-time files named in tunegate/paths.py."""
    import re

    from tunegate import paths as names

    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")) or {}
    pipeline = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}
    resolve = lambda text: re.sub(r"\$\{([\w.]+)\}", lambda m: str(_lookup(params, m.group(1))), str(text))
    entry = lambda item: next(iter(item)) if isinstance(item, dict) else item  # `- path: {cache: false}`
    outputs, inputs = set(), set()
    for stage in (pipeline.get("stages") or {}).values():
        for key in ("outs", "metrics", "plots"):
            outputs.update(resolve(entry(item)) for item in stage.get(key) or [])
        inputs.update(resolve(entry(item)) for item in stage.get("deps") or [])
    lock = root / names.DVC_LOCK
    if lock.exists():  # an earlier run with other paths may have left outputs dvc.yaml no longer names
        recorded = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages") or {}
        outputs.update(out["path"] for stage in recorded.values() for out in stage.get("outs") or [])
    read = lambda path: any(dep == path or dep.startswith(f"{path}/") for dep in inputs)
    outputs.update(str(path) for path in (params.get("paths") or {}).values() if not read(str(path)))
    register = params.get("register") or {}
    if str(register.get("tracking_uri", "")).startswith("sqlite:///"):
        outputs.add(register["tracking_uri"].removeprefix("sqlite:///"))
    if register.get("artifact_root") and "://" not in register["artifact_root"]:
        outputs.add(register["artifact_root"])
    outputs.update(str(p) for p in (names.DVC_LOCK, names.TIMINGS, names.THROUGHPUT, names.LOGS))
    return {str(Path(p)) for p in outputs if p and not Path(p).is_absolute()}


def copy_project(dest: Path, root: Path = ROOT) -> Path:
    """What a fresh clone of the project has, as a git repo: tracked files and untracked source files
    (not ignored), never a pipeline output, tracked or not. An earlier `make demo` in `root` leaves
    dvc.lock, metrics/ and plots/ (meant to be committed) and more; copied, they would make the first
    run in the copy differ from a fresh one and its registered `git_commit` read `<sha>-dirty`."""
    outputs = pipeline_outputs(root)
    produced = lambda rel: any(rel == out or rel.startswith(f"{out}/") for out in outputs)
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    for rel in filter(None, files):
        src = root / rel
        if src.is_file() and not produced(rel):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for args in (
        ["init", "-q"],
        ["add", "-A"],
        ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "snapshot"],
    ):
        subprocess.run(["git", *args], cwd=dest, check=True, capture_output=True)
    return dest


@pytest.fixture(scope="session", autouse=True)
def warm_runner(tmp_path_factory):
    """One warm runner per worker for the session's stages. Stages run cold until it has imported its libraries
    (about 15 s) and whenever it declines; the tests read the same outputs either way. TUNEGATE_TEST_COLD=1 runs
    every stage cold (no runner), as `dvc repro` does without one. The runner's log (per stage handed to it:
    forked, then its exit with wall and CPU seconds; or declined and why) is copied to the session's temp folder
    as warm-runner-<worker>.log."""
    if os.environ.get("TUNEGATE_TEST_COLD"):
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="tg-warm-"))  # short: a Unix socket's path has a 107-byte limit
    socket_path = folder / "runner.sock"
    env = env_for(ROOT)
    env.pop("PYTHONPATH")  # the runner imports libraries only; each stage gets its caller's PYTHONPATH
    log = (folder / "runner.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunegate.warm", str(socket_path)], cwd=ROOT, env=env, stdout=log, stderr=log
    )
    WARM["socket"] = str(socket_path)
    yield proc
    WARM.clear()
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    shutil.copy(folder / "runner.log", _shared(tmp_path_factory) / f"warm-runner-{worker}.log")
    shutil.rmtree(folder, ignore_errors=True)


def _shared(tmp_path_factory) -> Path:
    """A folder both workers of this session see (their own temp folders' parent under xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Path:
    """The demo pipeline after one full `dvc repro` with the default params.

    Each worker has its own copy (its own MLflow store and registry), but the copies share one DVC cache: the first
    worker to get here pretrains the demo base and runs every stage; the other waits on a file lock, restores all of
    it from DVC's run cache, and runs `register` (which has no output DVC could restore), so each registers its own
    champion. The scheduler (tests/conftest.py) gives the other worker unit test files until the first build is done.

    TUNEGATE_TEST_PROJECT=<folder> reuses a copy already built there (copy_project + `dvc repro`) while
    working on one end-to-end test; the tests change it, and put back what they change."""
    import fcntl

    from tests.conftest import DEMO_READY

    reuse = os.environ.get("TUNEGATE_TEST_PROJECT")
    if reuse:
        return Path(reuse).resolve()
    path = copy_project(tmp_path_factory.mktemp("project"))
    shared = _shared(tmp_path_factory)
    sh(path, "dvc", "config", "--local", "cache.dir", str(shared / "dvc-cache"))
    started = time.time()
    with (shared / "demo-base.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the second worker waits for the first one's build, then restores it
        base = sh(path, "dvc", "repro", "base")
        proc = sh(path, "dvc", "repro")
        (shared / DEMO_READY).touch()
    (path / "first_repro.log").write_text(base.stdout + base.stderr + proc.stdout + proc.stderr)
    (path / "first_repro.seconds").write_text(f"{time.time() - started:.0f}")
    return path
