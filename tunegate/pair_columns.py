"""Preference pairs of three strings held as columns: the usual DPO export validated without an object per message.

A JSONL preference source whose rows are all `{"prompt": "...", "chosen": "...", "rejected": "..."}` (other keys
ignored, no tools) is read by `read_pairs` into three lists of strings, one per field, instead of a `formats.Row`
with three lists of `formats.Message` per line. `stages.validate` works on the `PairRows` it returns as on any list
of rows (it is a sequence of them, each made when first asked for: only the rows something was found in are), while
the work done for every row runs on the columns:

- the table's columns: `parts` gives tunegate.rendering its three `Flat`s from the strings themselves;
- the content ids: `assign_ids` JSON-encodes each field's strings in one msgspec call, joins them in Arrow into
  the very bytes `formats.assign_ids` hashes for a row, hashes those, and makes the ids in Arrow from the digests
  (a Python string per id only where contents repeat and the repeats are numbered);
- the written lines: `chunks` joins the same encoded strings in Arrow into the very lines msgspec writes for the
  rows, a row made and changed since (masked, stripped) written from the row.

The joins run in Arrow, which releases the GIL, so they run in a thread beside the stage's own work: the contents'
JSON while the stage builds the table, every row's line while it runs the suite. Outputs are byte for byte those of
the rows (tests/stages/test_validate_columns.py compares every output file of the two paths over generated corpora,
malformed lines and changed rows included); a file with a line of any other shape (a conversation, a tools list, a
byte order mark in the middle of the file) is read as rows. What this saves is measured side by side in
`python -m benchmarks.validate_cost --source preferences` (docs/performance.md).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from operator import attrgetter
from pathlib import Path
from typing import Any

import msgspec

from tunegate.errors import UserError
from tunegate.formats import (
    ANSWER_ROLE,
    FAST,
    PROMPT_ROLE,
    Problem,
    Row,
    jsonl_file,
    number_repeats,
    other_line,
)
from tunegate.readers import source_kind
from tunegate.rendering import Flat
from tunegate.runtime import gc_paused

FIELDS = ("prompt", "chosen", "rejected")
_ROLES = (PROMPT_ROLE, ANSWER_ROLE, ANSWER_ROLE)  # of each field's one message


class _PairStrings(msgspec.Struct, gc=False):
    prompt: str
    chosen: str
    rejected: str
    tools: None = None  # a tools list (even `[]`) makes the line a row of another shape


def read_pairs(name: str, path: str | Path, fmt: str) -> tuple[PairRows, list[Problem], str, dict[str, int]] | None:
    """`formats.load_rows(..., ids=False)` for a JSONL file of string-form preference pairs: (the rows as columns,
    the lines' problems, the format, the read notes). None where the source is anything else, which is then read as
    rows: another file type, another format, or a line the usual preference shape reads as a row of another shape.
    Lines neither shape reads take the general path, as there, and end as problems (or the file is read as rows)."""
    p = Path(str(path))
    if p.suffix.lower() != ".jsonl" or not p.exists() or source_kind(p) != "file" or fmt not in ("auto", "preference"):
        return None
    notes: Counter = Counter()
    with gc_paused():
        lines, fmt, last_open = jsonl_file(p, fmt, notes)
        if fmt != "preference":
            return None
        decode, usual = msgspec.json.Decoder(_PairStrings).decode, msgspec.json.Decoder(FAST["preference"][0]).decode
        records: list[_PairStrings] = []
        problems: list[Problem] = []
        others: list[int] = []  # numbers of the lines that are not pairs of strings: problems and blank lines
        number = 0
        for number, raw in enumerate(lines(), 1):  # noqa: B007 - the last number is the file's line count
            try:
                records.append(decode(raw))
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                if _usual_shape(usual, raw):
                    return None
                got = other_line(name, number, raw, fmt, last_open, notes)
                if isinstance(got, Row):
                    return None
                others.append(number)
                problems += [got] if got is not None else []
        if not records and not problems:
            raise UserError(f"{p}: no records; add records or remove the source from data.sources")
        return PairRows.of(name, records, _numbers(number, others)), problems, fmt, dict(sorted(notes.items()))


def _usual_shape(decode, raw: bytes) -> bool:
    try:
        decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return False
    return True


def _numbers(last: int, others: list[int]) -> Any:
    """The line numbers 1..last less `others`."""
    import numpy as np

    numbers = np.arange(1, last + 1, dtype=np.int64)
    return np.delete(numbers, np.asarray(others, np.int64) - 1) if others else numbers


class _Columns:
    """What every view of one source's pairs shares: the columns, the ids once assigned, the rows made so far (by
    position in the columns; a row made is the row from then on), and the JSON work run beside the stage's own.

    The Arrow joins below release the GIL, so they run in a thread while the stage does its Python work: the
    contents' JSON (what the ids hash) while the stage builds the table, every row's written line while it runs the
    suite. msgspec's encoding of the strings holds the GIL; it runs in the same thread, first."""

    def __init__(self, name: str, records: list[_PairStrings], lines: Any):
        self.name, self.lines = name, lines
        self.fields = {f: list(map(attrgetter(f), records)) for f in FIELDS}
        self.ids: Any = None  # an Arrow array of the ids (UTF-8 bytes) once assigned
        self.made: dict[int, Row] = {}
        self.content: Callable[[], Any] | None = None  # started once the table has its strings (`start`)
        self.written: Callable[[], Any] | None = None  # every row's line, started once the ids are known

    def row(self, k: int) -> Row:
        if k not in self.made:
            row = _pair_row(self.name, int(self.lines[k]), *(self.fields[f][k] for f in FIELDS))
            row.id = self.id_of(k) if self.ids is not None else ""
            self.made[k] = row
        return self.made[k]

    def start(self) -> None:
        """Start joining the contents' JSON in a thread, if not yet started."""
        if self.content is None and self.ids is None:
            self.content = _later(self._content)

    def _content(self) -> tuple[dict[str, Any], Any]:
        """(each field's strings JSON-encoded, each row's content JSON as `formats.assign_ids` hashes it)."""
        import pyarrow.compute as pc

        encoded = {f: _json_strings(self.fields[f]) for f in FIELDS}
        marker = _pair_row(self.name, 0, *(f"\0{f}" for f in FIELDS))
        pieces = _framing(msgspec.json.encode(tuple(getattr(marker, f) for f in FIELDS)), [f"\0{f}" for f in FIELDS])
        return encoded, pc.binary_join_element_wise(*_interleave(pieces, [encoded[f] for f in FIELDS]), _bytes(b""))

    def assign_ids(self) -> None:
        if self.ids is not None:
            raise AssertionError("ids are assigned once")
        self.start()
        encoded, content = self.content()
        self.content = None  # the contents' JSON is freed once hashed
        view, offsets, sha = memoryview(_data(content)), _offsets(content), hashlib.sha256
        digests = b"".join([sha(view[a:b]).digest() for a, b in pairwise(offsets.tolist())])
        del view, content
        self.ids, ids = _ids(self.name, digests)
        for k, row in self.made.items():
            row.id = self.id_of(k)
        self.written = _later(lambda: self._written(ids, encoded))

    def id_of(self, k: int) -> str:
        return self.ids[k].as_py().decode()

    def _written(self, ids: Any, encoded: dict[str, Any]) -> Any:
        """Every row's JSON line (with its newline), as msgspec's `encode_lines` writes the row."""
        import pyarrow as pa
        import pyarrow.compute as pc

        tag = "\0" * (self.name.count("\0") + 1)  # markers the source's name cannot equal
        marker = _pair_row(self.name, 0, *(f"{tag}{f}" for f in FIELDS))
        marker.id = f"{tag}id"
        pieces = _framing(msgspec.json.encode(marker) + b"\n", [f"{tag}id", *(f"{tag}{f}" for f in FIELDS)])
        # the line number's place, "line":0 after the source's name (JSON-encoded: it holds no bare quote)
        before, line, after = pieces[1].partition(b'"line":0,')
        pieces[1:2] = [before + line[:-2], line[-1:] + after]
        numbers = pa.array(self.lines).cast(pa.large_string()).cast(pa.large_binary())
        return pc.binary_join_element_wise(
            *_interleave(pieces, [ids, numbers, *(encoded[f] for f in FIELDS)]), _bytes(b"")
        )


