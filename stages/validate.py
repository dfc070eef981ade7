"""validate: check every source row with a Great Expectations suite before any GPU time is spent.

    python -m stages.validate        # what dvc.yaml runs

Rows are read and normalised (tunegate.formats), their derived columns are built in Arrow (`_table`,
with rendered sizes and token counts from tunegate.rendering), then a GX 1.x suite runs over that
table, one row per record: role order, non-empty content, token length under the base tokenizer and
its chat template, unfilled template placeholders, unique ids, chosen != rejected for preference
rows, and PII and secret patterns (one pass for all). The suite is handed the narrow columns it
reads (`_narrow`): ids as numbers and, per regex on the text, whether it matched, not the text
itself, which GX would hash whole to fingerprint the batch. A row failing any expectation is
quarantined with the first failing check as its reason; unreadable lines are quarantined with file:line.
A preference source of string-form pairs (three strings a row) is held as columns, not as row objects
(tunegate.pair_columns; the same outputs byte for byte).
A chat template that refuses a system turn (Gemma's) gets it folded into the first user turn (`_fold_system`);
a role order it refuses otherwise is quarantined as `template_refused` before the suite (`_renderable`).
Characters that do not show (bidi overrides, zero-width and control characters) are found in the
same Arrow pass that builds the table and reported, stripped or quarantined (`validate.invisible`).
For every source, in = kept + quarantined, and the stage fails in one line when a source's invalid
share exceeds `validate.max_invalid_share`.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from tunegate.chat import (
    PROBE_CONVERSATION,
    Renderer,
    first_line,
    fold_system,
    message_text,
    system_refusal,
    tool_support,
    uses_tools,
)
from tunegate.config import Source, Validate, load_config
from tunegate.errors import UserError
from tunegate.formats import LABELLED, NOTE_EXTRAS, PAIR, SFT, Message, Row, assign_ids, load_rows
from tunegate.io import atomic_path, write_chunks, write_json, write_jsonl, write_text
from tunegate.pair_columns import PairRows, read_pairs
from tunegate.paths import QUARANTINE, REPORT, Layout, jsonl_of
from tunegate.rendering import ROLE_SEP, Flat, RenderedSize, TokenCounter, joined
from tunegate.runtime import gc_paused, stage_main

log = logging.getLogger(__name__)

PLACEHOLDER = r"\{[A-Za-z_][A-Za-z0-9_]*\}|\{\{[^}]*\}\}"
# A turn: the user, then any number of tool rounds (an assistant turn that calls tools, then one tool
# result or more), then the assistant's answer. A conversation's last answer may itself be a tool call.
CALLS = r"(?:assistant\+call,(?:tool,)+)*"
SFT_ROLES = rf"^(?:system,)?(?:user,{CALLS}assistant,)*user,{CALLS}assistant(?:\+call)?$"
ANSWER = r"assistant(?:\+call)?"
PREF_ROLES = rf"^(?:system,)?(?:user,{CALLS}assistant,)*user(?:,assistant\+call(?:,tool)+)*\|{ANSWER}\|{ANSWER}$"
CALL_ROLE = "assistant+call"  # an assistant message with tool calls, in the roles column only
NO_TOOLS = "template_no_tools"
REFUSED = "template_refused"  # a role order the chat template raises on (its own words in the detail)
SYSTEM_FOLDED = "system_folded"  # a read note: system turns folded into the first user turn (`fold_system`)
ID_NUMBER = "id_number"  # the suite's id column: a number per distinct id (`_narrow`)
WRITE_ROWS = 1024  # rows encoded per chunk while the previous one is written; small enough (~0.3 MB) that
# the allocator reuses the chunk buffers instead of mapping (and page-faulting) fresh memory for each
PII = "pii"  # the combined PII check; rows it flags get one `pii_<name>` reason per matching pattern
PII_KEY = {"mask": "pii_masked", "report": "pii_reported", "quarantine": "pii_quarantined"}
# Characters a reader cannot see, by class (inclusive code point ranges). Left out on purpose: tab,
# newline and carriage return, the zero-width (non-)joiners U+200C/U+200D that emoji sequences and
# Indic and Persian scripts need, and variation selectors.
INVISIBLE = {
    # C0 controls other than \t \n \r, DEL, and the C1 controls
    "control": ((0x00, 0x08), (0x0B, 0x0C), (0x0E, 0x1F), (0x7F, 0x9F)),
    # directional marks, embeddings, overrides and isolates: they reorder what a reader sees (Trojan Source)
    "bidi": ((0x061C, 0x061C), (0x200E, 0x200F), (0x202A, 0x202E), (0x2066, 0x2069)),
    # zero-width space, word joiner and invisible operators, a byte order mark inside text, soft hyphen
    "zero_width": ((0x00AD, 0x00AD), (0x180E, 0x180E), (0x200B, 0x200B), (0x2060, 0x2064), (0xFEFF, 0xFEFF)),
    # Unicode tag characters: invisible ASCII look-alikes used to hide instructions in text
    "tag": ((0xE0000, 0xE007F),),
}
INVISIBLE_KEY = {"report": "invisible_reported", "strip": "invisible_stripped", "quarantine": "invisible_quarantined"}


def _char_class(ranges, escape) -> str:
    return "[" + "".join(escape(a) if a == b else f"{escape(a)}-{escape(b)}" for a, b in ranges) + "]"


# The same classes for Arrow's RE2 (\x{...}) and for Python's re (\U........), from the one table.
INVISIBLE_RE2 = _char_class([r for ranges in INVISIBLE.values() for r in ranges], lambda c: f"\\x{{{c:x}}}")
INVISIBLE_PY = {name: re.compile(_char_class(ranges, lambda c: f"\\U{c:08x}")) for name, ranges in INVISIBLE.items()}
DOCS_SITE = "tunegate_docs"  # an ephemeral context already owns "local_site"


def _table(
    rows: list[Row], counter: TokenCounter, sizes: RenderedSize, extras: bool = True, on_text: Any = None
) -> Any:
    """One line per row with the derived columns the expectations check, built column-wise in Arrow.
    `extras`: whether any row may have tool calls, names or weights (`chat_extras` when read); without
    them no row is looked at one by one. `on_text` is handed the text column (Arrow) as soon as it is made."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    columns: dict[str, Any] = {}
    rich = (
        [i for i, row in enumerate(rows) if row.tools or any(type(m) is not Message for m in row.all_messages())]
        if extras and not isinstance(rows, PairRows)
        else []
    )
    if not isinstance(rows, PairRows) and all(row.kind != PAIR for row in rows):  # SFT rows, or labelled answers
        turns = [row.conversation() for row in rows]
        flat = Flat([_shown(t) for t in turns] if rich else turns)
        text = (on_text or _ignore)(flat.join(flat.contents, "\n"))
        columns["roles"] = flat.join(flat.roles, ",")
        columns["min_chars"] = flat.per_group(flat.lengths(trimmed=True, unit="chars"), np.minimum, 0)
        columns["text"] = text
        columns["n_tokens"] = counter.count_bytes(
            *_rich_sizes(sizes, rows, rich, flat, lambda row: (row.conversation(), row.tools))
        )
    else:
        parts = _pair_parts(rows, rich)
        prompt, chosen, rejected = parts
        text = (on_text or _ignore)(joined(parts, [part.join(part.contents, "\n") for part in parts], "\n"))
        roles = [part.join(part.roles, ",") for part in parts]
        columns["roles"] = pc.binary_join_element_wise(*roles, pa.scalar("|", pa.large_string()))
        none = np.iinfo(np.int64).max
        shortest = np.minimum.reduce(
            [part.per_group(part.lengths(trimmed=True, unit="chars"), np.minimum, none) for part in parts]
        )
        columns["min_chars"] = np.where(shortest == none, 0, shortest)
        columns["text"] = text
        columns["n_tokens"] = np.maximum(
            counter.count_bytes(
                *_rich_sizes(sizes, rows, rich, (prompt, chosen), lambda row: (row.prompt + row.chosen, row.tools))
            ),
            counter.count_bytes(
                *_rich_sizes(sizes, rows, rich, (prompt, rejected), lambda row: (row.prompt + row.rejected, row.tools))
            ),
        )
        # chosen == rejected (contents, trimmed): candidates by joined text, confirmed row by row
        same = [part.join(part.trimmed, ROLE_SEP) for part in (chosen, rejected)]
        candidates = np.flatnonzero(pc.equal(*same).to_numpy(zero_copy_only=False) & (chosen.counts == rejected.counts))
        equal = np.zeros(len(rows), bool)
        for i in candidates.tolist():
            equal[i] = _same_answers(rows, i)
        columns["chosen_equals_rejected"] = equal
    return pa.table(columns).to_pandas()


