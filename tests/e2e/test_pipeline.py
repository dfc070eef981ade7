"""The real pipeline on the demo: dvc repro end to end, caching, the gate's three outcomes, provenance."""

from __future__ import annotations

import json
import re
import time

import pytest
import yaml

from tests.e2e.conftest import edit_params, sh

pytestmark = pytest.mark.slow

STAGES = ["base", "validate", "dedup", "mix", "train", "eval_base", "eval_candidate", "gate", "register"]


def ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


def client(project):
    from mlflow import MlflowClient

    uri = f"sqlite:///{project / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_first_run_registers_a_champion_with_provenance(project):
    log = (project / "first_repro.log").read_text()
    assert ran(log) == STAGES
    assert "gate PASSED" in log
    c = client(project)
    versions = c.search_model_versions("name = 'tunegate-demo'")
    assert len(versions) == 1
    v = c.get_model_version("tunegate-demo", versions[0].version)
    mix = json.loads((project / "data/mix/manifest.json").read_text())
    base = json.loads((project / "models/base/base.json").read_text())
    assert v.tags["base_model"] == "demo" and v.tags["base_revision"] == base["resolved_revision"]
    assert v.tags["train_sha256"] == mix["train_sha256"]
    assert v.tags["hp.lora.r"] == "16" and v.tags["hp.args.learning_rate"]
    assert v.tags["gate_passed"] == "true" and len(v.tags["adapter_sha256"]) == 64
    assert re.fullmatch(r"[0-9a-f]{40}", v.tags["git_commit"])
    assert c.get_model_version_by_alias("tunegate-demo", "champion").version == v.version
    assert len(c.get_metric_history(v.run_id, "curve.loss")) >= 10  # the training curve, step by step


def test_default_gate_passes_target_and_general(project):
    verdict = json.loads((project / "reports/gate/verdict.json").read_text())
    assert verdict["passed"], verdict["lines"]
    roles = {c["role"] for c in verdict["checks"] if c["passed"]}
    assert roles == {"general", "target"}


def test_identical_candidate_fails_target(project):
    from tunegate.evaluation import load_samples
    from tunegate.gate import decide, load_policy

    base = load_samples(project / "reports/eval_base")
    verdict = decide(base, base, load_policy(project / "evals/gates.yaml"))
    failed = [c for c in verdict["checks"] if not c["passed"]]
    assert failed and {c["role"] for c in failed} == {"target"}


def test_second_repro_does_nothing(project):
    started = time.time()
    proc = sh(project, "dvc", "repro")
    assert ran(proc.stdout) == []
    assert time.time() - started < 30
    assert "up to date" in sh(project, "dvc", "status").stdout


def test_gate_policy_change_reruns_only_gate_and_register(project):
    policy = project / "evals/gates.yaml"
    original = policy.read_text()
    try:
        doc = yaml.safe_load(original)
        doc["checks"][0]["margin"] = 0.06
        policy.write_text(yaml.safe_dump(doc, sort_keys=False))
        status = sh(project, "dvc", "status").stdout
        assert "gate:" in status and "train:" not in status
        proc = sh(project, "dvc", "repro")
        assert ran(proc.stdout) == ["gate", "register"]
        # the adapter did not change, so register reused the version instead of creating another
        assert len(client(project).search_model_versions("name = 'tunegate-demo'")) == 1
    finally:
        policy.write_text(original)
        sh(project, "dvc", "repro")


def test_forgetting_profile_is_blocked(project):
    c = client(project)
    champion = c.get_model_version_by_alias("tunegate-demo", "champion").version
    before = len(c.search_model_versions("name = 'tunegate-demo'"))
    original = (project / "params.yaml").read_text()
    edit_params(project, **{"mix.general_ratio": 0.0, "train.args.learning_rate": 0.005, "train.args.max_steps": 400})
    try:
        proc = sh(project, "dvc", "repro")
        assert ran(proc.stdout) == ["mix", "train", "eval_candidate", "gate", "register"]  # eval_base is cached
        verdict = json.loads((project / "reports/gate/verdict.json").read_text())
        failed_roles = {c["role"] for c in verdict["checks"] if not c["passed"]}
        assert not verdict["passed"] and failed_roles == {"general"}, verdict["lines"]
        assert "GATE FAILED" in proc.stderr
        versions = c.search_model_versions("name = 'tunegate-demo'")
        assert len(versions) == before + 1
        newest = max(versions, key=lambda v: int(v.version))
        assert newest.tags["gate_passed"] == "false" and "general" in newest.tags["gate_failed"]
        assert c.get_model_version_by_alias("tunegate-demo", "champion").version == champion
        out = sh(project, "tunegate", "promote", str(newest.version), check=False)  # the CLI refuses it too
        assert out.returncode == 2 and "gate did not pass" in out.stderr
    finally:
        (project / "params.yaml").write_text(original)
        restore = sh(project, "dvc", "repro")  # back to the default run: DVC's run cache restores it without training
    assert "train" not in ran(restore.stdout)
    assert json.loads((project / "reports/gate/verdict.json").read_text())["passed"]


