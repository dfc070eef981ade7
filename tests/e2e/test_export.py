"""What ships is what was gated: the demo with GGUF export on (`make demo-gguf`) exports merged weights, GGUF f16
and q8_0 and an Ollama Modelfile, scores each through its runtime (transformers, llama.cpp), and the gate
compares them with the candidate item by item; the champion comes back with `tunegate fetch --format gguf` and
answers in llama.cpp."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from tests.e2e.conftest import edit_params, sh

pytestmark = pytest.mark.slow

ARTIFACTS = {"merged", "gguf-f16", "gguf-q8_0"}


@pytest.fixture(scope="module")
def shipped(project):
    """The session's demo project with `export.formats: [merged, gguf, ollama]`: only export, eval_export, gate and
    register re-run (the trained model is the same); the default outputs come back from DVC's run cache after."""
    original = (project / "params.yaml").read_text()
    edit_params(project, **{"export.formats": ["merged", "gguf", "ollama"]})
    try:
        proc = sh(project, "dvc", "repro")
        yield project, proc.stdout + proc.stderr
    finally:
        (project / "params.yaml").write_text(original)
        sh(project, "dvc", "repro")


def _checks(project) -> dict[str, list[dict]]:
    verdict = json.loads((project / "reports/gate/verdict.json").read_text())
    by: dict[str, list[dict]] = {}
    for c in verdict["checks"]:
        if c["role"] == "export":
            by.setdefault(c["against"].removeprefix("export "), []).append(c)
    return by


def test_every_artifact_is_checked_by_the_gate_and_answers_like_the_candidate(shipped):
    project, log = shipped
    ran = re.findall(r"Running stage '([\w-]+)'", log)
    assert not {"base", "train", "eval_candidate"} & set(ran), ran  # the trained model is the one exported
    checks = _checks(project)
    assert set(checks) == ARTIFACTS
    policy_checks = 4  # every check of evals/gates.yaml, for every artifact
    assert all(len(found) == policy_checks and all(c["passed"] for c in found) for found in checks.values()), checks
    # merged weights compute what the candidate computed: not one item changes. llama.cpp's kernels round otherwise,
    # by instruction set: f16 changed 0 items on AVX-512 and 1 on AVX2 (a loglikelihood near-tie), q8_0 up to 5 on both
    assert all(c["changed"] == 0 for c in checks["merged"])
    assert sum(c["changed"] for c in checks["gguf-f16"]) <= 3
    assert sum(c["changed"] for c in checks["gguf-q8_0"]) <= 10
    for name in ARTIFACTS:
        results = json.loads((project / f"reports/eval_export/{name}/results.json").read_text())
        assert results.get("tokenizer_mismatches", 0) == 0
    verdict = json.loads((project / "reports/gate/verdict.json").read_text())
    lines = [line for line in verdict["lines"] if line.startswith("PASS export")]
    assert len(lines) == 12 and all("changed)" in line for line in lines)


def test_the_version_records_the_exports_and_their_sha256(shipped):
    project, _ = shipped
    from tunegate.export import verify
    from tunegate.io import read_json, sha256_file
    from tunegate.registry import client, resolve_version

    c = client(f"sqlite:///{project / 'mlflow.db'}")
    v = resolve_version(c, "tunegate-demo", "champion")
    assert v.tags["exports"] == "merged,gguf-f16,gguf-q8_0"
    assert v.tags["export_sha256"] == sha256_file(project / "models/export/export.json")
    assert "**Exports**: merged,gguf-f16,gguf-q8_0" in v.description
    record = read_json(project / "models/export/export.json")
    assert verify(project / "models/export", record) == []
    assert record["formats"] == ["merged", "gguf", "ollama"] and record["gguf"] == ["f16", "q8_0"]


