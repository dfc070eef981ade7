"""gate: decide whether the candidate may be promoted, from paired per-sample eval results and evals/gates.yaml.

    python -m stages.gate        # what dvc.yaml runs

Writes verdict.json (one line per check with estimate and bounds), flipped.json (per check, the items the
candidate lost and won against its reference), report.md and report.html (tunegate.gate_report), chart.png
(base vs candidate per task with intervals) and, with baselines, cost.png (quality against prompt tokens).
A failing gate does not stop `dvc repro`: `register` still records the candidate, tagged with the failed
checks and without the champion alias, and the run ends with an unmissable FAILED banner (see docs/gate.md).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tunegate import gate_report
from tunegate.config import load_config
from tunegate.evaluation import load_samples
from tunegate.gate import Policy, Samples, decide, describe_baseline, flipped_check, load_policy
from tunegate.io import atomic_path, read_json, sha256_file, write_json, write_text
from tunegate.paths import CHART, COST_CHART, COSTS, FLIPPED, REPORT, REPORT_HTML, SAMPLES, VERDICT, Layout
from tunegate.runtime import stage_main

log = logging.getLogger(__name__)


def exported_samples(folder: Path) -> dict[str, Samples]:
    """Per-sample outcomes of each exported artifact the eval_export stage scored (none when it is absent)."""
    if not folder.is_dir():
        return {}
    return {sub.name: load_samples(sub) for sub in sorted(folder.iterdir()) if (sub / SAMPLES).is_dir()}


def baseline_samples(folder: Path) -> tuple[dict[str, Samples], dict[str, dict[str, Any]]]:
    """Per-sample outcomes of each baseline the eval_baselines stage scored, and their costs (none when absent)."""
    costs = read_json(folder / COSTS) if (folder / COSTS).exists() else {}
    return {name: load_samples(folder / name) for name in costs if (folder / name / SAMPLES).is_dir()}, costs


def flipped(
    verdict: dict[str, Any], policy: Policy, sides: dict[str, Samples], candidate: Samples
) -> list[dict[str, Any]]:
    """Per check of the verdict, the items the candidate lost and won against that check's reference. For an export
    check the reference is the candidate and the artifact is on the candidate's side."""
    checks = {(c.task, c.metric): c for c in policy.checks}
    out = []
    for c in verdict["checks"]:
        check = checks[(c["task"], c["metric"])]
        against = c["against"]
        if against.startswith("export "):
            reference, side = candidate, sides.get(against.removeprefix("export "))
        else:
            reference, side = sides.get(against), candidate
        if reference is None or side is None:
            continue
        out.append(flipped_check(check, against, reference, side))
    return out


def recommendation(verdict: dict[str, Any], costs: dict[str, dict[str, Any]]) -> str | None:
    """When the candidate did not beat a baseline that itself did better than the base, that cheaper path named with
    its score and its cost. A baseline no better than the base is no path to ship (when nothing moved the score, the
    gate's lines say so)."""
    base = {(c["task"], c["metric"]): c for c in verdict["checks"] if c["against"] == "base" and c["diff"] is not None}
    lost = [
        c
        for c in verdict["checks"]
        if not c["passed"] and c["against"] in costs and c["n"] and _beats_base(c, base.get((c["task"], c["metric"])))
    ]
    if not lost:
        return None
    c = lost[0]
    cost = costs[c["against"]]
    return (
        f"The cheaper path: {describe_baseline(c['against'])} gets {c['reference']:.3f} on {c['task']}/{c['metric']} "
        f"(the candidate {c['candidate']:.3f}) with no training, at {cost['prompt_tokens']:.0f} prompt tokens per "
        f"request against {cost['plain_prompt_tokens']:.0f}; ship that, or give the fine-tune what it lacks."
    )


def _beats_base(against_baseline: dict[str, Any], against_base: dict[str, Any] | None) -> bool:
    """Whether the baseline scored better than the base on the check's task and metric: both checks' differences are
    the candidate's over the other side (in the metric's direction), so their difference is the baseline's over the
    base. True where the base was not scored on it."""
    if against_base is None or against_baseline["diff"] is None:
        return True
    return against_base["diff"] - against_baseline["diff"] > 1e-12


def main() -> None:
    def body() -> None:
        cfg = load_config()
        layout = Layout.of(cfg.paths)
        policy_path = Path(cfg.gate.policy)
        policy = load_policy(policy_path)
        base, candidate = load_samples(layout.eval("base")), load_samples(layout.eval("candidate"))
        exports = exported_samples(layout.eval_export()) if cfg.export.check else {}
        baselines, costs = baseline_samples(layout.eval_baselines())
        verdict = decide(base, candidate, policy, cfg.gate.bootstrap, cfg.seed, exports=exports, baselines=baselines)
        verdict["policy_sha256"] = sha256_file(policy_path)
        verdict["costs"] = costs
        verdict["recommendation"] = recommendation(verdict, costs)
        changed = flipped(verdict, policy, {"base": base, **baselines, **exports}, candidate)
        with atomic_path(layout.gate) as tmp:
            tmp.mkdir()
            write_json(tmp / VERDICT, verdict)
            write_json(tmp / FLIPPED, changed)
            gate_report.chart(verdict, tmp / CHART)
            if points := gate_report.cost_points(verdict, costs):
                gate_report.cost_chart(points, tmp / COST_CHART)
            write_text(tmp / REPORT, gate_report.markdown(verdict, changed, costs))
            write_text(tmp / REPORT_HTML, gate_report.page(verdict, changed, costs, tmp))
        diffs = {
            f"{c['task']}.{c['metric']}.{c['against'].replace(' ', '_')}.diff": round(c["diff"], 4)
            for c in verdict["checks"]
            if c["n"]
        }
        write_json(layout.metrics("gate"), {"passed": verdict["passed"], **diffs})
        for line in verdict["lines"]:
            log.info("%s", line)
        if verdict["recommendation"]:
            log.warning("%s", verdict["recommendation"])

    stage_main("gate", body)


if __name__ == "__main__":
    main()
