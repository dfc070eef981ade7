"""Process set-up: the console keeps tunegate's own lines, bars and errors; what libraries log or warn
goes to the stage's log file (reports/logs/<stage>.log), and TUNEGATE_VERBOSE=1 shows it all.

Each case runs a real process, as DVC runs a stage."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from tests.conftest import ROOT

NOISY_STAGE = """
import logging, sys, warnings
from tunegate.errors import UserError
from tunegate.runtime import stage_main

def body():
    logging.getLogger("__main__").info("own line")
    logging.getLogger("tunegate.x").warning("own warning")
    if sys.argv[1:] == ["fail"]:
        raise UserError("data/x.jsonl: empty file; add records")
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
    logging.getLogger("lm_eval.evaluator").warning("generation_kwargs specified through cli")
    warnings.warn("The specified dataset source can be interpreted in multiple ways", UserWarning)
    from transformers.utils import logging as hf_logging
    hf_logging.get_logger("transformers.modeling_utils").warning("Some weights were not initialized")
    import mlflow  # noqa: F401  (MLflow would otherwise give its loggers their own console handler)
    logging.getLogger("mlflow.store.db.utils").warning("Creating initial MLflow database tables")
    logging.getLogger("some.library").error("a library error")

stage_main("noisy", body)
"""
NOISE = [
    "gemm_4bit_forward",
    "generation_kwargs specified through cli",
    "UserWarning",
    "Some weights were not initialized",
    "Creating initial MLflow database tables",
]
OWN = ["own line", "own warning", "a library error"]


def _run(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    script = tmp_path / "noisy_stage.py"
    script.write_text(NOISY_STAGE)
    environ = {k: v for k, v in os.environ.items() if k not in ("TUNEGATE_VERBOSE", "MLFLOW_CONFIGURE_LOGGING")}
    return subprocess.run(
        [sys.executable, str(script), *args],
        cwd=tmp_path,
        env={**environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_console_shows_own_lines_and_errors_the_log_file_everything(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    console = proc.stdout + proc.stderr
    assert all(line in console for line in OWN), console
    assert not [noise for noise in NOISE if noise in console], console
    logged = (tmp_path / "reports/logs/noisy.log").read_text()
    assert all(line in logged for line in OWN + NOISE), logged


def test_verbose_shows_everything_on_the_console(tmp_path):
    proc = _run(tmp_path, TUNEGATE_VERBOSE="1")
    assert proc.returncode == 0, proc.stderr
    assert all(line in proc.stderr for line in OWN + NOISE), proc.stderr


def test_a_user_error_is_one_console_line_and_logged(tmp_path):
    for verbose in ("0", "1"):
        proc = _run(tmp_path, "fail", TUNEGATE_VERBOSE=verbose)
        assert proc.returncode == 2
        errors = [line for line in proc.stderr.splitlines() if "empty file" in line]
        assert errors == ["tunegate noisy: error: data/x.jsonl: empty file; add records"], proc.stderr
        assert "empty file" in (tmp_path / "reports/logs/noisy.log").read_text()


# A stage frees and allocates the same memory at every training step. Here: 64 MiB of 32 KiB blocks (each under
# malloc's mmap threshold, so on its heap), every page written, freed, five times over; the page faults after the
# first round count how often the memory went back to the OS and came in again.
ROUNDS = """
import resource, sys
from tunegate.runtime import configure

if sys.argv[1] == "configured":
    configure()

def round_trip():
    blocks = [bytearray(32 * 1024) for _ in range(2048)]
    del blocks

round_trip()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    round_trip()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(tmp_path, mode: str, **env: str) -> int:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    proc = subprocess.run(
        [sys.executable, "-c", ROUNDS, mode],
        cwd=tmp_path,
        env={**environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return int(proc.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_a_stage_keeps_freed_memory_for_its_next_step_unless_the_user_set_malloc_himself(tmp_path):
    pages = 5 * 64 * 2**20 // 4096  # every page of every round faulted in afresh
    assert _faults(tmp_path, "plain") > pages // 2  # glibc as it comes: freed memory goes back to the OS
    assert _faults(tmp_path, "configured") < pages // 100  # a stage (configure()): kept and reused
    assert _faults(tmp_path, "configured", MALLOC_TOP_PAD_="0") > pages // 2  # the user's own setting wins