def _ignore(text: Any) -> Any:
    return text


def _pair_parts(rows: list[Row], rich: list[int]) -> list[Flat]:
    """The prompt, chosen and rejected parts of preference rows, laid out for the table (tool calls shown as text
    where rows have them)."""
    if isinstance(rows, PairRows):
        return rows.parts()
    return [
        Flat([_shown(getattr(row, part)) for row in rows] if rich else [getattr(row, part) for row in rows])
        for part in ("prompt", "chosen", "rejected")
    ]


def _same_answers(rows: list[Row], i: int) -> bool:
    """Whether row i's chosen and rejected say the same, message by message, trimmed."""
    if isinstance(rows, PairRows):
        return rows.same_answers(i)
    return [message_text(m).strip() for m in rows[i].chosen] == [message_text(m).strip() for m in rows[i].rejected]


def _shown(messages: list[Message]) -> list[Message]:
    """Messages as the table's columns see them: tool calls are part of the text (so an assistant turn
    that only calls a tool is not empty, and PII in arguments is found) and mark their role."""
    if all(type(m) is Message for m in messages):
        return messages
    return [
        Message(CALL_ROLE if m.role == "assistant" and getattr(m, "tool_calls", None) else m.role, message_text(m))
        for m in messages
    ]


def _rich_sizes(sizes: RenderedSize, rows: list[Row], rich: list[int], parts, conversation):
    """(rendered sizes, text of row i) for `TokenCounter.count_bytes`: plain rows from the template's
    layouts, rows with tool calls, tool results, names, weights or a tools list rendered for real."""
    parts = parts if isinstance(parts, tuple) else (parts,)
    if not rich:
        return sizes.sizes(*parts), sizes.text_of(*parts)
    import numpy as np

    plain = np.ones(len(rows), bool)
    plain[rich] = False
    out = np.zeros(len(rows), np.int64)
    index = np.flatnonzero(plain)
    if index.size:
        subset = tuple(Flat([part.groups[i] for i in index.tolist()]) for part in parts)
        out[index] = sizes.sizes(*subset)
    texts = {i: sizes.rendered(*conversation(rows[i])) for i in rich}
    for i, text in texts.items():
        out[i] = len(text.encode())
    layout_text = sizes.text_of(*parts)
    return out, lambda i: texts[i] if i in texts else layout_text(i)


