"""The gate as a pure function: paired bootstrap checks on per-sample outcomes."""

from dataclasses import asdict

import numpy as np
import pytest

from tunegate.gate import Check, Policy, decide, judge, paired_bootstrap

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
    general = verdict["checks"][0]
    # The mean difference is the same under any pairing; only pairing by doc id makes every
    # per-item difference zero, so only then are the bootstrap bounds exactly [0, 0].
    assert (general["diff"], general["lower"], general["upper"]) == (0.0, 0.0, 0.0)
    assert general["passed"]


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


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"checks: [unclosed\n", "not valid YAML"),
        (b"", "expected a mapping with `checks:` (see evals/gates.yaml), got an empty file"),
        (b"- task: general_mc\n", "(see evals/gates.yaml), got a list"),
        (b"checks: general_mc\n", "checks: Input should be a valid list"),
        (b"confidence: high\nchecks: [{task: t, metric: acc, role: general}]\n", "confidence: Input should be a valid"),
        (b"checks: [{task: t, metric: acc, role: guess}]\n", "checks.0.role: Input should be 'general' or 'target'"),
        (b"checks: [{task: t, metric: acc, role: general}]\n# caf\xe9\n", "not UTF-8"),
    ],
)
def test_a_bad_policy_file_is_one_line_naming_it(tmp_path, content, expected):
    from tunegate.errors import UserError
    from tunegate.gate import load_policy

    path = tmp_path / "gates.yaml"
    path.write_bytes(content)
    with pytest.raises(UserError) as err:
        load_policy(path)
    assert str(err.value).startswith(f"{path}: ") and expected in str(err.value) and "\n" not in str(err.value)


def test_a_policy_path_that_is_a_folder_is_one_line(tmp_path):
    from tunegate.errors import UserError
    from tunegate.gate import load_policy

    with pytest.raises(UserError, match="a folder; gate.policy in params.yaml names the policy file"):
        load_policy(tmp_path)


def test_a_policy_file_that_is_missing_or_unreadable_is_one_line(tmp_path, monkeypatch):
    from pathlib import Path

    from tunegate.errors import UserError
    from tunegate.gate import load_policy

    missing = tmp_path / "gates.yaml"
    with pytest.raises(UserError) as err:
        load_policy(missing)
    assert str(err.value) == f"{missing}: gate policy not found (gate.policy in params.yaml)"
    loop = tmp_path / "loop.yaml"
    loop.symlink_to(loop)
    with pytest.raises(UserError) as err:
        load_policy(loop)
    assert str(err.value) == f"{loop}: cannot be read (Too many levels of symbolic links)"

    def unreadable(self, *args, **kwargs):
        raise OSError  # an OSError without strerror: the message names its type instead

    monkeypatch.setattr(Path, "read_text", unreadable)
    with pytest.raises(UserError) as err:
        load_policy(missing)
    assert str(err.value) == f"{missing}: cannot be read (OSError)"


def test_a_long_yaml_error_is_one_line_of_200_characters(tmp_path):
    from tunegate.errors import UserError
    from tunegate.gate import load_policy

    path = tmp_path / "gates.yaml"
    path.write_text("checks: [" + "verylongtaskname" * 6 + "\n  " + "anotherlongword" * 6 + ": x\n")
    with pytest.raises(UserError) as err:
        load_policy(path)
    head = f"{path}: not valid YAML ("
    detail = str(err.value).removeprefix(head).removesuffix(")")
    assert str(err.value).startswith(head) and len(detail) == 200 and "\n" not in detail
    assert detail.startswith("while parsing a flow sequence in ")  # YAML's words, joined by single spaces


