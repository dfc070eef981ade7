"""Gate decisions as a pure function of (base samples, candidate samples, policy).

Base and candidate answer the same items, so each check uses the paired per-item differences and a
one-sided paired bootstrap bound on their mean, rather than comparing two means. A general-skill
check passes when the lower bound stays above -margin (non-inferiority: the candidate did not
forget); a target check passes when the lower bound is above zero and the gain reaches min_gain.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

Samples = dict[str, list[dict[str, Any]]]  # task -> [{"doc_id": int, metric: value}]


class Check(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    task: str
    metric: str
    role: Literal["general", "target"]
    direction: Literal["higher", "lower"] = "higher"
    margin: float = Field(0.0, ge=0)
    min_gain: float = Field(0.0, ge=0)
    confidence: float | None = Field(None, gt=0.5, lt=1, description="overrides the policy's confidence for this check")


class ChampionRule(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    beat_on_target: bool = False
    margin: float = Field(0.0, ge=0)
    # When the champion's logged per-sample outcomes cannot be read (registered by hand, artifacts
    # deleted): `block` keeps the champion where it is (promote the candidate by name if it is wanted),
    # `skip` promotes on the checks against the base alone. Either way the decision is stated.
    missing_samples: Literal["block", "skip"] = "block"


class ExportRule(BaseModel):
    """How far an exported artifact may fall below the candidate it was exported from, per check (non-inferiority,
    paired on the same items). Keys: `merged` or a GGUF type; types not listed get `default_margin`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    margins: dict[str, float] = {"merged": 0.0, "f32": 0.0, "f16": 0.01, "bf16": 0.01, "q8_0": 0.02}
    default_margin: float = Field(0.05, ge=0, description="4-bit and other lossy types")

    def margin(self, artifact: str) -> float:
        return self.margins.get(artifact.removeprefix("gguf-"), self.default_margin)


class BaselineRule(BaseModel):
    """The candidate against the base given the cheaper alternatives (params.yaml `baselines:`): on every target
    check it must beat the best baseline, paired item by item (lower bound > 0, gain >= min_gain)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    beat: bool = True
    min_gain: float = Field(0.0, ge=0)


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    confidence: float = Field(0.95, gt=0.5, lt=1)
    min_items: int = Field(30, ge=1)
    checks: list[Check] = Field(min_length=1)
    champion: ChampionRule = ChampionRule()
    export: ExportRule = ExportRule()
    baselines: BaselineRule = BaselineRule()


@dataclass(frozen=True)
class Outcome:
    task: str
    metric: str
    role: str
    against: str
    n: int
    reference: float | None  # None: no paired items, nothing to estimate
    candidate: float | None
    diff: float | None
    lower: float | None
    upper: float | None
    threshold: str
    passed: bool
    why: str
    changed: int | None = None  # export checks: items whose outcome differs from the candidate's

    def line(self) -> str:
        mark = "PASS" if self.passed else "FAIL"
        head = f"{mark} {self.role:7} {self.task}/{self.metric} vs {self.against}"
        if self.n == 0:
            return f"{head}: no paired items (n=0) — {self.why}"
        return (
            f"{head}: {self.reference:.3f} -> {self.candidate:.3f} "
            f"(diff {self.diff:+.3f}, bounds [{self.lower:+.3f}, {self.upper:+.3f}], "
            f"need {self.threshold}; n={self.n}{'' if self.changed is None else f'; {self.changed} changed'})"
            f"{'' if self.passed else ' — ' + self.why}"
        )


def paired_bootstrap(diffs: np.ndarray, confidence: float, resamples: int, seed: int) -> tuple[float, float]:
    """One-sided bounds (lower at 1-confidence, upper at confidence) of the mean paired difference."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diffs), size=(resamples, len(diffs)))
    means = diffs[idx].mean(axis=1)
    return float(np.quantile(means, 1 - confidence)), float(np.quantile(means, confidence))


def paired(ref: list[dict], cand: list[dict], metric: str) -> tuple[np.ndarray, np.ndarray]:
    r = {s["doc_id"]: s[metric] for s in ref if metric in s}
    c = {s["doc_id"]: s[metric] for s in cand if metric in s}
    common = sorted(r.keys() & c.keys())
    return np.array([r[i] for i in common], dtype=float), np.array([c[i] for i in common], dtype=float)


