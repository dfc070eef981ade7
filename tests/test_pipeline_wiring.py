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


# Modules that cannot change what a stage writes: errors, names of paths, process set-up, atomic writes and hashes,
# the typed params (whose values DVC tracks through `params:`).
PLUMBING = {"errors", "paths", "runtime", "io", "config", "__init__"}


def _imported_modules(root, path) -> set[str]:
    """The project modules a file imports, at module level or inside functions."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {f"{n.replace('.', '/')}.py" for n in names if (root / f"{n.replace('.', '/')}.py").exists()}
    return found


def test_stage_deps_cover_their_module_and_the_library_code_it_calls(root):
    """A change to the code that computes a stage's outputs makes DVC run the stage again: its own module and every
    tunegate module it imports are deps (the plumbing above aside)."""
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    for name, stage in dvc.items():
        assert f"stages/{name}.py" in stage["deps"], name
        called = _imported_modules(root, root / f"stages/{name}.py")
        called = {m for m in called if m.startswith(("tunegate/", "demo/"))}
        missing = sorted(m for m in called if m.rsplit("/", 1)[1][:-3] not in PLUMBING and m not in stage["deps"])
        assert not missing, f"dvc.yaml stage {name}: add {missing} to its deps"


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
    assert all(c in help_out.stdout for c in ("demo-base", "demo-data", "demo-lookup"))  # the demo's, by entry point
