"""Training data in the formats people use, normalised to one internal schema (the records come out of the
files through tunegate.readers).

Accepted files: JSONL, JSON (a list of objects), Parquet, CSV, a `datasets.save_to_disk` folder, or a
Hugging Face dataset id. Accepted record shapes:

- chat `messages` (OpenAI fine-tuning JSONL): {"messages": [{"role": ..., "content": ...}, ...]}
- prompt/completion: {"prompt": str | messages, "completion": str | messages}
- Alpaca: {"instruction": str, "input": str (optional), "output": str}
- preference: {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
- labelled answer (TRL's unpaired preference, what KTO reads): {"prompt": str | messages,
  "completion": str | messages, "label": true | false}

Internal schema (what `validate` writes and every later stage reads):

    sft:        {"id", "source", "line", "kind": "sft", "messages": [{"role", "content"}, ...]}
    preference: {"id", "source", "line", "kind": "preference", "prompt": [...], "chosen": [...], "rejected": [...]}
    unpaired:   {"id", "source", "line", "kind": "unpaired", "prompt": [...], "completion": [...], "label": bool}

`id` is stable: the source name plus a content hash (and an occurrence number for repeats), so it
survives reordering of the input file and identifies the same row in every report.

JSONL is read line by line: msgspec decodes and type-checks a line of the format's usual shape in one
call; any other line takes the general path (`json.loads` + `normalise`), which gives the same row or
names the problem. `load_rows` returns msgspec structs (what validate works on), `load_source` dicts.

Text files are UTF-8; a byte order mark is dropped (UTF-8) or decoded (UTF-16 / UTF-32), and a record
with bytes that are not UTF-8 is quarantined (`encoding`) while the rest of the file loads. Everything
else a user can get wrong about a source as a whole (missing, a folder, empty, unreadable, an unknown
extension, a Parquet / CSV / JSON / saved dataset that does not parse) ends in one `UserError` line
naming the file and what to do.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import msgspec

from tunegate import layouts
from tunegate.errors import UserError
from tunegate.layouts import NormaliseError
from tunegate.readers import NOTE_BOM, read_bytes, read_records, shards, source_kind, utf8_bytes
from tunegate.runtime import gc_paused

# The kinds of normalised row (the internal schema above), named once: what every later stage asks a row.
SFT, PAIR, LABELLED = "sft", "preference", "unpaired"
FORMATS = ("messages", "prompt_completion", "alpaca", "preference", "unpaired", "sharegpt", "openai_preference")
REQUIRED = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "preference": ("prompt", "chosen", "rejected"),  # without `prompt`: whole conversations that share it (layouts)
    "unpaired": ("prompt", "completion", "label"),
    "sharegpt": ("conversations",),
    "openai_preference": ("input", "preferred_output", "non_preferred_output"),
    "gemini": ("contents",),
}


@dataclass(frozen=True)
class Problem:
    """A row that could not be read or normalised: where it is and why."""

    source: str
    line: int
    reason: str
    detail: str
    raw: str

    def as_row(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "line": self.line,
            "reason": self.reason,
            "detail": self.detail,
            # bytes that were not UTF-8 stay visible as \udcXX escapes instead of failing the write
            "raw": self.raw[:500].encode("utf-8", "backslashreplace").decode("utf-8"),
        }


NOTE_ALPACA = "alpaca_input_as_instruction"  # empty instruction, non-empty input: the input is the user turn
NOTE_EXTRAS = "chat_extras"  # rows with tool calls, tool results, a tools list, names or weights (OpenAI format)


def _from_table(key: str, value: Any) -> Any:
    # A message-list field saved as JSON text (CSV cells, string columns) is read as a list of messages;
    # any other text, JSON-looking or not (an answer that is `{"intent": ...}`), stays text.
    if isinstance(value, str) and value[:1] == "[" and key in MESSAGE_FIELDS:
        try:
            parsed = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            return value
        if isinstance(parsed, list) and parsed and all(isinstance(m, dict) for m in parsed):
            return parsed
    return value


MESSAGE_FIELDS = frozenset({"messages", "conversations", "prompt", "completion", "chosen", "rejected"})


def detect_format(record: dict[str, Any]) -> str | None:
    keys = record.keys()
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "contents" in keys:
        return "gemini"
    if "preferred_output" in keys or "non_preferred_output" in keys:
        return "openai_preference"
    if "chosen" in keys or "rejected" in keys:
        return "preference"
    if "instruction" in keys or "output" in keys:
        return "alpaca"
    if "label" in keys and ("prompt" in keys or "completion" in keys):
        return "unpaired"
    if "prompt" in keys or "completion" in keys:
        return "prompt_completion"
    return None


def infer_source_format(records: list[dict[str, Any]]) -> str:
    counts = Counter(f for r in records if isinstance(r, dict) and (f := detect_format(r)))
    if not counts:
        raise UserError(
            "no record has a known shape (messages / prompt+completion / instruction+output / prompt+chosen+rejected "
            "/ prompt+completion+label / ShareGPT conversations / OpenAI preference input+preferred_output / Gemini "
            "contents; see the format table in docs/data.md)"
        )
    return counts.most_common(1)[0][0]


WEIGHTS = (0, 1)
ROLES_WITH_NAME = ("system", "user", "assistant")


def _text_content(value: Any, where: str) -> str:
    """A message's content: a string, or the OpenAI list of content parts whose text parts are joined
    with newlines. Parts that are not text (images, audio, files) cannot train a text model."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(part, dict) for part in value):
        texts = []
        for j, part in enumerate(value):
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "text":
                raise NormaliseError("wrong_type", f"{where}.content[{j}].text must be a string")
            else:
                raise NormaliseError(
                    "non_text_content", f"{where}.content[{j}] is a {kind!r} part; only text parts can be trained"
                )
        return "\n".join(texts)
    raise NormaliseError("wrong_type", f"{where}.content must be a string or a list of text parts")


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    """One assistant tool call in the OpenAI shape; `arguments` (a JSON string there) is parsed, as chat
    templates expect an object."""
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise NormaliseError("bad_tool_call", f"{where} needs function.name")
    if call.get("type", "function") != "function":
        raise NormaliseError("bad_tool_call", f"{where}.type {call.get('type')!r} is not 'function'")
    args = fn.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except (json.JSONDecodeError, RecursionError):
            raise NormaliseError("bad_tool_call", f"{where}.function.arguments is not valid JSON") from None
    if not isinstance(args, dict):
        raise NormaliseError("bad_tool_call", f"{where}.function.arguments must be a JSON object")
    out: dict[str, Any] = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
    if call.get("id") is not None:
        if not isinstance(call["id"], str):
            raise NormaliseError("bad_tool_call", f"{where}.id must be a string")
        out = {"id": call["id"], **out}
    return out