def _text_checks(cfg: Validate) -> list[tuple[str, str]]:
    """(reason, regex) of the checks that read the text: unfilled template placeholders, then PII.
    One pass over the text for all PII patterns; which of them matched is worked out afterwards for
    the flagged rows only (`_pii_reasons`). Patterns that cannot be combined get a pass each."""
    checks = [("template_leftover", PLACEHOLDER)]
    if cfg.pii_patterns:
        combined = "|".join(f"(?:{p})" for p in cfg.pii_patterns.values())
        try:
            re.compile(combined)
            checks.append((PII, combined))
        except re.error:  # e.g. the same group name in two patterns
            checks += [(f"pii_{name}", p) for name, p in cfg.pii_patterns.items()]
    return checks


def _matches(reason: str) -> str:
    return f"{reason}_in_text"  # the suite's column: whether the text matches that check's regex


def _expectations(cfg: Validate, kind: str) -> list[Any]:
    """The suite, in the order reasons are assigned: a row's first failing check names it in quarantine.
    It reads the table `_narrow` makes: the ids as numbers, and per regex check on the text
    (`_text_checks`) whether the row's text matched."""
    import great_expectations as gx

    E = gx.expectations
    leftover, *pii = [
        (reason, E.ExpectColumnValuesToBeInSet, {"column": _matches(reason), "value_set": [False]})
        for reason, _ in _text_checks(cfg)
    ]
    checks: list[tuple[str, Any, dict[str, Any]]] = [
        ("duplicate_id", E.ExpectColumnValuesToBeUnique, {"column": ID_NUMBER}),
        (
            "wrong_role",
            E.ExpectColumnValuesToMatchRegex,
            {"column": "roles", "regex": PREF_ROLES if kind == PAIR else SFT_ROLES},
        ),
        ("empty_content", E.ExpectColumnValuesToBeBetween, {"column": "min_chars", "min_value": 1}),
        leftover,
        (
            "length",
            E.ExpectColumnValuesToBeBetween,
            {"column": "n_tokens", "min_value": cfg.min_tokens, "max_value": cfg.max_tokens},
        ),
    ]
    if kind == PAIR:
        checks.append(
            (
                "chosen_equals_rejected",
                E.ExpectColumnValuesToBeInSet,
                {"column": "chosen_equals_rejected", "value_set": [False]},
            )
        )
    return [cls(**kwargs, meta={"reason": reason}) for reason, cls, kwargs in checks + pii]


def _text_flags(frame, cfg: Validate) -> dict[str, Any]:
    """Per regex check on the text, whether each row's text matched: computed with the very call GX's pandas
    engine makes (`column.astype(str).str.contains(regex)`), so the same rows match."""
    text = frame["text"].astype(str)
    return {_matches(reason): text.str.contains(regex).to_numpy(dtype=bool) for reason, regex in _text_checks(cfg)}


def _hidden(frame) -> Any:
    """Whether each row's text has a character that does not show (one RE2 pass over the text column)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return pc.match_substring_regex(pa.array(frame["text"]), INVISIBLE_RE2).to_numpy(zero_copy_only=False)


def _narrow(frame, ids: Any, flags: dict[str, Any]):
    """The table the suite reads: no text and no id strings, which GX would hash whole for its batch
    fingerprint (most of the suite's time). The ids become numbers (equal ids, equal numbers), and each
    regex check on the text the flag `_text_flags` made."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    out = frame.drop(columns=["text"])
    # numbered in order of first appearance, as pandas.factorize numbers them (Arrow's hashing is the quicker)
    ids = ids if isinstance(ids, pa.Array) else pa.array(ids, pa.large_string())
    out.insert(0, ID_NUMBER, pc.dictionary_encode(ids).indices.to_numpy().astype(np.int64))
    for column, matched in flags.items():
        out[column] = matched
    return out


def _pii_reasons(row: Row, patterns: dict[str, re.Pattern[str]]) -> list[str]:
    text = "\n".join(map(message_text, row.all_messages()))
    return [f"pii_{name}" for name, p in patterns.items() if p.search(text)] or [PII]


def _run_suite(ctx, name: str, frame, checks: list[Any]) -> dict[int, list[str]]:
    """Run the suite; return {row number in the table: [failed check reasons, in suite order]}."""
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
        # every failing row's index (its row number), and nothing else: no values are copied into the result
        result_format={
            "result_format": "COMPLETE",
            "exclude_unexpected_values": True,
            "partial_unexpected_count": 0,
            "return_unexpected_index_query": False,
        },
    )
    order = [c.meta["reason"] for c in checks]
    failed: dict[int, list[str]] = {}
    for res in result.results:
        reason = res.expectation_config.meta["reason"]
        for i in res.result.get("unexpected_index_list") or []:
            failed.setdefault(int(i), []).append(reason)
    return {i: sorted(set(rs), key=order.index) for i, rs in failed.items()}


