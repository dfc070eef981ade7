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
