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


# Floating-point dtypes that widen to float32 exactly: hashed as float32, so a bf16 adapter re-saved in
# float32 (PEFT loads adapters in the base's dtype) hashes as it did when trained.
_WIDENS_TO_F32 = {"BF16", "F16", "F32"}


def _as_f32(dtype: str, chunk: bytes) -> bytes:
    import numpy as np

    if dtype == "BF16":  # bfloat16 is float32's top 16 bits
        return (np.frombuffer(chunk, dtype="<u2").astype("<u4") << 16).tobytes()
    if dtype == "F16":
        return np.frombuffer(chunk, dtype="<f2").astype("<f4").tobytes()
    return chunk


def sha256_tensors(root: str | os.PathLike[str]) -> str:
    """sha256 over the weights in the safetensors files under root: every tensor's name, shape and values,
    read from each file's own header and streamed (nothing is loaded as a tensor). The same weights hash
    the same whatever files, shards or header order hold them, and bf16/f16 values hash as their exact
    float32 widening: MLflow re-saves a full model at its own shard size, and PEFT re-saves a bf16 adapter
    in float32."""
    tensors: dict[str, str] = {}
    for path in sorted(Path(root).rglob("*.safetensors")):
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            try:
                header = json.loads(f.read(size)) if size <= path.stat().st_size - 8 else None
            except (ValueError, MemoryError):
                header = None
            if not isinstance(header, dict):
                raise UserError(f"{path}: not a safetensors file (its header cannot be read)")
            start = 8 + size
            for name, info in sorted(header.items()):
                if name == "__metadata__":
                    continue
                dtype = info["dtype"]
                begin, end = info["data_offsets"]
                digest = hashlib.sha256(
                    f"{name}|{'F32' if dtype in _WIDENS_TO_F32 else dtype}|{info['shape']}|".encode()
                )
                f.seek(start + begin)
                left = end - begin
                while left:
                    chunk = f.read(min(left, 1 << 20))
                    if not chunk:
                        raise UserError(f"{path}: truncated safetensors file (tensor {name})")
                    digest.update(_as_f32(dtype, chunk))
                    left -= len(chunk)
                tensors[name] = digest.hexdigest()
    return sha256_of(tensors)
