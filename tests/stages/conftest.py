"""Fixtures for stage tests: the committed demo data run through the real stage functions."""

from __future__ import annotations

import json

import pytest

from tunegate.config import load_config


@pytest.fixture(scope="session")
def cfg(tmp_path_factory):
    from tests.conftest import ROOT

    return load_config(ROOT / "params.yaml")


@pytest.fixture(scope="session")
def ledger():
    from tests.conftest import ROOT

    return json.loads((ROOT / "data/raw/DEFECTS.json").read_text())


@pytest.fixture(scope="session")
def tokenizer():
    """A small tokenizer with the demo chat template (the real base is not needed to count tokens)."""
    from demo.model import train_tokenizer
    from tests.conftest import ROOT
    from tunegate.io import read_jsonl

    rows = read_jsonl(ROOT / "data/pretrain/general.jsonl")[:3000]
    return train_tokenizer([r["prompt"] for r in rows] + [r["completion"] for r in rows], 1024)


@pytest.fixture(scope="session")
def validated(cfg, tokenizer, tmp_path_factory):
    import os

    from stages import validate
    from tests.conftest import ROOT

    out = tmp_path_factory.mktemp("validated")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        metrics = validate.run(cfg.validate_, cfg.data.sources, tokenizer, out)
    finally:
        os.chdir(cwd)
    return out, metrics


@pytest.fixture(scope="session")
def result(cfg, validated):
    """The dedup stage's (kept, dropped, metrics) on the validated demo sources, single-machine engine."""
    from stages import dedup
    from tests.conftest import ROOT
    from tunegate.io import read_jsonl

    out, _ = validated
    sources = {name: read_jsonl(out / f"{name}.jsonl") for name in cfg.data.sources}
    return dedup.run(cfg.dedup, sources, dedup.eval_items(ROOT / "evals/data"), cfg.seed)