def _message(  # noqa: C901 - one check per field OpenAI's message format allows
    m: dict[str, Any], where: str
) -> dict[str, Any]:
    role = m.get("role")
    if "role" not in m or ("content" not in m and not m.get("tool_calls")):
        raise NormaliseError("missing_field", f"{where} needs 'role' and 'content'")
    if not isinstance(role, str):
        raise NormaliseError("wrong_type", f"{where}.content and .role must be strings")
    calls = m.get("tool_calls")
    content = m.get("content")
    if content is None and role == "assistant" and calls:
        content = ""  # an assistant turn that only calls tools
    out: dict[str, Any] = {"role": role, "content": _text_content(content, where)}
    if m.get("name") is not None:
        if not isinstance(m["name"], str):
            raise NormaliseError("wrong_type", f"{where}.name must be a string")
        out["name"] = m["name"]
    if calls is not None:
        if role != "assistant" or not isinstance(calls, list):
            raise NormaliseError("bad_tool_call", f"{where}.tool_calls must be a list on an assistant message")
        if calls:
            out["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
    if m.get("tool_call_id") is not None:
        if role != "tool" or not isinstance(m["tool_call_id"], str):
            raise NormaliseError("bad_tool_call", f"{where}.tool_call_id belongs on a tool message, as a string")
        out["tool_call_id"] = m["tool_call_id"]
    if "weight" in m and m["weight"] is not None:
        weight = m["weight"]
        if role != "assistant":
            raise NormaliseError("bad_weight", f"{where}.weight is read on assistant messages only")
        if type(weight) not in (int, bool) or int(weight) not in WEIGHTS:
            raise NormaliseError("bad_weight", f"{where}.weight must be 0 or 1, got {weight!r}")
        out["weight"] = int(weight)
    return out


def _check_tool_turns(messages: list[dict[str, Any]], field: str) -> None:
    """Tool results answer the calls just before them: a tool message follows an assistant turn with
    tool calls (or another tool message), and where the calls carry ids, it names one of them."""
    ids: set[str] | None = None
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            calls = m.get("tool_calls") or []
            ids = {c["id"] for c in calls if "id" in c} if calls else None
        elif m["role"] == "tool":
            if ids is None:
                raise NormaliseError("bad_tool_call", f"{field}[{i}] is a tool result with no tool call before it")
            if ids and m.get("tool_call_id") not in ids:
                raise NormaliseError(
                    "bad_tool_call",
                    f"{field}[{i}].tool_call_id {m.get('tool_call_id')!r} names none of the calls before it",
                )
        else:
            ids = None


def _as_messages(value: Any, field: str, default_role: str, notes: Counter | None = None) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        out = [_message(layouts.legacy_message(m, notes), f"{field}[{i}]") for i, m in enumerate(value)]
        if any(m["role"] == "tool" for m in out):
            _check_tool_turns(out, field)
        return out
    raise NormaliseError("wrong_type", f"{field} must be a string or a list of messages, got {type(value).__name__}")


def _tools(record: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = record.get("tools")
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise NormaliseError("wrong_type", "tools must be a list of tool definitions (objects)")
    return tools


def alpaca_user(instruction: str, extra: str | None, notes: Counter | None = None) -> str:
    """The user turn of an Alpaca record. The optional `input` (absent, null or empty: none) follows the
    instruction after a blank line; with an empty instruction the input alone is the user turn, as in
    a prompt/completion pair, and the row is counted (`alpaca_input_as_instruction`)."""
    if not extra:
        return instruction
    if instruction.strip():
        return f"{instruction}\n\n{extra}"
    if notes is not None:
        notes[NOTE_ALPACA] += 1
    return extra


def normalise(record: Any, fmt: str, notes: Counter | None = None) -> dict[str, Any]:
    """Turn one record of format `fmt` into the internal schema (without id/source/line)."""
    if not isinstance(record, dict):
        raise NormaliseError("wrong_type", f"expected a JSON object, got {type(record).__name__}")
    missing = [f for f in REQUIRED[fmt] if record.get(f) is None]
    if missing and (fmt != "preference" or missing != ["prompt"]):  # no prompt alone: an implicit-prompt pair
        raise NormaliseError("missing_field", ", ".join(missing))
    if fmt == "sharegpt":
        fmt, record = layouts.sharegpt(record)
    elif fmt == "gemini":
        fmt, record = layouts.gemini(record)
    elif fmt == "openai_preference":
        fmt, record = "preference", layouts.openai_preference(record)
    if fmt == "messages":
        return _sft(_as_messages(record["messages"], "messages", "user", notes), _tools(record))
    if fmt == "prompt_completion":
        return _sft(
            _as_messages(record["prompt"], "prompt", "user", notes)
            + _as_messages(record["completion"], "completion", "assistant", notes),
            _tools(record),
        )
    if fmt == "alpaca":
        for f in ("instruction", "output", "input"):
            if record.get(f) is not None and not isinstance(record[f], str):
                raise NormaliseError("wrong_type", f"{f} must be a string")
        user = alpaca_user(record["instruction"], record.get("input"), notes)
        return {
            "kind": SFT,
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}],
        }
    if fmt == "unpaired":
        return _unpaired(record, notes)
    return _preference(record, notes)


