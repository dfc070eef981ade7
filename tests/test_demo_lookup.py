"""The demo's lookup variant (demo/lookup.py): the data makes retrieval sufficient and fine-tuning a memory test, the
base's further pretraining never shows the task, and switching a project over keeps its params file readable."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest
import yaml

from demo import lookup
from tests.conftest import ROOT

WORD = re.compile(r"\w+")


def _number(text: str) -> str:
    return re.search(r"\d{5}", text).group()


def test_every_eval_order_is_asked_in_training_in_other_words_with_the_same_answer():
    train, evals = lookup.training_rows(7), lookup.eval_rows(7)
    answers: dict[str, set[str]] = {}
    for row in train:
        user, assistant = row["messages"]
        answers.setdefault(_number(user["content"]), set()).add(assistant["content"])
    assert len(train) == lookup.ORDERS * len(lookup.TRAIN_TEMPLATES) and len(answers) == lookup.ORDERS
    assert all(len(a) == 1 for a in answers.values())  # one warehouse per order: no contradiction to drop
    questions = {row["messages"][0]["content"] for row in train}
    assert len(evals) == lookup.EVAL_ORDERS == len({_number(e["message"]) for e in evals})
    for item in evals:
        assert item["message"] not in questions  # an eval item is never a training row
        assert answers[_number(item["message"])] == {item["answer"]}
    spread = Counter(w for (w,) in answers.values())
    assert set(spread) == set(lookup.WAREHOUSES) and max(spread.values()) < 3 * min(spread.values())


def test_the_data_is_seeded():
    assert lookup.training_rows(7) == lookup.training_rows(7) != lookup.training_rows(8)
    assert lookup.eval_rows(7) == lookup.eval_rows(7)


def test_the_recall_corpus_never_shows_the_task_and_mostly_asks_what_it_showed():
    """The base learns to read its context from keys and labels of its own, never an order or a warehouse question;
    most questions are about a key shown before them (the answer is there to copy), the rest about a new one."""
    general = [{"prompt": "Name a colour.", "completion": "blue"}]
    rows = lookup.recall_corpus(general, 3, 400)
    task_words = {"warehouse", "order", "ship", "ships"}
    recall = [r for r in rows if r is not general[0]]
    assert recall and not any(task_words & set(WORD.findall(r["prompt"].lower())) for r in recall)
    assert lookup.recall_corpus(general, 3, 400) == rows
    seen: dict[str, str] = {}
    copyable = asked_again = 0
    for row in recall:
        key = re.search(rf"(?:(?:{'|'.join(lookup.RECALL_THINGS)}) )?\d+", row["prompt"]).group()
        if key in seen:
            asked_again += 1
            copyable += seen[key] == row["completion"]
        seen[key] = row["completion"]
    assert asked_again > 300 and copyable > 0.97 * asked_again  # a key keeps its label (numbers may recur by chance)


def test_set_params_changes_only_the_named_keys_and_keeps_the_comments(tmp_path):
    path = tmp_path / "params.yaml"
    original = (ROOT / "params.yaml").read_text()
    path.write_text(original)
    lookup.set_params(path, lookup.PARAMS)
    after = path.read_text()
    before, changed = yaml.safe_load(original), yaml.safe_load(after)
    for dotted, value in lookup.PARAMS.items():
        node, old = changed, before
        for key in dotted.split("."):
            node, old = node[key], old[key]
        assert node == value
    changed["data"]["sources"]["preferences"] = before["data"]["sources"]["preferences"]
    for dotted in lookup.PARAMS:
        section, *rest = dotted.split(".")
        if rest:
            *parents, leaf = rest
            node, old = changed[section], before[section]
            for key in parents:
                node, old = node[key], old[key]
            node[leaf] = old[leaf]
    assert changed == before  # nothing else moved
    kept = [line for line in original.splitlines() if "#" in line]
    assert sum(line in after for line in kept) >= len(kept) - len(lookup.PARAMS)  # comments and layout stay
    assert "null" in after and ": \n" not in after


def test_the_command_refuses_a_project_that_is_not_the_built_demo(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tunegate.cli import load_plugins

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    result = CliRunner().invoke(load_plugins(), ["demo-lookup"])
    assert result.exit_code == 2, result.output
    assert "the demo base is not built yet; run `dvc repro base` first" in result.output
    lookup.set_params(tmp_path / "params.yaml", {"base.model": lookup.HUB})  # already switched
    result = CliRunner().invoke(load_plugins(), ["demo-lookup"])
    assert result.exit_code == 2 and "`git checkout params.yaml` first" in " ".join(result.output.split())
    assert not (tmp_path / lookup.DATA).exists()


@pytest.mark.parametrize("rel", [lookup.TASK, lookup.POLICY])
def test_the_written_task_and_policy_parse(tmp_path, rel):
    lookup.write_files(tmp_path, 1)
    text = (tmp_path / rel).read_text()
    if rel == lookup.POLICY:
        from tunegate.gate import load_policy

        policy = load_policy(tmp_path / rel)
        assert [c.task for c in policy.checks] == ["general_mc", "general_gen", "lookup_gen"]
        assert policy.baselines.beat
    else:
        assert "utils.exact" in text and lookup.EVAL_DATA in text
    assert Path(tmp_path / lookup.DATA).stat().st_size > 0
