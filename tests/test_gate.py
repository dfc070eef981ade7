"""The gate as a pure function: paired bootstrap checks on per-sample outcomes."""

import numpy as np
import pytest

from tunegate.gate import Policy, decide, paired_bootstrap

POLICY = Policy.model_validate(
    {
        "confidence": 0.95,
        "min_items": 30,
        "checks": [
            {"task": "gen", "metric": "acc", "role": "general", "margin": 0.05},
            {"task": "dom", "metric": "acc", "role": "target", "min_gain": 0.1},
        ],
        "champion": {"beat_on_target": True, "margin": 0.0},
    }
)


def samples(values):
    return [{"doc_id": i, "acc": float(v)} for i, v in enumerate(values)]


def world(base_gen, cand_gen, base_dom, cand_dom):
    return {"gen": samples(base_gen), "dom": samples(base_dom)}, {"gen": samples(cand_gen), "dom": samples(cand_dom)}


def test_identical_candidate_fails_target_only():
    rng = np.random.default_rng(0)
    gen, dom = rng.random(200) < 0.6, rng.random(200) < 0.3
    base, cand = world(gen, gen, dom, dom)
    verdict = decide(base, cand, POLICY)
    assert not verdict["passed"]
    assert verdict["failed"] == ["dom/acc vs base"]


def test_improved_and_not_forgetting_passes():
    rng = np.random.default_rng(1)
    gen = rng.random(200) < 0.6
    dom_base = rng.random(200) < 0.2
    dom_cand = dom_base | (rng.random(200) < 0.5)
    base, cand = world(gen, gen, dom_base, dom_cand)
    verdict = decide(base, cand, POLICY)
    assert verdict["passed"], verdict["lines"]


def test_forgetting_fails_general():
    rng = np.random.default_rng(2)
    gen_base = rng.random(200) < 0.7
    gen_cand = gen_base & (rng.random(200) < 0.6)  # loses ~30% of what it knew
    dom_base = np.zeros(200, bool)
    dom_cand = rng.random(200) < 0.8
    base, cand = world(gen_base, gen_cand, dom_base, dom_cand)
    verdict = decide(base, cand, POLICY)
    assert verdict["failed"] == ["gen/acc vs base"]
    check = verdict["checks"][0]
    assert check["lower"] < -0.05 and check["diff"] < 0


def test_tiny_eval_set_cannot_pass_on_noise():
    base, cand = world([1] * 10, [1] * 10, [0] * 10, [1] * 10)
    verdict = decide(base, cand, POLICY)
    assert not verdict["passed"]
    assert all("too little evidence" in c["why"] for c in verdict["checks"])


def test_pairing_uses_doc_ids_not_order():
    base = {"gen": samples([1, 0] * 50), "dom": samples([0] * 100)}
    cand = {"gen": list(reversed(samples([1, 0] * 50))), "dom": samples([1] * 100)}
    verdict = decide(base, cand, POLICY)
    assert verdict["checks"][0]["diff"] == 0.0


def test_champion_comparison_added_for_targets():
    rng = np.random.default_rng(3)
    gen = rng.random(100) < 0.5
    base, cand = world(gen, gen, np.zeros(100), np.ones(100))
    champ = {"gen": samples(gen), "dom": samples(np.ones(100))}
    verdict = decide(base, cand, POLICY, champion=champ)
    against = [c["against"] for c in verdict["checks"]]
    assert against == ["base", "base", "champion"]
    assert verdict["passed"]


def test_bootstrap_bounds_bracket_mean():
    diffs = np.array([0.0, 1.0] * 50)
    lower, upper = paired_bootstrap(diffs, 0.95, 2000, 0)
    assert lower < 0.5 < upper
    assert upper - lower == pytest.approx(0.16, abs=0.05)


def test_per_check_confidence_widens_bounds():
    rng = np.random.default_rng(4)
    gen = rng.random(200) < 0.6
    dom_b, dom_c = np.zeros(200), (rng.random(200) < 0.3)
    base, cand = world(gen, gen, dom_b, dom_c)
    strict = Policy.model_validate(
        {**POLICY.model_dump(), "checks": [{**POLICY.checks[1].model_dump(), "confidence": 0.999}]}
    )
    loose = decide(base, cand, POLICY)["checks"][1]
    tight = decide(base, cand, strict)["checks"][0]
    assert tight["lower"] < loose["lower"]