LABELS = {"true": True, "false": False, "1": True, "0": False}  # what a table's cell holds for a boolean


def label_value(value: Any) -> bool:
    """An unpaired row's label: JSON true/false, 1/0, or a table cell's "true"/"false"/"1"/"0" (any case)."""
    if type(value) is bool:
        return value
    if type(value) is int and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in LABELS:
        return LABELS[value.strip().lower()]
    raise NormaliseError("bad_label", f"label must be true (a desirable answer) or false, got {value!r}")


def _prompt_and_answers(record: dict[str, Any], kind: str, answers: tuple[str, ...], notes: Counter | None) -> dict:
    """A pair's or a labelled answer's fields as turns: the prompt as user turns, each answer as assistant turns."""
    out = {"kind": kind, "prompt": _as_messages(record["prompt"], "prompt", "user", notes)}
    for part in answers:
        out[part] = _as_messages(record[part], part, "assistant", notes)
    return out


def _unweighted(record: dict[str, Any], out: dict[str, Any], what: str) -> dict[str, Any]:
    """`out` with the record's tools list; a weight on any turn is refused (what is learnt from is `what`)."""
    if any("weight" in m for part, turns in out.items() if part != "kind" and isinstance(turns, list) for m in turns):
        raise NormaliseError("bad_weight", f"weight has no meaning in {what}")
    if tools := _tools(record):
        out["tools"] = tools
    return out


