"""Training set-up before any compute: device defaults, the multi-process launch, and an instant memory refusal."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tunegate.config import Launch, Train
from tunegate.errors import UserError
from tunegate.training import device_defaults, launch_command, resolved_args, sharded

CONFIGS = sorted((ROOT / "infra/accelerate").glob("*.yaml"))


def test_device_defaults_fast_and_16bit_on_cuda_deterministic_fp32_on_cpu():
    cpu = device_defaults(Train(), cuda=False, bf16_supported=False)
    assert cpu["use_cpu"] and cpu["full_determinism"] and not cpu["bf16"] and "tf32" not in cpu
    gpu = device_defaults(Train(), cuda=True, bf16_supported=True)
    assert not gpu["use_cpu"] and not gpu["full_determinism"] and gpu["bf16"] and gpu["tf32"]
    assert not device_defaults(Train(), cuda=True, bf16_supported=False)["bf16"]  # e.g. a V100 / T4
    pinned = device_defaults(Train(deterministic=True), cuda=True, bf16_supported=True)
    assert pinned["full_determinism"] and "tf32" not in pinned  # reproducible on request
    # train.args has the last word
    assert resolved_args(Train(args={"bf16": False}), cuda=True, bf16_supported=True)["bf16"] is False


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_accelerate_configs_load_with_accelerates_own_loader(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes >= 1 and config.compute_environment.value == "LOCAL_MACHINE"


def test_sharding_is_read_from_the_accelerate_config():
    folder = ROOT / "infra/accelerate"
    assert sharded(folder / "fsdp.yaml") and sharded(folder / "zero3.yaml")
    assert not sharded(folder / "multi_gpu.yaml") and not sharded(folder / "single_gpu.yaml") and not sharded(None)


def test_launch_command_names_config_processes_and_the_trainers_precision():
    cfg = Train(launch=Launch(processes=4, config=str(ROOT / "infra/accelerate/multi_gpu.yaml")))
    command = launch_command(cfg)
    assert command[1:3] == ["launch", "--config_file"] and command[command.index("--num_processes") + 1] == "4"
    assert command[command.index("--mixed_precision") + 1] == "no"  # CPU here: fp32, whatever the file says
    assert command[-2:] == ["-m", "stages.train"]
    from tunegate.errors import UserError

    with pytest.raises(UserError, match="train.launch.config nope.yaml: not found"):
        launch_command(Train(launch=Launch(config="nope.yaml")))


def _project_with_config_only(tmp_path: Path, train: dict) -> Path:
    """A project whose base folder has config.json and base.json but no weights at all."""
    import yaml

    base = tmp_path / "models/base"
    base.mkdir(parents=True)
    config = {
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "num_hidden_layers": 80,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (base / "config.json").write_text(json.dumps(config))  # Llama-3.1-70B's shape
    (base / "base.json").write_text(json.dumps({"model": "big", "path": ".", "weights_sha256": {}}))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(train)
    params["base"]["model"] = "big"  # what base.json says was built
    params["gate"]["policy"] = str(ROOT / "evals/gates.yaml")
    params["paths"]["prompt"] = str(ROOT / "evals/prompt.md")
    (tmp_path / "evals").symlink_to(ROOT / "evals")  # the demo's local tasks: nothing to look up in lm-eval's
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


def test_check_refuses_a_run_that_cannot_fit_from_config_json_alone(tmp_path, monkeypatch):
    """`tunegate check` estimates from config.json (there are no weights to load here) and names the fix."""
    from typer.testing import CliRunner

    from tunegate.cli import app

    project = _project_with_config_only(tmp_path, {"adapter": "full", "args": {"per_device_train_batch_size": 8}})
    monkeypatch.chdir(project)
    monkeypatch.setattr("tunegate.preflight.available_bytes", lambda: ("NVIDIA A10G", 22 * 2**30))
    out = CliRunner().invoke(app, ["check"])
    assert out.exit_code == 2
    assert "estimated peak memory" in out.output and "22.0 GiB free on NVIDIA A10G" in out.output
    assert "gradient_checkpointing: true" in out.output and "still needs more" in out.output  # 70B full: no fix fits


def test_check_reports_the_estimate_when_it_fits(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tunegate.cli import app

    project = _project_with_config_only(
        tmp_path,
        {
            "adapter": "qlora",
            "args": {"per_device_train_batch_size": 1, "max_length": 1024, "gradient_checkpointing": True},
        },
    )
    monkeypatch.chdir(project)
    monkeypatch.setattr("tunegate.preflight.available_bytes", lambda: ("NVIDIA H200", 139 * 2**30))
    out = CliRunner().invoke(app, ["check"])
    assert out.exit_code == 0, out.output
    assert "memory: training big (built in models/base) needs about" in out.output
    assert "per device; fits NVIDIA H200 (139.0 GiB)" in out.output


# Real models' shapes (their config.json as published), for the questions a user asks before renting a GPU
REAL_SHAPES = {
    "llama-3-8b": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256},
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "num_hidden_layers": 28, "vocab_size": 152064},
    "mistral-7b": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 32000},
}  # fmt: skip
REAL_ARGS = {"per_device_train_batch_size": 4, "max_length": 1024, "gradient_checkpointing": True}


@pytest.mark.parametrize("name", REAL_SHAPES)
def test_check_answers_for_a_real_model_on_a_gpu_the_user_does_not_have(tmp_path, monkeypatch, name):
    """`tunegate check --memory 24GiB` with base.model a local folder holding only a 7-8B config.json, beside a
    built demo base (which must not be what it estimates from): QLoRA fits one 24 GiB card, bf16 full
    fine-tuning is refused with the changes that would fit."""
    import yaml
    from typer.testing import CliRunner

    from tunegate.cli import app

    project = _project_with_config_only(tmp_path, {"adapter": "qlora", "args": REAL_ARGS})  # a built base: "big"
    folder = tmp_path / "models" / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps({**REAL_SHAPES[name], "tie_word_embeddings": False, "torch_dtype": "bfloat16"})
    )
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["base"]["model"] = str(folder)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(project)
    fits = CliRunner().invoke(app, ["check", "--memory", "24GiB"])
    assert fits.exit_code == 0, fits.output
    got = float(re.search(r"needs about ([\d.]+) GiB", fits.output)[1])
    assert 5 < got < 21.6 and f"training {folder} needs" in fits.output and "fits 24GiB GPU (24.0 GiB)" in fits.output
    params["train"]["adapter"] = "full"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    refused = CliRunner().invoke(app, ["check", "--memory", "rtx4090"])
    assert refused.exit_code == 2 and "exceeds 90% of the 23.6 GiB free on rtx4090" in refused.output
    need = float(re.search(r"estimated peak memory ([\d.]+) GiB", refused.output)[1])
    assert need > 60  # weights, gradients and Adam states of 7-8B parameters
    assert "train.adapter: qlora" in refused.output
    h200 = CliRunner().invoke(app, ["check", "--memory", "h200"])  # bf16 weights, gradients, AdamW states: fits 141 GB
    assert h200.exit_code == 0 and "fits h200 (139.8 GiB)" in h200.output, h200.output
    bad = CliRunner().invoke(app, ["check", "--memory", "lots"])
    assert bad.exit_code == 2 and "--memory lots: a size (24GiB, 80GB) or one of t4" in bad.output


def test_check_answers_the_memory_question_beside_the_other_problems(tmp_path, monkeypatch):
    """A project with something else wrong (here an eval task lm-eval does not know, which `check` names) still gets
    its memory answer: the estimate when the run fits, the refusal among the problems when it does not; exit 2."""
    import yaml
    from typer.testing import CliRunner

    from tunegate.cli import app

    project = _project_with_config_only(tmp_path, {"adapter": "qlora", "args": REAL_ARGS})
    folder = tmp_path / "models" / "llama-3-8b"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**REAL_SHAPES["llama-3-8b"], "torch_dtype": "bfloat16"}))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["base"]["model"] = str(folder)
    params["eval"]["tasks"] = [*params["eval"]["tasks"], "no_such_task"]
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(project)
    fits = CliRunner().invoke(app, ["check", "--memory", "24GiB"])
    assert fits.exit_code == 2, fits.output
    assert "needs about" in fits.output and "fits 24GiB GPU (24.0 GiB)" in fits.output
    assert "eval.tasks: unknown task(s) no_such_task (not built into lm-eval and not in evals/tasks)" in fits.output
    assert fits.output.index("needs about") < fits.output.index("no_such_task")
    params["train"]["adapter"] = "full"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    refused = CliRunner().invoke(app, ["check", "--memory", "24GiB"])
    assert refused.exit_code == 2 and "2 problems" in refused.output, refused.output
    assert "no_such_task" in refused.output and "estimated peak memory" in refused.output
    assert "train.adapter: qlora" in refused.output


@pytest.fixture
def installed(monkeypatch):
    """flash-attn and liger-kernel installed only once named in the returned set (whatever this machine has); a
    pretended liger-kernel has kernels for llama and qwen2."""
    import importlib.util
    import sys
    import types
    from importlib.machinery import ModuleSpec

    real = importlib.util.find_spec
    present: set[str] = set()

    def find_spec(name, package=None):
        if name in ("flash_attn", "liger_kernel"):
            return ModuleSpec(name, None) if name in present else None
        return real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    patch = types.ModuleType("liger_kernel.transformers.monkey_patch")
    patch.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": print, "qwen2": print}
    for name in ("liger_kernel", "liger_kernel.transformers"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.monkey_patch", patch)
    return present


def test_attention_auto_takes_flash_only_where_it_runs_and_a_named_one_is_kept(installed):
    from tunegate.training import attention_plan

    assert attention_plan("auto", cuda=False, sixteen_bit=True) == (None, "auto: no CUDA device")
    assert attention_plan("auto", cuda=True, sixteen_bit=True)[0] is None  # flash-attn not installed
    assert "pip install flash-attn" in attention_plan("auto", cuda=True, sixteen_bit=True)[1]
    installed.add("flash_attn")
    assert attention_plan("auto", cuda=True, sixteen_bit=True)[0] == "flash_attention_2"
    impl, why = attention_plan("auto", cuda=True, sixteen_bit=False)
    assert impl is None and "float32" in why  # FlashAttention takes bf16/fp16 only
    assert attention_plan("eager", cuda=False, sixteen_bit=False) == ("eager", "train.attn_implementation")
    assert attention_plan("flash_attention_2", cuda=True, sixteen_bit=True)[0] == "flash_attention_2"
    with pytest.raises(UserError, match=r"^train.attn_implementation flash_attention_2: needs a CUDA device"):
        attention_plan("flash_attention_2", cuda=False, sixteen_bit=True)


def test_liger_kernels_auto_only_where_they_run_and_cover_the_model(installed):
    from tunegate.training import LIGER_CONFIG, kernels_plan

    assert kernels_plan("none", cuda=True, model_type="llama") == (False, "train.kernels: none")
    assert kernels_plan("auto", cuda=False, model_type="llama") == (
        False,
        "auto: Liger's kernels run on CUDA only",
    )
    assert "pip install liger-kernel" in kernels_plan("auto", cuda=True, model_type="llama")[1]
    with pytest.raises(UserError, match=r"^train.kernels liger: liger-kernel is not installed"):
        kernels_plan("liger", cuda=True, model_type="llama")
    installed.add("liger_kernel")
    assert kernels_plan("auto", cuda=True, model_type="qwen2") == (True, "auto: Liger has kernels for qwen2")
    assert kernels_plan("auto", cuda=True, model_type="phi_x") == (
        False,
        "auto: Liger has no kernels for phi_x",
    )
    with pytest.raises(UserError, match="no kernels for phi_x"):
        kernels_plan("liger", cuda=True, model_type="phi_x")
    # the loss stays TRL's fused LM head: Liger's own loss kernels are never switched on
    assert not LIGER_CONFIG["fused_linear_cross_entropy"] and not LIGER_CONFIG["cross_entropy"]


def test_logprob_tiles_as_wide_as_a_small_vocabulary_give_the_same_numbers_bit_for_bit():
    """fit_logprob_tiles narrows TRL's tile buffer to the vocabulary: log-probabilities, entropies and gradients are
    bit-identical to TRL's own tiles (one tile either way); a vocabulary wider than a tile keeps TRL's width."""
    import torch
    import trl.trainer.utils as trl_utils

    from tunegate.training import LOGPROB_TILE, fit_logprob_tiles

    torch.manual_seed(0)
    hidden, weight = torch.randn(300, 64), torch.randn(1024, 64) * 0.1
    targets = torch.randint(0, 1024, (300,))

    def scored(width: int):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logprobs, entropy, *_ = trl_utils._ChunkedLogProbFunction.apply(h, w, None, targets, 1.0, width)
        (logprobs.sum() + entropy.sum()).backward()
        return logprobs, entropy, h.grad, w.grad

    try:
        assert fit_logprob_tiles(1024) == trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE == 1024
        for ours, theirs in zip(scored(1024), scored(LOGPROB_TILE), strict=True):
            assert torch.equal(ours, theirs)
        assert fit_logprob_tiles(151_936) == LOGPROB_TILE  # a real model's vocabulary: TRL's tiles
    finally:
        trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE = LOGPROB_TILE