def test_a_policy_with_several_mistakes_names_the_first_and_counts_the_rest(tmp_path):
    from tunegate.errors import UserError
    from tunegate.gate import load_policy

    path = tmp_path / "gates.yaml"
    for body, more in [
        ("confidence: 2\nchecks: [{task: t, metric: acc, role: guess}]\n", " (+1 more)"),
        ("confidence: 2\nmin_items: 0\nchecks: [{task: t, metric: acc, role: guess}]\n", " (+2 more)"),
        ("confidence: 2\nchecks: [{task: t, metric: acc, role: general}]\n", ""),
    ]:
        path.write_text(body)
        with pytest.raises(UserError) as err:
            load_policy(path)
        assert str(err.value) == f"{path}: confidence: Input should be less than 1{more}"


def test_gate_lines_state_the_estimate_the_bounds_the_threshold_and_why():
    base, cand = world([1, 0] * 50, [1, 0] * 50, [0] * 100, [0] * 100)
    verdict = decide(base, cand, POLICY)
    assert verdict["lines"] == [
        "PASS general gen/acc vs base: 0.500 -> 0.500 (diff +0.000, bounds [+0.000, +0.000], "
        "need lower >= -0.050; n=100)",
        "FAIL target  dom/acc vs base: 0.000 -> 0.000 (diff +0.000, bounds [+0.000, +0.000], "
        "need lower > 0 and diff >= 0.100; n=100) — no significant gain",
    ]
    assert verdict["confidence"] == 0.95 and [c["why"] for c in verdict["checks"]] == ["", "no significant gain"]


def test_forgetting_names_the_loss_and_the_margin():
    base, cand = world([1] * 40, [0] * 40, [0] * 40, [1] * 40)
    general = decide(base, cand, POLICY)["checks"][0]
    assert (general["threshold"], general["passed"]) == ("lower >= -0.050", False)
    assert general["why"] == "candidate may have lost up to 1.000 (margin 0.050)"


@pytest.mark.parametrize("base_side", [True, False])
def test_a_task_missing_on_either_side_fails_with_no_paired_items(base_side):
    present = {"gen": samples([1] * 40)}
    base, cand = (present, {}) if base_side else ({}, present)
    outcome = judge(POLICY.checks[0], base, cand, POLICY, 100, 0)
    why = (
        "no item of gen scored with acc on both sides "
        "(task or metric missing from the base's or the candidate's eval samples?)"
    )
    assert asdict(outcome) == {
        "task": "gen",
        "metric": "acc",
        "role": "general",
        "against": "base",
        "n": 0,
        "reference": None,
        "candidate": None,
        "diff": None,
        "lower": None,
        "upper": None,
        "threshold": "-",
        "passed": False,
        "why": why,
        "changed": None,
    }
    assert outcome.line() == f"FAIL general gen/acc vs base: no paired items (n=0) — {why}"


def test_only_items_scored_on_both_sides_are_paired():
    base = {"gen": samples([1] * 60)}
    cand = {"gen": [{"doc_id": i, "acc": 0.0} for i in range(30, 90)] + [{"doc_id": 5}]}  # 5: not scored
    outcome = judge(POLICY.checks[0], base, cand, POLICY, 100, 0)
    assert (outcome.n, outcome.reference, outcome.candidate, outcome.diff) == (30, 1.0, 0.0, -1.0)


def test_lower_is_better_metrics_count_a_drop_as_a_gain():
    check = Check(task="t", metric="loss", role="general", direction="lower")
    high = {"t": [{"doc_id": i, "loss": 1.0} for i in range(40)]}
    low = {"t": [{"doc_id": i, "loss": 0.5} for i in range(40)]}
    better, worse = judge(check, high, low, POLICY, 200, 0), judge(check, low, high, POLICY, 200, 0)
    assert (better.diff, better.lower, better.upper, better.passed) == (0.5, 0.5, 0.5, True)
    assert (worse.diff, worse.passed) == (-0.5, False)
    as_higher = judge(check.model_copy(update={"direction": "higher"}), high, low, POLICY, 200, 0)
    assert (as_higher.diff, as_higher.passed) == (-0.5, False)


