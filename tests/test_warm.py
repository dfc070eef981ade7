"""The warm runner (tunegate/warm.py): a stage handed to it behaves as the `python -m stages.X` process it replaces.

A real runner process on a Unix socket, preloading only a small module so that it is up in a second; the stage is
a probe module in a throwaway `stages` package that has the project's own `stages/__init__.py` (the hand-off)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

PROBE = textwrap.dedent(
    """
    import json, os, random, signal, sys, time
    mode = sys.argv[1]
    report = {
        "pid": os.getpid(), "argv": sys.argv, "cwd": os.getcwd(), "var": os.environ.get("PROBE_VAR"),
        "warm_var": os.environ.get("TUNEGATE_WARM"), "umask": os.umask(0o022), "random": random.random(),
        "name": __name__, "path0": sys.path[0], "stdin": sys.stdin.read() if mode == "echo" else "",
        "preloaded": "colorsys" in sys.modules,
    }
    print(json.dumps(report), flush=True)
    print("to stderr", file=sys.stderr)
    if mode == "echo":
        raise SystemExit(int(sys.argv[2]))
    if mode == "raise":
        raise ValueError("probe failed")
    if mode == "message":
        raise SystemExit("probe says no")
    if mode == "sleep":
        signal.signal(signal.SIGTERM, lambda *_: (print("term", flush=True), sys.exit(143)))
        open(sys.argv[2], "w").write(str(os.getpid()))
        time.sleep(60)
    """
)
RUNNER = textwrap.dedent(
    """
    import sys
    from tunegate import warm
    warm.main(sys.argv[1], modules=("colorsys", "sets_env"))
    """
)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("warm-project")
    (root / "stages").mkdir()
    (root / "stages" / "__init__.py").write_text((ROOT / "stages" / "__init__.py").read_text())
    (root / "stages" / "probe.py").write_text(PROBE)
    # a library that sets a variable of its own when imported, as torch does with TORCHINDUCTOR_CACHE_DIR
    (root / "sets_env.py").write_text("import os\nos.environ.setdefault('TORCH_PROBE_DIR', '/tmp/probe')\n")
    return root


@pytest.fixture(scope="module")
def runner(project, tmp_path_factory):
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="tg-warm-test-"))
    path, log = folder / "r.sock", folder / "runner.log"
    with log.open("w") as out:
        env = _env(PYTHONPATH=f"{ROOT}{os.pathsep}{project}")
        proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(path)], cwd=ROOT, env=env, stdout=out)
    deadline = time.time() + 60
    while len(log.read_text().splitlines()) < 2:
        assert proc.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.05)
    first, second = log.read_text().splitlines()[:2]
    assert first.startswith("tunegate warm: libraries imported"), first
    assert second == f"export TUNEGATE_WARM={path}"
    yield path
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    assert not path.exists(), "the runner leaves no socket behind"
    lines = log.read_text().splitlines()[2:]
    forked = [line for line in lines if line.endswith(f"stages.probe in {project}: forked")]
    ended = [line for line in lines if re.search(f"stages.probe in {re.escape(str(project))}: (exit|signal) ", line)]
    assert len(ended) == len(forked), lines  # each forked stage's closing line: exit, seconds, CPU
    assert all(re.search(r": (exit -?\d+|signal \d+) after \d+\.\d s, \d+\.\d s CPU$", line) for line in ended), ended
    declined = [line for line in lines if "declined" in line]
    assert declined and all(("HF_HUB_OFFLINE" in line or "TORCH_PROBE_DIR" in line) for line in declined), declined
    assert not any("=0" in line or "/elsewhere" in line for line in declined), "values are never logged"
    shutil.rmtree(folder, ignore_errors=True)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TUNEGATE_WARM", "PYTHONPATH")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def _stage(project: Path, *args: str, warm: Path | None, stdin: str = "", **extra: str):
    env = _env(PYTHONPATH=f"{project}{os.pathsep}{ROOT}", PROBE_VAR="seen", **extra)
    if warm:
        env["TUNEGATE_WARM"] = str(warm)
    cmd = [sys.executable, "-m", "stages.probe", *args]
    proc = subprocess.run(cmd, cwd=project, env=env, input=stdin, capture_output=True, text=True, timeout=60)
    report = json.loads(proc.stdout.splitlines()[0]) if proc.stdout.startswith("{") else {}
    return proc, report


def test_a_handed_off_stage_sees_what_the_cold_process_would(project, runner):
    cold, cold_report = _stage(project, "echo", "3", warm=None, stdin="in")
    proc, report = _stage(project, "echo", "3", warm=runner, stdin="in")
    assert report["pid"] != proc.args and report["preloaded"], "the stage ran in the runner (it has colorsys)"
    assert not cold_report["preloaded"]
    assert (proc.returncode, cold.returncode) == (3, 3)
    assert proc.stderr == cold.stderr == "to stderr\n"
    same = ("argv", "cwd", "var", "umask", "name", "path0", "stdin")
    assert {k: report[k] for k in same} == {k: cold_report[k] for k in same}
    assert report["argv"][1:] == ["echo", "3"] and report["argv"][0].endswith("probe.py")
    assert report["stdin"] == "in" and report["name"] == "__main__" and report["path0"] == str(project)
    assert report["warm_var"] is None, "processes the stage starts run cold"


def test_each_stage_draws_its_own_random_state(project, runner):
    draws = {_stage(project, "echo", "0", warm=runner)[1]["random"] for _ in range(3)}
    assert len(draws) == 3


@pytest.mark.parametrize(
    ("mode", "code", "stderr"),
    [("raise", 1, "ValueError: probe failed"), ("message", 1, "probe says no")],
)
def test_a_failing_stage_ends_as_the_interpreter_would(project, runner, mode, code, stderr):
    cold, _ = _stage(project, mode, warm=None)
    proc, report = _stage(project, mode, warm=runner)
    assert report["preloaded"]
    assert proc.returncode == cold.returncode == code
    assert stderr in proc.stderr and stderr in cold.stderr
    assert proc.stderr.strip().splitlines()[-1] == cold.stderr.strip().splitlines()[-1]


def _start_sleeper(project: Path, runner: Path, tmp_path: Path):
    pid_file = tmp_path / "pid"
    env = _env(PYTHONPATH=f"{project}{os.pathsep}{ROOT}", TUNEGATE_WARM=str(runner))
    proc = subprocess.Popen(
        [sys.executable, "-m", "stages.probe", "sleep", str(pid_file)],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 30
    while not (pid_file.exists() and pid_file.read_text()):
        assert time.time() < deadline, "the stage did not start"
        time.sleep(0.05)
    stage = int(pid_file.read_text())
    assert stage != proc.pid, "the stage ran in the runner"
    return proc, stage


def _gone(pid: int, within: float = 10) -> bool:
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_a_signal_to_the_process_reaches_the_stage(project, runner, tmp_path):
    proc, stage = _start_sleeper(project, runner, tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 143
    assert "term" in proc.stdout.read()
    assert _gone(stage)


def test_killing_the_process_kills_the_stage(project, runner, tmp_path):
    proc, stage = _start_sleeper(project, runner, tmp_path)
    proc.kill()
    proc.wait(timeout=10)
    assert _gone(stage), "a stage whose caller was killed would run on, unseen"


def test_the_runner_declines_what_it_cannot_run_as_cold(project, runner, tmp_path):
    # a variable a library reads at import: the runner imported under another value
    _, report = _stage(project, "echo", "0", warm=runner, HF_HUB_OFFLINE="0")
    assert not report["preloaded"]
    # interpreter options
    env = _env(PYTHONPATH=f"{project}{os.pathsep}{ROOT}", TUNEGATE_WARM=str(runner))
    cmd = [sys.executable, "-X", "utf8", "-m", "stages.probe", "echo", "0"]
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=60)
    assert not json.loads(proc.stdout.splitlines()[0])["preloaded"]
    # no runner at that path: cold, no error
    proc, report = _stage(project, "echo", "0", warm=tmp_path / "none.sock")
    assert proc.returncode == 0 and not report["preloaded"] and proc.stderr == "to stderr\n"
    # and the runner still serves
    assert _stage(project, "echo", "0", warm=runner)[1]["preloaded"]


def test_import_env_holds_the_variables_read_at_import_and_the_stage_defaults():
    from tunegate.warm import import_env

    env = import_env({"HF_HOME": "/x", "MLFLOW_TRACKING_URI": "http://a", "PYTHONPATH": "/p", "OMP_NUM_THREADS": "1"})
    assert env["HF_HOME"] == "/x" and env["OMP_NUM_THREADS"] == "1"
    assert "MLFLOW_TRACKING_URI" not in env and "PYTHONPATH" not in env
    assert env["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1", "a stage's own defaults count as set"
    assert "HF_DATASETS_DISABLE_PROGRESS_BARS" not in import_env({"TUNEGATE_VERBOSE": "1"})


def test_a_variable_the_runners_imports_set_counts_as_set_for_the_caller(project, runner):
    """torch sets TORCHINDUCTOR_CACHE_DIR when imported: a caller that has not imported it yet lacks the variable, and
    one that has (a test process) has the same value; both are what the stage's own imports would leave. Another
    value is not."""
    assert _stage(project, "echo", "0", warm=runner)[1]["preloaded"]
    assert _stage(project, "echo", "0", warm=runner, TORCH_PROBE_DIR="/tmp/probe")[1]["preloaded"]
    assert not _stage(project, "echo", "0", warm=runner, TORCH_PROBE_DIR="/elsewhere")[1]["preloaded"]