def _ids(name: str, digests: bytes) -> tuple[Any, Any]:
    """(the ids, their JSON strings), Arrow arrays, from each row's sha256 digest end to end: `<name>-` and the
    digest's first 6 bytes in hex, as `formats.assign_ids` makes them, with no Python string per row; where some
    digests repeat, through `formats.number_repeats` (`-2`, `-3`, ...)."""
    import binascii

    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    n = len(digests) // 32
    short = np.frombuffer(digests, np.uint8).reshape(n, 32)[:, :6]
    keys = np.zeros((n, 8), np.uint8)
    keys[:, :6] = short
    ordered = np.sort(keys.view(np.uint64).ravel())  # (np.unique is 40 times slower here)
    if (ordered[1:] == ordered[:-1]).any():  # repeats of the same content: numbered in Python
        hexes = binascii.hexlify(short.tobytes()).decode()
        ids = number_repeats([f"{name}-{hexes[12 * k : 12 * k + 12]}" for k in range(n)])
        return pa.array(ids, pa.large_string()).cast(pa.large_binary()), _json_strings(ids)
    hexes = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(),
        n,
        [
            None,
            pa.py_buffer(np.arange(0, 12 * n + 1, 12, dtype=np.int64)),
            pa.py_buffer(binascii.hexlify(short.tobytes())),
        ],
    )
    quoted = msgspec.json.encode(f"{name}-")  # the name as JSON escapes it, quotes included
    ids = pc.binary_join_element_wise(_bytes(f"{name}-".encode()), hexes, _bytes(b""))
    return ids, pc.binary_join_element_wise(_bytes(quoted[:-1]), hexes, _bytes(b'"'), _bytes(b""))


