"""gate: decide whether the candidate may be promoted, from paired per-sample eval results and evals/gates.yaml.

    python -m stages.gate        # what dvc.yaml runs

Writes verdict.json (one line per check with estimate and bounds), report.md and chart.png (base vs
candidate per task with intervals). A failing gate does not stop `dvc repro`: `register` still
records the candidate, tagged with the failed checks and without the champion alias, and the run
ends with an unmissable FAILED banner (see docs/gate.md).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tunegate.config import Gate, load_config
from tunegate.evaluation import load_samples
from tunegate.gate import Policy, Samples, decide, load_policy
from tunegate.io import atomic_path, sha256_file, write_json, write_text
from tunegate.paths import CHART, REPORT, SAMPLES, VERDICT, Layout
from tunegate.runtime import stage_main

log = logging.getLogger(__name__)


def run(  # noqa: PLR0913 - the policy and each side's samples
    cfg: Gate, policy: Policy, base: Samples, candidate: Samples, seed: int, exports: dict[str, Samples] | None = None
) -> dict[str, Any]:
    return decide(base, candidate, policy, cfg.bootstrap, seed, exports=exports)


def exported_samples(folder: Path) -> dict[str, Samples]:
    """Per-sample outcomes of each exported artifact the eval_export stage scored (none when it is absent)."""
    if not folder.is_dir():
        return {}
    return {sub.name: load_samples(sub) for sub in sorted(folder.iterdir()) if (sub / SAMPLES).is_dir()}


def _chart(verdict: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    checks = [c for c in verdict["checks"] if c["against"] == "base" and c["n"]]
    fig, ax = plt.subplots(figsize=(7, 0.6 + 0.55 * len(checks)))
    for y, c in enumerate(checks):
        color = "tab:green" if c["passed"] else "tab:red"
        ax.plot([c["reference"]], [y + 0.15], "o", color="grey", label="base" if y == 0 else None)
        ax.errorbar(
            [c["candidate"]],
            [y - 0.15],
            xerr=[[c["diff"] - c["lower"]], [c["upper"] - c["diff"]]],
            fmt="o",
            color=color,
            capsize=4,
            label="candidate (paired bounds)" if y == 0 else None,
        )
    ax.set_yticks(range(len(checks)), [f"{c['task']}/{c['metric']}\n({c['role']})" for c in checks])
    ax.set_xlim(-0.05, 1.05)
    ax.set_xlabel("score")
    ax.set_title(f"gate {'PASSED' if verdict['passed'] else 'FAILED'}: base vs candidate")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def report(verdict: dict[str, Any]) -> str:
    head = "PASSED" if verdict["passed"] else f"FAILED ({', '.join(verdict['failed'])})"
    rows = [
        "| check | role | base | candidate | diff | bounds | need | n | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in verdict["checks"]:
        result = "pass" if c["passed"] else "FAIL: " + c["why"]
        if not c["n"]:
            rows.append(
                f"| {c['task']}/{c['metric']} vs {c['against']} | {c['role']} "
                f"| – | – | – | – | {c['threshold']} | 0 | {result} |"
            )
            continue
        rows.append(
            f"| {c['task']}/{c['metric']} vs {c['against']} | {c['role']} "
            f"| {c['reference']:.3f} | {c['candidate']:.3f} | {c['diff']:+.3f} | "
            f"[{c['lower']:+.3f}, {c['upper']:+.3f}] | {c['threshold']} | {c['n']} | {result} |"
        )
    return "\n".join(
        [
            f"# Gate {head}",
            "",
            f"Paired bootstrap, one-sided bounds at {verdict['confidence']:.0%}.",
            "",
            *rows,
            "",
            f"![base vs candidate]({CHART})",
            "",
        ]
    )


def main() -> None:
    def body() -> None:
        cfg = load_config()
        layout = Layout.of(cfg.paths)
        policy_path = Path(cfg.gate.policy)
        base, candidate = load_samples(layout.eval("base")), load_samples(layout.eval("candidate"))
        exports = exported_samples(layout.eval_export()) if cfg.export.check else {}
        verdict = run(cfg.gate, load_policy(policy_path), base, candidate, cfg.seed, exports)
        verdict["policy_sha256"] = sha256_file(policy_path)
        with atomic_path(layout.gate) as tmp:
            tmp.mkdir()
            write_json(tmp / VERDICT, verdict)
            write_text(tmp / REPORT, report(verdict))
            _chart(verdict, tmp / CHART)
        diffs = {
            f"{c['task']}.{c['metric']}.{c['against'].replace(' ', '_')}.diff": round(c["diff"], 4)
            for c in verdict["checks"]
            if c["n"]
        }
        write_json(layout.metrics("gate"), {"passed": verdict["passed"], **diffs})
        for line in verdict["lines"]:
            log.info("%s", line)

    stage_main("gate", body)


if __name__ == "__main__":
    main()
