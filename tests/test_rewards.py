"""GRPO's rewards (tunegate.rewards): a scorer reward is the gate's own scorer called as lm-eval calls it, the
format reward, your functions by import path, each with its code's sha256; a reward that raises scores 0 and is
counted; every wrong name ends in one line before any weights load."""

from __future__ import annotations

import json
import logging

import pytest

from tests.conftest import ROOT
from tunegate import rewards
from tunegate.config import RewardSpec as Spec
from tunegate.config import Train
from tunegate.errors import UserError

TASKS = ROOT / "evals/tasks"


def test_a_scorer_reward_scores_a_completion_as_the_gate_scores_the_generation():
    from evals.tasks import utils

    (reward,) = rewards.build([Spec(scorer="support_gen/json_fields")], TASKS)
    items = [json.loads(line) for line in (ROOT / "evals/data/support_gen.jsonl").read_text().splitlines()[:20]]
    for item in items:
        want = json.loads(item["answer"])
        for completion in (
            item["answer"],  # right
            json.dumps({**want, next(iter(want)): "wrong"}),  # one field wrong
            item["answer"] + "\nand then some text",  # cut at the task's until "\n", as lm-eval cuts
            "not json",
        ):
            expected = utils.json_fields(item, [completion.split("\n")[0]])["json_fields"]
            assert reward.one([], completion, item["answer"]) == expected
    assert reward.one([], items[0]["answer"] + "\nmore", items[0]["answer"]) == 1.0
    assert reward.code_sha256 == __import__("hashlib").sha256((TASKS / "utils.py").read_bytes()).hexdigest()


def test_the_format_reward_wants_a_json_object_with_the_references_keys():
    reference = '{"intent": "refund", "order": "12345"}'
    assert rewards.json_format([], '{"order": "1", "intent": "x", "extra": 2}', reference) == 1.0
    assert rewards.json_format([], '{"intent": "refund"}', reference) == 0.5
    assert rewards.json_format([], '["intent"]', reference) == 0.0
    assert rewards.json_format([], "intent: refund", reference) == 0.0


def test_a_user_function_is_imported_from_the_project_and_its_code_hashed(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def refund_policy(prompt, completion, reference):\n"
        "    return 1.0 if 'refund' in completion else 0.0\n"
        "def broken(prompt, completion, reference):\n"
        "    return {}[completion]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    good, bad = rewards.build(
        [Spec(function="my_rewards:refund_policy", weight=2), Spec(function="my_rewards:broken")], TASKS
    )
    assert good.weight == 2 and good.one([], "a refund", "") == 1.0 and good.one([], "no", "") == 0.0
    assert len(good.code_sha256) == 64
    batch = bad.batch()
    assert batch.__name__ == "my_rewards:broken"
    assert batch(prompts=[[], []], completions=[[{"role": "assistant", "content": "x"}], "y"], reference=["", ""]) == [
        0.0,
        0.0,
    ]  # it raised on both: scored 0, counted, the run goes on
    assert dict(bad.errors) == {"KeyError": 2}


def test_a_reward_that_raised_is_reported_in_one_line(caplog):
    reward = rewards.Reward("flaky", lambda p, c, r: 1 / 0)
    reward.one([], "x", "y")
    with caplog.at_level(logging.WARNING):
        assert rewards.report_errors([reward, rewards.Reward("fine", lambda p, c, r: 1.0)]) == {"flaky": 1}
    assert "reward flaky raised on 1 completions, scored 0 for them (ZeroDivisionError 1)" in caplog.text


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"scorer": "no_task/json_fields"}, "scorer no_task/json_fields: no task 'no_task' in"),
        (
            {"scorer": "support_gen/nope"},
            r"scorer support_gen/nope: utils.json_fields returns \['json_exact', 'json_fields'\], not nope",
        ),
        ({"function": "no_such_module:f"}, "function no_such_module:f: cannot import no_such_module"),
        (
            {"function": "json:no_such_function"},
            "function json:no_such_function: json has no function no_such_function",
        ),
    ],
)
def test_a_wrong_reward_is_named_before_any_weights_load(spec, message):
    with pytest.raises(UserError, match=message):
        rewards.build([Spec(**spec)], TASKS)


@pytest.mark.parametrize(
    "train, message",
    [
        ({"method": "grpo"}, "needs at least one reward in train.grpo.rewards"),
        ({"method": "grpo", "grpo": {"rewards": [{"format": "json", "scorer": "a/b"}]}}, "exactly one of scorer"),
        ({"method": "grpo", "grpo": {"rewards": [{"scorer": "support_gen"}]}}, "expected <task>/<metric>"),
        ({"method": "grpo", "grpo": {"rewards": [{"function": "my_rewards"}]}}, "expected module:function"),
        ({"method": "sft", "grpo_args": {"num_generations": 4}}, "only used when train.method is grpo or sft\\+grpo"),
    ],
)
def test_grpo_settings_are_checked_with_the_method(train, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        Train.model_validate({"adapter": "lora", "args": {}, **train})


def test_the_reward_code_is_provenance():
    from tunegate.provenance import _baseline_and_reward_tags

    tags = _baseline_and_reward_tags({}, {"reward_code": {"support_gen/json_fields": "ab" * 32}})
    assert tags == {"reward.support_gen/json_fields.code_sha256": "ab" * 32}