def _pair_row(name: str, line: int, prompt: str, chosen: str, rejected: str) -> Row:
    """The row the usual preference shape makes of a pair of strings (formats.FAST), id not yet assigned."""
    shape, make = FAST["preference"]
    return make(shape(prompt, chosen, rejected), name, line, Counter())


def _later(fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn started in a thread now; the returned call waits for its result (and raises its error)."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="pair-columns")
    future = pool.submit(fn)
    pool.shutdown(wait=False)  # the thread ends once fn returns
    return future.result


def _json_strings(values: list[str]) -> Any:
    """Each string as msgspec encodes it in JSON, quotes included, as an Arrow array: the strings encoded in one call
    as lines, split at the newlines, which an encoded string never holds."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    blob = msgspec.json.Encoder().encode_lines(values)
    offsets = np.zeros(len(values) + 1, np.int64)
    offsets[1:] = np.flatnonzero(np.frombuffer(blob, np.uint8) == ord("\n")) + 1
    lines = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(values), [None, pa.py_buffer(offsets), pa.py_buffer(blob)]
    )
    return pc.binary_slice(lines, 0, -1)


def _offsets(array: Any) -> Any:
    """A large binary array's value offsets (numpy, len + 1), its own slice of the buffer."""
    import numpy as np

    return np.frombuffer(array.buffers()[1], np.int64)[array.offset : array.offset + len(array) + 1]


def _data(array: Any) -> Any:
    return array.buffers()[2] or b""  # an empty array may have no data buffer


def _framing(encoded: bytes, markers: list[str]) -> list[bytes]:
    """The bytes around each marker's JSON string in `encoded` (len(markers) + 1 pieces), each marker found once."""
    pieces, rest = [], encoded
    for marker in markers:
        quoted = msgspec.json.encode(marker)
        before, found, rest = rest.partition(quoted)
        if not found or quoted in rest:
            raise AssertionError(f"{marker!r} not found once in {encoded!r}")
        pieces.append(before)
    return [*pieces, rest]


class PairRows(Sequence[Row]):
    """A source's string-form preference pairs (or some of them, `take`), a sequence of `formats.Row`; see the
    module's docstring."""

    def __init__(self, columns: _Columns, index: Any = None):
        self._columns, self._index = columns, index  # index: positions in the columns, ascending; None for all

    @classmethod
    def of(cls, name: str, records: list[_PairStrings], lines: Any) -> PairRows:
        return cls(_Columns(name, records, lines))

    def __len__(self) -> int:
        return len(self._columns.lines) if self._index is None else len(self._index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            import numpy as np

            return self.take(np.arange(len(self))[i])
        return self._columns.row(self._at(i))

    def __iter__(self) -> Iterator[Row]:
        return map(self._columns.row, self._positions())

    def _at(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        i %= n
        return i if self._index is None else int(self._index[i])

    def _positions(self) -> Any:
        return range(len(self._columns.lines)) if self._index is None else self._index.tolist()

    def take(self, positions: Any) -> PairRows:
        """The rows at these positions (ascending indices into this sequence, a numpy array)."""
        import numpy as np

        positions = np.asarray(positions, np.int64)
        return PairRows(self._columns, positions if self._index is None else self._index[positions])

    def strings(self, field: str) -> list[str]:
        values = self._columns.fields[field]
        return values if self._index is None else [values[k] for k in self._index.tolist()]

    def parts(self) -> list[Flat]:
        """The prompt, chosen and rejected parts as tunegate.rendering lays them out, from the strings alone; the
        contents' JSON starts joining in a thread once they are made (both take the GIL to read the strings)."""
        parts = [Flat.of_strings(self.strings(f), role) for f, role in zip(FIELDS, _ROLES, strict=True)]
        self._columns.start()
        return parts

    def same_answers(self, i: int) -> bool:
        """Whether row i's chosen and rejected are equal, trimmed (the check `chosen_equals_rejected` confirms)."""
        k = self._at(i)
        return self._columns.fields["chosen"][k].strip() == self._columns.fields["rejected"][k].strip()

    @property
    def ids(self) -> list[str]:
        return [id_.decode() for id_ in self.id_array().to_pylist()]

    def id_array(self) -> Any:
        """The rows' ids, an Arrow array (of UTF-8 bytes)."""
        import pyarrow as pa

        ids = self._columns.ids
        if ids is None:
            raise AssertionError("ids read before assign_ids")
        return ids if self._index is None else ids.take(pa.array(self._index))

    def joined(self) -> None:
        """Wait until the contents' JSON is joined (or the ids assigned): the thread that joins it is then done."""
        if (content := self._columns.content) is not None:
            content()

    def assign_ids(self) -> None:
        """Every row's id, as `formats.assign_ids` gives it: `<source>-<sha256 of the content's JSON>[:12]`, repeats
        numbered in file order; the content's JSON joined in Arrow from the encoded strings, then hashed."""
        if self._index is not None:
            raise AssertionError("ids are assigned to a source's rows, all of them")
        self._columns.assign_ids()

    def chunks(self) -> Iterator[Any]:
        """The rows as JSON lines, byte for byte what msgspec's `encode_lines` gives for them: runs of every row's
        line joined in Arrow, and the rows made (and maybe changed since, masked or stripped) encoded from the rows,
        `MADE_PER_CHUNK` at a time."""
        import numpy as np

        columns = self._columns
        if not len(self):
            return
        if columns.written is None:
            raise AssertionError("lines written before assign_ids")
        lines = columns.written()
        offsets, view = _offsets(lines), memoryview(_data(lines))
        positions = np.arange(len(columns.lines)) if self._index is None else self._index
        made = np.isin(positions, np.fromiter(columns.made, np.int64, len(columns.made)))
        # runs of rows alike (all made, or none made and consecutive in the file): a slice, or rows encoded together
        breaks = np.flatnonzero((made[1:] != made[:-1]) | (~made[1:] & (np.diff(positions) != 1))) + 1
        encode = msgspec.json.Encoder().encode_lines
        for run in np.split(np.arange(len(positions)), breaks):
            if not made[run[0]]:
                yield view[offsets[positions[run[0]]] : offsets[positions[run[-1]] + 1]]
                continue
            for at in range(0, len(run), MADE_PER_CHUNK):
                yield encode([columns.row(k) for k in positions[run[at : at + MADE_PER_CHUNK]].tolist()])


MADE_PER_CHUNK = 1024  # rows made, encoded per chunk (as stages.validate encodes a list of rows)


def _interleave(pieces: list[bytes], values: list[Any]) -> list[Any]:
    """pieces[0], values[0], pieces[1], ..., values[-1], pieces[-1], as arguments of Arrow's element-wise join."""
    out: list[Any] = []
    for piece, value in zip(pieces, values, strict=False):
        out += [_bytes(piece), value]
    return [*out, _bytes(pieces[-1])]


def _bytes(value: bytes) -> Any:
    import pyarrow as pa

    return pa.scalar(value, pa.large_binary())
