"""Reading a source into records: files (JSONL, JSON, Parquet, CSV), a `datasets.save_to_disk` folder or a hub
dataset id, with their encodings (a byte order mark dropped or decoded, bytes that are not UTF-8 named).

What a record *is* (its shape, the one row schema, the reasons a record is refused) is tunegate.formats';
this module only gets the records out of the bytes, and ends in one line naming the file for what a user can
get wrong about a source as a whole (missing, a folder, empty, unreadable, an unknown extension, a file
that does not parse). Tested in tests/test_formats.py; not in the mutation run, which covers the pure
normalisation.
"""

from __future__ import annotations

import codecs
import io
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tunegate.errors import UserError, first_line

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
SUPPORTED = (
    ".jsonl, .json, .parquet, .csv, a folder or glob of such files (shards), a datasets.save_to_disk folder or a hub "
    "id (org/name)"
)
GLOB = re.compile(r"[*?\[]")
# Longest first: the UTF-32 LE mark begins with the UTF-16 LE one.
BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(?::[\w.-]+)?")
SNIFF_BYTES = 4096  # what the NUL-byte test for UTF-16/32 without a byte order mark looks at
# Note names (the fourth item `formats.load_rows` returns): what was read differently from the file's bytes.
NOTE_BOM = "byte_order_mark"  # a UTF-8 byte order mark at the start of the file (or of a JSONL line) was dropped
NOTE_UTF16 = "decoded_utf16_utf32"  # the file was UTF-16 / UTF-32 with a byte order mark; its records were decoded


def source_kind(path: str | Path) -> str:
    """'file', 'dataset' (a save_to_disk folder) or 'hub', or a UserError naming what is wrong with the path."""
    path_s = str(path)
    p = Path(path_s)
    if p.is_symlink() and not p.exists():
        raise UserError(f"{p}: a broken symlink (to {p.readlink()}); fix the link or point the source at the file")
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "state.json").exists() or (p / "dataset_dict.json").exists():
            return "dataset"
        if shards(p):
            return "shards"
        raise UserError(
            f"{p}: a folder with no data file and not a saved dataset; point the source at files ({SUPPORTED})"
        )
    if GLOB.search(path_s) and not p.exists():
        if shards(p):
            return "shards"
        raise UserError(f"{path_s}: the pattern matches no data file (relative paths start at the project root)")
    if p.exists():
        if p.suffix.lower() not in SUFFIXES:
            raise UserError(f"{p}: unsupported file type {p.suffix or '(no extension)'!r}; use {SUPPORTED}")
        return "file"
    if p.suffix.lower() not in SUFFIXES and HUB_ID.fullmatch(path_s):
        return "hub"
    raise UserError(f"{p}: not found (check data.sources in params.yaml; relative paths start at the project root)")


def shards(path: str | Path) -> list[Path]:
    """The data files a multi-file source names, in sorted order: a glob's matches, or a folder's files (not its
    subfolders) with a supported extension; [] for anything else."""
    path_s = str(path)
    if GLOB.search(path_s) and not Path(path_s).exists():
        import glob

        matched = [Path(m) for m in glob.glob(path_s, recursive=True)]
    elif Path(path_s).is_dir():
        matched = list(Path(path_s).iterdir())
    else:
        return []
    return sorted(m for m in matched if m.is_file() and m.suffix.lower() in SUFFIXES)


def dependency(path: str) -> str:
    """What DVC tracks for a source: the path itself, or a glob's folder (the part before the first wildcard), so
    a shard added, changed or removed makes validate run again."""
    if not GLOB.search(path):
        return path
    fixed = []
    for part in Path(path).parts:
        if GLOB.search(part):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."


def read_bytes(p: Path) -> bytes:
    """The file's bytes, or one line saying why they cannot be read."""
    try:
        return p.read_bytes()
    except PermissionError:
        raise UserError(f"{p}: permission denied; make the file readable (chmod +r) for the user running it") from None
    except OSError as err:
        raise UserError(f"{p}: cannot be read ({err.strerror or type(err).__name__})") from None


def utf8_bytes(p: Path, data: bytes, notes: Counter) -> bytes:
    """The file's text as UTF-8 bytes: a UTF-8 byte order mark is dropped, UTF-16 / UTF-32 with one is
    decoded (one line naming the line to convert when that fails), and UTF-16 / UTF-32 without one,
    which no line-by-line reading can recover, is refused in one line."""
    for bom, codec in BOMS:
        if data.startswith(bom):
            if codec == "utf-8":
                notes[NOTE_BOM] += 1
                return data[len(bom) :]
            try:
                text = data.decode(codec)
            except UnicodeDecodeError as err:
                line = data[: err.start].decode(codec, "replace").count("\n") + 1
                raise UserError(
                    f"{p}: line {line}: not valid {codec.upper()} ({err.reason}); convert the file to UTF-8 "
                    f"(e.g. iconv -f {codec.upper()} -t UTF-8)"
                ) from None
            notes[NOTE_UTF16] += 1
            return text.encode("utf-8")  # the codec has consumed the byte order mark
    head = data[:SNIFF_BYTES]
    if head.count(b"\x00") * 4 > len(head):
        raise UserError(
            f"{p}: looks like UTF-16 or UTF-32 without a byte order mark (NUL bytes); convert it to UTF-8 "
            "(e.g. iconv -f UTF-16LE -t UTF-8)"
        )
    return data


