"""register logs no secret (params.yaml and dvc.lock artifacts are redacted, params and tags too); its banner
and the version description."""

from __future__ import annotations

import yaml

from tests.conftest import ROOT
from tunegate import provenance
from tunegate.config import parse_config
from tunegate.paths import DVC_LOCK, PARAMS
from tunegate.registry import redact

HUB_TOKEN = "hf_" + "Q7xK2mP9vR4tL8wN3jB6cY1z"
SOURCE_TOKEN = "hf_" + "Z9yX8wV7uT6sR5qP4oN3mL2k"
PASSWORD = "Tr4ck1ngPassw0rd"
SECRETS = (HUB_TOKEN, SOURCE_TOKEN, PASSWORD)


def _params_with_secrets() -> dict:
    """params.yaml with secrets where users put them: a hub token in train.args, a token in a source's
    path, a password in the tracking URI."""
    raw = yaml.safe_load((ROOT / PARAMS).read_text())
    raw["train"]["args"]["hub_token"] = HUB_TOKEN
    raw["data"]["sources"]["general"]["path"] = f"hf://datasets/acme/general?token={SOURCE_TOKEN}"
    raw["register"]["tracking_uri"] = f"http://tunegate:{PASSWORD}@mlflow.internal:5000"
    return raw


def test_params_artifact_is_logged_without_the_secrets_in_it(tmp_path):
    raw = _params_with_secrets()
    path = tmp_path / PARAMS.name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    logged = provenance.provenance_file(path, scratch)
    text = logged.read_text()
    assert logged != path and not [s for s in SECRETS if s in text]
    doc = yaml.safe_load(text)
    assert doc["train"]["args"]["hub_token"] == "[redacted]"
    assert doc["register"]["tracking_uri"] == "http://tunegate:[redacted]@mlflow.internal:5000"
    # everything that is not a secret survives, so `tunegate reproduce` still reads the run's settings
    assert doc["train"]["lora"] == raw["train"]["lora"] and doc["seed"] == raw["seed"]
    assert doc["data"]["sources"]["domain"] == raw["data"]["sources"]["domain"]


def test_dvc_lock_artifact_is_logged_without_the_params_it_records(tmp_path):
    """dvc.lock records every stage's params values, so the hub token is in it too."""
    lock = {"schema": "2.0", "stages": {"train": {"cmd": "python -m stages.train", "params": {"params.yaml": {}}}}}
    lock["stages"]["train"]["params"]["params.yaml"] = {"train": _params_with_secrets()["train"], "seed": 1}
    path = tmp_path / DVC_LOCK.name
    path.write_text(yaml.safe_dump(lock))
    (tmp_path / "scratch").mkdir()
    text = provenance.provenance_file(path, tmp_path / "scratch").read_text()
    assert HUB_TOKEN not in text and "[redacted]" in text


def test_params_without_secrets_are_logged_as_written(tmp_path):
    assert provenance.redacted_yaml((ROOT / PARAMS).read_text()) == (ROOT / PARAMS).read_text()  # comments kept
    report = tmp_path / "report.md"
    report.write_text("token: not yaml to redact")
    assert provenance.provenance_file(report, tmp_path / "scratch") == report


def test_run_params_and_tags_carry_no_secret():
    cfg = parse_config(_params_with_secrets())
    params = provenance.logged_params(cfg)
    assert not [(k, v) for k, v in params.items() for s in SECRETS if s in v]
    assert params["register.tracking_uri"] == "http://tunegate:[redacted]@mlflow.internal:5000"
    assert params["train.args.learning_rate"] == str(cfg.train.args["learning_rate"])  # the rest is logged as is
    base = {"model": "demo", "resolved_revision": "r", "weights_sha256": {}, "tokenizer_sha256": {}}
    mix = {"train_sha256": "t", "rows": 1, "by": "tokens", "general_share_tokens": 0.2, "sources": {}}
    tags = redact(provenance.record(cfg, base, mix, {"passed": True, "failed": []}, {}, "f"))
    assert tags["hp.args.hub_token"] == "[redacted]"
    assert not [(k, v) for k, v in tags.items() for s in SECRETS if s in v]


