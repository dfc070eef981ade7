"""validate: check every source row with a Great Expectations suite before any GPU time is spent.

    python -m stages.validate        # what dvc.yaml runs

Rows are read and normalised (tunegate.formats), their derived columns are built in Arrow (`_table`,
with rendered sizes and token counts from tunegate.rendering), then a GX 1.x suite runs over that
table, one row per record: role order, non-empty content, token length under the base tokenizer and
its chat template, unfilled template placeholders, unique ids, chosen != rejected for preference
rows, and PII patterns (one pass for all). A row failing any expectation is quarantined with the
first failing check as its reason; unreadable lines are quarantined with file:line. For every
source, in = kept + quarantined, and the stage fails in one line when a source's invalid share
exceeds `validate.max_invalid_share`.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec

from tunegate.config import Source, Validate, load_config
from tunegate.errors import UserError
from tunegate.formats import Row, load_rows
from tunegate.io import write_chunks, write_json, write_jsonl, write_text
from tunegate.paths import QUARANTINE, REPORT, Layout, jsonl_of
from tunegate.rendering import PY_WHITESPACE, ROLE_SEP, Flat, RenderedSize, TokenCounter, joined
from tunegate.runtime import gc_paused, stage_main

log = logging.getLogger(__name__)

PLACEHOLDER = r"\{[A-Za-z_][A-Za-z0-9_]*\}|\{\{[^}]*\}\}"
SFT_ROLES = r"^(?:system,)?(?:user,assistant,)*user,assistant$"
PREF_ROLES = r"^(?:system,)?(?:user,assistant,)*user\|assistant\|assistant$"
WRITE_ROWS = 16384  # rows encoded per chunk while the previous chunk is written
PII = "pii"  # the combined PII check; rows it flags get one `pii_<name>` reason per matching pattern
PII_KEY = {"mask": "pii_masked", "report": "pii_reported", "quarantine": "pii_quarantined"}
DOCS_SITE = "tunegate_docs"  # an ephemeral context already owns "local_site"


def _table(rows: list[Row], counter: TokenCounter, sizes: RenderedSize) -> Any:
    """One line per row with the derived columns the expectations check, built column-wise in Arrow."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    columns: dict[str, Any] = {"id": pa.array([row.id for row in rows], pa.large_string())}
    if all(row.kind == "sft" for row in rows):
        flat = Flat([row.messages for row in rows])
        columns["roles"] = flat.join(flat.roles, ",")
        columns["min_chars"] = flat.per_group(flat.lengths(trimmed=True, unit="chars"), np.minimum, 0)
        columns["text"] = flat.join(flat.contents, "\n")
        columns["n_tokens"] = counter.count_bytes(sizes.sizes(flat), sizes.text_of(flat))
    else:
        parts = [
            Flat([row.prompt for row in rows]),
            Flat([row.chosen for row in rows]),
            Flat([row.rejected for row in rows]),
        ]
        prompt, chosen, rejected = parts
        roles = [part.join(part.roles, ",") for part in parts]
        columns["roles"] = pc.binary_join_element_wise(*roles, pa.scalar("|", pa.large_string()))
        none = np.iinfo(np.int64).max
        shortest = np.minimum.reduce(
            [part.per_group(part.lengths(trimmed=True, unit="chars"), np.minimum, none) for part in parts]
        )
        columns["min_chars"] = np.where(shortest == none, 0, shortest)
        columns["text"] = joined(parts, [part.join(part.contents, "\n") for part in parts], "\n")
        columns["n_tokens"] = np.maximum(
            counter.count_bytes(sizes.sizes(prompt, chosen), sizes.text_of(prompt, chosen)),
            counter.count_bytes(sizes.sizes(prompt, rejected), sizes.text_of(prompt, rejected)),
        )
        # chosen == rejected (contents, trimmed): candidates by joined text, confirmed row by row
        same = [part.join(pc.utf8_trim(part.contents, PY_WHITESPACE), ROLE_SEP) for part in (chosen, rejected)]
        candidates = np.flatnonzero(pc.equal(*same).to_numpy(zero_copy_only=False) & (chosen.counts == rejected.counts))
        equal = np.zeros(len(rows), bool)
        for i in candidates.tolist():
            equal[i] = [m.content.strip() for m in rows[i].chosen] == [m.content.strip() for m in rows[i].rejected]
        columns["chosen_equals_rejected"] = equal
    return pa.table(columns).to_pandas()


