"""Read training data in the formats people use and normalise it to one internal schema.

Accepted files: JSONL, JSON (a list of objects), Parquet, CSV, a `datasets.save_to_disk` folder, or a
Hugging Face dataset id. Accepted record shapes:

- chat `messages` (OpenAI fine-tuning JSONL): {"messages": [{"role": ..., "content": ...}, ...]}
- prompt/completion: {"prompt": str | messages, "completion": str | messages}
- Alpaca: {"instruction": str, "input": str (optional), "output": str}
- preference: {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}

Internal schema (what `validate` writes and every later stage reads):

    sft:        {"id", "source", "line", "kind": "sft", "messages": [{"role", "content"}, ...]}
    preference: {"id", "source", "line", "kind": "preference", "prompt": [...], "chosen": [...], "rejected": [...]}

`id` is stable: the source name plus a content hash (and an occurrence number for repeats), so it
survives reordering of the input file and identifies the same row in every report.

JSONL is read line by line: msgspec decodes and type-checks a line of the format's usual shape in one
call; any other line takes the general path (`json.loads` + `normalise`), which gives the same row or
names the problem. `load_rows` returns msgspec structs (what validate works on), `load_source` dicts.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from tunegate.errors import UserError
from tunegate.runtime import gc_paused

FORMATS = ("messages", "prompt_completion", "alpaca", "preference")
REQUIRED = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"),
    "preference": ("prompt", "chosen", "rejected"),
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
            "raw": self.raw[:500],
        }


def read_records(path: str | Path) -> Iterator[tuple[int, Any, str]]:
    """Yield (row_number, record, '') for every record of a JSON, Parquet or CSV file, a saved dataset
    or a hub dataset. JSONL goes through `_load_jsonl` instead, which reports bad lines one by one."""
    path_s = str(path)
    p = Path(path_s)
    if p.suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{p}: not valid JSON ({err}); use JSONL to have bad rows quarantined one by one") from None
        if not isinstance(data, list):
            raise UserError(f"{p}: expected a JSON list of records at the top level")
        for i, rec in enumerate(data, 1):
            yield i, rec, ""
    elif p.suffix in (".parquet", ".csv"):
        import pandas as pd

        frame = pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_csv(p, keep_default_na=False)
        for i, rec in enumerate(frame.to_dict(orient="records"), 1):
            yield i, {k: _from_table(v) for k, v in rec.items()}, ""
    elif p.is_dir() and ((p / "dataset_info.json").exists() or (p / "state.json").exists()):
        import datasets

        for i, rec in enumerate(datasets.load_from_disk(path_s), 1):
            yield i, rec, ""
    elif not p.exists() and "/" in path_s and not path_s.startswith((".", "/")):
        yield from _read_hub_dataset(path_s)
    else:
        raise UserError(
            f"{p}: not found or not a supported format (.jsonl, .json, .parquet, .csv, a saved dataset, a hub id)"
        )


def _read_hub_dataset(name: str) -> Iterator[tuple[int, Any, str]]:
    import datasets

    repo, _, split = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, split=split or "train")
    except Exception as err:  # the hub client raises many types for "offline"; all end the same way
        raise UserError(
            f"dataset {repo!r}: cannot load from the Hugging Face hub ({type(err).__name__}); "
            "download it first or point data.sources.<name>.path at a local file"
        ) from None
    for i, rec in enumerate(ds, 1):
        yield i, rec, ""


def _from_table(value: Any) -> Any:
    # Parquet gives numpy arrays for list columns; CSV gives JSON text for nested fields.
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, str) and value[:1] in "[{":
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def detect_format(record: dict[str, Any]) -> str | None:
    keys = record.keys()
    if "messages" in keys:
        return "messages"
    if "chosen" in keys or "rejected" in keys:
        return "preference"
    if "instruction" in keys or "output" in keys:
        return "alpaca"
    if "prompt" in keys or "completion" in keys:
        return "prompt_completion"
    return None


def infer_source_format(records: list[dict[str, Any]]) -> str:
    counts = Counter(f for r in records if isinstance(r, dict) and (f := detect_format(r)))
    if not counts:
        raise UserError(
            "no record has a known shape (messages / prompt+completion / instruction+output / prompt+chosen+rejected)"
        )
    return counts.most_common(1)[0][0]


class NormaliseError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def _as_messages(value: Any, field: str, default_role: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        out = []
        for i, m in enumerate(value):
            if "role" not in m or "content" not in m:
                raise NormaliseError("missing_field", f"{field}[{i}] needs 'role' and 'content'")
            if not isinstance(m["content"], str) or not isinstance(m["role"], str):
                raise NormaliseError("wrong_type", f"{field}[{i}].content and .role must be strings")
            out.append({"role": m["role"], "content": m["content"]})
        return out
    raise NormaliseError("wrong_type", f"{field} must be a string or a list of messages, got {type(value).__name__}")


def normalise(record: Any, fmt: str) -> dict[str, Any]:
    """Turn one record of format `fmt` into the internal schema (without id/source/line)."""
    if not isinstance(record, dict):
        raise NormaliseError("wrong_type", f"expected a JSON object, got {type(record).__name__}")
    missing = [f for f in REQUIRED[fmt] if record.get(f) is None]
    if missing:
        raise NormaliseError("missing_field", ", ".join(missing))
    if fmt == "messages":
        return {"kind": "sft", "messages": _as_messages(record["messages"], "messages", "user")}
    if fmt == "prompt_completion":
        return {
            "kind": "sft",
            "messages": _as_messages(record["prompt"], "prompt", "user")
            + _as_messages(record["completion"], "completion", "assistant"),
        }
    if fmt == "alpaca":
        for f in ("instruction", "output", "input"):
            if f in record and not isinstance(record[f], str):
                raise NormaliseError("wrong_type", f"{f} must be a string")
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return {
            "kind": "sft",
            "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}],
        }
    return {
        "kind": "preference",
        "prompt": _as_messages(record["prompt"], "prompt", "user"),
        "chosen": _as_messages(record["chosen"], "chosen", "assistant"),
        "rejected": _as_messages(record["rejected"], "rejected", "assistant"),
    }


class Message(msgspec.Struct, gc=False):
    role: str
    content: str


class Row(msgspec.Struct, gc=False, omit_defaults=True):
    """One normalised record, as validate writes it (sft rows carry `messages`, preference rows the other three)."""

    id: str
    source: str
    line: int
    kind: str
    messages: list[Message] | None = None
    prompt: list[Message] | None = None
    chosen: list[Message] | None = None
    rejected: list[Message] | None = None

    def all_messages(self) -> list[Message]:
        return self.messages if self.kind == "sft" else self.prompt + self.chosen + self.rejected


# The usual shape of each format, decoded and type-checked in one C call per line. A line that does
# not fit (a null, a string where messages were expected, broken JSON) takes the general path below.
Turns = str | list[Message]


class _Chat(msgspec.Struct, gc=False):
    messages: list[Message]


class _PromptCompletion(msgspec.Struct, gc=False):
    prompt: Turns
    completion: Turns


class _Alpaca(msgspec.Struct, gc=False):
    instruction: str
    output: str
    input: str = ""


class _Preference(msgspec.Struct, gc=False):
    prompt: Turns
    chosen: Turns
    rejected: Turns


def _turns(value: Turns, role: str) -> list[Message]:
    return [Message(role, value)] if type(value) is str else value


def _from_chat(rec: _Chat, name: str, line: int) -> Row:
    return Row("", name, line, "sft", rec.messages)


def _from_prompt_completion(rec: _PromptCompletion, name: str, line: int) -> Row:
    return Row("", name, line, "sft", _turns(rec.prompt, "user") + _turns(rec.completion, "assistant"))


def _from_alpaca(rec: _Alpaca, name: str, line: int) -> Row:
    user = rec.instruction + (f"\n\n{rec.input}" if rec.input else "")
    return Row("", name, line, "sft", [Message("user", user), Message("assistant", rec.output)])


def _from_preference(rec: _Preference, name: str, line: int) -> Row:
    return Row(
        "",
        name,
        line,
        "preference",
        None,
        _turns(rec.prompt, "user"),
        _turns(rec.chosen, "assistant"),
        _turns(rec.rejected, "assistant"),
    )


FAST = {
    "messages": (_Chat, _from_chat),
    "prompt_completion": (_PromptCompletion, _from_prompt_completion),
    "alpaca": (_Alpaca, _from_alpaca),
    "preference": (_Preference, _from_preference),
}
INFER_SAMPLE = 1000  # `format: auto` on JSONL looks at the first this many records


def _row(record: Any, fmt: str, name: str, line: int) -> Row:
    """The general path: any record, through `normalise` (raises NormaliseError naming the field)."""
    norm = normalise(record, fmt)
    parts = {k: [Message(m["role"], m["content"]) for m in v] for k, v in norm.items() if k != "kind"}
    return Row("", name, line, norm["kind"], **parts)


def load_rows(name: str, path: str | Path, fmt: str = "auto") -> tuple[list[Row], list[Problem], str]:
    """Read and normalise one source. Returns (rows, problems, format); every input record ends in one of the two lists.

    Ids are `<source>-<content hash>` (and `-<n>` for the n-th repeat of the same content), so they
    survive reordering of the input file and name the same row in every report.
    """
    with gc_paused():
        p = Path(str(path))
        if p.suffix == ".jsonl":
            rows, problems, fmt = _load_jsonl(name, p, fmt)
        else:
            rows, problems, fmt = _load_records(name, path, fmt)
        _assign_ids(name, rows)
        return rows, problems, fmt


def _assign_ids(name: str, rows: list[Row]) -> None:
    encode, sha = msgspec.json.encode, hashlib.sha256
    keys = [
        sha(encode(r.messages if r.kind == "sft" else (r.prompt, r.chosen, r.rejected))).hexdigest()[:12] for r in rows
    ]
    prefix = f"{name}-"
    ids = [prefix + key for key in keys]
    if len(set(keys)) < len(keys):  # repeats of the same content: -2, -3, ... in file order
        seen: dict[str, int] = {}
        for i, key in enumerate(keys):
            n = seen[key] = seen.get(key, 0) + 1
            if n > 1:
                ids[i] = f"{prefix}{key}-{n}"
    for row, rid in zip(rows, ids, strict=True):
        row.id = rid


def _infer(path: str | Path, records: Iterable[Any]) -> str:
    try:
        return infer_source_format([r for r in records if isinstance(r, dict)])
    except UserError as err:
        raise UserError(f"{path}: {err}") from None


def _load_records(name: str, path: str | Path, fmt: str) -> tuple[list[Row], list[Problem], str]:
    records = list(read_records(path))
    if fmt == "auto":
        fmt = _infer(path, (r for _, r, _ in records))
    rows: list[Row] = []
    problems: list[Problem] = []
    for line, record, _ in records:
        try:
            rows.append(_row(record, fmt, name, line))
        except NormaliseError as e:
            problems.append(
                Problem(name, line, e.reason, e.detail, json.dumps(record, ensure_ascii=False, default=str))
            )
    return rows, problems, fmt


def _load_jsonl(name: str, p: Path, fmt: str) -> tuple[list[Row], list[Problem], str]:
    """JSONL line by line: a bad line (broken JSON, wrong encoding, a truncated tail, a wrong type) is
    reported with its line number and the rest of the file still loads."""
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{p}: not found (check data.sources in params.yaml)") from None
    lines = data.split(b"\n")
    if fmt == "auto":
        fmt = _infer(p, _sample(lines))
    shape, make = FAST[fmt]
    decode = msgspec.json.Decoder(shape).decode
    last_open = len(lines) if not data.endswith(b"\n") else -1
    rows: list[Row] = []
    problems: list[Problem] = []
    for number, raw in enumerate(lines, 1):
        try:
            rows.append(make(decode(raw), name, number))
        except msgspec.DecodeError:  # ValidationError included: not the usual shape, so the general path decides
            if not raw.strip():
                continue
            row = _jsonl_line(name, number, raw, fmt, number == last_open)
            (rows if isinstance(row, Row) else problems).append(row)
    return rows, problems, fmt


def _sample(lines: list[bytes]) -> Iterator[Any]:
    n = 0
    for raw in lines:
        try:
            yield msgspec.json.decode(raw)
        except msgspec.DecodeError:
            continue
        n += 1
        if n == INFER_SAMPLE:
            return


def _jsonl_line(name: str, number: int, raw: bytes, fmt: str, truncated: bool) -> Row | Problem:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return Problem(name, number, "encoding", f"not UTF-8 ({err.reason} at byte {err.start})", "")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        detail = f"{err.msg.removesuffix(' at')} at column {err.colno}" + (
            " (file ends mid-record)" if truncated else ""
        )
        return Problem(name, number, "malformed_json", detail, text)
    try:
        return _row(record, fmt, name, number)
    except NormaliseError as e:
        return Problem(name, number, e.reason, e.detail, json.dumps(record, ensure_ascii=False, default=str))


def load_source(name: str, path: str | Path, fmt: str = "auto") -> tuple[list[dict[str, Any]], list[Problem], str]:
    """`load_rows` with plain dicts for rows (the internal schema as every later stage reads it)."""
    rows, problems, fmt = load_rows(name, path, fmt)
    return msgspec.to_builtins(rows), problems, fmt


def row_text(row: dict[str, Any]) -> str:
    """All message content of a row, for pattern checks and n-gram matching."""
    parts = [m["content"] for key in ("messages", "prompt", "chosen", "rejected") for m in row.get(key, ())]
    return "\n".join(parts)


def prompt_and_answer(row: dict[str, Any]) -> tuple[str, str]:
    """(everything before the final assistant turn, the final answer) for SFT and preference rows."""
    if row["kind"] == "preference":
        return "\n".join(m["content"] for m in row["prompt"]), "\n".join(m["content"] for m in row["chosen"])
    msgs = row["messages"]
    return "\n".join(m["content"] for m in msgs[:-1]), msgs[-1]["content"] if msgs else ""
