"""validate: check every source row with a Great Expectations suite before any GPU time is spent.

    python -m stages.validate        # what dvc.yaml runs

Rows are read and normalised (tunegate.formats), their derived columns are built in Arrow (`_table`),
then a GX 1.x suite runs over that table, one row per record: role order, non-empty content, token
length under the base tokenizer and its chat template, unfilled template placeholders, unique ids,
chosen != rejected for preference rows, and PII patterns (one pass for all). A row failing any
expectation is quarantined with the first failing check as its reason; unreadable lines are
quarantined with file:line. For every source, in = kept + quarantined, and the stage fails in one
line when a source's invalid share exceeds `validate.max_invalid_share`.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from tunegate.config import Source, Validate, load_config
from tunegate.errors import UserError
from tunegate.formats import Message, Row, load_rows
from tunegate.io import write_chunks, write_json, write_jsonl, write_text
from tunegate.runtime import gc_paused, stage_main

log = logging.getLogger(__name__)

PLACEHOLDER = r"\{[A-Za-z_][A-Za-z0-9_]*\}|\{\{[^}]*\}\}"
SFT_ROLES = r"^(?:system,)?(?:user,assistant,)*user,assistant$"
PREF_ROLES = r"^(?:system,)?(?:user,assistant,)*user\|assistant\|assistant$"
QUARANTINE = "quarantine.jsonl"
WRITE_ROWS = 16384  # rows encoded per chunk while the previous chunk is written
PII = "pii"  # the combined PII check; rows it flags get one `pii_<name>` reason per matching pattern
PII_KEY = {"mask": "pii_masked", "report": "pii_reported", "quarantine": "pii_quarantined"}
DOCS_SITE = "tunegate_docs"  # an ephemeral context already owns "local_site"


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
        return self.count_bytes([len(t.encode()) for t in texts], texts.__getitem__).tolist()

    def count_bytes(self, sizes, text: Callable[[int], str]):
        """Counts (a numpy array) for texts of the given UTF-8 sizes; `text(i)` is asked only for the
        texts the bounds cannot decide."""
        import numpy as np

        counts = np.array(sizes, np.int64)
        if self.longest:
            todo = np.flatnonzero((counts > self.max_tokens) | (-(-counts // self.longest) < self.min_tokens))
        else:
            todo = np.arange(len(counts))
        if todo.size:
            counts[todo] = self._exact([text(i) for i in todo.tolist()])
        return counts

    def _exact(self, texts: list[str]) -> list[int]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and hasattr(backend, "encode_batch_fast"):
            return [len(e) for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _renderer(tokenizer) -> Callable[[list[dict[str, str]]], str]:
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


# The characters str.strip() (and so Jinja's `trim`) removes, for Arrow's utf8_trim: equal results both ways.
PY_WHITESPACE = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
ROLE_SEP = "\x1f"


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


class Flat:
    """Groups of messages (rows or conversations) laid end to end as Arrow arrays, so that per-message
    and per-group work runs in Arrow and numpy instead of a Python loop per row."""

    def __init__(self, groups: list[list[Message]]):
        import numpy as np
        import pyarrow as pa

        self.groups = groups
        self.counts = np.fromiter(map(len, groups), np.int64, len(groups))
        self.offsets = np.zeros(len(groups) + 1, np.int64)
        np.cumsum(self.counts, out=self.offsets[1:])
        self._sums: dict[bool, Any] = {}
        if len(groups) and self.counts.min() == self.counts.max() == 1:  # one message each (string fields)
            self.contents = pa.array([g[0].content for g in groups], pa.large_string())
            self.roles = pa.array([g[0].role for g in groups], pa.large_string())
        else:
            self.contents = pa.array([m.content for g in groups for m in g], pa.large_string())
            self.roles = pa.array([m.role for g in groups for m in g], pa.large_string())

    def join(self, values, sep: str):
        import pyarrow as pa
        import pyarrow.compute as pc

        lists = pa.LargeListArray.from_arrays(pa.array(self.offsets), values)
        return pc.binary_join(lists, pa.scalar(sep, pa.large_string()))

    def per_group(self, values, reduce, empty: int):
        """reduce (a numpy ufunc) over each group's messages; `empty` for a group with none."""
        import numpy as np

        values = np.asarray(values, np.int64)
        starts = self.offsets[:-1]
        nonempty = self.offsets[1:] > starts
        out = np.full(len(starts), empty, np.int64)
        if values.size:
            out[nonempty] = reduce.reduceat(values, starts[nonempty])
        return out

    def lengths(self, trimmed: bool, unit: str = "bytes"):
        import pyarrow.compute as pc

        values = pc.utf8_trim(self.contents, PY_WHITESPACE) if trimmed else self.contents
        return (pc.binary_length(values) if unit == "bytes" else pc.utf8_length(values)).to_numpy()

    def byte_sums(self, trimmed: bool):
        """UTF-8 size of each group's contents (as they are, or each trimmed), summed."""
        import numpy as np

        if trimmed not in self._sums:
            self._sums[trimmed] = self.per_group(self.lengths(trimmed), np.add, 0)
        return self._sums[trimmed]


