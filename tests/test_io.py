"""Atomic writes on a full disk: one line naming the output, nothing half-written left behind, and the
previous complete output untouched. The disk is really full: writes go to /dev/full (ENOSPC from the
kernel), through a temp file that atomic_path would otherwise rename into place."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from tunegate import io
from tunegate.errors import UserError

pytestmark = pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")


@pytest.fixture
def full_disk(monkeypatch):
    """Every temp file (a name with an extension) atomic_path hands out is a link to /dev/full: writing
    to it fails with ENOSPC. Temp folders stay real folders."""
    real = tempfile.mkdtemp

    def mkdtemp(prefix="", dir=None):
        folder = real(prefix=prefix, dir=dir)
        name = prefix[1:-1]  # atomic_path's prefix is ".<name>."
        if "." in name:
            os.symlink("/dev/full", os.path.join(folder, name))
        return folder

    monkeypatch.setattr(io.tempfile, "mkdtemp", mkdtemp)


WRITERS = {
    "write_text": lambda path: io.write_text(path, "x" * 100_000),
    "write_json": lambda path: io.write_json(path, {"rows": list(range(50_000))}),
    "write_jsonl": lambda path: io.write_jsonl(path, ({"row": i, "text": "x" * 100} for i in range(5_000))),
    "write_chunks": lambda path: io.write_chunks(path, (b"x" * 65_536 for _ in range(8))),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_full_disk_mid_write_is_one_line_and_leaves_the_last_output(tmp_path, full_disk, writer):
    path = tmp_path / "out" / "result.jsonl"
    path.parent.mkdir()
    path.write_text("the previous complete output\n")
    with pytest.raises(UserError) as err:
        WRITERS[writer](path)
    message = str(err.value)
    assert message.startswith(f"{path}: no space left on device while writing it") and "\n" not in message
    assert "nothing was replaced" in message
    assert path.read_text() == "the previous complete output\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.jsonl"]  # no temp leftovers


def test_a_folder_output_is_all_or_nothing(tmp_path, full_disk):
    out = tmp_path / "validated"
    out.mkdir()
    (out / "domain.jsonl").write_text("previous\n")
    with pytest.raises(UserError, match="no space left on device"):
        with io.atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "first.jsonl").write_text("complete\n")  # the first file fits ...
            io.write_jsonl(tmp / "second.jsonl", [{"row": i} for i in range(10_000)])  # ... the second does not
    assert sorted(p.name for p in tmp_path.iterdir()) == ["validated"]
    assert [p.name for p in out.iterdir()] == ["domain.jsonl"] and (out / "domain.jsonl").read_text() == "previous\n"


def test_other_os_errors_are_not_disguised(tmp_path):
    with pytest.raises(PermissionError):
        with io.atomic_path(tmp_path / "x.json"):
            raise PermissionError(13, "Permission denied")