def judge(  # noqa: PLR0913 - the check, both sides, the policy's statistics and this reference's threshold
    check: Check,
    ref: Samples,
    cand: Samples,
    policy: Policy,
    resamples: int,
    seed: int,
    against: str = "base",
    margin: float | None = None,
    min_gain: float | None = None,
) -> Outcome:
    """One check: paired difference candidate - reference (sign flipped for lower-is-better metrics). Against the
    base a target check asks for a gain, any other reference non-inferiority at `margin`; `min_gain` asks for a
    gain against any reference (the baselines)."""
    a, b = paired(ref.get(check.task, []), cand.get(check.task, []), check.metric)
    sign = 1.0 if check.direction == "higher" else -1.0
    n = len(a)
    if n == 0:
        why = (
            f"no item of {check.task} scored with {check.metric} on both sides "
            f"(task or metric missing from the {against}'s or the candidate's eval samples?)"
        )
        return Outcome(check.task, check.metric, check.role, against, 0, None, None, None, None, None, "-", False, why)
    diffs = sign * (b - a)
    lower, upper = paired_bootstrap(diffs, check.confidence or policy.confidence, resamples, seed)
    diff = float(diffs.mean())
    improve = min_gain is not None or (check.role == "target" and against == "base")
    gain = check.min_gain if min_gain is None else min_gain
    if not improve:
        m = check.margin if margin is None else margin
        threshold, passed = f"lower >= {-m or 0.0:+.3f}", lower >= -m
        why = f"candidate may have lost up to {-lower:.3f} (margin {m:.3f})"
    else:
        threshold = f"lower > 0 and diff >= {gain:.3f}"
        passed = lower > 0 and diff >= gain
        why = "no significant gain" if lower <= 0 else f"gain {diff:.3f} below min_gain {gain:.3f}"
    if n < policy.min_items:
        passed, why = False, f"only {n} paired items (< min_items {policy.min_items}): too little evidence"
    return Outcome(
        check.task,
        check.metric,
        check.role,
        against,
        n,
        float(a.mean()),
        float(b.mean()),
        diff,
        lower,
        upper,
        threshold,
        bool(passed),
        why if not passed else "",
    )


def judge_export(  # noqa: PLR0913 - judge's inputs plus the artifact
    check: Check, candidate: Samples, exported: Samples, artifact: str, policy: Policy, resamples: int, seed: int
) -> Outcome:
    """One check of an exported artifact against the in-memory candidate: non-inferiority at the artifact's margin,
    with the number of items whose outcome changed (in either direction)."""
    outcome = judge(
        check, candidate, exported, policy, resamples, seed, f"export {artifact}", policy.export.margin(artifact)
    )
    a, b = paired(candidate.get(check.task, []), exported.get(check.task, []), check.metric)
    why = outcome.why and f"{outcome.why}; the exported artifact answers differently from the candidate"
    return replace(outcome, role="export", changed=int((a != b).sum()), why=why)


def describe_baseline(name: str) -> str:
    """A baseline's name as the cheaper path it stands for, for verdict lines and recommendations."""
    kind, _, k = name.partition("-")
    if kind == "few_shot":
        return f"prompting with {k} examples"
    if kind == "retrieval":
        return f"prompting with retrieval of {k} examples"
    return "prompting with the instructions" if kind == "prompt" else name


def _mean(samples: Samples, task: str, metric: str) -> float | None:
    values = [s[metric] for s in samples.get(task, []) if metric in s]
    return float(np.mean(values)) if values else None


def judge_baselines(  # noqa: PLR0913 - judge's inputs plus every baseline's samples
    check: Check, baselines: dict[str, Samples], candidate: Samples, policy: Policy, resamples: int, seed: int
) -> Outcome | None:
    """A target check against the best baseline on it (by mean; the first listed on a tie): the candidate must beat
    it, paired item by item. None when no baseline scored the check's task."""
    sign = 1.0 if check.direction == "higher" else -1.0
    scored = {n: m for n, s in baselines.items() if (m := _mean(s, check.task, check.metric)) is not None}
    if not scored:
        return None
    best = max(scored, key=lambda n: sign * scored[n])
    outcome = judge(
        check, baselines[best], candidate, policy, resamples, seed, best, min_gain=policy.baselines.min_gain
    )
    why = outcome.why and f"{outcome.why}; fine-tuning does not beat {describe_baseline(best)}"
    return replace(outcome, why=why)


def baseline_scores(baselines: dict[str, Samples], policy: Policy) -> dict[str, dict[str, float]]:
    """Every baseline's mean on every check it scored: {name: {"task/metric": mean}}."""
    out: dict[str, dict[str, float]] = {}
    for name, samples in baselines.items():
        means = {f"{c.task}/{c.metric}": _mean(samples, c.task, c.metric) for c in policy.checks}
        out[name] = {key: round(value, 6) for key, value in means.items() if value is not None}
    return out


