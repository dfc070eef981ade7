"""Shared fixtures. Tests run on tiny in-memory fixtures and, for the slow ones, the real demo pipeline on CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Telemetry off and no hub access in tests, whatever the developer's shell says.
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ[key] = value

# The unit tests train in this process: freed memory kept for reuse, as every stage process keeps it.
from tunegate.runtime import keep_freed_memory  # noqa: E402

keep_freed_memory()

# The whole suite runs in one pytest on two workers (`make test`: `pytest -n 2 --dist loadgroup`). Most of the
# end-to-end tier is one Python thread at a time (imports, DVC, MLflow, lm-eval's request loop, a tiny model's
# steps), so each group of its files below is one worker's, while the unit test files fill every wait:
# - "demo" (first, on the first worker): the tests that read the first run's console and the pipeline's own runs.
#   Its worker builds the demo project: it pretrains the demo base and runs the whole pipeline once
#   (tests/e2e/conftest.py), which every other project copies from DVC's run cache.
# - "own" (first on the other worker): your own model and data, which needs no demo.
# - "servers": the retraining loop, the MLflow server, the team stack. Its worker restores the demo from DVC's run
#   cache and registers its own champion, so it starts once the first build is done (demo-project.ready); until
#   then that worker takes unit test files.
E2E_GROUPS = {
    "test_adapter_kinds": "demo",
    "test_export": "demo",
    "test_pipeline": "demo",
    "test_portable": "demo",
    "test_own_model": "own",
    "test_lookup": "servers",  # its project restores the demo base from the first build: after it, as "servers" runs
    "test_retrain": "servers",
    "test_servers": "servers",
    "test_team": "servers",
}
# Single runs of a group's file given to another group, to even the two workers out: {file stem: {test id: group}}.
# None now: with the stages forked from the warm runner, "servers" (which starts only once the demo is built, about
# 10 minutes in) is the longest chain; given SFT then GRPO as well, its worker ended 3 minutes after the other.
E2E_MOVED: dict[str, dict[str, str]] = {}
FIRST = ("demo", "own")  # given out before anything else, in this order

# The end-to-end tests' warm runner, once it is up: {"socket": path} (tests/e2e/conftest.py: warm_runner, env_for).
# Kept here because tests/e2e is not a package: its conftest, imported by pytest and again by the test modules
# (`from tests.e2e.conftest import sh`), is two modules with two copies of any state it holds.
WARM: dict[str, str] = {}
DEMO_READY = "demo-project.ready"  # written beside the workers' temp folders once the demo project is built


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup`: whole groups of the table above, then each other file, to one worker at a time; "servers"
    only once the demo project is built, unit test files before it (xdist's own loadgroup reads `xdist_group`
    marks into test ids, which pytest 9 no longer lets it rewrite)."""
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    ready = config._tmp_path_factory.getbasetemp() / DEMO_READY  # the workers' basetemp is <this>/popen-gwN
    groups = set(E2E_GROUPS.values())

    class FileGroups(LoadScopeScheduling):
        demo_runs: bool | None = None  # whether the "demo" group is in this run at all

        def _split_scope(self, nodeid: str) -> str:
            path, _, name = nodeid.partition("::")
            stem, param = Path(path).stem, name.partition("[")[2].removesuffix("]")
            return E2E_MOVED.get(stem, {}).get(param) or E2E_GROUPS.get(stem, path)

        def _assign_work_unit(self, node) -> None:
            scope = self._next_scope()
            self.workqueue.move_to_end(scope, last=False)  # the base class gives out the first unit of the queue
            super()._assign_work_unit(node)

        def _next_scope(self) -> str:
            queue = list(self.workqueue)
            if self.demo_runs is None:
                self.demo_runs = "demo" in queue
            first = [scope for scope in FIRST if scope in queue]
            if first:
                return first[0]
            files = [scope for scope in queue if scope not in groups]
            if "servers" in queue and (ready.exists() or not files or not self.demo_runs):
                return "servers"
            return files[0] if files else queue[0]

    return FileGroups(config, log)


@pytest.fixture
def root() -> Path:
    return ROOT


def sft(content_user: str, content_assistant: str, rid: str, source: str = "domain", line: int = 1) -> dict:
    return {
        "id": rid,
        "source": source,
        "line": line,
        "kind": "sft",
        "messages": [{"role": "user", "content": content_user}, {"role": "assistant", "content": content_assistant}],
    }
