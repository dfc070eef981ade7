"""The one factory of tiny demo bases for the tests: a DemoBase of a few thousand parameters (changed where a
test needs more layers, positions or steps) built from the embedded pretraining corpus in seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunegate.config import DemoBase

# The smallest base the tests use; each test file names only what it needs bigger.
SMALLEST: dict[str, Any] = {
    "vocab_size": 400,
    "hidden_size": 32,
    "layers": 1,
    "heads": 2,
    "intermediate_size": 64,
    "max_position": 64,
    "steps": 2,
    "batch_size": 4,
    "warmup_steps": 1,
}
# A base that learns enough in a short run for training tests to see it (two layers, a wider vocabulary).
TRAINABLE: dict[str, Any] = {"vocab_size": 512, "hidden_size": 64, "layers": 2, "intermediate_size": 128}


def tiny(**changes: Any) -> DemoBase:
    """SMALLEST with `changes`."""
    return DemoBase(**{**SMALLEST, **changes})


def pretrain_rows(n: int) -> list[dict]:
    from tests.conftest import ROOT
    from tunegate.io import read_jsonl

    return read_jsonl(ROOT / "data/pretrain/general.jsonl")[:n]


def build_base(folder: Path, settings: DemoBase, rows: int = 300, seed: int = 1) -> dict[str, Any]:
    """Build a tiny base into folder from the first `rows` pretraining rows; returns its manifest (with path)."""
    from demo.model import build
    from tunegate.models import describe

    build(pretrain_rows(rows), settings, seed, folder)
    return {**describe(folder, "demo", "seeded", f"seed-{seed}"), "path": str(folder)}
