"""Rendered sizes and token counts of conversations under a base tokenizer and its chat template, at scale.

What the trainer sees is each conversation rendered by the chat template and then tokenised, so a
length check has to measure that text, not the raw contents. Doing it literally (render every row in
Jinja, tokenise every render) dominates validation time on large sources; this module gives the same
numbers for far less:

- `Flat` lays groups of messages (rows, or the prompt/chosen/rejected parts of preference rows) end
  to end as Arrow arrays, so per-message and per-group work runs in Arrow and numpy, not a Python loop
  per row; `joined` joins the parts of a row as if they were one list.
- `RenderedSize` gives the UTF-8 size of each conversation as the template renders it, from a layout
  probed once per role sequence (fixed text + contents, verbatim or trimmed), with real renders as a
  check and as the fallback for templates whose output depends on the content.
- `TokenCounter` checks token counts against [min_tokens, max_tokens], tokenising only the rows whose
  byte-derived bounds cannot decide the verdict.
- `renderer` renders messages with the template compiled once.

`stages.validate` builds its derived columns with these; the benchmark `benchmarks/validate_cost.py`
turns the shortcuts off (`use_bounds`, `use_layouts`) to show what they save.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from tunegate.chat import message_text, template_messages
from tunegate.formats import Message

log = logging.getLogger(__name__)


class TokenCounter:
    """Token counts under the base tokenizer, checked against [min_tokens, max_tokens] at the least cost.

    For a byte-level BPE tokenizer with no normaliser (GPT-2, Llama 3, Qwen, Mistral Nemo and the
    demo's), every token covers at least one byte and at most `longest` bytes, so
    ceil(bytes / longest) <= tokens <= bytes. A row whose byte bounds already lie inside the limits
    cannot fail the length check and is not tokenised; the rest (and every row of any other kind of
    tokenizer) get an exact count from the Rust tokenizer in one batch. The `n_tokens` column then
    holds the exact count or, for rows decided by the bounds, the upper bound.

    `use_bounds=False` counts every row exactly (benchmarks/validate_cost.py does, to show what the
    bounds save).
    """

    def __init__(self, tokenizer, min_tokens: int, max_tokens: int, *, use_bounds: bool = True):
        self.tokenizer, self.min_tokens, self.max_tokens = tokenizer, min_tokens, max_tokens
        self.use_bounds = use_bounds
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.longest = None
        if (
            self.use_bounds
            and backend is not None
            and backend.normalizer is None
            and type(backend.pre_tokenizer).__name__ == "ByteLevel"
        ):
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


def renderer(tokenizer) -> Callable[[list[dict[str, str]]], str]:
    """messages -> the text the trainer will see, through the one renderer training uses (`chat.Renderer`,
    the template compiled once); a template that rejects the rows' role order gives the contents joined
    (the roles check, or validate's template_refused, reports those rows)."""
    from tunegate.chat import Renderer

    render = Renderer(tokenizer)

    def safe(msgs: list[dict[str, str]]) -> str:
        try:
            return render(msgs)
        except Exception:  # a template that rejects the role order; the roles check or template_refused reports it
            return "\n".join(m["content"] for m in msgs)

    return safe


# The characters str.strip() (and so Jinja's `trim`) removes, for Arrow's utf8_trim: equal results both ways.
PY_WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
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
        self._trimmed = None
        # one message each (string fields, the usual preference row): a group's values are its message's
        self.single = bool(len(groups) and self.counts.min() == self.counts.max() == 1)
        if self.single:
            self.contents = pa.array([g[0].content for g in groups], pa.large_string())
            self.roles = pa.array([g[0].role for g in groups], pa.large_string())
        else:
            self.contents = pa.array([m.content for g in groups for m in g], pa.large_string())
            self.roles = pa.array([m.role for g in groups for m in g], pa.large_string())

    @classmethod
    def of_strings(cls, contents: list[str], role: str) -> Flat:
        """Groups of one message each, all of `role`, from their contents alone (string-form preference pairs held
        as columns, tunegate.pair_columns): a group's messages are made only when asked for (`groups[i]`)."""
        import numpy as np
        import pyarrow as pa

        flat = cls.__new__(cls)
        n = len(contents)
        flat.groups = _OneMessage(contents, role)
        flat.counts = np.ones(n, np.int64)
        flat.offsets = np.arange(n + 1, dtype=np.int64)
        flat._sums, flat._trimmed, flat.single = {}, None, bool(n)
        flat.contents = pa.array(contents, pa.large_string())
        flat.roles = pa.repeat(pa.scalar(role, pa.large_string()), n)
        return flat

    @property
    def trimmed(self):
        """The contents, each trimmed as str.strip() does (built once: lengths and comparisons share it)."""
        import pyarrow.compute as pc

        if self._trimmed is None:
            self._trimmed = pc.utf8_trim(self.contents, PY_WHITESPACE)
        return self._trimmed

    def join(self, values, sep: str):
        """Each group's values (one per message) joined with sep."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if self.single:  # a group of one: its value as it is (no list array, no copy of the text)
            return values
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

        values = self.trimmed if trimmed else self.contents
        return (pc.binary_length(values) if unit == "bytes" else pc.utf8_length(values)).to_numpy()

    def byte_sums(self, trimmed: bool):
        """UTF-8 size of each group's contents (as they are, or each trimmed), summed."""
        import numpy as np

        if trimmed not in self._sums:
            self._sums[trimmed] = self.per_group(self.lengths(trimmed), np.add, 0)
        return self._sums[trimmed]


class _OneMessage:
    """Groups of one message each, made from a content and a role when asked for (`Flat.of_strings`)."""

    def __init__(self, contents: list[str], role: str):
        self.contents, self.role = contents, role

    def __len__(self) -> int:
        return len(self.contents)

    def __getitem__(self, i: int) -> list[Message]:
        return [Message(self.role, self.contents[i])]


def _conversation(parts: tuple[Flat, ...], i: int) -> list[Message]:
    """Row i's groups of `parts` laid end to end (e.g. prompt + chosen)."""
    return [m for part in parts for m in part.groups[i]]


def joined(parts: list[Flat], values: list[Any], sep: str):
    """Per row, the non-empty parts' values joined with sep (as if each row's groups were one list)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if all(part.counts.all() for part in parts):  # every row has every part: one join, no intermediate arrays
        return pc.binary_join_element_wise(*values, pa.scalar(sep, pa.large_string()))
    out, seen = values[0], pa.array(parts[0].counts > 0)
    for part, value in zip(parts[1:], values[1:], strict=True):
        has = pa.array(part.counts > 0)
        both = pc.binary_join_element_wise(out, value, pa.scalar(sep, pa.large_string()))
        out = pc.if_else(has, pc.if_else(seen, both, value), out)
        seen = pc.or_(seen, has)
    return out


Layout = tuple[int, tuple[bool, ...]]  # a role sequence's rendered fixed text size, and per message: trimmed?


def _laid_out(layout: Layout, conv: list[Message]) -> int:
    """A conversation's rendered size from its template layout: the fixed text plus each content, trimmed where
    the template trims."""
    fixed, trims = layout
    sizes = [_utf8_len(m.content.strip() if trim else m.content) for m, trim in zip(conv, trims, strict=True)]
    return fixed + sum(sizes)


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

    `use_layouts=False` renders every row (benchmarks/validate_cost.py does, to show what the
    layouts save).
    """

    CHECK_ROWS = 16
    # Content used other than whole or trimmed: a method or filter on it, indexing it, or testing
    # what it contains (e.g. reasoning templates that cut `<think>` blocks out of earlier turns).
    CONTENT_DEPENDENT = re.compile(
        r"""content(?:['"]\])?\s*(?:\.(?!strip\s*\(\s*\))|\|(?!\s*trim\b)|\[)"""
        r"""|\bin\s+(?:\w+\.content\b|\w+\[\s*['"]content['"]\s*\])"""
    )

    def __init__(self, tokenizer, *, use_layouts: bool = True):
        self.use_layouts = use_layouts
        self.tokenizer = tokenizer
        self._chat = None
        self.render = renderer(tokenizer)
        self.layouts: dict[tuple[str, ...], Layout | None] = {}
        self.checked: dict[tuple[str, ...], int] = {}
        template = getattr(tokenizer, "chat_template", None)
        self.shortcut = self.use_layouts and isinstance(template, str) and not self.CONTENT_DEPENDENT.search(template)
        if self.use_layouts and not self.shortcut:
            log.info("validate: the chat template is rendered for every row (its output may depend on the content)")

    def text(self, conv: list[Message]) -> str:
        return self.render([{"role": m.role, "content": m.content} for m in conv])

    def rendered(self, conv: list[Message], tools: list[dict[str, Any]] | None = None) -> str:
        """A conversation with tool calls, tool results, names or a tools list, rendered for real."""
        if self._chat is None:
            from tunegate.chat import Renderer

            self._chat = Renderer(self.tokenizer)
        try:
            return self._chat(template_messages(conv), tools)
        except Exception:  # a template that rejects the role order; the roles check or template_refused reports it
            return "\n".join(map(message_text, conv))

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
        # would blur the keys below
        if any(pc.any(pc.match_substring(part.roles, ROLE_SEP)).as_py() for part in parts):
            out[:] = [self.size(conv(i)) for i in range(n)]
            return out
        encoded = pc.dictionary_encode(
            joined(list(parts), [part.join(part.roles, ROLE_SEP) for part in parts], ROLE_SEP)
        )
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

    def _check(self, roles: tuple[str, ...], conv: list[Message], layout: Layout) -> Layout | None:
        self.checked[roles] = self.checked.get(roles, 0) + 1
        if len(self.text(conv).encode()) != _laid_out(layout, conv):
            log.info(
                "chat template: rows with roles %s are rendered one by one (its output depends on content)",
                ",".join(roles),
            )
            self.layouts[roles] = None
            return None
        return layout

    def _probe(self, roles: tuple[str, ...]) -> Layout | None:
        if not self.shortcut:
            self.layouts[roles] = None
            return None
        layouts = [self._layout(roles, tag) for tag in ("tgMk", "tgMarkerLonger")]
        layout = layouts[0] if layouts[0] is not None and layouts[0] == layouts[1] else None
        self.layouts[roles] = layout
        return layout

    def _layout(self, roles: tuple[str, ...], tag: str) -> Layout | None:
        markers = [f"{tag}{i}z" for i in range(len(roles))]
        pad = " \n"
        try:
            out = self.render([{"role": r, "content": f"{pad}{m}{pad}"} for r, m in zip(roles, markers, strict=True)])
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
