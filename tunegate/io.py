"""File helpers every stage shares: atomic writes, JSON/JSONL, sha256 fingerprints.

Outputs are written to a temporary sibling and renamed into place, so a killed stage (or a full disk)
never leaves a half-written file that DVC or the next stage would mistake for a finished one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tunegate.errors import UserError

CHUNK = 1 << 20


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it over `path` (file or folder).

    A full disk (or quota) while writing ends in one UserError line naming `path`; the partial temp
    copy is removed and whatever was at `path` before is left as it was."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent)) / path.name
    except OSError as err:
        _no_space(path, err)
        raise
    try:
        yield tmp
        publish(tmp, path)
    except OSError as err:
        _no_space(path, err)
        raise
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


def _no_space(path: Path, err: OSError) -> None:
    if err.errno in NO_SPACE:
        free = shutil.disk_usage(path.parent if path.parent.exists() else ".").free
        raise UserError(
            f"{path}: {os.strerror(err.errno).lower()} while writing it ({free / 2**20:.0f} MiB free there); "
            "nothing was replaced: free some space and run the stage again"
        ) from None


def publish(tmp: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Move a finished file or folder into place (replacing what was there) with one rename."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    os.replace(tmp, path)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_chunks(path: str | os.PathLike[str], chunks: Iterable[bytes]) -> None:
    """Atomic write of the chunks an iterator produces. A thread writes each chunk (file writes
    release the GIL) while the caller's iterator makes the next one, e.g. by encoding rows."""
    from concurrent.futures import ThreadPoolExecutor

    with atomic_path(path) as tmp, tmp.open("wb") as fh, ThreadPoolExecutor(1) as pool:
        pending = None
        for chunk in chunks:
            if pending is not None:
                pending.result()
            pending = pool.submit(fh.write, chunk)
        if pending is not None:
            pending.result()


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def write_jsonl(path: str | os.PathLike[str], rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a JSONL file the pipeline itself wrote (trusted: no per-line error reporting)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_tree(root: str | os.PathLike[str], pattern: str = "*") -> dict[str, str]:
    """sha256 of every file under root matching pattern, keyed by relative path (sorted)."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob(pattern)) if p.is_file()}


def sha256_of(obj: Any) -> str:
    """Fingerprint of a JSON-able object, independent of key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
