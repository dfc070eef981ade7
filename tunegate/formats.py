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
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunegate.errors import UserError

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
        return {"source": self.source, "line": self.line, "reason": self.reason, "detail": self.detail, "raw": self.raw[:500]}


def read_records(path: str | Path) -> Iterator[tuple[int, Any, str]]:
    """Yield (line_or_row_number, record_or_None, error_or_'') for every record in a file or dataset.

    JSONL is read line by line so that a bad line (broken JSON, wrong encoding, a truncated tail) is
    reported with its line number and the rest of the file still loads.
    """
    path_s = str(path)
    p = Path(path_s)
    if p.suffix == ".jsonl":
        yield from _read_jsonl(p)
    elif p.suffix == ".json":
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
        raise UserError(f"{p}: not found or not a supported format (.jsonl, .json, .parquet, .csv, a saved dataset, a hub id)")


def _read_jsonl(p: Path) -> Iterator[tuple[int, Any, str]]:
    if not p.exists():
        raise UserError(f"{p}: not found (check data.sources in params.yaml)")
    with p.open("rb") as fh:
        for number, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield number, None, f"encoding: not UTF-8 ({err.reason} at byte {err.start})"
                continue
            try:
                yield number, json.loads(text), ""
            except json.JSONDecodeError as err:
                truncated = not raw.endswith(b"\n")
                yield number, text, f"malformed_json: {err.msg} at column {err.colno}" + (" (file ends mid-record)" if truncated else "")


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
        raise UserError("no record has a known shape (messages / prompt+completion / instruction+output / prompt+chosen+rejected)")
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
            "messages": _as_messages(record["prompt"], "prompt", "user") + _as_messages(record["completion"], "completion", "assistant"),
        }
    if fmt == "alpaca":
        for f in ("instruction", "output", "input"):
            if f in record and not isinstance(record[f], str):
                raise NormaliseError("wrong_type", f"{f} must be a string")
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return {"kind": "sft", "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]}
    return {
        "kind": "preference",
        "prompt": _as_messages(record["prompt"], "prompt", "user"),
        "chosen": _as_messages(record["chosen"], "chosen", "assistant"),
        "rejected": _as_messages(record["rejected"], "rejected", "assistant"),
    }


def content_key(row: dict[str, Any]) -> str:
    body = {k: row[k] for k in ("messages", "prompt", "chosen", "rejected") if k in row}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]


def load_source(name: str, path: str | Path, fmt: str = "auto") -> tuple[list[dict[str, Any]], list[Problem], str]:
    """Read and normalise one source. Returns (rows, problems, format); every input record ends in one of the two lists."""
    records = list(read_records(path))
    if fmt == "auto":
        try:
            fmt = infer_source_format([r for _, r, err in records if not err])
        except UserError as err:
            raise UserError(f"{path}: {err}") from None
    rows: list[dict[str, Any]] = []
    problems: list[Problem] = []
    seen: Counter[str] = Counter()
    for line, record, err in records:
        raw = record if isinstance(record, str) else json.dumps(record, ensure_ascii=False, default=str)
        if err:
            reason, _, detail = err.partition(": ")
            problems.append(Problem(name, line, reason, detail, raw or ""))
            continue
        try:
            row = normalise(record, fmt)
        except NormaliseError as e:
            problems.append(Problem(name, line, e.reason, e.detail, raw))
            continue
        key = content_key(row)
        seen[key] += 1
        rid = f"{name}-{key}" + (f"-{seen[key]}" if seen[key] > 1 else "")
        rows.append({"id": rid, "source": name, "line": line, **row})
    return rows, problems, fmt


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
