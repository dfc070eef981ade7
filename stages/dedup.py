"""dedup: drop eval leaks, contradictions, exact and near duplicates, each with a reason and a pointer.

    python -m stages.dedup        # what dvc.yaml runs

Order matters and is deliberate:
1. contamination: a row containing an eval item's prompt (word n-grams; whole text for short items)
   is dropped, naming the eval task and item, so no eval item leaks into training;
2. contradictions: the same normalised prompt with materially different answers (for a labelled answer:
   the same prompt and answer labelled both desirable and not) is resolved by `dedup.contradictions`
   (keep_majority / keep_first / drop_all) before duplicates are collapsed, so the majority vote still
   counts every copy;
3. exact duplicates after case / whitespace / punctuation / unicode normalisation;
4. near duplicates: MinHash LSH on word n-grams (rensa signatures), candidates verified by their exact
   Jaccard similarity, greedy leader clustering (a row is dropped only for a verified resemblance to a
   row that is kept).
Sources are processed in params order, so rows of an earlier source (domain) win over later ones.
For every source: in = kept + dropped.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Literal

from tunegate.config import Dedup, load_config
from tunegate.dedup import ContaminationIndex, exact_key, near_duplicates
from tunegate.formats import LABELLED, prompt_and_answer, row_text
from tunegate.io import read_jsonl, write_json, write_jsonl, write_text
from tunegate.paths import DROPPED, REPORT, Layout
from tunegate.runtime import stage_main
from tunegate.text import words

log = logging.getLogger(__name__)

NGRAM = Dedup.model_fields["contamination_ngram"].default  # the setting's default, for callers without a config
PROMPT_FIELDS = ("prompt", "message", "question", "query", "input", "text")
ANSWER_FIELDS = ("answer", "target", "output")


def eval_items(eval_data: Path, ngram: int = NGRAM) -> list[tuple[str, str, bool]]:
    """(item id, text, is_prompt) for every prompt and correct answer in evals/data/*.jsonl. An item held out of a
    conversation (`history`, its earlier exchanges) is often a short follow-up ("Thanks, and the refund?"), which
    matched whole on its own would drop every row that says as much: a prompt shorter than `ngram` words
    (dedup.contamination_ngram) is matched with the words before it in its conversation, `ngram` words in all, or
    followed by its answer."""
    items = []
    for path in sorted(eval_data.glob("*.jsonl")):
        for n, row in enumerate(read_jsonl(path), 1):
            item = f"{path.stem}:{row.get('id', n)}"
            before = _earlier_words(row.get("history"))
            answer = next((row[f] for f in ANSWER_FIELDS if isinstance(row.get(f), str)), "")
            for f in PROMPT_FIELDS:
                if isinstance(row.get(f), str):
                    items += [(item, text, True) for text in _leak_texts(row[f], answer, before, ngram)]
            items += [(item, row[f], False) for f in ANSWER_FIELDS if isinstance(row.get(f), str)]
            if isinstance(row.get("choices"), list) and isinstance(row.get("label"), int):
                items.append((item, str(row["choices"][row["label"]]), False))
    return items


def _earlier_words(history: Any) -> list[str]:
    """The words of an item's earlier exchanges, in order ([] for none, or for a history not as init writes it)."""
    if not isinstance(history, list):
        return []
    texts = [t.get(k) for t in history if isinstance(t, dict) for k in ("user", "assistant")]
    return [w for text in texts if isinstance(text, str) for w in words(text)]


def _leak_texts(prompt: str, answer: str, before: list[str], ngram: int) -> list[str]:
    """A prompt's leak texts: the prompt itself when it has `ngram` words or more, or nothing before it; else the last
    `ngram` words of its conversation up to and including it, and the prompt followed by its answer (the same
    question and answer in another conversation)."""
    said = words(prompt)
    if len(said) >= ngram or not before:
        return [prompt]
    return [" ".join((before + said)[-ngram:]), f"{prompt}\n{answer}"]


def _contradictions(rows: list[dict[str, Any]], policy: str) -> dict[int, tuple[str, str, str]]:
    """{row index: (reason, other row id, detail)} for rows losing a same-prompt, different-answer conflict."""
    groups: dict[str, list[int]] = defaultdict(list)
    claims = [_claim(row) for row in rows]
    for i, row in enumerate(rows):
        groups[f"{row['kind']}|{exact_key(claims[i][0])}"].append(i)
    out: dict[int, tuple[str, str, str]] = {}
    for members in groups.values():
        answers = [claims[i][1] for i in members]
        votes = Counter(answers)
        if len(votes) < 2:
            continue
        ranked = votes.most_common()
        if policy == "keep_first":
            winner = answers[0]
        elif policy == "keep_majority" and ranked[0][1] > ranked[1][1]:
            winner = ranked[0][0]
        else:
            winner = None
        keeper = next((members[k] for k, a in enumerate(answers) if a == winner), None)
        for k, i in enumerate(members):
            if answers[k] != winner:
                other = rows[keeper]["id"] if keeper is not None else rows[members[0 if k else 1]]["id"]
                what = "labels of this answer" if rows[i]["kind"] == LABELLED else "answers to this prompt"
                detail = f"{len(votes)} different {what}; policy {policy}" + (
                    "" if winner else " (no majority: all dropped)"
                )
                out[i] = ("contradiction", other, detail)
    return out


def _claim(row: dict[str, Any]) -> tuple[str, str]:
    """(what a row is asked, what it answers), normalised: a conflict is the same question with another answer. A
    labelled answer (KTO) is asked its prompt and answer together and answers with its label: the same answer
    labelled both desirable and not contradicts itself, while other answers to the same prompt are what KTO needs."""
    prompt, answer = prompt_and_answer(row)
    if row["kind"] == LABELLED:
        return f"{prompt}\n{answer}", str(row["label"])
    return prompt, exact_key(answer)


def run(
    cfg: Dedup,
    sources: dict[str, list[dict[str, Any]]],
    evals: list[tuple[str, str, bool]],
    seed: int,
    minhash: Literal["rensa", "numpy"] = "rensa",
) -> tuple[dict[str, list], list[dict], dict]:
    """Returns (kept rows per source, dropped rows with reasons, metrics). `minhash="numpy"` runs the
    previous signature path on one machine (the reference tests and benchmarks compare with).

    Each check sees only the rows the earlier ones kept, in this order: eval leaks, contradictions, exact
    duplicates, near duplicates; a row dropped is dropped for the first reason found."""
    rows = [r for name in sources for r in sources[name]]
    verdict: dict[int, tuple[str, str, str]] = {}  # row -> (reason, what it duplicates, detail)
    verdict |= _eval_leaks(cfg, rows, evals)
    live = [i for i in range(len(rows)) if i not in verdict]
    verdict |= {live[k]: v for k, v in _contradictions([rows[i] for i in live], cfg.contradictions).items()}
    verdict |= _exact_duplicates(rows, verdict)
    verdict |= _near_duplicates(cfg, rows, verdict, seed, minhash)
    kept: dict[str, list] = {name: [] for name in sources}
    dropped = []
    for i, row in enumerate(rows):
        if i in verdict:
            reason, of, detail = verdict[i]
            dropped.append(
                {
                    "id": row["id"],
                    "source": row["source"],
                    "line": row["line"],
                    "reason": reason,
                    "of": of,
                    "detail": detail,
                }
            )
        else:
            kept[row["source"]].append(row)
    return kept, dropped, _metrics(sources, kept, dropped)


def _eval_leaks(cfg: Dedup, rows: list[dict], evals: list[tuple[str, str, bool]]) -> dict[int, tuple[str, str, str]]:
    """Rows that contain an eval item's text (its n-grams, or a whole short prompt)."""
    index = ContaminationIndex(cfg.contamination_ngram)
    for item, text, is_prompt in evals:
        index.add(text, item, whole=is_prompt)
    return {
        i: ("eval_leak", hit[0], f"contains eval text: '{hit[1]}'")
        for i, row in enumerate(rows)
        if (hit := index.match(row_text(row)))
    }


def _exact_duplicates(rows: list[dict], verdict: dict[int, tuple]) -> dict[int, tuple[str, str, str]]:
    """Rows identical to an earlier live row after normalisation (the earlier one is kept)."""
    first_of: dict[str, int] = {}
    found = {}
    for i, row in enumerate(rows):
        if i in verdict:
            continue
        key = f"{row['kind']}|{exact_key(row_text(row))}"
        if key in first_of:
            found[i] = ("exact_duplicate", rows[first_of[key]]["id"], "identical after normalisation")
        else:
            first_of[key] = i
    return found


def _near_duplicates(
    cfg: Dedup, rows: list[dict], verdict: dict[int, tuple], seed: int, minhash: Literal["rensa", "numpy"]
) -> dict[int, tuple[str, str, str]]:
    """Live rows whose verified Jaccard with their cluster's leader reaches the threshold (Ray or one machine).
    Labelled answers (KTO) are compared only with answers of the same label: a desirable and an undesirable answer
    to one prompt share most of their words, and are the contrast KTO learns from, not a duplicate."""
    parts: dict[Any, list[int]] = defaultdict(list)
    for i in range(len(rows)):
        if i not in verdict:
            parts[rows[i]["label"] if rows[i]["kind"] == LABELLED else None].append(i)
    found = {}
    for live in parts.values():
        texts = [row_text(rows[i]) for i in live]
        if cfg.engine == "ray":
            from tunegate.dedup_ray import near_duplicates_ray

            near = near_duplicates_ray(
                texts, cfg.ngram, cfg.num_perm, cfg.bands, cfg.threshold, seed, address=cfg.ray_address
            )
        else:
            near = near_duplicates(texts, cfg.ngram, cfg.num_perm, cfg.bands, cfg.threshold, seed, minhash=minhash)
        found |= {
            live[k]: ("near_duplicate", rows[live[rep]]["id"], f"jaccard {sim:.2f} >= {cfg.threshold}")
            for k, (rep, sim) in near.items()
        }
    return found


def _metrics(sources: dict[str, list], kept: dict[str, list], dropped: list[dict]) -> dict[str, Any]:
    """Per source in = kept + dropped with the reasons, the totals, and whether the counts are conserved."""
    metrics: dict[str, Any] = {"sources": {}}
    for name, src_rows in sources.items():
        reasons = Counter(d["reason"] for d in dropped if d["source"] == name)
        metrics["sources"][name] = {
            "in": len(src_rows),
            "kept": len(kept[name]),
            "dropped": sum(reasons.values()),
            "reasons": dict(sorted(reasons.items())),
        }
    totals = {k: sum(s[k] for s in metrics["sources"].values()) for k in ("in", "kept", "dropped")}
    metrics.update(totals, conserved=totals["in"] == totals["kept"] + totals["dropped"])
    return metrics


# The setting that decides each reason a row is dropped for (named in the warning when a source loses most of its rows)
SETTING_OF = {
    "near_duplicate": "dedup.threshold (verified Jaccard; raise it to keep more) and dedup.ngram",
    "eval_leak": "dedup.contamination_ngram (and the eval sets in evals/data)",
    "contradiction": "dedup.contradictions",
    "exact_duplicate": "none: the rows are the same after normalisation",
}


def heavy_losses(m: dict[str, Any], share: float) -> list[str]:
    """One line per source that lost more than `share` of its rows: how many, the main reasons, the setting."""
    out = []
    for name, s in m["sources"].items():
        if not s["in"] or s["dropped"] / s["in"] <= share:
            continue
        reasons = sorted(s["reasons"].items(), key=lambda kv: (-kv[1], kv[0]))
        main = reasons[0][0]
        out.append(
            f"dedup: source {name} lost {s['dropped']} of {s['in']} rows ({s['dropped'] / s['in']:.0%}, kept "
            f"{s['kept']}): {', '.join(f'{k} {v}' for k, v in reasons)}; {main} is decided by "
            f"{SETTING_OF.get(main, 'dedup settings')} (see data/dedup/report.md; dedup.warn_share {share})"
        )
    return out


def _report(m: dict[str, Any], dropped: list[dict]) -> str:
    lines = [
        "# dedup",
        "",
        f"in {m['in']} = kept {m['kept']} + dropped {m['dropped']} (conserved: {m['conserved']})",
        "",
    ]
    lines += ["| source | in | kept | dropped | reasons |", "|---|---|---|---|---|"]
    for name, s in m["sources"].items():
        reasons = ", ".join(f"{k} {v}" for k, v in s["reasons"].items()) or "-"
        lines.append(f"| {name} | {s['in']} | {s['kept']} | {s['dropped']} | {reasons} |")
    lines += ["", "## First drops of each kind", "", "| row | reason | of | detail |", "|---|---|---|---|"]
    shown: Counter[str] = Counter()
    for d in dropped:
        if shown[d["reason"]] < 3:
            shown[d["reason"]] += 1
            lines.append(f"| {d['source']}:{d['line']} | {d['reason']} | {d['of']} | {d['detail']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    def body() -> None:
        cfg = load_config()
        layout = Layout.of(cfg.paths)
        sources = {name: read_jsonl(layout.validated_source(name)) for name in cfg.data.sources}
        evals = eval_items(layout.eval_data, cfg.dedup.contamination_ngram)
        kept, dropped, metrics = run(cfg.dedup, sources, evals, cfg.seed)
        for name, rows in kept.items():
            write_jsonl(layout.dedup_source(name), rows)
        write_jsonl(layout.dedup / DROPPED, dropped)
        write_text(layout.dedup / REPORT, _report(metrics, dropped))
        write_json(layout.metrics("dedup"), metrics)
        log.info("dedup: in %d = kept %d + dropped %d", metrics["in"], metrics["kept"], metrics["dropped"])
        for line in heavy_losses(metrics, cfg.dedup.warn_share):
            log.warning("%s", line)

    stage_main("dedup", body)


if __name__ == "__main__":
    main()