def _invisible(
    rows: list[Row], frame, hidden, mode: str, counter: TokenCounter, sizes: RenderedSize
) -> tuple[Any, dict[int, list[str]]]:
    """Rows with characters that do not show (`hidden`, per row), by class. `strip` removes them from the
    contents and rebuilds those rows' table lines, so every check sees the text as it will be trained on (a
    message of nothing but zero-width spaces is then empty). Returns the table and {row number:
    [invisible_<class>]}."""
    import numpy as np

    flagged = np.flatnonzero(hidden)
    found: dict[int, list[str]] = {}
    for i in flagged.tolist():
        text = "\n".join(map(message_text, rows[i].all_messages()))
        found[i] = [f"invisible_{name}" for name, p in INVISIBLE_PY.items() if p.search(text)]
    if mode == "strip" and flagged.size:
        strip = [p.sub for p in INVISIBLE_PY.values()]
        for i in flagged.tolist():
            for msg in rows[i].all_messages():
                for sub in strip:
                    _edit_text(msg, lambda text, sub=sub: sub("", text))
        redone = _table([rows[i] for i in flagged.tolist()], counter, sizes)
        for column in redone.columns:
            frame.iloc[flagged, frame.columns.get_loc(column)] = redone[column].to_numpy()
    return frame, found


def _mask(row: Row, patterns: dict[str, re.Pattern[str]]) -> Row:
    """Replace every match with `[<NAME>]`. Matches are found on the original text and overlapping ones
    merged under the earliest (then longest), so one pattern's mask never hides the rest of another's
    match from it (`xoxb-123456789012-...` is one API key, not a phone number inside a kept key)."""
    for msg in row.all_messages():
        _edit_text(msg, lambda text: _masked(text, patterns))
    return row


def _edit_text(msg: Message, edit) -> None:
    """Apply a text edit to a message's content and to every string inside its tool calls' arguments."""
    msg.content = edit(msg.content)
    for call in getattr(msg, "tool_calls", None) or ():
        call["function"]["arguments"] = _strings(call["function"]["arguments"], edit)


def _strings(value: Any, edit) -> Any:
    if isinstance(value, str):
        return edit(value)
    if isinstance(value, dict):
        return {k: _strings(v, edit) for k, v in value.items()}
    if isinstance(value, list):
        return [_strings(v, edit) for v in value]
    return value


def _masked(text: str, patterns: dict[str, re.Pattern[str]]) -> str:
    found = sorted((m.start(), -m.end(), name) for name, p in patterns.items() for m in p.finditer(text) if m.end())
    merged: list[list[Any]] = []  # [start, end, name]
    for start, neg_end, name in found:
        if merged and start < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], -neg_end)
        else:
            merged.append([start, -neg_end, name])
    parts, at = [], 0
    for start, end, name in merged:
        parts += [text[at:start], f"[{name.upper()}]"]
        at = end
    return "".join(parts) + text[at:]


def run(
    cfg: Validate,
    sources: dict[str, Source],
    tokenizer,
    out_dir: Path,
    docs_dir: Path | None = None,
    *,
    use_bounds: bool = True,
    use_layouts: bool = True,
    use_columns: bool = True,
) -> dict[str, Any]:
    """Validate every source; write <source>.jsonl (valid rows), quarantine.jsonl and report.md to out_dir.

    `use_bounds` (TokenCounter) and `use_layouts` (RenderedSize) switch the length check's shortcuts, `use_columns`
    string-form preference pairs held as columns (tunegate.pair_columns); benchmarks/validate_cost.py turns them off
    to show what they save, and the outputs are the same either way."""
    with gc_paused():  # the rows stay alive throughout; collections would walk them again and again
        return _run(
            cfg,
            sources,
            tokenizer,
            out_dir,
            docs_dir,
            use_bounds=use_bounds,
            use_layouts=use_layouts,
            use_columns=use_columns,
        )