def _expectations(cfg: Validate, kind: str) -> list[Any]:
    """The suite, in the order reasons are assigned: a row's first failing check names it in quarantine."""
    import great_expectations as gx

    E = gx.expectations
    checks: list[tuple[str, Any]] = [
        ("duplicate_id", E.ExpectColumnValuesToBeUnique, {"column": "id"}),
        (
            "wrong_role",
            E.ExpectColumnValuesToMatchRegex,
            {"column": "roles", "regex": SFT_ROLES if kind == "sft" else PREF_ROLES},
        ),
        ("empty_content", E.ExpectColumnValuesToBeBetween, {"column": "min_chars", "min_value": 1}),
        ("template_leftover", E.ExpectColumnValuesToNotMatchRegex, {"column": "text", "regex": PLACEHOLDER}),
        (
            "length",
            E.ExpectColumnValuesToBeBetween,
            {"column": "n_tokens", "min_value": cfg.min_tokens, "max_value": cfg.max_tokens},
        ),
    ]
    if kind == "preference":
        checks.append(
            (
                "chosen_equals_rejected",
                E.ExpectColumnValuesToBeInSet,
                {"column": "chosen_equals_rejected", "value_set": [False]},
            )
        )
    if cfg.pii_patterns:
        # One pass over the text for all patterns; which of them matched is worked out afterwards for
        # the flagged rows only (`_pii_reasons`). Patterns that cannot be combined get a pass each.
        combined = "|".join(f"(?:{p})" for p in cfg.pii_patterns.values())
        try:
            re.compile(combined)
            checks.append((PII, E.ExpectColumnValuesToNotMatchRegex, {"column": "text", "regex": combined}))
        except re.error:  # e.g. the same group name in two patterns
            checks += [
                (f"pii_{name}", E.ExpectColumnValuesToNotMatchRegex, {"column": "text", "regex": p})
                for name, p in cfg.pii_patterns.items()
            ]
    return [cls(**kwargs, meta={"reason": reason}) for reason, cls, kwargs in checks]


def _pii_reasons(row: Row, patterns: dict[str, re.Pattern[str]]) -> list[str]:
    text = "\n".join(m.content for m in row.all_messages())
    return [f"pii_{name}" for name, p in patterns.items() if p.search(text)] or [PII]


def _run_suite(ctx, name: str, frame, checks: list[Any]) -> dict[str, list[str]]:
    """Run the suite; return {row id: [failed check reasons, in suite order]}."""
    import great_expectations as gx

    asset = ctx.data_sources.add_pandas(f"{name}_rows").add_dataframe_asset(name)
    suite = ctx.suites.add(gx.ExpectationSuite(name=name))
    for expectation in checks:
        suite.add_expectation(expectation)
    definition = ctx.validation_definitions.add(
        gx.ValidationDefinition(name=name, data=asset.add_batch_definition_whole_dataframe("all"), suite=suite)
    )
    result = definition.run(
        batch_parameters={"dataframe": frame},
        # every failing row's id, and nothing else: the values themselves (whole texts) are not copied into the result
        result_format={
            "result_format": "COMPLETE",
            "unexpected_index_column_names": ["id"],
            "exclude_unexpected_values": True,
            "partial_unexpected_count": 0,
            "return_unexpected_index_query": False,
        },
    )
    order = [c.meta["reason"] for c in checks]
    failed: dict[str, list[str]] = {}
    for res in result.results:
        reason = res.expectation_config.meta["reason"]
        for item in res.result.get("unexpected_index_list") or []:
            ids = item["id"]  # {"id": [ids...]} when values are excluded, {"id": id} per row otherwise
            for rid in ids if isinstance(ids, list) else [ids]:
                failed.setdefault(rid, []).append(reason)
    return {rid: sorted(set(rs), key=order.index) for rid, rs in failed.items()}


def _mask(row: Row, patterns: dict[str, re.Pattern[str]]) -> Row:
    for msg in row.all_messages():
        for name, pattern in patterns.items():
            msg.content = pattern.sub(f"[{name.upper()}]", msg.content)
    return row


def run(
    cfg: Validate,
    sources: dict[str, Source],
    tokenizer,
    out_dir: Path,
    docs_dir: Path | None = None,
    *,
    use_bounds: bool = True,
    use_layouts: bool = True,
) -> dict[str, Any]:
    """Validate every source; write <source>.jsonl (valid rows), quarantine.jsonl and report.md to out_dir.

    `use_bounds` (TokenCounter) and `use_layouts` (RenderedSize) switch the length check's shortcuts;
    benchmarks/validate_cost.py turns them off to show what they save."""
    with gc_paused():  # the rows stay alive throughout; collections would walk them again and again
        return _run(cfg, sources, tokenizer, out_dir, docs_dir, use_bounds=use_bounds, use_layouts=use_layouts)


