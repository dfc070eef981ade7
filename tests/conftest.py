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


# The end-to-end tier runs on two workers (`pytest -m slow -n 2 --dist loadgroup`, as `make test` does): most of
# it is one Python thread at a time (imports, DVC, MLflow, lm-eval's request loop, a tiny model's steps), so a
# second worker uses the second core. Each group of files is one worker's, in this order: "demo" holds the tests
# that read the first run's console and the pipeline's own runs; "servers" starts with your own model (no demo
# needed), then the retraining loop and the servers. Each worker builds its own demo project (tests/e2e/conftest.py).
E2E_GROUPS = {
    "test_adapter_kinds": "demo",
    "test_export": "demo",
    "test_pipeline": "demo",
    "test_portable": "demo",
    "test_own_model": "servers",
    "test_retrain": "servers",
    "test_servers": "servers",
    "test_team": "servers",
}


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadgroup`: whole files of the table above to one worker per group (xdist's own loadgroup reads
    `xdist_group` marks into test ids, which pytest 9 no longer lets it rewrite); other files by file."""
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return E2E_GROUPS.get(Path(path).stem, path)

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
