"""The pipeline as a Prefect flow: one task run per DVC stage, in DVC's own dependency order.

    python -m flows.pipeline                 # run once (ephemeral Prefect, or $PREFECT_API_URL's server)

The flow never re-encodes the DAG: stage names and order come from DVC's graph of dvc.yaml, and each
task runs `dvc repro --single-item <stage>`, so DVC still decides what is stale and writes the same
dvc.lock a manual `dvc repro` would. Prefect adds retries, a UI with per-stage runs and logs, and the
flow-run id recorded in MLflow next to the dvc.lock hash (see `register`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

ROOT = Path(__file__).resolve().parents[1]
# Stages that talk to a server (the hub, MLflow) get retries, and only for a fault that may pass: a bad
# setting or a bug fails the same way twice, so those end the run at once with the stage's own line.
RETRIES = {"register": 2, "base": 1}
TRANSIENT = re.compile(
    r"not reachable|lost the MLflow server|cannot reach the Hugging Face hub|Unable to acquire lock|"
    r"Connection(Error| refused| reset)|Timeout|timed out|503 Service|502 Bad Gateway",
    re.I,
)


class StageFailed(RuntimeError):
    """A DVC stage that exited non-zero; the message is the stage's own error line (or DVC's)."""

    def __init__(self, stage: str, code: int, why: str):
        super().__init__(f"stage {stage} failed (exit {code}): {why}")
        self.stage, self.why = stage, why
        self.transient = bool(TRANSIENT.search(why))


def why_failed(output: str) -> str:
    """The one line that says why a stage failed: tunegate's own error line, else DVC's, else the last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for marker in (": error: ", "ERROR: "):
        found = [line for line in lines if marker in line]
        if found:
            return found[-1][:300]
    return lines[-1][:300] if lines else "no output"


def dvc_stages(root: Path = ROOT) -> list[str]:
    """Stage names of dvc.yaml in dependency order (DVC's graph, topologically sorted)."""
    import networkx as nx
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        order = list(reversed(list(nx.topological_sort(graph))))
        return [stage.name for stage in order if getattr(stage, "name", None)]


def _dvc(args: list[str], root: Path) -> subprocess.CompletedProcess:
    bin_dir = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "TUNEGATE_ORCHESTRATOR": f"prefect:{flow_run.id or '-'}",
    }
    return subprocess.run([str(bin_dir / "dvc"), *args], cwd=root, env=env, capture_output=True, text=True)


def transient_only(task, task_run, state) -> bool:
    """Prefect's retry condition: retry a stage only for a fault that may pass (a server, the network, a lock)."""
    err = state.data if isinstance(state.data, BaseException) else None
    return isinstance(err, StageFailed) and err.transient


@task(task_run_name="{stage}", retry_delay_seconds=10, retry_condition_fn=transient_only)
def run_stage(stage: str, root: str, force: bool = False) -> str:
    """`dvc repro --single-item STAGE`: DVC skips it when nothing it depends on changed."""
    log = get_run_logger()
    args = ["repro", "--single-item", stage] + (["--force"] if force else [])
    proc = _dvc(args, Path(root))
    for line in (proc.stdout + proc.stderr).splitlines()[-40:]:
        log.info("%s", line)
    if proc.returncode:
        raise StageFailed(stage, proc.returncode, why_failed(proc.stdout + proc.stderr))
    return "skipped" if "didn't change, skipping" in proc.stdout else "ran"


def run_stages(root: str, force_stages: list[str] | None = None) -> dict[str, str]:
    """Every DVC stage as a task run of the calling flow, in DVC's order; {stage: 'ran' | 'skipped'}."""
    force = set(force_stages or [])
    return {
        stage: run_stage.with_options(retries=RETRIES.get(stage, 0))(stage, root, stage in force)
        for stage in dvc_stages(Path(root))
    }


@flow(name="tunegate-pipeline", log_prints=True)
def pipeline(root: str = str(ROOT), force_stages: list[str] | None = None) -> dict[str, str]:
    """Run every DVC stage as its own task, in order; returns {stage: 'ran' | 'skipped'}."""
    outcome = run_stages(root, force_stages)
    get_run_logger().info("pipeline: %s", outcome)
    return outcome


if __name__ == "__main__":
    print(pipeline())
