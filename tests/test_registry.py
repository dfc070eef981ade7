"""Registry helpers that need no server: secret redaction."""

from tunegate.registry import redact


def test_secrets_are_redacted_by_key_and_by_value():
    out = redact({"hf_token": "x", "db.password": "y", "hub_token": "<HUB_TOKEN>", "tokenizer_sha256": "abc",
                  "note": "use hf_" + "a" * 30 + " here", "api_key": "k", "max_tokens": 5})
    assert out["hf_token"] == out["db.password"] == out["hub_token"] == out["note"] == out["api_key"] == "[redacted]"
    assert out["tokenizer_sha256"] == "abc" and out["max_tokens"] == "5"


import pytest

from tunegate.errors import UserError
from tunegate.registry import adapter_fingerprint, champion, client, move_champion


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
    with pytest.raises(UserError, match="no longer match the registered adapter sha256"):
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
    other = c.create_run(exp, tags={**started, "adapter_sha256": "g"}).info.run_id  # another adapter's: not ours to touch
    model = c.create_logged_model(exp, source_run_id=run)
    c.create_registered_model("m")
    v1, v2 = (c.create_model_version("m", f"models:/{model.model_id}", run_id=run, tags={"adapter_sha256": "f"}).version for _ in range(2))
    c.set_logged_model_tags(model.model_id, {"mlflow.modelVersions": json.dumps([{"name": "m", "version": v1}, {"name": "m", "version": v2}])})
    assert find_version(c, "m", "f").version == v1

    assert settle(c, "m", "f", run) == str(v1)
    assert [v.version for v in c.search_model_versions("name = 'm'")] == [v1]
    assert json.loads(c.get_logged_model(model.model_id).tags["mlflow.modelVersions"]) == [{"name": "m", "version": str(v1)}]
    assert c.get_run(run).data.tags["registration"] == "complete"
    assert c.get_run(orphan).info.lifecycle_stage == "deleted"
    assert c.get_run(other).info.lifecycle_stage == "active"
    assert settle(c, "m", "f", run) == str(v1)  # idempotent: a second pass changes nothing
