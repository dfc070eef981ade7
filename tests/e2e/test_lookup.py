"""The demo's lookup variant end to end (demo/lookup.py): a task that retrieval from the training rows already solves.

A fresh copy of the project (its demo base restored from the session's DVC cache), `tunegate demo-lookup`, then
`dvc repro` as a user runs them: the base given the two training rows most like each question answers it, a
fine-tune on the same rows does not beat that, and the gate fails naming retrieval as the cheaper path.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.e2e.conftest import copy_project, sh

pytestmark = pytest.mark.slow

MODEL = "tunegate-lookup"
CHECK = "lookup_gen/exact"


@pytest.fixture(scope="module")
def lookup(project, tmp_path_factory):
    """The variant after `tunegate demo-lookup` and one `dvc repro`: (project, the two commands' console)."""
    path = copy_project(tmp_path_factory.mktemp("lookup"))
    cache = sh(project, "dvc", "cache", "dir").stdout.strip()  # the session's shared cache
    sh(path, "dvc", "config", "--local", "cache.dir", cache)
    sh(path, "dvc", "repro", "base")  # the demo base, from the run cache the session's first build filled
    made = sh(path, "tunegate", "demo-lookup")
    run = sh(path, "dvc", "repro")
    return path, made.stdout + made.stderr + run.stdout + run.stderr


def test_retrieval_already_solves_it_and_the_gate_names_the_cheaper_path(lookup):
    from mlflow import MlflowClient

    path, console = lookup
    verdict = json.loads((path / "reports/gate/verdict.json").read_text())
    assert verdict["passed"] is False
    line = next(x for x in verdict["lines"] if f"{CHECK} vs retrieval-2:" in x)
    assert line.startswith("FAIL target") and "fine-tuning does not beat prompting with retrieval of 2 examples" in line
    scores = verdict["baselines"]
    assert scores["retrieval-2"][CHECK] >= 0.8  # the base reads the answer off the rows about the same order
    assert scores["prompt"][CHECK] <= 0.05 and scores["few_shot-2"][CHECK] <= 0.3  # instructions, random rows: no
    against_base = next(c for c in verdict["checks"] if c["task"] == "lookup_gen" and c["against"] == "base")
    assert against_base["candidate"] < scores["retrieval-2"][CHECK]
    recommendation = verdict["recommendation"]
    assert recommendation.startswith("The cheaper path: prompting with retrieval of 2 examples gets")
    costs = verdict["costs"]  # the cost side of the recommendation: examples at every request
    assert costs["retrieval-2"]["prompt_tokens"] > 2 * costs["retrieval-2"]["plain_prompt_tokens"]
    assert f"prompt tokens per request against {costs['retrieval-2']['plain_prompt_tokens']:.0f}" in recommendation

    assert re.search(r"FAIL target\s+lookup_gen/exact vs retrieval-2: ", console), console[-3000:]
    assert "GATE FAILED: tunegate-lookup v1 registered WITHOUT the champion alias" in console
    assert "The cheaper path: prompting with retrieval of 2 examples" in console

    uri = f"sqlite:///{path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (version,) = client.search_model_versions(f"name = '{MODEL}'")
    assert version.tags["gate_passed"] == "false" and not version.aliases
    assert float(version.tags["eval.baseline.retrieval-2.lookup_gen.exact"]) == pytest.approx(
        scores["retrieval-2"][CHECK], abs=1e-3
    )
    assert recommendation in version.description


def test_the_examples_are_training_rows_about_the_same_order_never_eval_items(lookup):
    """Every retrieval prompt shows two rows the dedup stage kept, asked in training wordings, before the question;
    no eval item is ever among them; most name the question's own order."""
    from tunegate.evaluation import load_samples
    from tunegate.io import read_jsonl

    path, _ = lookup
    items = read_jsonl(path / "evals/data/lookup_gen.jsonl")
    questions = [item["message"] for item in items]
    kept = {row["messages"][0]["content"] for row in read_jsonl(path / "data/dedup/domain.jsonl")}
    same_order = 0
    samples = load_samples(path / "reports/eval_baselines/retrieval-2")["lookup_gen"]
    assert len(samples) == len(items)
    for s in samples:
        question = items[s["doc_id"]]["message"]
        head = s["prompt"][: s["prompt"].rindex(question)]
        assert not any(q in head for q in questions), s["doc_id"]
        shown = [q for q in kept if q in head]
        assert len(shown) == 2, (s["doc_id"], shown)
        number = re.search(r"\d+", question).group()
        same_order += all(number in q for q in shown)
    assert same_order >= 0.9 * len(samples)
