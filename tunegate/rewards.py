"""The rewards GRPO trains toward (`train.grpo.rewards`): the gate's own scorers, a format check, your functions.

    rewards:
      - scorer: support_gen/json_fields      # the task's process_results (evals/tasks/*.yaml), one of its metrics
      - format: json                         # 1: a JSON object with every key of the reference; 0.5: another object
      - function: my_rewards:refund_policy   # yours, importable from the project root:
                                             #   f(prompt: list[dict], completion: str, reference: str) -> float

A scorer reward is the function lm-eval calls when the gate scores the task, called the same way (the reference as
`doc["answer"]`, the completion cut at the task's `until` strings as lm-eval cuts a generation): what the model is
trained toward and what it is judged on cannot drift apart. Each reward carries the sha256 of its code (the file
that defines it), recorded as provenance. A reward that raises on a completion scores 0 for it and is counted; the
run goes on, and the counts are reported at its end.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunegate.config import RewardSpec
from tunegate.errors import UserError

log = logging.getLogger(__name__)

Score = Callable[[list[dict[str, Any]], str, str], float]  # (prompt messages, completion text, reference) -> reward


@dataclass
class Reward:
    """One reward: its name (TRL logs rewards/<name>/mean and /std), its function, its weight, its code's sha256."""

    name: str
    score: Score
    weight: float = 1.0
    code_sha256: str = ""
    errors: Counter = field(default_factory=Counter)  # exception type -> completions it raised on

    def batch(self) -> Callable[..., list[float]]:
        """The reward as TRL calls it: lists of prompts, completions and the dataset's `reference` column."""

        def reward(prompts, completions, reference, **_) -> list[float]:
            return [self.one(p, _text(c), r) for p, c, r in zip(prompts, completions, reference, strict=True)]

        reward.__name__ = self.name
        return reward

    def one(self, prompt: list[dict[str, Any]], completion: str, reference: str) -> float:
        try:
            return float(self.score(prompt, completion, reference))
        except Exception as err:  # noqa: BLE001 - a reward's own bug scores 0 for that completion, counted
            self.errors[type(err).__name__] += 1
            return 0.0


def _text(completion: Any) -> str:
    """A completion's text: TRL gives conversational completions as [{"role": "assistant", "content": ...}]."""
    if isinstance(completion, list):
        return "".join(str(m.get("content") or "") for m in completion if isinstance(m, dict))
    return str(completion)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def json_format(prompt: list[dict[str, Any]], completion: str, reference: str) -> float:
    """1.0 when the completion parses as a JSON object holding every key of the reference's object; 0.5 for
    another JSON object; 0 otherwise."""
    try:
        got = json.loads(completion.strip())
    except (json.JSONDecodeError, RecursionError):
        return 0.0
    if not isinstance(got, dict):
        return 0.0
    try:
        want = json.loads(reference)
    except (json.JSONDecodeError, RecursionError):
        want = None
    return 1.0 if isinstance(want, dict) and set(want) <= set(got) else 0.5


FORMATS: dict[str, Score] = {"json": json_format}


def scorer(spec: str, tasks_dir: Path) -> Reward:
    """The reward `<task>/<metric>`: the task YAML's `process_results` function, loaded from the task's folder."""
    from tunegate.consistency import merged_task
    from tunegate.evaluation import FunctionTag, task_yaml

    task, metric = spec.split("/")
    found = [(p, d) for p in sorted(tasks_dir.glob("*.yaml")) if (d := task_yaml(p)).get("task") == task]
    if not found:
        raise UserError(f"train.grpo.rewards: scorer {spec}: no task {task!r} in {tasks_dir}")
    path, doc = found[0]
    doc = merged_task(path, doc)  # with the files it includes, as lm-eval reads it
    until = (doc.get("generation_kwargs") or {}).get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    function = doc.get("process_results")
    if not isinstance(function, FunctionTag) or "." not in function:
        raise UserError(f"{path}: process_results is not `!function <module>.<name>`: no scorer to reward with")
    module_name, name = function.rsplit(".", 1)
    source = path.parent / f"{module_name.replace('.', '/')}.py"
    fn = getattr(_load_file(source), name, None)
    if not callable(fn):
        raise UserError(f"{source}: no function {name} (named by {path} as its process_results)")
    try:
        returned = fn({"answer": "{}"}, [""])
    except Exception:  # noqa: BLE001 - a scorer that needs a real item: its metric names are checked on use
        returned = None
    if isinstance(returned, dict) and metric not in returned:
        raise UserError(f"train.grpo.rewards: scorer {spec}: {function} returns {sorted(returned)}, not {metric}")

    def score(prompt: list[dict[str, Any]], completion: str, reference: str) -> float:
        return fn({"answer": reference}, [_cut(completion, until)])[metric]

    return Reward(spec, score, code_sha256=_sha256(source))


def _cut(text: str, until: list[str]) -> str:
    """The completion up to the first stop string, as lm-eval cuts a generation."""
    for stop in until:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


def _load_file(path: Path):
    """A scorer module by its file (evals/tasks/utils.py), as lm-eval loads it, under a name of its own."""
    if not path.is_file():
        raise UserError(f"{path}: missing (named by a task's process_results)")
    spec = importlib.util.spec_from_file_location(f"tunegate_scorers_{_sha256(path)[:12]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def user_function(spec: str) -> Reward:
    """The reward `module:function`, imported from the project root."""
    module_name, name = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # noqa: BLE001 - whatever the import raised, named in one line
        raise UserError(f"train.grpo.rewards: function {spec}: cannot import {module_name} ({err})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"train.grpo.rewards: function {spec}: {module_name} has no function {name}")
    source = inspect.getsourcefile(fn)
    return Reward(spec, fn, code_sha256=_sha256(Path(source)) if source else "")


def build(specs: list[RewardSpec], tasks_dir: Path) -> list[Reward]:
    """train.grpo.rewards -> Rewards, each checked now (task, metric, module, function), before any weights load."""
    rewards = []
    for spec in specs:
        if spec.scorer is not None:
            reward = scorer(spec.scorer, tasks_dir)
        elif spec.format is not None:
            reward = Reward(f"format:{spec.format}", FORMATS[spec.format], code_sha256=_sha256(Path(__file__)))
        else:
            reward = user_function(spec.function)
        reward.weight = spec.weight
        rewards.append(reward)
    return rewards


def report_errors(rewards: list[Reward]) -> dict[str, int]:
    """Completions each reward raised on (scored 0), said in one warning line each; {name: count}."""
    counts = {}
    for r in rewards:
        if r.errors:
            total = sum(r.errors.values())
            counts[r.name] = total
            kinds = ", ".join(f"{k} {n}" for k, n in r.errors.most_common())
            log.warning("train: reward %s raised on %d completions, scored 0 for them (%s)", r.name, total, kinds)
    return counts