def decide(  # noqa: PLR0913 - the samples of every side the gate compares
    base: Samples,
    candidate: Samples,
    policy: Policy,
    resamples: int = 2000,
    seed: int = 0,
    champion: Samples | None = None,
    exports: dict[str, Samples] | None = None,
    baselines: dict[str, Samples] | None = None,
) -> dict[str, Any]:
    """The verdict: every check against the base, target checks against the best baseline and the champion if
    asked, and every check of each exported artifact against the candidate."""
    outcomes = [judge(c, base, candidate, policy, resamples, seed) for c in policy.checks]
    if baselines and policy.baselines.beat:
        against = (
            judge_baselines(c, baselines, candidate, policy, resamples, seed)
            for c in policy.checks
            if c.role == "target"
        )
        outcomes += [o for o in against if o is not None]
    if champion is not None and policy.champion.beat_on_target:
        outcomes += [
            judge(c, champion, candidate, policy, resamples, seed, "champion", policy.champion.margin)
            for c in policy.checks
            if c.role == "target"
        ]
    for artifact, samples in (exports or {}).items():
        outcomes += [judge_export(c, candidate, samples, artifact, policy, resamples, seed) for c in policy.checks]
    return {
        "passed": all(o.passed for o in outcomes),
        "failed": [f"{o.task}/{o.metric} vs {o.against}" for o in outcomes if not o.passed],
        "confidence": policy.confidence,
        "checks": [asdict(o) for o in outcomes],
        "exports": sorted(exports or {}),
        "baselines": baseline_scores(baselines or {}, policy),
        "lines": [o.line() for o in outcomes],
    }


def load_policy(path: Path) -> Policy:
    """evals/gates.yaml as a Policy; a missing file or a bad key ends in one line naming it."""
    import yaml
    from pydantic import ValidationError

    from tunegate.errors import UserError, yaml_error

    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        if not isinstance(doc, dict):
            got = "an empty file" if doc is None else f"a {type(doc).__name__}"
            raise UserError(f"{path}: expected a mapping with `checks:` (see evals/gates.yaml), got {got}")
        return Policy.model_validate(doc)
    except FileNotFoundError:
        raise UserError(f"{path}: gate policy not found (gate.policy in params.yaml)") from None
    except IsADirectoryError:
        raise UserError(f"{path}: a folder; gate.policy in params.yaml names the policy file") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 (byte {err.start}); save the policy as UTF-8") from None
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror or type(err).__name__})") from None
    except yaml.YAMLError as err:
        raise yaml_error(path, err) from None
    except ValidationError as err:
        e = err.errors()[0]
        more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
        raise UserError(f"{path}: {'.'.join(map(str, e['loc']))}: {e['msg']}{more}") from None


def flips(check: Check, reference: Samples, candidate: Samples) -> dict[str, list[dict[str, Any]]]:
    """The items of one check whose outcome differs between reference and candidate, split into those the candidate
    lost and won (by the check's direction), each with its prompt (the candidate's), reference answer and both
    outputs, in doc_id order: what a reviewer reads first when a gate fails or passes narrowly."""
    ref = {s["doc_id"]: s for s in reference.get(check.task, []) if check.metric in s}
    cand = {s["doc_id"]: s for s in candidate.get(check.task, []) if check.metric in s}
    sign = 1.0 if check.direction == "higher" else -1.0
    out: dict[str, list[dict[str, Any]]] = {"lost": [], "won": []}
    for doc_id in sorted(ref.keys() & cand.keys()):
        a, b = ref[doc_id][check.metric], cand[doc_id][check.metric]
        if a == b:
            continue
        out["won" if sign * (b - a) > 0 else "lost"].append(
            {
                "doc_id": doc_id,
                "prompt": cand[doc_id].get("prompt", ref[doc_id].get("prompt")),
                "target": cand[doc_id].get("target", ref[doc_id].get("target")),
                "reference_output": ref[doc_id].get("output"),
                "candidate_output": cand[doc_id].get("output"),
                "reference_score": a,
                "candidate_score": b,
            }
        )
    return out


def flipped_check(check: Check, against: str, reference: Samples, candidate: Samples) -> dict[str, Any]:
    """One check's flipped items with the names reports and `flipped.json` read them by."""
    return {
        "check": f"{check.task}/{check.metric} vs {against}",
        "task": check.task,
        "metric": check.metric,
        "against": against,
        **flips(check, reference, candidate),
    }