def test_the_version_description_says_why_and_from_what():
    from stages.register import description
    from tests.conftest import ROOT
    from tunegate.config import load_config

    cfg = load_config(ROOT / "params.yaml")
    base = {"model": "demo", "resolved_revision": "seed-1234"}
    mix = {
        "rows": 2704,
        "by": "tokens",
        "general_share_tokens": 0.2,
        "train_sha256": "ab" * 32,
        "sources": {"domain": {"role": "domain", "used": 1500, "sha256": "cd" * 32}},
    }
    result = {
        "version": "3",
        "champion": "2",
        "gate_passed": False,
        "champion_check": "not run: gate failed",
        "lines": ["FAIL general general_mc/acc vs base: 0.800 -> 0.500 (diff -0.300, ...)"],
        "notes": ["a note"],
    }
    text = description(cfg, base, mix, result, {"git_commit": "1234567890abcdef", "base_artifact": "runs:/r/base"})
    assert text.startswith("**Gate FAILED**; at registration: not champion (champion: v2).")
    assert "| `FAIL general general_mc/acc vs base: 0.800 -> 0.500 (diff -0.300, ...)` |" in text
    assert "**Base**: `demo` at revision `seed-1234` (stored as `runs:/r/base`)" in text
    assert "| domain | domain | 1500 | `cdcdcdcdcdcd` |" in text and "tunegate reproduce 3" in text
    assert text.endswith("Note: a note")
    cheaper = "The cheaper path: prompting with retrieval of 5 examples gets 0.812 on t/m (the candidate 0.806) ..."
    lost = {**result, "baselines": ["retrieval-5: t/m 0.812"], "recommendation": cheaper}
    text = description(cfg, base, mix, lost, {})
    assert f"- retrieval-5: t/m 0.812\n\n**{cheaper}**" in text  # the cheaper path under the baselines


def test_with_no_champion_yet_the_banner_and_description_say_so():
    """Not `champion stays at v-`: a first version that failed its gate leaves no champion, in those words."""
    from stages.register import banner, description
    from tunegate.config import load_config

    result = {
        "model_name": "m",
        "version": "1",
        "champion": None,
        "gate_passed": False,
        "champion_check": "not run: gate failed",
        "lines": ["FAIL target t/exact vs base: 0.1 -> 0.1"],
        "notes": [],
    }
    failed = banner(result)
    assert "!! no champion yet; see reports/gate/report.md" in failed and "v-" not in failed
    cheaper = "The cheaper path: prompting with retrieval of 2 examples gets 0.973 on t/exact (the candidate 0.140) ..."
    assert f"!! {cheaper}\n!! no champion yet" in banner({**result, "recommendation": cheaper})  # the last words
    passed = banner({**result, "gate_passed": True, "lines": []})
    assert passed.endswith("m v1 registered; no champion yet")
    assert banner({**result, "gate_passed": True, "champion": "2"}).endswith("champion stays at v2")
    cfg = load_config(ROOT / "params.yaml")
    mix = {"rows": 1, "by": "tokens", "general_share_tokens": 0.2, "train_sha256": "ab" * 32, "sources": {}}
    text = description(cfg, {"model": "demo", "resolved_revision": "r"}, mix, result, {})
    assert text.startswith("**Gate FAILED**; at registration: not champion (no champion yet).")
    full = description(
        cfg.model_copy(update={"train": cfg.train.model_copy(update={"adapter": "full"})}),
        {"model": "demo", "resolved_revision": "r"},
        mix,
        result,
        {},
    )
    assert "`tunegate fetch 1` (a full model: loads without its base)." in full
