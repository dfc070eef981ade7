"""mix honours the ratio (examples or tokens), is seeded, and records per-source accounting."""

import pytest

from stages import mix
from tests.conftest import sft
from tunegate.config import Mix, Source

SOURCES = {
    "dom": Source(path="d", role="domain"),
    "gen_a": Source(path="a", role="general", weight=3),
    "gen_b": Source(path="b", role="general", weight=1),
}


def rows(prefix, n, words=5):
    return [sft(" ".join([prefix] * words) + f" {i}", "ok", f"{prefix}-{i}", source=prefix) for i in range(n)]


def data():
    return {"dom": rows("dom", 800), "gen_a": rows("gen_a", 500), "gen_b": rows("gen_b", 40)}


def n_tokens(row):
    return len(row["messages"][0]["content"].split())


def test_ratio_by_examples_and_weights():
    train, prefs, probe, manifest = mix.run(Mix(general_ratio=0.2), SOURCES, data(), n_tokens, 1)
    assert manifest["rows"] == 1000 and manifest["general_share_examples"] == 0.2
    assert manifest["sources"]["gen_a"]["used"] == 150 and manifest["sources"]["gen_b"]["used"] == 50
    assert manifest["sources"]["gen_b"]["upsampled"] is True
    assert probe and not {r["id"] for r in probe} & {r["id"] for r in train}


def test_ratio_by_tokens():
    d = data()
    d["gen_a"] = rows("gen_a", 500, words=20)
    _, _, _, manifest = mix.run(Mix(general_ratio=0.2, by="tokens"), SOURCES, d, n_tokens, 1)
    assert manifest["general_share_tokens"] == pytest.approx(0.2, abs=0.02)


def test_seeded_and_sensitive_to_seed():
    a = mix.run(Mix(), SOURCES, data(), n_tokens, 1)[0]
    b = mix.run(Mix(), SOURCES, data(), n_tokens, 1)[0]
    c = mix.run(Mix(), SOURCES, data(), n_tokens, 2)[0]
    assert a == b and a != c


def test_zero_general_is_domain_only():
    train, _, _, manifest = mix.run(Mix(general_ratio=0.0), SOURCES, data(), n_tokens, 1)
    assert {r["source"] for r in train} == {"dom"} and manifest["general_share_examples"] == 0
