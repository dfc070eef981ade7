"""Real stage mains in a subprocess, as DVC runs them, on a small project: the console holds only the
stage's own lines; what Great Expectations and other libraries log is in reports/logs/<stage>.log."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import yaml

from tests.conftest import ROOT

OWN_LINE = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING) (__main__|tunegate[\w.]*): ")


def _project(tmp_path, tokenizer):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw = tmp_path / "data/raw"
    raw.mkdir(parents=True)
    for name, source in params["data"]["sources"].items():
        lines = (ROOT / source["path"]).read_text(encoding="utf-8").splitlines(keepends=True)[:120]
        (raw / f"{name}.jsonl").write_text("".join(lines), encoding="utf-8")
        source["path"] = f"data/raw/{name}.jsonl"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    base = tmp_path / params["paths"]["base"]
    tokenizer.save_pretrained(base)
    (base / "base.json").write_text(json.dumps({"path": ".", "model": "demo", "revision": "main"}))
    shutil.copytree(ROOT / "evals/data", tmp_path / "evals/data")
    return tmp_path


def test_stage_mains_keep_the_console_to_their_own_lines(tmp_path, tokenizer):
    project = _project(tmp_path, tokenizer)
    env = {k: v for k, v in os.environ.items() if k != "TUNEGATE_VERBOSE"}
    for stage in ("validate", "dedup"):
        proc = subprocess.run(
            [sys.executable, "-m", f"stages.{stage}"],
            cwd=project,
            env={**env, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        assert lines and all(OWN_LINE.match(line) for line in lines), lines
        assert (project / f"reports/logs/{stage}.log").read_text().count("\n") >= len(lines)
    validate_log = (project / "reports/logs/validate.log").read_text()
    assert "great_expectations" in validate_log and "Created temporary directory" in validate_log