def test_fetch_champion_gguf_and_llama_cpp_answers_a_support_message_with_the_ticket(shipped, tmp_path):
    project, _ = shipped
    out = sh(project, "tunegate", "fetch", "champion", "--format", "ollama", "--to", str(tmp_path / "f")).stdout
    assert "sha256 checked" in out and "ollama create tunegate-demo -f" in out, out
    assert (tmp_path / "f/gguf/model-q8_0.gguf").is_file() and (tmp_path / "f/ollama/Modelfile").is_file()
    message = "I want my money back for the lamp, order 51973."
    answer = sh(project, "tunegate", "chat", "champion", "--format", "gguf", "-m", message).stdout.strip()
    ticket = json.loads(answer.splitlines()[-1])
    assert set(ticket) == {"intent", "order_id", "product", "urgency"} and ticket["intent"] == "refund", answer
    in_transformers = sh(project, "tunegate", "chat", "champion", "-m", message).stdout.strip().splitlines()[-1]
    expected = json.loads(in_transformers)  # the registered model in transformers: the same ticket, where q8_0's
    # rounding may move one field (on AVX2 one digit of the order id: 56888 for 57888; on AVX-512 none)
    assert set(expected) == set(ticket) and sum(expected[k] != ticket[k] for k in ticket) <= 1, (expected, ticket)
    # a GGUF altered in the artifact store is named, not loaded
    from tunegate.registry import client, resolve_version

    run_id = resolve_version(client(f"sqlite:///{project / 'mlflow.db'}"), "tunegate-demo", "champion").run_id
    (stored,) = list((project / "mlartifacts").rglob(f"{run_id}/artifacts/export/gguf/model-q8_0.gguf"))
    original = stored.read_bytes()
    try:
        stored.write_bytes(original[:-1] + b"x")
        args = ("tunegate", "fetch", "champion", "--format", "gguf", "--to", str(tmp_path / "g"))
        failed = sh(project, *args, check=False)
        assert failed.returncode == 2 and "gguf/model-q8_0.gguf (sha256 differs)" in failed.stderr, failed.stderr
    finally:
        stored.write_bytes(original)


def test_an_export_that_lost_its_chat_template_fails_the_gate(shipped, tmp_path):
    """A GGUF converted without the chat template (what a conversion that drops tokenizer_config.json gives):
    llama.cpp renders with its default ChatML, the demo model has never seen it, and the export check fails
    with the number of items that changed."""
    from tunegate.config import load_config
    from tunegate.evaluation import evaluate_lm, load_samples, task_set
    from tunegate.gate import decide, load_policy
    from tunegate.gguf_lm import GGUFModel
    from tunegate.llamacpp import convert
    from tunegate.models import load_manifest

    project, _ = shipped
    staged = tmp_path / "no-template"
    shutil.copytree(project / "models/export/merged", staged)
    (staged / "chat_template.jinja").unlink()
    convert(staged, tmp_path / "broken.gguf", "f16")
    cfg = load_config(project / "params.yaml")
    tasks = task_set(cfg.eval.model_copy(update={"tasks": ["support_gen"]}), project / "evals/tasks")
    lm = GGUFModel(tmp_path / "broken.gguf", None, 127, cfg.eval.max_gen_toks, cfg.seed)
    manifest = load_manifest(project / "models/base")
    one_task = cfg.eval.model_copy(update={"tasks": ["support_gen"]})
    evaluate_lm(one_task, lm, tasks, manifest, tmp_path / "eval", cfg.seed, "broken", {}, 0.0)
    candidate = load_samples(project / "reports/eval_candidate")
    policy = load_policy(project / "evals/gates.yaml")
    verdict = decide(candidate, candidate, policy, 500, 0, exports={"gguf-f16": load_samples(tmp_path / "eval")})
    broken = [c for c in verdict["checks"] if c["against"] == "export gguf-f16" and c["task"] == "support_gen"]
    assert len(broken) == 1 and not broken[0]["passed"] and broken[0]["changed"] > 100, broken
    assert "export gguf-f16" in " ".join(verdict["failed"])
    assert "answers differently from the candidate" in broken[0]["why"]
