"""Every adapter kind of the table (lora, qlora, dora, full) and every training method (sft, dpo, orpo, kto,
grpo, sft+dpo, sft+kto, sft+grpo) reaches the registry through `dvc repro`, and every kind loads from another
folder, with the project's base moved away: a kind or a method that cannot be registered, fetched or loaded fails
here, not at a user's last stage. The runs pair each kind with a method, so both tables are covered in seven runs
(sft with lora is the default run's, tests/e2e/test_pipeline.py); a test below holds the pairing to both tables.

Each kind trains briefly (the pipeline is the same; the gate's verdict does not matter here, only that the
version is registered with the right provenance and its files come back sha256-checked). A kind's first run also
ships merged weights, checked by the gate, and is fetched and loaded in a teammate's folder (how a version loads
depends on its kind, not on the method that trained it). SFT then GRPO must also raise the held-out json_fields
over its SFT phase alone; SFT then KTO packs its SFT phase's rows."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from tests.e2e.conftest import edit_params, sh
from tunegate.adapters import ADAPTERS
from tunegate.provenance import ATTENTION, LIGER, PACKED

pytestmark = pytest.mark.slow

SHORT = {"train.args.max_steps": 16, "train.args.warmup_steps": 2, "train.args.save_steps": 1000}
SHORT |= {"train.args.eval_steps": 1000}


def load_script() -> str:
    """What a teammate's processes do with `tunegate fetch`'s output, in one process: load the version with
    tunegate and answer one message; load the merged export with plain transformers (no PEFT, no tunegate:
    what any runtime that reads safetensors does) and answer it too."""
    code = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "msg = [{'role': 'user', 'content': 'Where is order 12345?'}]\n"
        "def answer(model, tok):\n"
        "    ids = tok.apply_chat_template(msg, add_generation_prompt=True, return_tensors='pt', return_dict=True)\n"
        "    return model.generate(**ids, max_new_tokens=8, do_sample=False).shape[1] - ids['input_ids'].shape[1]\n"
        "merged = AutoModelForCausalLM.from_pretrained(sys.argv[2]), AutoTokenizer.from_pretrained(sys.argv[2])\n"
        "merged_tokens = answer(*merged)\n"
        "from tunegate.registry import load\n"
        "model, tok = load(json.loads(sys.argv[1]))\n"
        "print(json.dumps({'peft': type(model).__module__.startswith('peft'), 'new_tokens': answer(model, tok),"
        " 'merged_tokens': merged_tokens}))\n"
    )
    return code


@pytest.fixture(scope="module")
def default_run_after(project):
    """The kinds run one after another on the shared project; the default run's outputs come back once, at the
    end (DVC's run cache), for the tests after this module."""
    original = (project / "params.yaml").read_text()
    yield
    (project / "params.yaml").write_text(original)
    sh(project, "dvc", "repro")


# (adapter kind, method): every kind and every method at least once (a chain needs an adapter; full fine-tuning
# with ORPO keeps no frozen reference copy)
RUNS = [
    ("full", "orpo"),
    ("lora", "sft+kto"),
    ("qlora", "dpo"),
    ("dora", "sft+dpo"),
    ("lora", "kto"),
    ("dora", "grpo"),
    ("lora", "sft+grpo"),
]
# GRPO: 8 completions per prompt (2 prompts a step at batch 16), as long as the demo's answers; the demo's own
# rewards (params.yaml: the support_gen scorer and the JSON format)
SAMPLED = {"train.grpo_args": {"num_generations": 8, "max_completion_length": 48}}
# SFT then GRPO is also held to what GRPO is for: from a short SFT (40 steps, whose held-out support_gen json_fields
# is about 0.21), 100 GRPO steps of 4 completions per prompt raise the held-out json_fields (to about 0.26, measured
# on the demo); the SFT phase alone is scored first, exactly as the chain trains it
GRPO_RISES = {"train.args.max_steps": 40, "train.args.warmup_steps": 20}
GRPO_RISES["train.grpo_args"] = {
    "num_generations": 4,
    "max_completion_length": 48,
    "max_steps": 100,
    "learning_rate": 4.0e-4,
    "warmup_steps": 20,
}
PACKED_RUN = "sft+kto"  # its SFT phase packs its rows (train.packing: true), and the version says so
HELD_OUT_GAIN = 0.02  # the least rise of held-out json_fields (0.207 -> 0.255 measured; the gate's bounds: ~0.01)


def held_out_json_fields(project) -> float:
    return json.loads((project / "reports/eval_candidate/results.json").read_text())["scores"]["support_gen"][
        "json_fields"
    ]


# Each kind ships merged weights in its first run, loaded in a teammate's folder (what differs between kinds: a
# merged adapter, a copied full model; the method does not change how an adapter merges or loads); the GGUF
# conversion starts from that merged folder whatever the kind (tests/e2e/test_export.py, tests/test_export.py).
SHIPPED = {(kind, method) for i, (kind, method) in enumerate(RUNS) if kind not in {k for k, _ in RUNS[:i]}}


def test_the_runs_cover_every_adapter_kind_and_every_method():
    from tunegate.methods import METHODS

    assert {kind for kind, _ in RUNS} == set(ADAPTERS)
    assert {method for _, method in RUNS} | {"sft"} == set(METHODS)  # sft: the default run
    assert {kind for kind, _ in SHIPPED} == set(ADAPTERS) and len(SHIPPED) == len(ADAPTERS)
    from tests.conftest import E2E_MOVED  # runs given to the other worker name runs of this table

    assert set(E2E_MOVED.get("test_adapter_kinds", {})) <= {f"{kind}-{method}" for kind, method in RUNS}


@pytest.mark.parametrize("kind, method", RUNS, ids=[f"{k}-{m}" for k, m in RUNS])
def test_each_adapter_kind_and_method_is_registered_fetched_and_loaded_elsewhere(
    project, tmp_path, kind, method, default_run_after
):
    from tunegate.registry import client, fetch, model_files, resolve_version

    original = (project / "params.yaml").read_text()
    name = f"kind-{kind}-{method}".replace("+", "-")
    uri = f"sqlite:///{project / 'mlflow.db'}"
    base, away = project / "models/base", project / "models/base-away"
    try:
        own = {**SAMPLED} if method.endswith("grpo") else {}
        own |= GRPO_RISES if method == "sft+grpo" else {}
        ships = (kind, method) in SHIPPED
        own |= {"export.formats": ["merged"] if ships else []}
        own |= {"train.packing": True} if method == PACKED_RUN else {}
        chosen = {"train.adapter": kind, "train.method": method, "register.model_name": name}
        if method == "sft+grpo":  # the SFT phase alone, trained and scored as the chain trains it
            sft_phase = {k: v for k, v in own.items() if k != "train.grpo_args"}  # (refused with method sft)
            edit_params(project, **{**SHORT, **sft_phase, **chosen, "train.method": "sft"})
            sh(project, "dvc", "repro", "eval_candidate")
            sft_only = held_out_json_fields(project)
        edit_params(project, **{**SHORT, **own, **chosen})
        sh(project, "dvc", "repro")
        if method == "sft+grpo":
            assert held_out_json_fields(project) >= sft_only + HELD_OUT_GAIN, (sft_only, held_out_json_fields(project))
        result = json.loads((project / "reports/register.json").read_text())
        assert result["model_name"] == name and result["version"] == "1"
        assert (result["champion"] == "1") is result["gate_passed"]
        trained = json.loads((project / "models/candidate/train_config.json").read_text())
        assert trained["adapter"] == kind and trained["method"] == method

        c = client(uri)
        v = resolve_version(c, name, "1")
        tags = v.tags
        mix = json.loads((project / "data/mix/manifest.json").read_text())
        manifest = json.loads((project / "models/base/base.json").read_text())
        assert tags["adapter"] == kind and tags["method"] == method and tags["base_model"] == "demo"
        assert tags[ATTENTION] == "sdpa" and tags[LIGER] == "false"  # how it trained: CPU, train.*: auto
        assert tags[PACKED] == ("rows" if method == PACKED_RUN else "false")  # CPU: rows with block-diagonal masks
        assert tags["base_revision"] == manifest["resolved_revision"] and tags["train_sha256"] == mix["train_sha256"]
        steps = {**SHORT, **own}["train.args.max_steps"]
        assert tags["hp.args.max_steps"] == str(steps) and len(tags["adapter_sha256"]) == 64
        # a full model is stored whole and needs no base; an adapter's base is stored once beside it
        assert ("base_artifact" in tags) is ADAPTERS[kind].peft
        assert ("full model" in v.description) is (not ADAPTERS[kind].peft)
        assert "champion stays at v-" not in (project / "reports/register.json").read_text()
        # promote's and rollback's check: the files in the store match the recorded sha256
        assert list(model_files(c, name, v, tmp_path / "check").rglob("*.safetensors"))
        if not ships:  # a method changes nothing in how a version loads: each kind's first run loads it elsewhere
            got = fetch(c, name, "1", tmp_path / "fetched")
            assert got["kind"] == kind and (got["base"] is None) is (not ADAPTERS[kind].peft)
            return

        params = yaml.safe_load(original)
        params["register"] |= {"tracking_uri": uri, "model_name": name}
        teammate = tmp_path / "teammate"
        teammate.mkdir()
        (teammate / "params.yaml").write_text(yaml.safe_dump(params))
        base.rename(away)
        out = sh(teammate, "tunegate", "fetch", "1", "--to", "fetched").stdout
        assert "sha256 checked" in out and ("full model" in out) is (not ADAPTERS[kind].peft), out
        got = fetch(c, name, "1", teammate / "again")
        assert got["kind"] == kind and str(project) not in json.dumps(got)
        assert (got["base"] is None) is (got["adapter"] is None) is (not ADAPTERS[kind].peft)

        # merged weights that answer exactly like the candidate, checked by the gate
        verdict = json.loads((project / "reports/gate/verdict.json").read_text())
        exported = [c for c in verdict["checks"] if c["role"] == "export"]
        assert {c["against"] for c in exported} == {"export merged"} and len(exported) == 4
        assert all(c["changed"] == 0 and c["passed"] for c in exported), exported
        assert tags["exports"] == "merged" and len(tags["export_sha256"]) == 64
        out = sh(teammate, "tunegate", "fetch", "1", "--format", "merged", "--to", "shipped").stdout
        assert "sha256 checked" in out and 'from_pretrained("shipped/merged")' in out, out
        loaded = sh(teammate, sys.executable, "-c", load_script(), json.dumps(got), "shipped/merged").stdout
        loaded = json.loads(loaded.splitlines()[-1])
        assert loaded["peft"] is ADAPTERS[kind].peft and loaded["new_tokens"] >= 1
        assert loaded["merged_tokens"] >= 1
    finally:
        if away.exists():
            away.rename(base)
        (project / "params.yaml").write_text(original)