def _run(
    cfg: Validate,
    sources: dict[str, Source],
    tokenizer,
    out_dir: Path,
    docs_dir: Path | None,
    *,
    use_bounds: bool,
    use_layouts: bool,
    use_columns: bool,
) -> dict[str, Any]:
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    checks = _Checks(
        cfg,
        ctx,
        tokenizer,
        {name: re.compile(p) for name, p in cfg.pii_patterns.items()},
        TokenCounter(tokenizer, cfg.min_tokens, cfg.max_tokens, use_bounds=use_bounds),
        RenderedSize(tokenizer, use_layouts=use_layouts),
        use_columns,
    )
    metrics: dict[str, Any] = {"sources": {}}
    quarantine: list[dict[str, Any]] = []
    valid: dict[str, list[Row]] = {}
    failures: list[str] = []
    for name, source in sources.items():
        valid[name], quarantined, metrics["sources"][name], failure = _validate_source(checks, name, source)
        quarantine += quarantined
        failures += [failure] if failure else []
    _write(out_dir, valid, quarantine, metrics)
    if docs_dir is not None:
        _data_docs(ctx, docs_dir)
    if failures:
        raise UserError("; ".join(failures) + f" — see {out_dir / QUARANTINE}")
    return metrics


@dataclass
class _Checks:
    """What every source is checked with: the settings, the GX context, the tokenizer and its counters."""

    cfg: Validate
    ctx: Any
    tokenizer: Any
    pii: dict[str, re.Pattern]
    counter: TokenCounter
    sizes: RenderedSize
    use_columns: bool = True  # string-form preference pairs held as columns (tunegate.pair_columns)
    no_tools: str | None = None  # probed once, when the first tool row is seen: "" = the template renders tools
    no_system: str | None = None  # probed once: "" = the template takes a system turn
    role_orders: dict[str, str] = field(default_factory=dict)  # roles column value -> why the template refuses it
    _render: Renderer | None = None

    def template(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "") or "the base model"

    def render(self) -> Renderer:
        """The renderer training uses (the template compiled once), for the probes below."""
        if self._render is None:
            self._render = Renderer(self.tokenizer)
        return self._render

    def system_refusal(self) -> str:
        """The template's words when it refuses a system turn ("" when it takes one), asked of it once."""
        if self.no_system is None:
            self.no_system = system_refusal(self.render()) or ""
        return self.no_system

    def role_refusal(self, roles: str) -> str:
        """Why the template refuses conversations with these roles (a roles column value), "" when it renders them:
        rendered once per distinct value, with placeholder contents."""
        if roles not in self.role_orders:
            render, why = self.render(), ""
            prompt, *answers = roles.split("|")
            for answer in answers or [""]:
                try:
                    render(_probe_turns(",".join(filter(None, (prompt, answer)))))
                except Exception as err:  # raise_exception in the template, or any error rendering
                    why = first_line(err)
                    break
            self.role_orders[roles] = why
        return self.role_orders[roles]

    def tool_refusal(self) -> str:
        """Why the template cannot train tool rows ("" when it can), asked of the template once."""
        if self.no_tools is None:
            why = tool_support(self.tokenizer)
            self.no_tools = f"the chat template of {self.template()} cannot train tool rows: {why}" if why else ""
        return self.no_tools


def _validate_source(
    checks: _Checks, name: str, source: Source
) -> tuple[list[Row], list[dict[str, Any]], dict[str, Any], str | None]:
    """(kept rows, quarantine rows, the source's metrics, the line if too many rows were invalid) of one source:
    read, rows of the wrong kind and untrainable tool rows set aside, the suite run, each row judged."""
    cfg, started = checks.cfg, time.perf_counter()
    read, problems, fmt, notes = _read(checks, name, source)
    expected_kind = _expected_kind(source, read)
    rows, wrong_kind = _of_kind(read, expected_kind)
    notes = _fold_system(checks, name, rows, notes)
    rows, untrainable, refusal = _trainable_tools(checks, name, rows, NOTE_EXTRAS in notes)
    table, flags, hidden = _derived(checks, rows, read, name, extras=NOTE_EXTRAS in notes)
    rows, table, flags, hidden, refused = _renderable(checks, name, expected_kind, rows, table, flags, hidden)
    quarantine = [p.as_row() for p in problems]
    quarantine += [
        _refused(name, r, "wrong_format", f"{r.kind} row in a {source.role} source of {expected_kind} rows")
        for r in wrong_kind
    ]
    quarantine += [_refused(name, r, NO_TOOLS, refusal) for r in untrainable]
    quarantine += [_refused(name, r, REFUSED, why) for r, why in refused]
    failed, invisible = {}, {}
    if rows:
        frame, invisible = _invisible(rows, table, hidden, cfg.invisible, checks.counter, checks.sizes)
        if invisible and cfg.invisible == "strip":  # the text changed: its checks run again on what will be trained
            flags = _text_flags(frame, cfg)
        narrow = _narrow(frame, _ids(rows), flags)
        failed = _run_suite(checks.ctx, name, narrow, _expectations(cfg, expected_kind))
    kept, judged, pii_hits = _judge(checks, name, rows, failed, invisible)
    quarantine += judged
    n_in = len(rows) + len(quarantine) - len(judged)  # every row read: kept, judged, or set aside before
    reasons = Counter(q["reason"] for q in quarantine)
    n_quarantined = sum(reasons.values())  # counted from the quarantine itself, so `conserved` is a real check
    metrics = {
        "format": fmt,
        "in": n_in,
        "kept": len(kept),
        "quarantined": n_quarantined,
        "reasons": dict(sorted(reasons.items())),
        PII_KEY[cfg.pii]: dict(sorted(pii_hits.items())),
        INVISIBLE_KEY[cfg.invisible]: dict(sorted(Counter(r for found in invisible.values() for r in found).items())),
        "read": notes,
    }
    _log_source(cfg, name, metrics, time.perf_counter() - started)
    return kept, quarantine, metrics, _too_many_invalid(cfg, source, n_in, reasons, quarantine)


