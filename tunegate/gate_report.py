"""The gate's report for people: markdown and HTML from the verdict, the flipped items and the baselines' costs.

- `report.md`: the checks table, the baselines with their cost (prompt tokens per request), every item the
  candidate lost on each check and the first items it won (all of them in flipped.json and report.html);
- `report.html`: the same with both charts inline and every flipped item, one file to open or to find in MLflow;
- `chart.png`: base vs candidate per check with the paired bounds;
- `cost.png`: score against prompt tokens per request on each target check, for the candidate, the base and
  each baseline: "retrieval-5 gets 0.78 at 7x the input tokens; the candidate gets 0.94" at a glance.

Nothing here decides anything (tunegate.gate does); everything here is a pure function of its inputs, so the
outputs are byte-identical for identical inputs.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from tunegate.gate import describe_baseline

MD_WON = 10  # won items listed per check in report.md (all of them in report.html and flipped.json)
MD_TEXT = 160  # characters of a prompt or output shown in report.md


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def chart(verdict: dict[str, Any], path: Path) -> None:
    """Base vs candidate on every check, with the candidate's paired bounds."""
    plt = _pyplot()
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


def cost_points(verdict: dict[str, Any], costs: dict[str, dict[str, Any]]) -> dict[str, list[tuple[str, float, float]]]:
    """Per target check: (who, prompt tokens per request, score) for the base, the candidate and each baseline.
    The base and the candidate read the same plain prompt; each baseline its own (instructions, examples)."""
    if not costs:
        return {}
    plain = max(c["plain_prompt_tokens"] for c in costs.values())
    points: dict[str, list[tuple[str, float, float]]] = {}
    for c in verdict["checks"]:
        if c["against"] != "base" or c["role"] != "target" or not c["n"]:
            continue
        key = f"{c['task']}/{c['metric']}"
        row = [("base", plain, c["reference"]), ("candidate", plain, c["candidate"])]
        row += [
            (name, costs[name]["prompt_tokens"], s[key])
            for name, s in verdict["baselines"].items()
            if key in s and name in costs
        ]
        points[key] = row
    return points


