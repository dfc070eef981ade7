"""Registry helpers that need no server: secret redaction."""

from pathlib import Path

import pytest

from tests.tiny import build_base, tiny
from tunegate.errors import UserError
from tunegate.registry import adapter_fingerprint, champion, client, move_champion, redact

# the registry tests' base: a shorter context and smaller vocabulary than the smallest, the demo's defaults otherwise
REGISTRY_BASE = tiny(vocab_size=300, max_position=32, batch_size=16, warmup_steps=100)


def test_secrets_are_redacted_by_key_and_by_value():
    out = redact(
        {
            "hf_token": "x",
            "db.password": "y",
            "hub_token": "<HUB_TOKEN>",
            "tokenizer_sha256": "abc",
            "note": "use hf_" + "a" * 30 + " here",
            "api_key": "k",
            "max_tokens": 5,
        }
    )
    assert out["hf_token"] == out["db.password"] == out["hub_token"] == out["note"] == out["api_key"] == "[redacted]"
    assert out["tokenizer_sha256"] == "abc" and out["max_tokens"] == "5"


@pytest.fixture
def registry(tmp_path):
    """A real local MLflow registry (SQLite) with two passing versions and one failing version."""
    c = client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    c.create_registered_model("m")
    versions = []
    for n, passed in enumerate(["true", "true", "false"]):
        folder = tmp_path / f"model{n}" / "peft"
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"weights %d" % n)
        tags = {"gate_passed": passed, "adapter_sha256": adapter_fingerprint(folder.parent)}
        versions.append(c.create_model_version("m", str(folder.parent), tags=tags).version)
    return c, versions, tmp_path


def test_promote_and_rollback_are_recorded(registry):
    c, (v1, v2, _), _ = registry
    assert move_champion(c, "m", str(v1), "first") is None
    assert move_champion(c, "m", str(v2), "better") == str(v1)
    assert str(champion(c, "m").version) == str(v2)
    tags = c.get_model_version("m", str(v2)).tags
    assert tags["previous_champion"] == str(v1)
    assert any(k.startswith("promotion_log.") and "better" in v for k, v in tags.items())


def test_failed_gate_and_tampered_files_are_refused(registry):
    c, (v1, _, v3), tmp = registry
    with pytest.raises(UserError, match="gate did not pass"):
        move_champion(c, "m", str(v3), "no")
    (tmp / "model0" / "peft" / "adapter_model.safetensors").write_bytes(b"swapped")
    with pytest.raises(UserError, match="present but no longer match the registered sha256"):
        move_champion(c, "m", str(v1), "tampered")
    assert champion(c, "m") is None


def test_settle_leaves_one_version_and_one_complete_run(tmp_path):
    """What a cut-off or a retried POST can leave (a duplicate version, an orphan run still marked
    `started`, a logged model linked to both versions) is settled to one version and one complete run."""
    import json

    from tunegate.registry import find_version, settle

    c = client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    started = {"adapter_sha256": "f", "registration": "started"}
    run, orphan = (c.create_run(exp, tags=started).info.run_id for _ in range(2))
    other = c.create_run(
        exp, tags={**started, "adapter_sha256": "g"}
    ).info.run_id  # another adapter's: not ours to touch
    model = c.create_logged_model(exp, source_run_id=run)
    c.create_registered_model("m")
    v1, v2 = (
        c.create_model_version("m", f"models:/{model.model_id}", run_id=run, tags={"adapter_sha256": "f"}).version
        for _ in range(2)
    )
    c.set_logged_model_tags(
        model.model_id,
        {"mlflow.modelVersions": json.dumps([{"name": "m", "version": v1}, {"name": "m", "version": v2}])},
    )
    assert find_version(c, "m", "f").version == v1

    assert settle(c, "m", "f", run) == str(v1)
    assert [v.version for v in c.search_model_versions("name = 'm'")] == [v1]
    assert json.loads(c.get_logged_model(model.model_id).tags["mlflow.modelVersions"]) == [
        {"name": "m", "version": str(v1)}
    ]
    assert c.get_run(run).data.tags["registration"] == "complete"
    assert c.get_run(orphan).info.lifecycle_stage == "deleted"
    assert c.get_run(other).info.lifecycle_stage == "active"
    assert settle(c, "m", "f", run) == str(v1)  # idempotent: a second pass changes nothing


# --- champion comparison and rollback history (the bugs of issue "no candidate can ever be promoted") ---


