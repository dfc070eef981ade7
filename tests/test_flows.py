"""Flows orchestrate only: the stage list comes from DVC, and the base watch detects a moved base."""

import json

import yaml

from tunegate.models import describe


def test_flow_modules_hold_no_stage_logic(root):
    for path in (root / "flows").glob("*.py"):
        text = path.read_text()
        assert "from stages" not in text and "import stages" not in text, path


def test_base_watch_detects_new_weights(tmp_path, root):
    from flows.retrain import base_changed

    model = tmp_path / "local-model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"v1")
    (model / "tokenizer.json").write_text("{}")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["base"]["model"] = str(model)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    (tmp_path / "models/base").mkdir(parents=True)
    (tmp_path / "models/base/base.json").write_text(json.dumps(describe(model, str(model), "main", "local")))

    assert base_changed.fn(str(tmp_path))[0] is False
    (model / "model.safetensors").write_bytes(b"v2: the base model got a new revision")
    changed, last, current = base_changed.fn(str(tmp_path))
    assert changed is True
