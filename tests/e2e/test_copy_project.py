"""The end-to-end fixture starts from what a fresh clone has, whatever an earlier `make demo` left behind.

Fast: a small git tree with the project's real dvc.yaml, params.yaml and .gitignore, pipeline outputs
planted in it (tracked and untracked), and `copy_project` run on it; the real pipeline is not run.
"""

from __future__ import annotations

import json
import shutil
import subprocess

from tests.conftest import ROOT
from tests.e2e.conftest import copy_project, pipeline_outputs

SOURCES = [".gitignore", "dvc.yaml", "params.yaml", "tunegate/paths.py", "stages/validate.py", "data/raw/domain.jsonl"]
LEFT_BY_A_RUN = [
    "dvc.lock",
    "metrics/dedup.json",
    "plots/train.csv",
    "mlflow.db",
    "mlartifacts/1/abc/artifacts/model.safetensors",
    "models/base/base.json",
    "data/validated/domain.jsonl",
    "data/mix/train.jsonl",
    "reports/gate/verdict.json",
    "reports/register.json",
    "reports/timings.json",
    "reports/logs/train.log",
    "checkpoints/train-1/checkpoint-10/trainer_state.json",
    "data/validated_old/domain.jsonl",  # named only by the earlier run's dvc.lock (paths.validated was renamed)
]


def git(cwd, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout


def test_outputs_are_derived_from_the_project_files():
    outputs = pipeline_outputs(ROOT)
    for expected in ["dvc.lock", "metrics", "plots", "models/base", "models/candidate", "data/validated", "data/mix"]:
        assert expected in outputs, expected
    for expected in ["reports/gate", "reports/data_docs", "checkpoints", "mlflow.db", "mlartifacts", "reports/logs"]:
        assert expected in outputs, expected
    inputs = {"data/raw", "data/pretrain/general.jsonl", "evals", "params.yaml", "dvc.yaml", "stages", "tunegate"}
    assert not any(i == o or i.startswith(f"{o}/") for i in inputs for o in outputs), outputs


def test_copy_leaves_out_what_a_demo_run_left_behind(tmp_path):
    tree, dest = tmp_path / "tree", tmp_path / "copy"
    for rel in SOURCES:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, tree / rel)
    (tree / "metrics").mkdir()
    (tree / "metrics/validate.json").write_text('{"in": 1}\n')  # a run someone committed, as the README suggests
    git(tree, "init", "-q")
    git(tree, "add", "-A")
    git(tree, "commit", "-qm", "sources and a committed run")
    for rel in LEFT_BY_A_RUN:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("left by an earlier run\n")
    lock = {"schema": "2.0", "stages": {"validate": {"outs": [{"path": "data/validated_old", "md5": "0"}]}}}
    (tree / "dvc.lock").write_text(json.dumps(lock))  # JSON is YAML
    new_sources = ["tunegate/work_in_progress.py", "data/raw/new_source.jsonl"]  # untracked, not ignored: copied
    for rel in new_sources:
        (tree / rel).write_text("# not committed yet\n")

    copy_project(dest, root=tree)

    copied = set(git(dest, "ls-files").split())
    assert copied == (set(SOURCES) | set(new_sources)), copied ^ (set(SOURCES) | set(new_sources))
    on_disk = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file() and ".git" not in p.parts}
    assert on_disk == copied
    assert not (dest / "metrics").exists() and not (dest / "dvc.lock").exists()
    assert git(dest, "status", "--porcelain") == ""  # the registered git_commit will not read `-dirty`