def test_verdict_is_the_same_for_the_same_seed_and_defaults_to_seed_0_with_2000_resamples():
    rng = np.random.default_rng(5)
    base, cand = world(rng.random(120) < 0.6, rng.random(120) < 0.6, rng.random(120) < 0.3, rng.random(120) < 0.6)
    champ = {"dom": samples(rng.random(120) < 0.5)}
    first = decide(base, cand, POLICY, champion=champ)
    assert decide(base, cand, POLICY, champion=champ) == first
    assert decide(base, cand, POLICY, 2000, 0, champion=champ) == first
    other = decide(base, cand, POLICY, 2000, 1, champion=champ)
    assert [c["lower"] for c in other["checks"]] != [c["lower"] for c in first["checks"]]


@pytest.mark.parametrize("where", [0, -1])
def test_bootstrap_resamples_every_item_including_the_first_and_the_last(where):
    diffs = np.zeros(20)
    diffs[where] = 10.0
    lower, upper = paired_bootstrap(diffs, 0.95, 2000, 0)
    assert lower == 0.0 and upper >= 1.0  # the outlier is drawn (twice or more) in over 5% of the resamples


def test_champion_comparison_is_on_target_checks_only_with_the_champions_margin():
    policy = Policy.model_validate({**POLICY.model_dump(), "champion": {"beat_on_target": True, "margin": 0.2}})
    base, cand = world([1, 0] * 50, [1, 0] * 50, [0] * 100, [1] * 95 + [0] * 5)
    verdict = decide(base, cand, policy, champion={"gen": samples([1] * 100), "dom": samples([1] * 100)})
    assert [(c["task"], c["role"], c["against"]) for c in verdict["checks"]] == [
        ("gen", "general", "base"),
        ("dom", "target", "base"),
        ("dom", "target", "champion"),
    ]
    against_champion = verdict["checks"][2]
    assert against_champion["diff"] == pytest.approx(-0.05) and against_champion["threshold"] == "lower >= -0.200"
    assert against_champion["passed"] and verdict["passed"]  # within the champion margin, not the check's 0
    assert verdict["lines"][2].startswith("PASS target  dom/acc vs champion: 1.000 -> 0.950")


TARGET_ONLY = {"confidence": 0.95, "min_items": 30}


@pytest.mark.parametrize(
    "cand_dom, min_gain, passed, why",
    [
        ([0] * 40, 0.0, False, "no significant gain"),  # lower bound exactly 0 is no gain, even with min_gain 0
        ([1] * 40, 1.0, True, ""),  # a gain of exactly min_gain is enough
        ([1, 0, 0, 0, 0] * 8, 0.5, False, "gain 0.200 below min_gain 0.500"),  # significant, too small
    ],
)
def test_target_check_needs_a_significant_gain_of_at_least_min_gain(cand_dom, min_gain, passed, why):
    policy = Policy.model_validate(
        {**TARGET_ONLY, "checks": [{"task": "dom", "metric": "acc", "role": "target", "min_gain": min_gain}]}
    )
    outcome = judge(policy.checks[0], {"dom": samples([0] * 40)}, {"dom": samples(cand_dom)}, policy, 2000, 0)
    assert (outcome.passed, outcome.why) == (passed, why)


@pytest.mark.parametrize("n, enough", [(30, True), (29, False)])
def test_min_items_is_the_smallest_number_of_paired_items_that_may_pass(n, enough):
    policy = Policy.model_validate({**TARGET_ONLY, "checks": [{"task": "dom", "metric": "acc", "role": "target"}]})
    outcome = judge(policy.checks[0], {"dom": samples([0] * n)}, {"dom": samples([1] * n)}, policy, 200, 0)
    assert outcome.n == n and outcome.passed is enough
    assert outcome.why == ("" if enough else f"only {n} paired items (< min_items 30): too little evidence")