def _run(
    cfg: Validate,
    sources: dict[str, Source],
    tokenizer,
    out_dir: Path,
    docs_dir: Path | None,
    *,
    use_bounds: bool,
    use_layouts: bool,
) -> dict[str, Any]:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    pii = {name: re.compile(p) for name, p in cfg.pii_patterns.items()}
    counter = TokenCounter(tokenizer, cfg.min_tokens, cfg.max_tokens, use_bounds=use_bounds)
    sizes = RenderedSize(tokenizer, use_layouts=use_layouts)
    metrics: dict[str, Any] = {"sources": {}}
    quarantine: list[dict[str, Any]] = []
    valid: dict[str, list[Row]] = {}
    failures: list[str] = []
    for name, source in sources.items():
        started = time.perf_counter()
        rows, problems, fmt = load_rows(name, source.path, source.format)
        expected_kind = "preference" if source.role == "preference" else "sft"
        wrong_kind = [r for r in rows if r.kind != expected_kind]
        if wrong_kind:
            rows = [r for r in rows if r.kind == expected_kind]
        quarantine += [p.as_row() for p in problems]
        quarantine += [
            {
                "source": name,
                "line": r.line,
                "id": r.id,
                "reason": "wrong_format",
                "detail": f"{r.kind} row in a {source.role} source",
            }
            for r in wrong_kind
        ]
        failed = _run_suite(ctx, name, _table(rows, counter, sizes), _expectations(cfg, expected_kind)) if rows else {}
        kept, pii_hits = [], Counter()  # rows per PII pattern: masked, reported or quarantined
        for row in rows:
            reasons = failed.get(row.id)
            if reasons is None:
                kept.append(row)
                continue
            if reasons[-1] == PII:
                reasons = reasons[:-1] + _pii_reasons(row, pii)
            hits = [r for r in reasons if r.startswith(PII)]
            blocking = [r for r in reasons if not r.startswith(PII) or cfg.pii == "quarantine"]
            if blocking:
                quarantine.append(
                    {
                        "source": name,
                        "line": row.line,
                        "id": row.id,
                        "reason": blocking[0],
                        "detail": ", ".join(reasons),
                    }
                )
                if cfg.pii == "quarantine":
                    pii_hits.update(hits)
                continue
            pii_hits.update(hits)
            kept.append(_mask(row, pii) if cfg.pii == "mask" else row)
        valid[name] = kept
        n_in = len(rows) + len(problems) + len(wrong_kind)
        reasons = Counter(q["reason"] for q in quarantine if q["source"] == name)
        n_quarantined = sum(reasons.values())  # counted from the quarantine itself, so `conserved` is a real check
        metrics["sources"][name] = {
            "format": fmt,
            "in": n_in,
            "kept": len(kept),
            "quarantined": n_quarantined,
            "reasons": dict(sorted(reasons.items())),
            PII_KEY[cfg.pii]: dict(sorted(pii_hits.items())),
        }
        share = n_quarantined / n_in if n_in else 1.0
        if share > cfg.max_invalid_share:
            top = ", ".join(f"{r} {c}" for r, c in reasons.most_common(3))
            failures.append(
                f"{source.path}: {n_quarantined}/{n_in} rows invalid "
                f"({share:.0%} > validate.max_invalid_share {cfg.max_invalid_share:.0%}; {top})"
            )
        log.info(
            "validate %s (%s): in %d = kept %d + quarantined %d (%.1f s)",
            name,
            fmt,
            n_in,
            len(kept),
            n_quarantined,
            time.perf_counter() - started,
        )

    totals = {k: sum(s[k] for s in metrics["sources"].values()) for k in ("in", "kept", "quarantined")}
    metrics.update(totals, conserved=totals["in"] == totals["kept"] + totals["quarantined"])
    out_dir.mkdir(parents=True, exist_ok=True)
    encode = msgspec.json.Encoder().encode_lines
    for name, kept in valid.items():
        write_chunks(
            out_dir / jsonl_of(name), (encode(kept[i : i + WRITE_ROWS]) for i in range(0, len(kept), WRITE_ROWS))
        )
    write_jsonl(out_dir / QUARANTINE, sorted(quarantine, key=lambda q: (q["source"], q["line"])))
    write_text(out_dir / REPORT, _report(metrics))
    if docs_dir is not None:
        _data_docs(ctx, docs_dir)
    if failures:
        raise UserError("; ".join(failures) + f" — see {out_dir / QUARANTINE}")
    return metrics


def _data_docs(ctx, docs_dir: Path) -> None:
    """Render GX Data Docs (HTML) for the suites just run; a human-readable view, not a DVC output."""
    try:
        ctx.add_data_docs_site(
            site_name=DOCS_SITE,
            site_config={
                "class_name": "SiteBuilder",
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir.resolve()),
                },
            },
        )
        ctx.build_data_docs(site_names=[DOCS_SITE])
    except Exception as err:  # docs are a convenience; never fail validation because HTML rendering did
        log.warning("data docs not built: %s", err)


def _report(m: dict[str, Any]) -> str:
    lines = [
        "# validate",
        "",
        f"in {m['in']} = kept {m['kept']} + quarantined {m['quarantined']} (conserved: {m['conserved']})",
        "",
    ]
    lines += ["| source | format | in | kept | quarantined | reasons |", "|---|---|---|---|---|---|"]
    for name, s in m["sources"].items():
        reasons = ", ".join(f"{k} {v}" for k, v in s["reasons"].items()) or "-"
        lines.append(f"| {name} | {s['format']} | {s['in']} | {s['kept']} | {s['quarantined']} | {reasons} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    def body() -> None:
        from tunegate.models import load_manifest, load_tokenizer

        cfg = load_config()
        tokenizer = load_tokenizer(load_manifest(cfg.paths.base), cfg.base.trust_remote_code)
        out = Path(cfg.paths.validated)
        metrics = run(cfg.validate_, cfg.data.sources, tokenizer, out, Path(cfg.paths.data_docs))
        write_json(Layout.of(cfg.paths).metrics("validate"), metrics)

    stage_main("validate", body)


if __name__ == "__main__":
    main()
