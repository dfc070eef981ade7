"""A registered version loads on another machine: from another directory, with only the tracking store
and the artifact store (the project's base folder moved away), its adapter and its base come back from
the artifact store, checked against their sha256, and give the same outputs as in the project."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.e2e.conftest import sh

pytestmark = pytest.mark.slow


def test_the_champion_loads_from_another_directory_with_the_base_folder_gone(project, tmp_path):
    import torch

    from tunegate.io import sha256_file, sha256_of
    from tunegate.registry import client, fetch, load, resolve_version

    params = yaml.safe_load((project / "params.yaml").read_text())
    uri = f"sqlite:///{project / 'mlflow.db'}"
    params["register"]["tracking_uri"] = uri  # what a teammate's params.yaml names: the shared server
    teammate = tmp_path / "teammate"
    teammate.mkdir()
    (teammate / "params.yaml").write_text(yaml.safe_dump(params))
    name = params["register"]["model_name"]
    messages = [{"role": "user", "content": "Where is order 12345? The lamp never came."}]

    base, away = project / "models/base", project / "models/base-away"
    base.rename(away)
    try:
        out = sh(teammate, "tunegate", "fetch", "champion", "--to", "fetched").stdout
        assert "sha256 checked" in out
        got = fetch(client(uri), name, "champion", teammate / "again")
        assert str(project) not in got["base"] and str(project) not in got["adapter"]
        model, tokenizer = load(got)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            answer = model.generate(**ids, max_new_tokens=24, do_sample=False)
    finally:
        away.rename(base)
    # the base that came back is the one the version was trained on, bit for bit
    champion = resolve_version(client(uri), name, "champion")
    tags = champion.tags
    # what a teammate reads in the MLflow UI: why, every check, the base, the data, how to reproduce
    text = champion.description
    assert (
        text.startswith("**Gate PASSED**") and "vs base:" in text and f"tunegate reproduce {champion.version}" in text
    )
    assert f"`{tags['base_model']}` at revision `{tags['base_revision']}`" in text and "| domain | domain |" in text
    weights = {p.name: sha256_file(p) for p in sorted(Path(got["base"]).glob("*.safetensors"))}
    assert sha256_of(weights) == tags["base_weights_sha256"]
    reply = tokenizer.decode(answer[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert reply.strip().startswith("{")  # the champion writes a JSON ticket
