"""Training set-up before any compute: device defaults, the multi-process launch, and an instant memory refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tunegate.config import Launch, Train
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
    params["gate"]["policy"] = str(ROOT / "evals/gates.yaml")
    params["paths"]["prompt"] = str(ROOT / "evals/prompt.md")
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
    assert "memory: training needs about" in out.output and "per device on NVIDIA H200" in out.output