def _conversation(parts: tuple[Flat, ...], i: int) -> list[Message]:
    """Row i's groups of `parts` laid end to end (e.g. prompt + chosen)."""
    return [m for part in parts for m in part.groups[i]]


def _joined(parts: list[Flat], values: list[Any], sep: str):
    """Per row, the non-empty parts' values joined with sep (as if each row's groups were one list)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out, seen = values[0], pa.array(parts[0].counts > 0)
    for part, value in zip(parts[1:], values[1:]):
        has = pa.array(part.counts > 0)
        both = pc.binary_join_element_wise(out, value, pa.scalar(sep, pa.large_string()))
        out = pc.if_else(has, pc.if_else(seen, both, value), out)
        seen = pc.or_(seen, has)
    return out


def _laid_out(layout: tuple[int, tuple[bool, ...]], conv: list[Message]) -> int:
    """A conversation's rendered size from its template layout: the fixed text plus each content, trimmed where the template trims."""
    fixed, trims = layout
    return fixed + sum([_utf8_len(m.content.strip() if trim else m.content) for m, trim in zip(conv, trims)])


class RenderedSize:
    """UTF-8 size of a conversation as the chat template renders it, without rendering every row.

    Chat templates wrap each message's content in text that depends only on the roles
    (`<|im_start|>user\\n` ... `<|im_end|>\\n`), and insert the content verbatim or trimmed. For each
    distinct role sequence the template is rendered twice with marker contents of different lengths,
    padded with whitespace. When both renders show every marker exactly once, in order, verbatim
    or trimmed, with identical text around them, a row's rendered size is that text's size plus
    its contents' sizes. A template that repeats, reorders or rewrites content fails the probe,
    and rows with those roles are rendered one by one. The first rows of every probed role sequence
    are rendered for real as a check; any difference turns the shortcut off for that sequence.
    """

    CHECK_ROWS = 16
    use_layouts = True  # benchmarks/validate_cost.py turns it off to show what it saves
    # Content used other than whole or trimmed: a method or filter on it, indexing it, or testing
    # what it contains (e.g. reasoning templates that cut `<think>` blocks out of earlier turns).
    CONTENT_DEPENDENT = re.compile(
        r"""content(?:['"]\])?\s*(?:\.(?!strip\s*\(\s*\))|\|(?!\s*trim\b)|\[)"""
        r"""|\bin\s+(?:\w+\.content\b|\w+\[\s*['"]content['"]\s*\])"""
    )

    def __init__(self, tokenizer):
        self.render = _renderer(tokenizer)
        self.layouts: dict[tuple[str, ...], tuple[int, tuple[bool, ...]] | None] = {}
        self.checked: dict[tuple[str, ...], int] = {}
        template = getattr(tokenizer, "chat_template", None)
        self.shortcut = self.use_layouts and isinstance(template, str) and not self.CONTENT_DEPENDENT.search(template)
        if self.use_layouts and not self.shortcut:
            log.info("validate: the chat template is rendered for every row (its output may depend on the content)")

    def text(self, conv: list[Message]) -> str:
        return self.render([{"role": m.role, "content": m.content} for m in conv])

    def sizes(self, *parts: Flat):
        """Rendered size of every conversation, where conversation i is the i-th groups of `parts`
        laid end to end (one part for chat rows; prompt and chosen, or prompt and rejected)."""
        import numpy as np
        import pyarrow.compute as pc

        def conv(i: int) -> list[Message]:
            return _conversation(parts, i)

        n = len(parts[0].groups)
        out = np.zeros(n, np.int64)
        if not n:
            return out
        if any(pc.any(pc.match_substring(part.roles, ROLE_SEP)).as_py() for part in parts):  # would blur the keys below
            out[:] = [self.size(conv(i)) for i in range(n)]
            return out
        encoded = pc.dictionary_encode(_joined(list(parts), [part.join(part.roles, ROLE_SEP) for part in parts], ROLE_SEP))
        keys, index = encoded.dictionary.to_pylist(), encoded.indices.to_numpy()
        for k, key in enumerate(keys):
            members = np.flatnonzero(index == k)
            roles = tuple(key.split(ROLE_SEP)) if key else ()
            # probes the roles once and checks the first rows against real renders; their sizes stand
            first = [self.size(conv(i)) for i in members[: self.CHECK_ROWS]]
            layout = self.layouts[roles]
            if layout is None or len(set(layout[1])) > 1:  # not probed, or trimmed in some places only
                out[members] = first + [self.size(conv(i)) for i in members[self.CHECK_ROWS :]]
                continue
            fixed, trims = layout
            trim = bool(trims and trims[0])
            out[members] = fixed + sum(part.byte_sums(trim)[members] for part in parts)
        return out

    def text_of(self, *parts: Flat) -> Callable[[int], str]:
        return lambda i: self.text(_conversation(parts, i))

    def size(self, conv: list[Message]) -> int:
        """One conversation's rendered size (the general path)."""
        roles = tuple([m.role for m in conv])
        layout = self.layouts[roles] if roles in self.layouts else self._probe(roles)
        if layout is not None and self.checked.get(roles, 0) < self.CHECK_ROWS:
            layout = self._check(roles, conv, layout)
        if layout is None:
            return len(self.text(conv).encode())
        return _laid_out(layout, conv)

    def _check(self, roles: tuple[str, ...], conv: list[Message], layout: tuple[int, tuple[bool, ...]]) -> tuple[int, tuple[bool, ...]] | None:
        self.checked[roles] = self.checked.get(roles, 0) + 1
        if len(self.text(conv).encode()) != _laid_out(layout, conv):
            log.info("chat template: rows with roles %s are rendered one by one (its output depends on content)", ",".join(roles))
            self.layouts[roles] = None
            return None
        return layout

    def _probe(self, roles: tuple[str, ...]) -> tuple[int, tuple[bool, ...]] | None:
        if not self.shortcut:
            self.layouts[roles] = None
            return None
        layouts = [self._layout(roles, tag) for tag in ("tgMk", "tgMarkerLonger")]
        layout = layouts[0] if layouts[0] is not None and layouts[0] == layouts[1] else None
        self.layouts[roles] = layout
        return layout

    def _layout(self, roles: tuple[str, ...], tag: str) -> tuple[int, tuple[bool, ...]] | None:
        markers = [f"{tag}{i}z" for i in range(len(roles))]
        pad = " \n"
        try:
            out = self.render([{"role": r, "content": f"{pad}{m}{pad}"} for r, m in zip(roles, markers)])
        except Exception:
            return None
        fixed, trims, pos = out, [], 0
        for m in markers:
            if out.count(m) != 1 or out.index(m) < pos:
                return None
            padded = f"{pad}{m}{pad}"
            if out.count(padded) == 1:
                trims.append(False)
                fixed = fixed.replace(padded, "", 1)
            elif pad + m not in out and m + pad not in out:
                trims.append(True)
                fixed = fixed.replace(m, "", 1)
            else:
                return None  # stripped on one side only, or otherwise changed
            pos = out.index(m)
        return len(fixed.encode()), tuple(trims)


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
        parts = [Flat([row.prompt for row in rows]), Flat([row.chosen for row in rows]), Flat([row.rejected for row in rows])]
        prompt, chosen, rejected = parts
        roles = [part.join(part.roles, ",") for part in parts]
        columns["roles"] = pc.binary_join_element_wise(*roles, pa.scalar("|", pa.large_string()))
        none = np.iinfo(np.int64).max
        shortest = np.minimum.reduce([part.per_group(part.lengths(trimmed=True, unit="chars"), np.minimum, none) for part in parts])
        columns["min_chars"] = np.where(shortest == none, 0, shortest)
        columns["text"] = _joined(parts, [part.join(part.contents, "\n") for part in parts], "\n")
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
        ("wrong_role", E.ExpectColumnValuesToMatchRegex, {"column": "roles", "regex": SFT_ROLES if kind == "sft" else PREF_ROLES}),
        ("empty_content", E.ExpectColumnValuesToBeBetween, {"column": "min_chars", "min_value": 1}),
        ("template_leftover", E.ExpectColumnValuesToNotMatchRegex, {"column": "text", "regex": PLACEHOLDER}),
        ("length", E.ExpectColumnValuesToBeBetween, {"column": "n_tokens", "min_value": cfg.min_tokens, "max_value": cfg.max_tokens}),
    ]
    if kind == "preference":
        checks.append(("chosen_equals_rejected", E.ExpectColumnValuesToBeInSet, {"column": "chosen_equals_rejected", "value_set": [False]}))
    if cfg.pii_patterns:
        # One pass over the text for all patterns; which of them matched is worked out afterwards for
        # the flagged rows only (`_pii_reasons`). Patterns that cannot be combined get a pass each.
        combined = "|".join(f"(?:{p})" for p in cfg.pii_patterns.values())
        try:
            re.compile(combined)
            checks.append((PII, E.ExpectColumnValuesToNotMatchRegex, {"column": "text", "regex": combined}))
        except re.error:  # e.g. the same group name in two patterns
            checks += [(f"pii_{name}", E.ExpectColumnValuesToNotMatchRegex, {"column": "text", "regex": p}) for name, p in cfg.pii_patterns.items()]
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