def cost_chart(points: dict[str, list[tuple[str, float, float]]], path: Path) -> None:
    """Score against prompt tokens per request, one panel per target check."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(points), figsize=(4.2 * len(points), 3.6), squeeze=False)
    for ax, (key, row) in zip(axes[0], points.items(), strict=True):
        at: dict[tuple[float, float], list[str]] = {}  # baselines that scored alike share one point and one label
        for who, tokens, score in row:
            at.setdefault((round(tokens, 1), round(score, 3)), []).append(who)
        for (tokens, score), whos in at.items():
            color = {"candidate": "tab:green", "base": "grey"}.get(whos[0], "tab:blue")
            ax.plot([tokens], [score], "o", color=color)
            ax.annotate(", ".join(whos), (tokens, score), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("prompt tokens per request")
        ax.set_ylim(-0.05, 1.1)
        ax.set_xlim(0, max(t for _, t, _ in row) * 1.35 + 1)
    axes[0][0].set_ylabel("score")
    fig.suptitle("quality against cost: the candidate and the cheaper alternatives", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def _checks_table(verdict: dict[str, Any]) -> list[str]:
    rows = [
        "| check | role | reference | candidate | diff | bounds | need | n | result |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in verdict["checks"]:
        result = "pass" if c["passed"] else "FAIL: " + c["why"]
        name = f"{c['task']}/{c['metric']} vs {c['against']}"
        if not c["n"]:
            rows.append(f"| {name} | {c['role']} | – | – | – | – | {c['threshold']} | 0 | {result} |")
            continue
        rows.append(
            f"| {name} | {c['role']} | {c['reference']:.3f} | {c['candidate']:.3f} | {c['diff']:+.3f} | "
            f"[{c['lower']:+.3f}, {c['upper']:+.3f}] | {c['threshold']} | {c['n']} | {result} |"
        )
    return rows


def _baselines_table(verdict: dict[str, Any], costs: dict[str, dict[str, Any]]) -> list[str]:
    points = cost_points(verdict, costs)
    if not points:
        return []
    keys = list(points)
    rows = [
        "| who | " + " | ".join(keys) + " | prompt tokens per request | examples shown | items trimmed |",
        "|---|" + "---|" * len(keys) + "---|---|---|",
    ]
    whos = [who for who, _, _ in points[keys[0]]]
    for who in whos:
        scores = [next((f"{s:.3f}" for w, _, s in points[k] if w == who), "–") for k in keys]
        cost = costs.get(who)
        tokens = f"{cost['prompt_tokens']:.0f}" if cost else f"{points[keys[0]][0][1]:.0f}"
        shown = f"{cost['examples_shown']:.1f}" if cost else "0"
        trimmed = f"{cost['items_trimmed']} of {cost['items']}" if cost else "–"
        label = f"{who} ({describe_baseline(who)})" if cost else who
        rows.append(f"| {label} | " + " | ".join(scores) + f" | {tokens} | {shown} | {trimmed} |")
    return rows


def _clip(text: Any, n: int = MD_TEXT, tail: bool = False) -> str:
    if text is None:
        return "–"
    text = " ".join(str(text).split())
    text = ("…" + text[-n:] if len(text) > n else text) if tail else (text[:n] + "…" if len(text) > n else text)
    return "`` " + text.replace("`", "'") + " ``"


def _md_item(item: dict[str, Any], against: str) -> list[str]:
    return [
        f"- doc {item['doc_id']}: {item['reference_score']:.3f} -> {item['candidate_score']:.3f}",
        f"  - prompt: {_clip(item['prompt'], tail=True)}",
        f"  - reference: {_clip(item['target'])}",
        f"  - {against}: {_clip(item['reference_output'])}",
        f"  - candidate: {_clip(item['candidate_output'])}",
    ]


def _flipped_md(flipped: list[dict[str, Any]]) -> list[str]:
    out = [
        "## Items that flipped",
        "",
        "Per check, the items whose outcome changed against the reference (all in `flipped.json` and `report.html`).",
        "",
    ]
    for f in flipped:
        out += [f"### {f['check']}: lost {len(f['lost'])}, won {len(f['won'])}", ""]
        for item in f["lost"]:
            out += _md_item(item, f["against"])
        shown = f["won"][:MD_WON]
        if shown:
            first = "" if len(shown) == len(f["won"]) else f" (first {len(shown)} of {len(f['won'])})"
            out += ["", f"Won{first}:", ""]
            for item in shown:
                out += _md_item(item, f["against"])
        out.append("")
    return out


def markdown(verdict: dict[str, Any], flipped: list[dict[str, Any]], costs: dict[str, dict[str, Any]]) -> str:
    head = "PASSED" if verdict["passed"] else f"FAILED ({', '.join(verdict['failed'])})"
    out = [f"# Gate {head}", "", f"Paired bootstrap, one-sided bounds at {verdict['confidence']:.0%}.", ""]
    out += [*_checks_table(verdict), "", "![base vs candidate](chart.png)", ""]
    if recommendation := verdict.get("recommendation"):
        out += [f"**{recommendation}**", ""]
    if table := _baselines_table(verdict, costs):
        out += ["## Against the cheaper alternatives", "", *table, "", "![quality against cost](cost.png)", ""]
    return "\n".join(out + _flipped_md(flipped))


def _img(path: Path) -> str:
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<p><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}"></p>'


def _html_table(rows: list[str]) -> str:
    """A markdown table (as written above) as HTML."""
    if not rows:
        return ""
    cells = [[html.escape(c.strip()) for c in r.strip("|").split(" | ")] for r in rows if not r.startswith("|---")]
    head = "".join(f"<th>{c}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_items(items: list[dict[str, Any]], against: str) -> str:
    if not items:
        return "<p>none</p>"
    names = ("doc", "score", "prompt", "reference", against, "candidate")
    head = "<tr>" + "".join(f"<th>{html.escape(n)}</th>" for n in names) + "</tr>"
    rows = "".join(
        f"<tr><td>{i['doc_id']}</td><td>{i['reference_score']:.3f} → {i['candidate_score']:.3f}</td>"
        + "".join(
            f"<td><pre>{html.escape(str(i[k]) if i[k] is not None else '–')}</pre></td>"
            for k in ("prompt", "target", "reference_output", "candidate_output")
        )
        + "</tr>"
        for i in items
    )
    return f"<table>{head}{rows}</table>"


def page(verdict: dict[str, Any], flipped: list[dict[str, Any]], costs: dict[str, dict[str, Any]], folder: Path) -> str:
    """report.html: the verdict, both charts inline and every flipped item."""
    head = "PASSED" if verdict["passed"] else "FAILED"
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Gate " + head + "</title><style>"
        "body{font-family:sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;font-size:90%}"
        "pre{white-space:pre-wrap;margin:0;max-width:30em}.FAILED{color:#b00}.PASSED{color:#070}</style></head><body>",
        f"<h1 class='{head}'>Gate {head}</h1>",
        "<ul>" + "".join(f"<li><code>{html.escape(line)}</code></li>" for line in verdict["lines"]) + "</ul>",
    ]
    if recommendation := verdict.get("recommendation"):
        parts.append(f"<p><strong>{html.escape(recommendation)}</strong></p>")
    parts += [_html_table(_checks_table(verdict)), _img(folder / "chart.png")]
    if table := _baselines_table(verdict, costs):
        parts += ["<h2>Against the cheaper alternatives</h2>", _html_table(table), _img(folder / "cost.png")]
    parts.append("<h2>Items that flipped</h2>")
    for f in flipped:
        parts.append(
            f"<details><summary>{html.escape(f['check'])}: lost {len(f['lost'])}, won {len(f['won'])}</summary>"
        )
        parts += [
            "<h4>lost</h4>",
            _html_items(f["lost"], f["against"]),
            "<h4>won</h4>",
            _html_items(f["won"], f["against"]),
        ]
        parts.append("</details>")
    return "\n".join([*parts, "</body></html>", ""])