# The statistics at their boundaries: the verdict follows the confidence bound, never the point estimate.
# Each case below has the mean on one side of its threshold and the bound on the other.
def _pairs(diffs) -> tuple[dict, dict]:
    """Base and candidate samples of task `t` whose paired differences are exactly `diffs` (values in -1, 0, 1)."""
    diffs = np.asarray(diffs, dtype=float)
    base = np.where(diffs < 0, 1.0, 0.0)
    return {"t": samples(base)}, {"t": samples(base + diffs)}


def _check(role: str, **kw) -> tuple[Check, Policy]:
    check = Check(task="t", metric="acc", role=role, **kw)
    return check, Policy(
        confidence=0.95, min_items=30, checks=[check], champion={"beat_on_target": True, **kw.get("champ", {})}
    )


NOISY_SMALL_LOSS = [-1.0] * 51 + [1.0] * 49  # mean -0.02, bound about -0.18
STEADY_SMALL_LOSS = [-1.0] * 2 + [0.0] * 98  # mean -0.02, bound about -0.04


@pytest.mark.parametrize("against", ["base", "champion"])
def test_forgetting_is_judged_on_the_bound_not_the_mean(against):
    """General check (and the champion comparison): a mean loss inside the margin whose lower bound is
    outside it FAILS; the same mean loss with its bound inside the margin PASSES."""
    check, policy = _check("general" if against == "base" else "target", margin=0.05)
    margin = 0.05 if against == "champion" else None
    noisy = judge(check, *_pairs(NOISY_SMALL_LOSS), policy, 2000, 0, against, margin)
    assert noisy.diff == pytest.approx(-0.02) and noisy.diff > -0.05 > noisy.lower
    assert not noisy.passed and "may have lost up to" in noisy.why
    steady = judge(check, *_pairs(STEADY_SMALL_LOSS), policy, 2000, 0, against, margin)
    assert steady.diff == pytest.approx(-0.02) and steady.lower >= -0.05
    assert steady.passed


def test_a_bound_exactly_at_the_margin_passes_and_just_below_fails():
    """`lower >= -margin`: equal passes (every item lost exactly the margin: each bootstrap mean is it)."""
    check, policy = _check("general", margin=0.25)
    base, cand = {"t": samples([1.0] * 40)}, {"t": samples([0.75] * 40)}
    at = judge(check, base, cand, policy, 500, 0)
    assert at.lower == at.upper == at.diff == -0.25 and at.passed
    below = judge(check, base, {"t": samples([0.75] * 39 + [0.5])}, policy, 500, 0)
    assert below.diff < -0.25 and not below.passed


def test_a_mean_gain_above_min_gain_with_a_bound_at_or_below_zero_fails():
    check, policy = _check("target", min_gain=0.03)
    noisy = judge(check, *_pairs([1.0] * 52 + [-1.0] * 48), policy, 2000, 0)
    assert noisy.diff == pytest.approx(0.04) and noisy.diff >= 0.03 and noisy.lower <= 0
    assert not noisy.passed and noisy.why == "no significant gain"
    flat = judge(check, {"t": samples([0.5] * 40)}, {"t": samples([0.5] * 40)}, policy, 500, 0)
    assert flat.lower == 0 and not flat.passed  # `lower > 0` is strict


def test_a_significant_gain_below_min_gain_fails_and_one_at_min_gain_passes():
    check, policy = _check("target", min_gain=0.1)
    small = judge(check, *_pairs([1.0] * 10 + [0.0] * 190), policy, 2000, 0)
    assert small.lower > 0 and small.diff == pytest.approx(0.05) and small.diff < 0.1
    assert not small.passed and small.why == "gain 0.050 below min_gain 0.100"
    exact = Check(task="t", metric="acc", role="target", min_gain=0.25)
    at = judge(exact, {"t": samples([0.5] * 40)}, {"t": samples([0.75] * 40)}, policy, 500, 0)
    assert at.diff == 0.25 and at.lower == 0.25 and at.passed  # `diff >= min_gain`: equal passes