def run(cfg: Validate, sources: dict[str, Source], tokenizer, out_dir: Path, docs_dir: Path | None = None) -> dict[str, Any]:
    """Validate every source; write <source>.jsonl (valid rows), quarantine.jsonl and report.md to out_dir."""
    with gc_paused():  # the rows stay alive throughout; collections would walk them again and again
        return _run(cfg, sources, tokenizer, out_dir, docs_dir)


def _run(cfg: Validate, sources: dict[str, Source], tokenizer, out_dir: Path, docs_dir: Path | None) -> dict[str, Any]:
    import great_expectations as gx

    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    pii = {name: re.compile(p) for name, p in cfg.pii_patterns.items()}
    counter = TokenCounter(tokenizer, cfg.min_tokens, cfg.max_tokens)
    sizes = RenderedSize(tokenizer)
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
            {"source": name, "line": r.line, "id": r.id, "reason": "wrong_format", "detail": f"{r.kind} row in a {source.role} source"}
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
                quarantine.append({"source": name, "line": row.line, "id": row.id, "reason": blocking[0], "detail": ", ".join(reasons)})
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
            failures.append(f"{source.path}: {n_quarantined}/{n_in} rows invalid ({share:.0%} > validate.max_invalid_share {cfg.max_invalid_share:.0%}; {top})")
        log.info("validate %s (%s): in %d = kept %d + quarantined %d (%.1f s)", name, fmt, n_in, len(kept), n_quarantined, time.perf_counter() - started)

    totals = {k: sum(s[k] for s in metrics["sources"].values()) for k in ("in", "kept", "quarantined")}
    metrics.update(totals, conserved=totals["in"] == totals["kept"] + totals["quarantined"])
    out_dir.mkdir(parents=True, exist_ok=True)
    encode = msgspec.json.Encoder().encode_lines
    for name, kept in valid.items():
        write_chunks(out_dir / f"{name}.jsonl", (encode(kept[i : i + WRITE_ROWS]) for i in range(0, len(kept), WRITE_ROWS)))
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