def _read(checks: _Checks, name: str, source: Source) -> tuple[list[Row], list[Any], str, dict[str, int]]:
    """A source's rows (ids not yet assigned), its lines' problems, its format and read notes: a preference source of
    string-form pairs as columns (`PairRows`, a sequence of rows), anything else as a list of rows."""
    if checks.use_columns and source.role == "preference" and not source.split:
        if (pairs := read_pairs(name, source.path, source.format)) is not None:
            return pairs
    return load_rows(name, source.path, source.format, source.split, ids=False)


def _expected_kind(source: Source, rows: list[Row]) -> str:
    """What the source's role trains on: SFT rows, or preference pairs, or labelled answers (KTO's unpaired rows)
    where a preference source holds more of those than pairs."""
    if source.role != "preference":
        return SFT
    if isinstance(rows, PairRows):
        return PAIR
    kinds = Counter(row.kind for row in rows)
    return LABELLED if kinds[LABELLED] > kinds[PAIR] else PAIR


def _derived(
    checks: _Checks, rows: list[Row], read: list[Row], name: str, extras: bool
) -> tuple[Any, dict[str, Any], Any]:
    """(the table of `rows`, its text checks' flags, which rows hide characters), and every row read given its
    id. The text checks and the hidden characters' pass run in a thread from the moment the table has its text
    column, while this one builds the rest of the table and hashes the ids: they are Arrow's regex kernels, which
    release the GIL, so on two cores they cost nothing beside the rest. (The table itself is not built beside the
    hashing: most of its time holds the GIL, and measured that way the two took as long as one after the other.)"""
    from concurrent.futures import ThreadPoolExecutor

    if not rows:
        _assign_ids(name, read)
        return None, {}, None
    with ThreadPoolExecutor(1) as pool:
        text = []

        def check(column: Any) -> Any:
            # pairs held as columns join their contents' JSON in a thread of their own: the text checks wait for it,
            # so that two threads, not three, share the two cores with this one's Python work
            after = rows.joined if isinstance(rows, PairRows) else None
            text.append(pool.submit(_text_work, column, checks.cfg, after))
            return column

        table = _table(rows, checks.counter, checks.sizes, extras=extras, on_text=check)  # reads no id
        _assign_ids(name, read)  # every row read, in file order: repeats of the same content are numbered in it
        return table, *text[0].result()


def _text_work(text: Any, cfg: Validate, after: Any = None) -> tuple[dict[str, Any], Any]:
    """(`_text_flags`, `_hidden`) of the table's text column, as Arrow hands it to `_table`'s `on_text`; once `after`
    (a call that waits) returns, where given."""
    if after is not None:
        after()
    frame = {"text": text.to_pandas()}
    return _text_flags(frame, cfg), _hidden(frame)


def _assign_ids(name: str, rows: list[Row]) -> None:
    if isinstance(rows, PairRows):
        rows.assign_ids()
    else:
        assign_ids(name, rows)


def _ids(rows: list[Row]) -> Any:
    """The rows' ids: a list, or an Arrow array for pairs held as columns."""
    return rows.id_array() if isinstance(rows, PairRows) else [r.id for r in rows]


def _kept(rows: list[Row], keep: Any) -> list[Row]:
    """The rows where `keep` (a numpy bool per row) is true, in order."""
    from itertools import compress

    import numpy as np

    if len(keep) != len(rows):
        raise AssertionError(f"{len(keep)} marks for {len(rows)} rows")
    if isinstance(rows, PairRows):
        return rows.take(np.flatnonzero(keep))
    return list(compress(rows, keep.tolist()))


def _of_kind(rows: list[Row], kind: str) -> tuple[list[Row], list[Row]]:
    """(the rows of the kind the source's role trains on, the others)."""
    if isinstance(rows, PairRows):
        return (rows, []) if kind == PAIR else ([], list(rows))
    wrong = [r for r in rows if r.kind != kind]
    if not wrong:
        return rows, []
    return [r for r in rows if r.kind == kind], wrong


def _fold_system(checks: _Checks, name: str, rows: list[Row], notes: dict[str, int]) -> dict[str, int]:
    """Where the template refuses a system turn, each row's leading system turn folded into its first user turn
    (`fold_system`), said once on the console; returns the source's read notes with the count (`system_folded`)."""
    why = checks.system_refusal() if rows and not isinstance(rows, PairRows) else ""  # pairs of strings: no system turn
    if not why:
        return notes
    folded = 0
    for row in rows:
        key = "messages" if row.kind == SFT else "prompt"
        turns = getattr(row, key)
        if turns is not (new := fold_system(turns)):
            setattr(row, key, new)
            folded += 1
    if not folded:
        return notes
    log.warning(
        "validate %s: the chat template of %s refuses a system turn (%s): folded into the first user turn in %d rows",
        name,
        checks.template(),
        why,
        folded,
    )
    return dict(sorted({**notes, SYSTEM_FOLDED: folded}.items()))