def _unpaired(record: dict[str, Any], notes: Counter | None) -> dict[str, Any]:
    out = _prompt_and_answers(record, LABELLED, ("completion",), notes)
    out["label"] = label_value(record["label"])  # a bad label is reported before a weight
    return _unweighted(record, out, "a labelled answer (the label is)")


def _preference(record: dict[str, Any], notes: Counter | None) -> dict[str, Any]:
    if record.get("prompt") is None:  # TRL's implicit prompt, or an HH text pair
        record = layouts.implicit_pair(record, notes)
    out = _prompt_and_answers(record, PAIR, ("chosen", "rejected"), notes)
    return _unweighted(record, out, "a preference row (chosen vs rejected is)")


def _sft(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> dict[str, Any]:
    trained = [m for m in messages if m["role"] == "assistant"]
    if trained and all(m.get("weight") == 0 for m in trained):
        raise NormaliseError("no_trained_turn", "every assistant turn has weight 0: nothing to train on")
    out: dict[str, Any] = {"kind": SFT, "messages": messages}
    if tools:
        out["tools"] = tools
    return out


class Message(msgspec.Struct, gc=False, omit_defaults=True, forbid_unknown_fields=True):
    """One message: role and text content. Also the fast path's shape, so a message with any other key
    (name, tool calls, a weight, content parts) or any other role (`developer`, `User`, `model`: renamed there,
    see tunegate.layouts) takes the general path, which checks it."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str


class RichMessage(Message):
    """A message with what the OpenAI chat format adds (tunegate.chat reads these fields)."""

    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    weight: int | None = None


class Row(msgspec.Struct, gc=False, omit_defaults=True):
    """One normalised record, as validate writes it (sft rows carry `messages`, preference rows prompt, chosen and
    rejected, unpaired rows prompt, completion and label)."""

    id: str
    source: str
    line: int
    kind: str
    messages: list[Message] | None = None
    prompt: list[Message] | None = None
    chosen: list[Message] | None = None
    rejected: list[Message] | None = None
    tools: list[dict[str, Any]] | None = None
    completion: list[Message] | None = None
    label: bool | None = None

    def all_messages(self) -> list[Message]:
        if self.kind == SFT:
            return self.messages
        return self.prompt + self.completion if self.kind == LABELLED else self.prompt + self.chosen + self.rejected

    def conversation(self) -> list[Message]:
        """The messages as one conversation: an SFT row's, or a labelled answer's prompt then its completion."""
        return self.messages if self.kind == SFT else self.prompt + self.completion


# The usual shape of each format, decoded and type-checked in one C call per line. A line that does
# not fit (a null, a string where messages were expected, broken JSON) takes the general path below.
Turns = str | list[Message]
PROMPT_ROLE, ANSWER_ROLE = "user", "assistant"  # the roles of a prompt and of an answer given as a string


Tools = list[dict[str, Any]] | None  # a tools list beside the turns (OpenAI's format): kept on the row, `[]` as none


class _Chat(msgspec.Struct, gc=False):
    messages: list[Message]
    tools: Tools = None


class _PromptCompletion(msgspec.Struct, gc=False):
    prompt: Turns
    completion: Turns
    tools: Tools = None


class _Alpaca(msgspec.Struct, gc=False):
    instruction: str
    output: str
    input: str | None = None


class _Preference(msgspec.Struct, gc=False):
    prompt: Turns
    chosen: Turns
    rejected: Turns
    tools: Tools = None


class _Unpaired(msgspec.Struct, gc=False):
    prompt: Turns
    completion: Turns
    label: bool
    tools: Tools = None


def _turns(value: Turns, role: str) -> list[Message]:
    return [Message(role, value)] if type(value) is str else value


def _extras(tools: Tools, notes: Counter) -> Tools:
    if tools:
        notes[NOTE_EXTRAS] += 1
        return tools
    return None


def _from_chat(rec: _Chat, name: str, line: int, notes: Counter) -> Row:
    if rec.tools is None:
        return Row("", name, line, SFT, rec.messages)
    return Row("", name, line, SFT, rec.messages, tools=_extras(rec.tools, notes))


def _from_prompt_completion(rec: _PromptCompletion, name: str, line: int, notes: Counter) -> Row:
    messages = _turns(rec.prompt, PROMPT_ROLE) + _turns(rec.completion, ANSWER_ROLE)
    return Row("", name, line, SFT, messages, tools=_extras(rec.tools, notes))


def _from_alpaca(rec: _Alpaca, name: str, line: int, notes: Counter) -> Row:
    user = alpaca_user(rec.instruction, rec.input, notes)
    return Row("", name, line, SFT, [Message("user", user), Message("assistant", rec.output)])


def _from_preference(rec: _Preference, name: str, line: int, notes: Counter) -> Row:
    # `_turns` written out: three calls fewer per row on the fast path
    prompt, chosen, rejected = rec.prompt, rec.chosen, rec.rejected
    return Row(
        "",
        name,
        line,
        PAIR,
        None,
        [Message(PROMPT_ROLE, prompt)] if type(prompt) is str else prompt,
        [Message(ANSWER_ROLE, chosen)] if type(chosen) is str else chosen,
        [Message(ANSWER_ROLE, rejected)] if type(rejected) is str else rejected,
        _extras(rec.tools, notes),
    )


def _from_unpaired(rec: _Unpaired, name: str, line: int, notes: Counter) -> Row:
    prompt, completion = _turns(rec.prompt, PROMPT_ROLE), _turns(rec.completion, ANSWER_ROLE)
    tools = _extras(rec.tools, notes)
    return Row("", name, line, LABELLED, prompt=prompt, completion=completion, label=rec.label, tools=tools)


FAST = {
    "messages": (_Chat, _from_chat),
    "prompt_completion": (_PromptCompletion, _from_prompt_completion),
    "alpaca": (_Alpaca, _from_alpaca),
    "preference": (_Preference, _from_preference),
    "unpaired": (_Unpaired, _from_unpaired),
}
INFER_SAMPLE = 1000  # `format: auto` on JSONL looks at the first this many records


def _row(record: Any, fmt: str, name: str, line: int, notes: Counter) -> Row:
    """The general path: any record, through `normalise` (raises NormaliseError naming the field)."""
    norm = normalise(record, fmt, notes)
    parts = {
        k: [RichMessage(**m) if len(m) > 2 else Message(m["role"], m["content"]) for m in v]
        for k, v in norm.items()
        if k not in ("kind", "tools", "label")
    }
    row = Row("", name, line, norm["kind"], **parts, tools=norm.get("tools"), label=norm.get("label"))
    for m in row.all_messages():
        _check_encodable(m.role)
        _check_encodable(m.content)
    if row.tools is not None or any(type(m) is RichMessage for m in row.all_messages()):
        notes[NOTE_EXTRAS] += 1  # a row read (one quarantined for its encoding is not counted)
    return row


def _check_encodable(text: str) -> None:
    """Text that cannot be written as UTF-8: bytes that were not UTF-8 (kept as U+DC80..U+DCFF by
    `surrogateescape`) or a lone surrogate escape such as "\\ud800" in JSON."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        char = ord(text[err.start])
        if 0xDC80 <= char <= 0xDCFF:
            raise NormaliseError("encoding", f"not UTF-8 (byte 0x{char - 0xDC00:02x})") from None
        raise NormaliseError("encoding", f"lone surrogate \\u{char:04x} (not valid Unicode text)") from None


# pragma: no mutate block (loading a source line by line, below: tests/test_formats.py)
def load_rows(
    name: str, path: str | Path, fmt: str = "auto", split: str | None = None, *, ids: bool = True
) -> tuple[list[Row], list[Problem], str, dict[str, int]]:
    """Read and normalise one source. Returns (rows, problems, format, notes); every input record ends in
    one of the two lists, and a source that cannot be read at all raises a one-line UserError.

    A source of several files (a folder of shards, a glob) is read file by file in sorted order, in the format
    of the first; rows and problems are numbered through all of them, and a problem names its file.
    Ids are `<source>-<content hash>` (and `-<n>` for the n-th repeat of the same content), so they
    survive reordering of the input file and name the same row in every report. `ids=False` leaves them to the
    caller (`assign_ids`, on the same rows in the same order), which may then do other work beside the hashing.
    """
    notes: Counter = Counter()
    with gc_paused():
        p = Path(str(path))
        if source_kind(p) == "shards":
            rows, problems, fmt = _load_shards(name, p, fmt, notes)
        else:
            rows, problems, fmt = _load_one(name, p if p.exists() else path, fmt, notes, split)
        if not rows and not problems:
            raise UserError(f"{p}: no records; add records or remove the source from data.sources")
        if ids:
            assign_ids(name, rows)
        return rows, problems, fmt, dict(sorted(notes.items()))


def _load_one(
    name: str, path: str | Path, fmt: str, notes: Counter, split: str | None = None
) -> tuple[list[Row], list[Problem], str]:
    p = Path(str(path))
    if p.suffix.lower() == ".jsonl" and source_kind(p) == "file":
        return _load_jsonl(name, p, fmt, notes)
    return _load_records(name, path, fmt, notes, split)


def _load_shards(name: str, pattern: Path, fmt: str, notes: Counter) -> tuple[list[Row], list[Problem], str]:
    rows: list[Row] = []
    problems: list[Problem] = []
    files = shards(pattern)
    for file in files:
        got, bad, fmt = _load_one(name, file, fmt, notes)
        offset = len(rows) + len(problems)
        for row in got:
            row.line += offset
        problems += [replace(b, line=b.line + offset, detail=f"{file.name} line {b.line}: {b.detail}") for b in bad]
        rows += got
    notes["shards"] = len(files)
    return rows, problems, fmt


def assign_ids(name: str, rows: list[Row]) -> None:
    """Each row's id: `<source>-<content hash>`, `-<n>` added for the n-th repeat of the same content."""
    # The content's JSON (msgspec.json.encode's bytes) is encoded into one reused buffer, no bytes object per row.
    encode, sha, buf, prefix = msgspec.json.Encoder().encode_into, hashlib.sha256, bytearray(), f"{name}-"
    ids = []
    for r in rows:
        encode(_content(r) if r.tools is None else (_content(r), r.tools), buf)
        ids.append(prefix + sha(buf).hexdigest()[:12])
    for r, id_ in zip(rows, number_repeats(ids), strict=True):
        r.id = id_


def number_repeats(ids: list[str]) -> list[str]:
    """The ids with `-2`, `-3`, ... added to the second, third, ... repeat of an id, in their order."""
    if len(set(ids)) == len(ids):
        return ids
    seen: dict[str, int] = {}
    out = []
    for id_ in ids:
        n = seen[id_] = seen.get(id_, 0) + 1
        out.append(f"{id_}-{n}" if n > 1 else id_)
    return out


def _content(r: Row) -> Any:
    if r.kind == LABELLED:
        return r.prompt, r.completion, r.label
    return r.messages if r.kind == SFT else (r.prompt, r.chosen, r.rejected)


def _infer(path: str | Path, records: Iterable[Any]) -> str:
    try:
        return infer_source_format([r for r in records if isinstance(r, dict)])
    except UserError as err:
        raise UserError(f"{path}: {err}; or set data.sources.<name>.format") from None


def _raw(record: Any) -> str:
    return json.dumps(record, ensure_ascii=False, default=str)


def _load_records(
    name: str, path: str | Path, fmt: str, notes: Counter, split: str | None = None
) -> tuple[list[Row], list[Problem], str]:
    records = list(read_records(path, notes, cell=_from_table, split=split))
    if not records:
        return [], [], fmt
    if fmt == "auto":
        fmt = _infer(path, (r for _, r, _ in records))
    rows: list[Row] = []
    problems: list[Problem] = []
    for line, record, _ in records:
        try:
            rows.append(_row(record, fmt, name, line, notes))
        except NormaliseError as e:
            problems.append(Problem(name, line, e.reason, e.detail, _raw(record)))
    return rows, problems, fmt


def _load_jsonl(name: str, p: Path, fmt: str, notes: Counter) -> tuple[list[Row], list[Problem], str]:
    """JSONL line by line: a bad line (broken JSON, wrong encoding, a truncated tail, a wrong type) is
    reported with its line number and the rest of the file still loads."""
    lines, fmt, last_open = jsonl_file(p, fmt, notes)
    shape, make = FAST.get(fmt, (None, None))
    decode = msgspec.json.Decoder(shape).decode if shape else _general_path
    rows: list[Row] = []
    problems: list[Problem] = []
    for number, raw in enumerate(lines(), 1):
        try:
            rows.append(make(decode(raw), name, number, notes))
        # not the usual shape (or not UTF-8, or nested past msgspec's depth limit): the general path decides
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
            row = other_line(name, number, raw, fmt, last_open, notes)
            if row is not None:
                (rows if isinstance(row, Row) else problems).append(row)
    return rows, problems, fmt


def jsonl_file(p: Path, fmt: str, notes: Counter) -> tuple[Callable[[], Iterable[bytes]], str, int]:
    """(a JSONL file's lines, each time called; its format, inferred where `auto`; the number of its last line when
    that line has no newline, else -1): the file read whole once, its encoding settled (tunegate.readers)."""
    data = read_bytes(p)
    if not data or data.isspace():  # isspace stops at the first other byte; strip() would copy the file
        raise UserError(f"{p}: empty file; add records or remove the source from data.sources")
    data = utf8_bytes(p, data, notes)
    # Lines end in \n or \r\n (the \r is JSON whitespace); a file with only old-Mac \r endings is split on \r.
    # \n lines are read from the buffer one at a time (with their \n, also JSON whitespace), each freed once
    # decoded: splitting the file into a list of every line first would copy all of it at once.
    newline = b"\n" if b"\n" in data or b"\r" not in data else b"\r"

    def lines() -> Iterable[bytes]:
        return io.BytesIO(data) if newline == b"\n" else data.split(newline)

    if fmt == "auto":
        fmt = _infer(p, _sample(lines()))
    last_open = data.count(newline) + 1 if not data.endswith((b"\n", b"\r")) else -1
    return lines, fmt, last_open


def other_line(name: str, number: int, raw: bytes, fmt: str, last_open: int, notes: Counter) -> Row | Problem | None:
    """A JSONL line that is not its format's usual shape, through the general path: its row, or its problem, or
    None for a blank line."""
    raw = raw.removesuffix(b"\n")
    if not raw.strip():
        return None
    return _jsonl_line(name, number, raw, fmt, number == last_open, notes)


def _general_path(raw: bytes) -> Any:
    """The decoder of a format with no fast shape (ShareGPT, OpenAI preference): every line takes the general path."""
    raise msgspec.DecodeError("no fast shape")


def _sample(lines: list[bytes]) -> Iterator[Any]:
    n = 0
    for raw in lines:
        try:
            yield msgspec.json.decode(raw.removeprefix(codecs.BOM_UTF8))
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):  # the line is reported later
            continue
        n += 1
        if n == INFER_SAMPLE:
            return


