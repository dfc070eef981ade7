"""dvc.yaml, params.yaml, stages/ and tests/ use one name per stage."""

import importlib

import yaml

from tunegate.config import Config

STAGES = (
    "base eval_base validate dedup eval_baselines mix train eval_candidate export eval_export gate register".split()
)


def test_every_stage_is_wired(root):
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == STAGES
    sections = {f.alias or name for name, f in Config.model_fields.items()}
    for name, stage in dvc.items():
        assert stage["cmd"] == f"python -m stages.{name}"
        module = importlib.import_module(f"stages.{name}")
        assert callable(module.main), name
        assert (root / "stages" / f"{name}.py").exists()
        # every stage but the evals (which share the `eval` section) has a params section of its own name, and
        # eval_baselines has `baselines` besides
        if not name.startswith("eval_"):
            assert name in sections, f"params section {name!r} missing"
        assert name != "eval_baselines" or "baselines" in stage["params"]


def test_stage_deps_cover_their_module(root):
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    for name, stage in dvc.items():
        assert f"stages/{name}.py" in stage["deps"], name


def test_help_does_not_import_heavy_libraries():
    import subprocess
    import sys

    code = (
        "import sys, tunegate.cli; "
        "heavy = {'torch', 'transformers', 'mlflow', 'lm_eval', 'great_expectations', 'trl', 'peft'} "
        "& set(sys.modules); "
        "print(sorted(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
    help_out = subprocess.run([sys.executable, "-m", "tunegate.cli", "--help"], capture_output=True, text=True)
    assert help_out.returncode == 0 and "promote" in help_out.stdout
    assert "demo-base" in help_out.stdout and "demo-data" in help_out.stdout  # the demo's, by entry point