def _probe_turns(roles: str) -> list[dict[str, Any]]:
    """Placeholder messages with the roles of a roles column value (tool calls and results included)."""
    call = PROBE_CONVERSATION[1]["tool_calls"]
    out: list[dict[str, Any]] = []
    for i, role in enumerate(roles.split(",") if roles else []):
        if role == CALL_ROLE:
            out.append({"role": "assistant", "content": "", "tool_calls": call})
        elif role == "tool":
            out.append({"role": "tool", "content": f"tgprobe{i}", "tool_call_id": call[0]["id"]})
        else:
            out.append({"role": role, "content": f"tgprobe{i}"})
    return out


def _renderable(checks: _Checks, name: str, kind: str, rows: list[Row], table, flags: dict[str, Any], hidden):
    """The rows (with their table lines, flags and hidden-character marks) less those whose role order the roles
    check accepts but the chat template refuses (one render per distinct order), which could not be trained;
    returns them last as (row, the template's words). A role order the roles check refuses is left to it."""
    import numpy as np
    import pandas as pd

    if table is None:
        return rows, table, flags, hidden, []
    allowed = re.compile(PREF_ROLES if kind == PAIR else SFT_ROLES)
    orders = {
        roles: why
        for roles in pd.unique(table["roles"])
        if allowed.match(roles) and (why := checks.role_refusal(roles))
    }
    if not orders:
        return rows, table, flags, hidden, []
    details = {
        roles: f"the chat template of {checks.template()} refuses roles {roles}: {why}" for roles, why in orders.items()
    }
    bad = table["roles"].isin(list(orders)).to_numpy()
    refused = [(rows[i], details[table["roles"].iat[i]]) for i in np.flatnonzero(bad).tolist()]
    log.warning(
        "validate %s: the chat template of %s refuses %d rows (%s): quarantined as %s",
        name,
        checks.template(),
        len(refused),
        "; ".join(sorted(set(orders.values()))),
        REFUSED,
    )
    keep = ~bad
    rows = _kept(rows, keep)
    flags = {column: matched[keep] for column, matched in flags.items()}
    return rows, table[keep].reset_index(drop=True), flags, hidden[keep], refused


def _refused(name: str, row: Row, reason: str, detail: str) -> dict[str, Any]:
    """The quarantine row of a row set aside before the suite runs."""
    return {"source": name, "line": row.line, "id": row.id, "reason": reason, "detail": detail}


def _trainable_tools(checks: _Checks, name: str, rows: list[Row], extras: bool) -> tuple[list[Row], list[Row], str]:
    """(the rows, less the tool rows when the template cannot render them; those tool rows; why not)."""
    if not extras or isinstance(rows, PairRows):  # pairs of strings call no tools
        return rows, [], ""
    uses = [uses_tools(r.all_messages(), r.tools) for r in rows]
    if not any(uses):
        return rows, [], ""
    refusal = checks.tool_refusal()
    if not refusal:
        return rows, [], ""
    tool_rows = [r for r, u in zip(rows, uses, strict=True) if u]
    log.warning("validate %s: %d tool rows quarantined: %s", name, len(tool_rows), refusal)
    return [r for r, u in zip(rows, uses, strict=True) if not u], tool_rows, refusal


def _judge(
    checks: _Checks, name: str, rows: list[Row], failed: dict[int, list[str]], invisible: dict[int, list[str]]
) -> tuple[list[Row], list[dict[str, Any]], Counter]:
    """(kept rows, quarantine rows, rows per PII pattern) after the suite: only the rows something was found
    in are looked at one by one; the rest are kept as they are."""
    import numpy as np

    cfg = checks.cfg
    quarantine, pii_hits = [], Counter()  # rows per PII pattern: masked, reported or quarantined
    keep = np.ones(len(rows), bool)
    suspects = sorted(failed.keys() | (invisible.keys() if cfg.invisible == "quarantine" else set()))
    for i in suspects:
        row = rows[i]
        reasons = failed.get(i)
        hidden = invisible.get(i, []) if cfg.invisible == "quarantine" else []
        if reasons is None and not hidden:
            continue
        reasons = reasons or []
        if reasons and reasons[-1] == PII:
            reasons = reasons[:-1] + _pii_reasons(row, checks.pii)
        # after the suite's own checks, before PII: a row's first failing check names it
        at = next((i for i, r in enumerate(reasons) if r.startswith(PII)), len(reasons))
        reasons = reasons[:at] + hidden + reasons[at:]
        hits = [r for r in reasons if r.startswith(PII)]
        blocking = [r for r in reasons if not r.startswith(PII) or cfg.pii == "quarantine"]
        if blocking:
            detail = ", ".join(f"{r} ({_roles(row)})" if r == "wrong_role" else r for r in reasons)
            quarantine.append({"source": name, "line": row.line, "id": row.id, "reason": blocking[0], "detail": detail})
            keep[i] = False
            if cfg.pii == "quarantine":
                pii_hits.update(hits)
            continue
        pii_hits.update(hits)
        if cfg.pii == "mask":
            _mask(row, checks.pii)  # in place: the row kept is the row masked
    return _kept(rows, keep), quarantine, pii_hits