def _jsonl_line(name: str, number: int, raw: bytes, fmt: str, truncated: bool, notes: Counter) -> Row | Problem:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return Problem(name, number, "encoding", f"not UTF-8 ({err.reason} at byte {err.start})", "")
    if text.startswith("\ufeff"):  # files joined with `cat`, each with its byte order mark
        notes[NOTE_BOM] += 1
        text = text[1:]
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        detail = f"{err.msg.removesuffix(' at')} at column {err.colno}" + (
            " (file ends mid-record)" if truncated else ""
        )
        return Problem(name, number, "malformed_json", detail, text)
    except RecursionError:
        return Problem(name, number, "malformed_json", "nested too deeply", text[:500])
    try:
        return _row(record, fmt, name, number, notes)
    except NormaliseError as e:
        return Problem(name, number, e.reason, e.detail, _raw(record))


def load_source(name: str, path: str | Path, fmt: str = "auto") -> tuple[list[dict[str, Any]], list[Problem], str]:
    """`load_rows` with plain dicts for rows (the internal schema as every later stage reads it)."""
    rows, problems, fmt, _ = load_rows(name, path, fmt)
    return msgspec.to_builtins(rows), problems, fmt


def row_text(row: dict[str, Any]) -> str:
    """All message text of a row (contents and tool calls, `tunegate.chat.message_text`), for pattern
    checks and n-gram matching."""
    from tunegate.chat import message_text

    keys = ("messages", "prompt", "chosen", "rejected", "completion")
    return "\n".join(message_text(m) for key in keys for m in row.get(key, ()))


def prompt_and_answer(row: dict[str, Any]) -> tuple[str, str]:
    """(everything before the final assistant turn, the final answer) for SFT and preference rows, as
    text that includes tool calls and tool results; a labelled answer's prompt and its completion."""
    from tunegate.chat import message_text

    if row["kind"] in (PAIR, LABELLED):
        answer = row["chosen"] if row["kind"] == PAIR else row["completion"]
        return "\n".join(map(message_text, row["prompt"])), "\n".join(map(message_text, answer))
    msgs = row["messages"]
    return "\n".join(map(message_text, msgs[:-1])), message_text(msgs[-1]) if msgs else ""