def test_reproduce_from_registry_matches(project, tmp_path):
    version = client(project).get_model_version_by_alias("tunegate-demo", "champion").version
    proc = sh(project, "tunegate", "reproduce", str(version), "--workdir", str(tmp_path / "again"))
    assert "MATCH" in proc.stdout and "MISMATCH" not in proc.stdout


def test_logged_model_reloads_with_the_trained_weights(project):
    """mlflow.transformers round trip: the registered champion gives the same logits as base + adapter."""
    import mlflow
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    logged = mlflow.transformers.load_model("models:/tunegate-demo@champion", return_type="components")["model"].eval()
    adapter = project / "models/candidate/adapter"
    ours = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(project / "models/base"), str(adapter)).eval()
    tok = AutoTokenizer.from_pretrained(adapter)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "My lamp from order 12345 is broken, refund please"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        assert torch.allclose(logged(ids).logits, ours(ids).logits, atol=1e-6)


def test_champion_moves_only_for_a_candidate_that_beats_it_and_rollback_walks_back(project):
    """After the first champion, a clearly better candidate is promoted (compared item by item with the
    champion's logged samples), a candidate better than the base but worse than the champion is refused
    with real numbers, and `tunegate rollback` walks the promotions back to the first champion."""
    c = client(project)
    first = c.get_model_version_by_alias("tunegate-demo", "champion").version
    original = (project / "params.yaml").read_text()
    try:
        edit_params(project, **{"train.args.max_steps": 400, "train.args.learning_rate": 0.0015})
        proc = sh(project, "dvc", "repro")
        better = c.get_model_version_by_alias("tunegate-demo", "champion")
        assert better.version != first, proc.stderr[-3000:]
        assert better.tags["previous_champion"] == str(first)
        assert better.tags["champion_check"] == f"passed vs v{first}"
        assert "gate PASSED" in proc.stderr and f"v{better.version} is champion" in proc.stderr

        edit_params(project, **{"train.args.max_steps": 60, "train.args.learning_rate": 0.002})
        proc = sh(project, "dvc", "repro")
        verdict = json.loads((project / "reports/gate/verdict.json").read_text())
        assert verdict["passed"], verdict["lines"]  # better than the base ...
        newest = max(c.search_model_versions("name = 'tunegate-demo'"), key=lambda v: int(v.version))
        assert newest.tags["champion_check"].startswith(f"failed vs v{better.version}")  # ... but not than the champion
        assert "previous_champion" not in newest.tags
        assert c.get_model_version_by_alias("tunegate-demo", "champion").version == better.version
        fails = [line for line in proc.stderr.splitlines() if "FAIL" in line and "vs champion" in line]
        assert fails and all("nan" not in line and re.search(r"\d\.\d{3} -> \d\.\d{3}", line) for line in fails), (
            proc.stderr[-3000:]
        )
        assert "GATE FAILED" in proc.stderr

        out = sh(project, "tunegate", "rollback")
        assert f"v{better.version} -> v{first}" in out.stdout
        out = sh(project, "tunegate", "rollback", check=False)
        assert out.returncode == 2 and "earliest champion on record" in out.stderr
        assert c.get_model_version_by_alias("tunegate-demo", "champion").version == first
    finally:
        (project / "params.yaml").write_text(original)
        sh(project, "dvc", "repro")  # back to the default run (restored from DVC's run cache)
    assert c.get_model_version_by_alias("tunegate-demo", "champion").version == first