def _as_is(key: str, value: Any) -> Any:
    return value


def read_records(
    path: str | Path, notes: Counter | None = None, cell: Callable[[str, Any], Any] = _as_is, split: str | None = None
) -> Iterator[tuple[int, Any, str]]:
    """Yield (row_number, record, '') for every record of a JSON, Parquet or CSV file, a saved dataset
    or a hub dataset. JSONL goes through `formats._load_jsonl` instead, which reports bad lines one by one.
    Text that is not UTF-8 is kept as lone surrogates (`surrogateescape`), so the records holding it
    are quarantined (`encoding`) and the others load. `cell(column, value)` reads a Parquet or CSV cell
    (the formats read a message list saved as JSON text)."""
    notes = Counter() if notes is None else notes
    path_s = str(path)
    p = Path(path_s)
    kind = source_kind(p)
    if kind == "hub":
        yield from _read_hub_dataset(path_s)
        return
    if kind == "dataset":
        yield from _read_saved_dataset(p, split)
        return
    if split:
        raise UserError(f"{p}: data.sources.<name>.split is for a saved DatasetDict folder; remove it for a file")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet(p, cell)
        return
    data = read_bytes(p)
    if not data or data.isspace():  # isspace stops at the first other byte; strip() would copy the file
        raise UserError(f"{p}: empty file; add records or remove the source from data.sources")
    data = utf8_bytes(p, data, notes)
    yield from (_read_json(p, data) if suffix == ".json" else _read_csv(p, data, cell))


def _read_parquet(p: Path, cell: Callable[[str, Any], Any]) -> Iterator[tuple[int, Any, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(p).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as err:
        raise UserError(f"{p}: not a readable Parquet file ({first_line(err)}); re-export it") from None
    for i, rec in enumerate(records, 1):
        yield i, {k: cell(k, v) for k, v in rec.items()}, ""


def _read_json(p: Path, data: bytes) -> Iterator[tuple[int, Any, str]]:
    try:
        doc = json.loads(data.decode("utf-8", "surrogateescape"))
    except json.JSONDecodeError as err:
        raise UserError(
            f"{p}: line {err.lineno}: not valid JSON ({err.msg}); a file of one record per line should be "
            ".jsonl (bad lines are then quarantined one by one)"
        ) from None
    except RecursionError:
        raise UserError(f"{p}: JSON nested too deeply to read; a file of records should be a flat list") from None
    if not isinstance(doc, list):
        got = f"an object with keys {', '.join(list(doc)[:5])}" if isinstance(doc, dict) else type(doc).__name__
        raise UserError(f"{p}: expected a JSON list of records at the top level, got {got}")
    for i, rec in enumerate(doc, 1):
        yield i, rec, ""


def _read_csv(p: Path, data: bytes, cell: Callable[[str, Any], Any]) -> Iterator[tuple[int, Any, str]]:
    import csv

    import pandas as pd

    # Every cell as read (object, not pandas' Arrow strings, which cannot hold the surrogates that stand
    # for bytes that are not UTF-8): a completion "42" or "007" is text, not a number.
    try:
        frame = pd.read_csv(
            io.BytesIO(data), dtype=object, keep_default_na=False, encoding="utf-8", encoding_errors="surrogateescape"
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, csv.Error, ValueError) as err:
        raise UserError(f"{p}: not readable as CSV ({first_line(err)}); check its quoting and delimiter") from None
    for i, rec in enumerate(frame.to_dict(orient="records"), 1):
        yield i, {k: cell(k, v) for k, v in rec.items()}, ""


def _read_saved_dataset(p: Path, split: str | None = None) -> Iterator[tuple[int, Any, str]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            want = split or "train"
            if want not in ds:
                raise UserError(
                    f"{p}: a saved DatasetDict without a {want!r} split (it has {', '.join(ds)}); set "
                    "data.sources.<name>.split to one of them"
                )
            ds = ds[want]
        elif split:
            raise UserError(f"{p}: a saved Dataset (one split), not a DatasetDict; remove data.sources.<name>.split")
        records = list(ds)
    except UserError:
        raise
    except Exception as err:  # datasets raises many types for a damaged folder; all end the same way
        raise UserError(
            f"{p}: not a readable saved dataset ({first_line(err)}); save it again with Dataset.save_to_disk"
        ) from None
    for i, rec in enumerate(records, 1):
        yield i, rec, ""


def _read_hub_dataset(name: str) -> Iterator[tuple[int, Any, str]]:
    import datasets

    repo, _, split = name.partition(":")
    try:
        ds = datasets.load_dataset(repo, split=split or "train")
    except Exception as err:  # the hub client raises many types for "offline"; all end the same way
        raise UserError(
            f"dataset {repo!r}: not a local file, and cannot load from the Hugging Face hub "
            f"({type(err).__name__}); download it first or point data.sources.<name>.path at a local file"
        ) from None
    for i, rec in enumerate(ds, 1):
        yield i, rec, ""
