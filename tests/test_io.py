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


def _save(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def test_weights_hash_ignores_files_and_shards_and_sees_every_value(tmp_path):
    """sha256_tensors: the same weights in one file or two shards hash the same (MLflow re-saves a full model
    at its own shard size); a changed value, name or shape does not."""
    import torch

    torch.manual_seed(0)
    weights = {"a.weight": torch.randn(4, 3), "b.bias": torch.randn(5), "c.ids": torch.arange(6)}
    _save(tmp_path / "one" / "model.safetensors", weights)
    _save(tmp_path / "two" / "model-00001-of-00002.safetensors", {"c.ids": weights["c.ids"]})
    _save(tmp_path / "two" / "model-00002-of-00002.safetensors", {k: weights[k] for k in ("a.weight", "b.bias")})
    one = io.sha256_tensors(tmp_path / "one")
    assert one == io.sha256_tensors(tmp_path / "two") and len(one) == 64
    for name, changed in {
        "value": {**weights, "b.bias": weights["b.bias"] + 1e-6},
        "name": {"a.other": weights["a.weight"], "b.bias": weights["b.bias"], "c.ids": weights["c.ids"]},
        "shape": {**weights, "a.weight": weights["a.weight"].reshape(3, 4)},
        "integer dtype": {**weights, "c.ids": weights["c.ids"].to(torch.int32)},
    }.items():
        _save(tmp_path / name / "model.safetensors", changed)
        assert io.sha256_tensors(tmp_path / name) != one, name


def test_weights_hash_widens_bf16_and_f16_exactly_to_float32(tmp_path):
    """A bf16 adapter (as QLoRA trains it) re-saved in float32 by PEFT is the same weights: the same hash."""
    import torch

    torch.manual_seed(1)
    for dtype in (torch.bfloat16, torch.float16):
        low = {"lora_A.weight": torch.randn(8, 4).to(dtype)}
        _save(tmp_path / str(dtype) / "low" / "adapter_model.safetensors", low)
        _save(
            tmp_path / str(dtype) / "wide" / "adapter_model.safetensors",
            {"lora_A.weight": low["lora_A.weight"].float()},
        )
        assert io.sha256_tensors(tmp_path / str(dtype) / "low") == io.sha256_tensors(tmp_path / str(dtype) / "wide")
        nudged = {"lora_A.weight": low["lora_A.weight"].float() + 1e-7}  # not representable in the low dtype
        _save(tmp_path / str(dtype) / "nudged" / "adapter_model.safetensors", nudged)
        assert io.sha256_tensors(tmp_path / str(dtype) / "nudged") != io.sha256_tensors(tmp_path / str(dtype) / "low")


def test_a_file_that_is_not_safetensors_is_one_line(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 8 + b"not json")
    with pytest.raises(UserError, match="model.safetensors: not a safetensors file"):
        io.sha256_tensors(tmp_path)
