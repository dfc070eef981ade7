"""validate: check every source row with a Great Expectations suite before any GPU time is spent.

    python -m stages.validate        # what dvc.yaml runs

Rows are read and normalised (tunegate.formats), then a GX 1.x suite runs over a table with one row
per record: role order, non-empty content, token length under the base tokenizer, unfilled template
placeholders, unique ids, chosen != rejected for preference rows, and PII patterns. A row failing any
expectation is quarantined with the first failing check as its reason; unreadable lines are
quarantined with file:line. For every source, in = kept + quarantined, and the stage fails in one
line when a source's invalid share exceeds `validate.max_invalid_share`.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

from tunegate.config import Source, Validate, load_config
from tunegate.errors import UserError
from tunegate.formats import load_source, row_text
from tunegate.io import write_json, write_jsonl, write_text
from tunegate.runtime import stage_main

log = logging.getLogger(__name__)

PLACEHOLDER = r"\{[A-Za-z_][A-Za-z0-9_]*\}|\{\{[^}]*\}\}"
SFT_ROLES = r"^(?:system,)?(?:user,assistant,)*user,assistant$"
PREF_ROLES = r"^(?:system,)?(?:user,assistant,)*user\|assistant\|assistant$"
QUARANTINE = "quarantine.jsonl"
PII_KEY = {"mask": "pii_masked", "report": "pii_reported", "quarantine": "pii_quarantined"}
DOCS_SITE = "tunegate_docs"  # an ephemeral context already owns "local_site"


def _roles(msgs: list[dict[str, str]]) -> str:
    return ",".join(m["role"] for m in msgs)


class TokenCounter:
    """Token counts under the base tokenizer, checked against [min_tokens, max_tokens] at the least cost.

    For a byte-level BPE tokenizer with no normaliser (GPT-2, Llama 3, Qwen, Mistral Nemo and the
    demo's), every token covers at least one byte and at most `longest` bytes, so
    ceil(bytes / longest) <= tokens <= bytes. A row whose byte bounds already lie inside the limits
    cannot fail the length check and is not tokenised; the rest (and every row of any other kind of
    tokenizer) get an exact count from the Rust tokenizer in one batch. The `n_tokens` column then
    holds the exact count or, for rows decided by the bounds, the upper bound.
    """

    use_bounds = True  # benchmarks/validate_cost.py turns it off to show what it saves

    def __init__(self, tokenizer, min_tokens: int, max_tokens: int):
        self.tokenizer, self.min_tokens, self.max_tokens = tokenizer, min_tokens, max_tokens
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.longest = None
        if self.use_bounds and backend is not None and backend.normalizer is None and type(backend.pre_tokenizer).__name__ == "ByteLevel":
            pieces = list(backend.get_vocab()) + [t.content for t in tokenizer.added_tokens_decoder.values()]
            self.longest = max(len(p.encode()) for p in pieces)  # byte-level vocab: one char per byte

    def count(self, texts: list[str]) -> list[int]:
        counts = [len(t.encode()) for t in texts]
        if self.longest:
            todo = [i for i, b in enumerate(counts) if b > self.max_tokens or -(-b // self.longest) < self.min_tokens]
        else:
            todo = list(range(len(texts)))
        if todo:
            exact = self._exact([texts[i] for i in todo])
            for i, n in zip(todo, exact):
                counts[i] = n
        return counts

    def _exact(self, texts: list[str]) -> list[int]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and hasattr(backend, "encode_batch_fast"):
            return [len(e) for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _renderer(tokenizer) -> Any:
    """messages -> the text the trainer will see. The template is compiled once (transformers'
    per-call apply_chat_template re-prepares it for every row); any other template falls back."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        compiled = _compile_jinja_template(tokenizer.chat_template)
        special = dict(tokenizer.special_tokens_map)

        def render(msgs: list[dict[str, str]]) -> str:
            return compiled.render(messages=msgs, add_generation_prompt=False, **special)
    except Exception:  # no template string, or a transformers without the helper: the public API
        def render(msgs: list[dict[str, str]]) -> str:
            return tokenizer.apply_chat_template(msgs, tokenize=False)

    def safe(msgs: list[dict[str, str]]) -> str:
        try:
            return render(msgs)
        except Exception:  # a template that rejects the role order; the roles check reports it
            return "\n".join(m["content"] for m in msgs)

    return safe


def _table(rows: list[dict[str, Any]], tokenizer, counter: TokenCounter) -> Any:
    """One line per row with the derived columns the expectations check."""
    import pandas as pd

    render = _renderer(tokenizer)
    records, rendered = [], []
    for row in rows:
        if row["kind"] == "sft":
            msgs = row["messages"]
            roles = _roles(msgs)
            texts = [render(msgs)]
            equal = False
        else:
            msgs = row["prompt"] + row["chosen"] + row["rejected"]
            roles = f"{_roles(row['prompt'])}|{_roles(row['chosen'])}|{_roles(row['rejected'])}"
            texts = [render(row["prompt"] + row["chosen"]), render(row["prompt"] + row["rejected"])]
            equal = [m["content"].strip() for m in row["chosen"]] == [m["content"].strip() for m in row["rejected"]]
        records.append(
            {
                "id": row["id"],
                "roles": roles,
                "min_chars": min((len(m["content"].strip()) for m in msgs), default=0),
                "text": row_text(row),
                "chosen_equals_rejected": equal,
            }
        )
        rendered.append(texts)
    lengths = iter(counter.count([t for texts in rendered for t in texts]))
    for rec, texts in zip(records, rendered):
        rec["n_tokens"] = max(next(lengths) for _ in texts)
    return pd.DataFrame.from_records(records)


def _expectations(cfg: Validate, kind: str) -> list[Any]:
    """The suite, in the order reasons are assigned: a row's first failing check names it in quarantine."""
    import great_expectations as gx

    E = gx.expectations
    checks: list[tuple[str, Any]] = [
        ("duplicate_id", E.ExpectColumnValuesToBeUnique, {"column": "id"}),
        ("wrong_role", E.ExpectColumnValuesToMatchRegex, {"column": "roles", "regex": SFT_ROLES if kind == "sft" else PREF_ROLES}),
        ("empty_content", E.ExpectColumnValuesToBeBetween, {"column": "min_chars", "min_value": 1}),
        ("template_leftover", E.ExpectColumnValuesToNotMatchRegex, {"column": "text", "regex": PLACEHOLDER}),
        ("length", E.ExpectColumnValuesToBeBetween, {"column": "n_tokens", "min_value": cfg.min_tokens, "max_value": cfg.max_tokens}),
    ]
    if kind == "preference":
        checks.append(("chosen_equals_rejected", E.ExpectColumnValuesToBeInSet, {"column": "chosen_equals_rejected", "value_set": [False]}))
    checks += [(f"pii_{name}", E.ExpectColumnValuesToNotMatchRegex, {"column": "text", "regex": p}) for name, p in cfg.pii_patterns.items()]
    return [cls(**kwargs, meta={"reason": reason}) for reason, cls, kwargs in checks]


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
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["id"]},
    )
    order = [c.meta["reason"] for c in checks]
    failed: dict[str, list[str]] = {}
    for res in result.results:
        reason = res.expectation_config.meta["reason"]
        for item in res.result.get("unexpected_index_list") or []:
            failed.setdefault(item["id"], []).append(reason)
    return {rid: sorted(set(rs), key=order.index) for rid, rs in failed.items()}