def _cli(*args: str):
    from typer.testing import CliRunner

    from tunegate.cli import app

    return CliRunner().invoke(app, list(args))


@pytest.fixture
def history(tmp_path):
    """Four passing versions of `m` in a real SQLite registry, and a params.yaml the CLI reads."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = client(uri)
    c.create_registered_model("m")
    for n in range(4):
        folder = tmp_path / f"model{n}" / "peft"
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"weights %d" % n)
        c.create_model_version(
            "m", str(folder.parent), tags={"gate_passed": "true", "adapter_sha256": adapter_fingerprint(folder.parent)}
        )
    params = tmp_path / "params.yaml"
    params.write_text(
        f"data: {{sources: {{d: {{path: d.jsonl, role: domain}}}}}}\neval: {{tasks: [t]}}\n"
        f"register: {{tracking_uri: '{uri}', model_name: m}}\n"
    )
    return c, str(params)


def _champ(c) -> str:
    return str(champion(c, "m").version)


def test_rollback_walks_the_promotion_history_backwards_through_the_cli(history):
    c, params = history
    first = _cli("promote", "1", "--params", params)
    assert first.exit_code == 0 and first.output.strip().endswith("champion: v1 (no champion before)")  # not v- -> v1
    for version in ("2", "3"):
        assert _cli("promote", version, "--params", params).exit_code == 0
    out = _cli("rollback", "--params", params)
    assert out.exit_code == 0 and "v3 -> v2" in out.output and _champ(c) == "2"
    out = _cli("rollback", "--params", params)
    assert out.exit_code == 0 and "v2 -> v1" in out.output and _champ(c) == "1"  # not back to v3: no toggling
    out = _cli("rollback", "--params", params)
    assert out.exit_code == 2 and "earliest champion on record" in out.output and _champ(c) == "1"
    assert c.get_model_version("m", "3").tags["rolled_back"] and c.get_model_version("m", "2").tags["rolled_back"]
    assert c.get_model_version("m", "2").tags["previous_champion"] == "1"  # a rollback leaves the history as it was


def test_rollback_skips_versions_rolled_back_from_and_promote_by_name_clears_the_mark(history):
    c, params = history
    for version in ("1", "2"):
        _cli("promote", version, "--params", params)
    assert "v2 -> v1" in _cli("rollback", "--params", params).output
    assert "v1 -> v3" in _cli("promote", "3", "--params", params).output  # v3 replaced v1
    assert "v3 -> v1" in _cli("rollback", "--params", params).output
    # v1 <- v3 <- v1 <- v2: v2 and v3 were rolled back from, v1 is the first: nothing earlier, and no cycle
    assert _cli("rollback", "--params", params).exit_code == 2 and _champ(c) == "1"
    assert "v1 -> v2" in _cli("promote", "2", "--params", params).output  # by name: allowed, and the mark goes
    assert "rolled_back" not in c.get_model_version("m", "2").tags
    assert c.get_model_version("m", "2").tags["previous_champion"] == "1"
    assert "v2 -> v1" in _cli("rollback", "--params", params).output


def test_promoting_the_champion_again_records_nothing(history):
    c, params = history
    _cli("promote", "1", "--params", params)
    tags = dict(c.get_model_version("m", "1").tags)
    out = _cli("promote", "1", "--params", params)
    assert out.exit_code == 0 and "v1 already" in out.output
    assert dict(c.get_model_version("m", "1").tags) == tags and tags["previous_champion"] == ""


def _policy(missing: str = "block"):
    from tunegate.gate import Policy

    return Policy.model_validate(
        {
            "min_items": 30,
            "checks": [
                {"task": "support", "metric": "acc", "role": "target"},
                {"task": "general", "metric": "acc", "role": "general", "margin": 0.05},
            ],
            "champion": {"beat_on_target": True, "margin": 0.02, "missing_samples": missing},
        }
    )


def _samples(right: int, n: int = 60) -> dict:
    return {"support": [{"doc_id": i, "acc": float(i < right)} for i in range(n)]}


@pytest.fixture
def with_champion(tmp_path):
    """v1 = champion, registered from a run that logged its per-sample outcomes as register does (45/60 right)."""
    import mlflow

    from stages.register import EVAL_ARTIFACTS
    from tunegate.config import parse_config
    from tunegate.io import write_jsonl

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = client(uri)
    exp = c.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    for task, rows in _samples(45).items():
        write_jsonl(tmp_path / "samples" / f"{task}.jsonl", rows)
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.log_artifacts(str(tmp_path / "samples"), artifact_path=EVAL_ARTIFACTS)
    c.create_registered_model("m")
    c.create_model_version("m", "unused", run_id=run.info.run_id, tags={"gate_passed": "true"})
    c.set_registered_model_alias("m", "champion", "1")
    c.create_model_version("m", "unused", tags={"gate_passed": "true"})
    cfg = parse_config(
        {
            "data": {"sources": {"d": {"path": "d.jsonl", "role": "domain"}}},
            "eval": {"tasks": ["support"]},
            "register": {"tracking_uri": uri, "model_name": "m"},
        }
    )
    return c, cfg, run.info.run_id


def test_champion_comparison_reads_the_champions_logged_samples(with_champion):
    from stages.register import champion_check

    c, cfg, _ = with_champion
    better = champion_check(c, cfg, "2", _samples(58), _policy())
    assert better["passed"] and better["tag"] == "passed vs v1"
    assert [line.split(":")[0] for line in better["lines"]] == ["PASS target  support/acc vs champion"]
    assert "0.750 -> 0.967" in better["lines"][0] and "n=60" in better["lines"][0]
    worse = champion_check(c, cfg, "2", _samples(36), _policy())  # 0.60 < the champion's 0.75 beyond the margin
    assert not worse["passed"] and worse["tag"] == "failed vs v1: support/acc"
    assert (
        worse["lines"][0].startswith("FAIL")
        and "0.750 -> 0.600" in worse["lines"][0]
        and "nan" not in worse["lines"][0]
    )


def test_unreadable_champion_samples_are_a_stated_decision(with_champion, tmp_path):
    import shutil

    from stages.register import banner, champion_check

    c, cfg, run_id = with_champion
    shutil.rmtree(tmp_path / "art" / run_id / "artifacts" / "eval")
    blocked = champion_check(c, cfg, "2", _samples(58), _policy("block"))
    assert not blocked["passed"] and blocked["tag"].startswith("blocked: champion v1's eval samples cannot be read")
    assert "tunegate promote 2" in blocked["lines"][0] and "nan" not in blocked["lines"][0]
    result = {
        "model_name": "m",
        "version": "2",
        "gate_passed": False,
        "champion": "1",
        "lines": blocked["lines"],
        "notes": [],
    }
    assert "champion v1's eval samples cannot be read" in banner(result)
    skipped = champion_check(c, cfg, "2", _samples(58), _policy("skip"))
    assert skipped["passed"] and skipped["tag"].startswith("skipped:") and "SKIPPED" in skipped["notes"][0]


def test_too_few_or_no_paired_items_never_print_nan():
    from tunegate.gate import decide

    policy = _policy()
    verdict = decide(_samples(10), {"general": []}, policy, champion={"other": []})
    assert not verdict["passed"]
    assert all("nan" not in line for line in verdict["lines"])
    assert any("no paired items (n=0)" in line for line in verdict["lines"])
    few = decide(_samples(5, n=10), _samples(8, n=10), policy)
    assert any("only 10 paired items (< min_items 30)" in line for line in few["lines"])


def test_tampered_file_in_the_artifact_store_blocks_promotion(tmp_path):
    """The tamper check reads the copy MLflow stored (a SQLite registry with a file artifact store), not
    the trained folder: an intact copy promotes, a stored file changed afterwards refuses."""
    import mlflow

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"trained weights")
    (adapter / "adapter_config.json").write_text("{}")
    c = client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = c.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    c.create_registered_model("m")
    versions = []
    for _ in range(2):
        with mlflow.start_run(experiment_id=exp) as run:
            mlflow.log_artifacts(str(adapter), artifact_path="model/peft")
        tags = {"gate_passed": "true", "adapter_sha256": adapter_fingerprint(adapter)}
        versions.append(c.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id, tags).version)
    assert move_champion(c, "m", str(versions[0]), "intact") is None
    (stored,) = (tmp_path / "art" / run.info.run_id).rglob("adapter_model.safetensors")
    stored.write_bytes(b"swapped weights")
    with pytest.raises(UserError, match="present but no longer match the registered sha256"):
        move_champion(c, "m", str(versions[1]), "tampered")
    assert str(champion(c, "m").version) == str(versions[0])
    assert (adapter / "adapter_model.safetensors").read_bytes() == b"trained weights"  # only the stored copy changed


def test_a_local_base_is_stored_once_by_content_and_a_version_loads_without_it(tmp_path):
    """log_base stores the base folder in the artifact store once per content; fetch brings adapter and base
    back into another folder, checked by sha256, and the loaded model equals the original, with the
    original base folder gone. A changed base file is refused."""
    import shutil

    import torch
    from peft import LoraConfig, get_peft_model

    from tunegate.models import load_model, load_with_adapter
    from tunegate.provenance import BASE_ARTIFACT, BASE_FILES
    from tunegate.registry import fetch, load, log_base

    folder = tmp_path / "base"
    base = build_base(folder, REGISTRY_BASE, rows=200, seed=1)
    torch.manual_seed(0)
    lora = LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False)
    adapter = tmp_path / "run" / "peft"
    get_peft_model(load_model(base), lora).save_pretrained(adapter)
    shutil.copy(folder / "tokenizer.json", adapter)
    shutil.copy(folder / "tokenizer_config.json", adapter)

    c = client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    location = (tmp_path / "store").as_uri()
    uri, key = log_base(c, base, location)
    assert log_base(c, base, location) == (uri, key)  # the same content is stored once
    c.create_registered_model("m")
    tags = {"adapter_sha256": adapter_fingerprint(adapter.parent), BASE_ARTIFACT: uri, BASE_FILES: key}
    v = c.create_model_version("m", str(adapter.parent), tags={**tags, "base_model": "demo"}).version
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    with torch.no_grad():
        expected = load_with_adapter(base, adapter)(input_ids=ids).logits
    shutil.rmtree(folder)

    got = fetch(c, "m", str(v), tmp_path / "elsewhere")
    model, _ = load(got)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)
    stored = next((tmp_path / "store").rglob("model.safetensors"))
    stored.write_bytes(stored.read_bytes()[:-1] + b"\0")
    with pytest.raises(UserError, match="the base at runs:/.* is present but does not match its recorded sha256"):
        fetch(c, "m", str(v), tmp_path / "third")


def test_a_full_model_fetches_and_loads_without_a_base_and_lost_files_are_named_missing(tmp_path):
    """A fully fine-tuned version (adapter tag `full`) is its own model: fetch brings weights and tokenizer,
    no base, and load gives the same logits. Files the store lost are reported as missing, naming the
    version, the URI and the store, not as tampering; changed files as altered."""
    import shutil

    import mlflow
    import torch

    from tunegate.models import load_model
    from tunegate.registry import fetch, fingerprint, load

    trained = tmp_path / "candidate"
    build_base(trained, REGISTRY_BASE, rows=200, seed=1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = client(uri)
    exp = c.create_experiment("e", artifact_location=(tmp_path / "store").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        mlflow.log_artifacts(str(trained), artifact_path="model/model")
    c.create_registered_model("m")
    tags = {"adapter": "full", "adapter_sha256": fingerprint(trained), "gate_passed": "true", "base_model": "demo"}
    v = c.create_model_version("m", f"runs:/{run.info.run_id}/model", run.info.run_id, tags).version

    got = fetch(c, "m", str(v), tmp_path / "elsewhere")
    assert got["kind"] == "full" and got["base"] is None and got["adapter"] is None
    assert Path(got["model"]).is_relative_to(tmp_path / "elsewhere")
    model, tokenizer = load(got)
    ids = torch.tensor([tokenizer("order 12345 never came")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, load_model({"path": str(trained)})(input_ids=ids).logits)
    assert move_champion(c, "m", str(v), "files intact") is None

    (stored,) = (tmp_path / "store" / run.info.run_id).rglob("model.safetensors")
    original = stored.read_bytes()
    stored.write_bytes(original[:-4] + b"\0\0\0\1")
    with pytest.raises(UserError, match=r"m v1: model files at runs:/.* are present but no longer match .*tampered\?"):
        fetch(c, "m", str(v), tmp_path / "altered")
    shutil.rmtree(tmp_path / "store" / run.info.run_id / "artifacts" / "model")
    for attempt in (lambda: fetch(c, "m", str(v), tmp_path / "lost"), lambda: move_champion(c, "m", str(v), "again")):
        with pytest.raises(UserError) as lost:
            attempt()
        line = str(lost.value)
        assert line.startswith(f"m v1: its model files are missing from the artifact store of {uri}: nothing at runs:/")
        assert "tampered" not in line and "\n" not in line