def _roles(row: Row) -> str:
    """A row's role order as the role check reads it, for a wrong_role detail (a pair: prompt | chosen | rejected)."""
    parts = [row.prompt, row.chosen, row.rejected] if row.kind == PAIR else [row.conversation()]
    return " | ".join(",".join(m.role for m in _shown(part)) for part in parts)


def _too_many_invalid(
    cfg: Validate, source: Source, n_in: int, reasons: Counter, quarantine: list[dict[str, Any]]
) -> str | None:
    """The line that stops the stage when a source's invalid share is above validate.max_invalid_share: the top
    reasons, and the first row of the most common one with its detail (what to look for in the file)."""
    n_quarantined = sum(reasons.values())
    share = n_quarantined / n_in if n_in else 1.0
    if share <= cfg.max_invalid_share:
        return None
    top = ", ".join(f"{r} {c}" for r, c in reasons.most_common(3))
    hint = "; not UTF-8 throughout: convert the file (e.g. iconv -f LATIN1 -t UTF-8)" if reasons["encoding"] else ""
    if not hint and quarantine:
        main = reasons.most_common(1)[0][0]
        first = min((q for q in quarantine if q["reason"] == main), key=lambda q: q["line"])
        hint = f"; e.g. line {first['line']}: {first['detail']}"[:300]
    return (
        f"{source.path}: {n_quarantined}/{n_in} rows invalid "
        f"({share:.0%} > validate.max_invalid_share {cfg.max_invalid_share:.0%}; {top}{hint})"
    )


def _log_source(cfg: Validate, name: str, metrics: dict[str, Any], seconds: float) -> None:
    """The source's accounting on the console, with what was found without a quarantine of its own (secrets
    masked, characters stripped)."""
    found = "".join(
        f"; {key.replace('_', ' ')}: " + ", ".join(f"{k.split('_', 1)[1]} {v}" for k, v in counts.items())
        for key in (PII_KEY[cfg.pii], INVISIBLE_KEY[cfg.invisible])
        if (counts := metrics[key])
    )
    log.info(
        "validate %s (%s): in %d = kept %d + quarantined %d%s (%.1f s)",
        name,
        metrics["format"],
        metrics["in"],
        metrics["kept"],
        metrics["quarantined"],
        found,
        seconds,
    )


def _write(out_dir: Path, valid: dict[str, list[Row]], quarantine: list[dict[str, Any]], metrics: dict) -> None:
    """Totals and the conservation check into metrics; every output file, all or none."""
    totals = {k: sum(s[k] for s in metrics["sources"].values()) for k in ("in", "kept", "quarantined")}
    metrics.update(totals, conserved=totals["in"] == totals["kept"] + totals["quarantined"])
    encode = msgspec.json.Encoder().encode_lines
    with atomic_path(out_dir) as tmp:  # all files or none: a run cut short (a full disk) leaves the last whole one
        tmp.mkdir()
        for name, kept in valid.items():
            chunks = (
                kept.chunks()
                if isinstance(kept, PairRows)
                else (encode(kept[i : i + WRITE_ROWS]) for i in range(0, len(kept), WRITE_ROWS))
            )
            write_chunks(tmp / jsonl_of(name), chunks)
        write_jsonl(tmp / QUARANTINE, sorted(quarantine, key=lambda q: (q["source"], q["line"])))
        write_text(tmp / REPORT, _report(metrics))


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
    # What was found and handled without a quarantine of its own (rows per kind), and how each file was read.
    found = []
    for name, s in m["sources"].items():
        for key in (*PII_KEY.values(), *INVISIBLE_KEY.values(), "read"):
            if s.get(key):
                found.append(f"- {name}: {key.replace('_', ' ')}: " + ", ".join(f"{k} {v}" for k, v in s[key].items()))
    if found:
        lines += ["", "Rows with PII or secrets, invisible characters, and how the files were read:", "", *found]
    return "\n".join(lines) + "\n"


def main() -> None:
    def body() -> None:
        from tunegate.consistency import data_problems, export_problems
        from tunegate.models import load_manifest, load_tokenizer

        cfg = load_config()
        if found := data_problems(cfg) + export_problems(cfg):  # before reading anything (and before any training)
            raise UserError("; ".join(found))
        tokenizer = load_tokenizer(load_manifest(cfg.paths.base), cfg.base.trust_remote_code)
        out = Path(cfg.paths.validated)
        metrics = run(cfg.validate_, cfg.data.sources, tokenizer, out, Path(cfg.paths.data_docs))
        write_json(Layout.of(cfg.paths).metrics("validate"), metrics)

    stage_main("validate", body)


if __name__ == "__main__":
    main()