def _mask(row: dict[str, Any], patterns: dict[str, re.Pattern[str]]) -> dict[str, Any]:
    for key in ("messages", "prompt", "chosen", "rejected"):
        for msg in row.get(key, ()):
            for name, pattern in patterns.items():
                msg["content"] = pattern.sub(f"[{name.upper()}]", msg["content"])
    return row


def run(cfg: Validate, sources: dict[str, Source], tokenizer, out_dir: Path, docs_dir: Path | None = None) -> dict[str, Any]:
    """Validate every source; write <source>.jsonl (valid rows), quarantine.jsonl and report.md to out_dir."""
    import great_expectations as gx

    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    pii = {name: re.compile(p) for name, p in cfg.pii_patterns.items()}
    counter = TokenCounter(tokenizer, cfg.min_tokens, cfg.max_tokens)
    metrics: dict[str, Any] = {"sources": {}}
    quarantine: list[dict[str, Any]] = []
    valid: dict[str, list[dict[str, Any]]] = {}
    failures: list[str] = []
    for name, source in sources.items():
        rows, problems, fmt = load_source(name, source.path, source.format)
        expected_kind = "preference" if source.role == "preference" else "sft"
        wrong_kind = [r for r in rows if r["kind"] != expected_kind]
        rows = [r for r in rows if r["kind"] == expected_kind]
        quarantine += [p.as_row() for p in problems]
        quarantine += [
            {"source": name, "line": r["line"], "id": r["id"], "reason": "wrong_format", "detail": f"{r['kind']} row in a {source.role} source"}
            for r in wrong_kind
        ]
        failed = _run_suite(ctx, name, _table(rows, tokenizer, counter), _expectations(cfg, expected_kind)) if rows else {}
        kept, pii_masked = [], Counter()
        for row in rows:
            reasons = failed.get(row["id"], [])
            blocking = [r for r in reasons if not r.startswith("pii_") or cfg.pii == "quarantine"]
            if blocking:
                quarantine.append({"source": name, "line": row["line"], "id": row["id"], "reason": blocking[0], "detail": ", ".join(reasons)})
                continue
            for r in reasons:
                pii_masked[r] += 1
            kept.append(_mask(row, pii) if cfg.pii == "mask" and reasons else row)
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
            PII_KEY[cfg.pii]: dict(sorted(pii_masked.items())),
        }
        share = n_quarantined / n_in if n_in else 1.0
        if share > cfg.max_invalid_share:
            top = ", ".join(f"{r} {c}" for r, c in reasons.most_common(3))
            failures.append(f"{source.path}: {n_quarantined}/{n_in} rows invalid ({share:.0%} > validate.max_invalid_share {cfg.max_invalid_share:.0%}; {top})")
        log.info("validate %s (%s): in %d = kept %d + quarantined %d", name, fmt, n_in, len(kept), n_quarantined)

    totals = {k: sum(s[k] for s in metrics["sources"].values()) for k in ("in", "kept", "quarantined")}
    metrics.update(totals, conserved=totals["in"] == totals["kept"] + totals["quarantined"])
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, kept in valid.items():
        write_jsonl(out_dir / f"{name}.jsonl", kept)
    write_jsonl(out_dir / QUARANTINE, sorted(quarantine, key=lambda q: (q["source"], q["line"])))
    write_text(out_dir / "report.md", _report(metrics))
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
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
            },
        )
        ctx.build_data_docs(site_names=[DOCS_SITE])
    except Exception as err:  # docs are a convenience; never fail validation because HTML rendering did
        log.warning("data docs not built: %s", err)


def _report(m: dict[str, Any]) -> str:
    lines = ["# validate", "", f"in {m['in']} = kept {m['kept']} + quarantined {m['quarantined']} (conserved: {m['conserved']})", ""]
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
        write_json(Path(cfg.paths.metrics) / "validate.json", metrics)

    stage_main("validate", body)


if __name__ == "__main__":
    main()
