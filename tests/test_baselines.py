"""Baselines: examples from training rows only, retrieval by similarity, prompts trimmed to the context by whole
examples, and the gate's judgement of the candidate against the best of them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.tiny import build_base, tiny
from tunegate import baselines
from tunegate.config import Baselines, Config, parse_config
from tunegate.errors import UserError
from tunegate.gate import Check, Policy, decide, describe_baseline, flips
from tunegate.io import read_jsonl, write_jsonl


def row(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


POOL_ROWS = [
    row("I want my money back for the lamp, order 1.", '{"intent": "refund"}'),
    row("Where is my kettle? It has not arrived.", '{"intent": "track"}'),
    row("Please cancel my chair order 3.", '{"intent": "cancel"}'),
    row("The camera came broken, I want to complain.", '{"intent": "complaint"}'),
    row("Replace the jacket please, wrong size.", '{"intent": "replace"}'),
]


def test_rows_become_example_turns_only_when_they_can_be_shown():
    system = {"role": "system", "content": "be brief"}
    assert baselines.example_turns({"messages": [system, *POOL_ROWS[0]["messages"]]}) == POOL_ROWS[0]["messages"]
    trailing = {"messages": [*POOL_ROWS[0]["messages"], {"role": "user", "content": "thanks"}]}
    assert baselines.example_turns(trailing) == POOL_ROWS[0]["messages"]
    tool = {"messages": [POOL_ROWS[0]["messages"][0], {"role": "assistant", "content": "", "tool_calls": [{}]}]}
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": "x"},
        ]
    }
    assert baselines.example_turns(tool) is None and baselines.example_turns(parts) is None
    assert baselines.example_turns({"messages": [{"role": "user", "content": "only a question"}]}) is None


def test_retrieval_puts_the_most_similar_row_nearest_the_question_and_never_the_question_itself():
    pool = [baselines.example_turns(r) for r in POOL_ROWS]
    retriever = baselines.Retriever(pool)
    nearest = retriever.nearest("My lamp is broken, I want my money back, order 9.", 2)
    assert nearest[-1] == pool[0] and len(nearest) == 2
    assert retriever.nearest("Please cancel my chair order 3.", 5)[-1] != pool[2]  # the item itself is skipped
    assert pool[2] not in retriever.nearest("please CANCEL my chair, order 3", 5)  # equal up to case and punctuation
    assert retriever.nearest("the and of", 3) == []  # stop words only: nothing to match on
    assert retriever.nearest("lamp money", 3) == baselines.Retriever(pool).nearest("lamp money", 3)


@pytest.fixture(scope="module")
def embedder(tmp_path_factory, manifest):
    """An embedding model whose text embedding is the mean of its tokens' (random, nearly orthogonal) vectors: no
    layer, the final norm only, so cosine similarity follows the tokens two texts share. The base's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    folder = tmp_path_factory.mktemp("embedder")
    tokenizer = AutoTokenizer.from_pretrained(manifest["path"])
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=512, intermediate_size=64, num_hidden_layers=0, num_attention_heads=4
    )
    LlamaModel(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def test_embedding_retrieval_ranks_by_the_embedder_and_never_returns_the_question_itself(embedder):
    pool = [baselines.example_turns(r) for r in POOL_ROWS]
    retriever = baselines.EmbeddingRetriever(pool, str(embedder))
    nearest = retriever.nearest("My lamp is broken, I want my money back, order 9.", 2)
    assert nearest[-1] == pool[0] and len(nearest) == 2  # the row sharing the most tokens, nearest the question
    assert retriever.nearest("Where is my kettle? Not arrived yet.", 1) == [pool[1]]
    assert pool[2] not in retriever.nearest("please CANCEL my chair, order 3", 5)  # the item itself, up to case
    assert len(retriever.nearest("please CANCEL my chair, order 3", 5)) == 4
    assert retriever.nearest("lamp money", 3) == baselines.EmbeddingRetriever(pool, str(embedder)).nearest(
        "lamp money", 3
    )
    identity = retriever.identity
    assert identity["ranking"] == "embedding" and identity["embedder"] == str(embedder)
    assert len(identity["sha256"]) == 64 and identity["revision"]  # which embedder, down to its files
    assert baselines.Retriever(pool).identity == {"ranking": "bm25"}


def test_an_embedder_that_cannot_be_loaded_is_one_line_naming_the_setting(tmp_path, monkeypatch):
    pool = [baselines.example_turns(r) for r in POOL_ROWS]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"^baselines.embedder 'acme/no-such-embedder' \(revision 'main'\): cannot"):
        baselines.EmbeddingRetriever(pool, "acme/no-such-embedder")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UserError, match=r"^baselines.embedder .*: no .safetensors weights .*pickle-based"):
        baselines.EmbeddingRetriever(pool, str(pickled))


def test_few_shot_draw_is_seeded_and_skips_the_item_itself():
    pool = [baselines.example_turns(r) for r in POOL_ROWS]
    settings = Baselines(tasks=["support_gen"], few_shot=3, retrieval=0)
    [prompt, few] = baselines.prompters(settings, "Answer as JSON.", pool, seed=7)
    assert prompt.name == "prompt" and few.name == "few_shot-3"
    drawn = few.examples("anything")
    assert len(drawn) == 3 and drawn == baselines.prompters(settings, None, pool, seed=7)[1].examples("anything")
    question = drawn[0][0]["content"]
    assert drawn[0] not in few.examples(question)
    messages = few.messages([{"role": "user", "content": "q"}], drawn)
    assert messages[0] == {"role": "system", "content": "Answer as JSON."} and messages[-1]["content"] == "q"
    assert len(messages) == 2 + 2 * 3


def test_names_follow_the_settings():
    assert Baselines().names() == []  # no tasks: off
    assert Baselines(tasks=["t"]).names() == ["prompt", "few_shot-5", "retrieval-5"]
    assert Baselines(tasks=["t"], prompt=False, few_shot=0, retrieval=3).names() == ["retrieval-3"]
    assert describe_baseline("retrieval-5") == "prompting with retrieval of 5 examples"
    assert describe_baseline("few_shot-2") == "prompting with 2 examples"


def _config(tmp_path, **baseline_changes) -> Config:
    data = {
        "sources": {"domain": {"path": "d.jsonl", "role": "domain"}, "general": {"path": "g.jsonl", "role": "general"}}
    }
    raw = {
        "data": data,
        "eval": {"tasks": ["support_gen"], "max_gen_toks": 16, "batch_size": 8},
        "baselines": {"tasks": ["support_gen"], "few_shot": 4, "retrieval": 3, **baseline_changes},
        "paths": {
            "evals": str(ROOT / "evals"),
            "dedup": str(tmp_path / "dedup"),
            "prompt": str(tmp_path / "prompt.md"),
        },
    }
    return parse_config(raw)


def _parsed(line: str) -> dict | None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:  # the raw demo data holds planted malformed lines
        return None
    return value if isinstance(value, dict) else None


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return build_base(tmp_path_factory.mktemp("base"), tiny(max_position=256))


def test_baselines_score_the_base_with_examples_from_training_rows_only_and_trim_whole_examples(
    manifest, tmp_path, monkeypatch
):
    """The examples shown are training rows, never an eval item (even one planted in the pool); prompts longer than
    the context lose whole examples, counted; every baseline's samples pair with the eval items."""
    from tunegate.paths import COSTS, RESULTS, SAMPLES, Layout

    monkeypatch.chdir(ROOT)
    eval_items = read_jsonl(ROOT / "evals/data/support_gen.jsonl")[:12]
    every_eval = read_jsonl(ROOT / "evals/data/support_gen.jsonl")
    training = [
        r
        for r in map(_parsed, (ROOT / "data/raw/domain.jsonl").read_text().splitlines()[:60])
        if r and baselines.example_turns(r)
    ]
    training = [r for r in training if not any(e["message"] in json.dumps(r) for e in every_eval)][:40]
    planted = [row(e["message"], e["answer"]) for e in eval_items[:3]]  # eval items that slipped into the data
    (tmp_path / "dedup").mkdir()
    write_jsonl(tmp_path / "dedup" / "domain.jsonl", [*training, *planted])
    write_jsonl(tmp_path / "dedup" / "general.jsonl", [row("What is the capital of Zyxland?", "Qorvath")])
    (tmp_path / "prompt.md").write_text("Reply with the ticket as JSON.\n")
    cfg = _config(tmp_path)
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"limit": 12})})
    out = tmp_path / "out"
    costs = baselines.run(cfg, manifest, Layout.of(cfg.paths), out)

    assert list(costs) == ["prompt", "few_shot-4", "retrieval-3"]
    assert json.loads((out / COSTS).read_text()).keys() == costs.keys()
    general_answers = {"Qorvath", "Zyxland"}
    for name in costs:
        samples = read_jsonl(out / name / SAMPLES / "support_gen.jsonl")
        assert [s["doc_id"] for s in samples] == list(range(12))
        assert json.loads((out / name / RESULTS).read_text())["examples_in_pool"] == len(training)
        for s in samples:
            item = eval_items[s["doc_id"]]
            head = s["prompt"][: s["prompt"].rindex(item["message"])]  # everything before the question
            assert not any(other["message"] in head for other in eval_items), (name, s["doc_id"])
            assert not any(answer in head for answer in general_answers)  # only domain rows are examples
            assert "Reply with the ticket as JSON." in s["prompt"]
    # 256 positions, 16 reserved for the answer: 4 examples of ~60 tokens do not fit; whole examples dropped
    few = costs["few_shot-4"]
    assert few["items_trimmed"] == 12 and few["examples_dropped"] > 0 and few["examples_shown"] < 4
    assert few["prompt_tokens"] + 16 <= 256 and few["prompt_tokens"] > costs["prompt"]["prompt_tokens"]
    assert costs["prompt"]["prompt_tokens"] > costs["prompt"]["plain_prompt_tokens"]
    assert costs["prompt"]["items_trimmed"] == 0
    assert costs["retrieval-3"]["retriever"] == "bm25" and "retriever" not in costs["few_shot-4"]


def test_the_baselines_scores_costs_and_retriever_are_tags_of_the_version():
    from tunegate.provenance import _baseline_and_reward_tags

    ranked = "embedding models/embedder@0123456789ab sha256:ba98"
    verdict = {
        "baselines": {"prompt": {"support_gen/json_fields": 0.5}, "retrieval-5": {"support_gen/json_fields": 0.6}},
        "costs": {"prompt": {"prompt_tokens": 40.0}, "retrieval-5": {"prompt_tokens": 300.0, "retriever": ranked}},
    }
    assert _baseline_and_reward_tags(verdict, {}) == {
        "eval.baseline.prompt.support_gen.json_fields": 0.5,
        "eval.baseline.prompt.prompt_tokens": 40.0,
        "eval.baseline.retrieval-5.support_gen.json_fields": 0.6,
        "eval.baseline.retrieval-5.prompt_tokens": 300.0,
        "eval.baseline.retrieval-5.retriever": ranked,
    }


def test_retrieval_by_an_embedder_shows_training_rows_only_and_records_the_embedder(
    manifest, embedder, tmp_path, monkeypatch
):
    from tunegate.paths import RESULTS, SAMPLES, Layout

    monkeypatch.chdir(ROOT)
    every_eval = read_jsonl(ROOT / "evals/data/support_gen.jsonl")
    eval_items = every_eval[:6]
    training = [r for r in map(_parsed, (ROOT / "data/raw/domain.jsonl").read_text().splitlines()[:60]) if r]
    training = [r for r in training if baselines.example_turns(r)]
    training = [r for r in training if not any(e["message"] in json.dumps(r) for e in every_eval)][:30]
    planted = [row(e["message"], e["answer"]) for e in eval_items[:3]]  # eval items that slipped into the data
    (tmp_path / "dedup").mkdir()
    write_jsonl(tmp_path / "dedup" / "domain.jsonl", [*training, *planted])
    write_jsonl(tmp_path / "dedup" / "general.jsonl", [row("What is the capital of Zyxland?", "Qorvath")])
    cfg = _config(tmp_path, prompt=False, few_shot=0, retrieval=2, embedder=str(embedder))
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"limit": 6})})
    costs = baselines.run(cfg, manifest, Layout.of(cfg.paths), tmp_path / "out")

    assert list(costs) == ["retrieval-2"] and costs["retrieval-2"]["examples_shown"] > 0
    results = json.loads((tmp_path / "out/retrieval-2" / RESULTS).read_text())
    assert results["retriever"]["ranking"] == "embedding" and len(results["retriever"]["sha256"]) == 64
    assert costs["retrieval-2"]["retriever"].startswith(f"embedding {embedder}@")  # the registry's tag
    for s in read_jsonl(tmp_path / "out/retrieval-2" / SAMPLES / "support_gen.jsonl"):
        head = s["prompt"][: s["prompt"].rindex(eval_items[s["doc_id"]]["message"])]
        assert not any(other["message"] in head for other in eval_items), s["doc_id"]
        assert "Qorvath" not in head


def test_a_missing_prompt_file_is_one_line(tmp_path, manifest):
    from tunegate.paths import Layout

    cfg = _config(tmp_path)
    with pytest.raises(UserError, match=r"prompt\.md: missing; write the instructions .* baselines\.prompt: false"):
        baselines.read_prompt(cfg.baselines, Layout.of(cfg.paths).prompt)
    assert baselines.read_prompt(cfg.baselines.model_copy(update={"prompt": False}), tmp_path / "nope") is None


# --- the gate against the baselines ---

TARGET = Check(task="t", metric="m", role="target", min_gain=0.1)
POLICY = Policy(checks=[TARGET], min_items=10)


def samples(values) -> dict:
    return {
        "t": [
            {"doc_id": i, "m": float(v), "output": f"out{i}", "target": f"ref{i}", "prompt": f"q{i}"}
            for i, v in enumerate(values)
        ]
    }


def test_the_candidate_must_beat_the_best_baseline_and_the_line_names_it():
    rng = np.random.default_rng(0)
    base = samples(np.zeros(100))
    candidate = samples(rng.random(100) < 0.8)
    weak, strong = samples(rng.random(100) < 0.3), samples(rng.random(100) < 0.85)
    verdict = decide(base, candidate, POLICY, 500, 1, baselines={"prompt": weak, "retrieval-5": strong})
    line = next(line for line in verdict["lines"] if "vs retrieval-5" in line)
    assert (
        line.startswith("FAIL target  t/m vs retrieval-5")
        and "fine-tuning does not beat prompting with retrieval" in line
    )
    assert not verdict["passed"] and verdict["failed"] == ["t/m vs retrieval-5"]
    assert not any("vs prompt" in line for line in verdict["lines"])  # judged against the best only
    assert verdict["baselines"]["prompt"]["t/m"] == pytest.approx(np.mean([s["m"] for s in weak["t"]]))
    passing = decide(base, candidate, POLICY, 500, 1, baselines={"prompt": weak})
    assert passing["passed"] and any(line.startswith("PASS target  t/m vs prompt") for line in passing["lines"])
    off = POLICY.model_copy(update={"baselines": POLICY.baselines.model_copy(update={"beat": False})})
    assert decide(base, candidate, off, 500, 1, baselines={"retrieval-5": strong})["passed"]


def test_against_a_baseline_the_gain_must_be_significant_and_reach_min_gain():
    """min_gain applies to the baseline comparison, and a mean gain whose lower bound is at zero fails."""
    base = samples(np.zeros(200))
    baseline = samples(np.r_[np.ones(100), np.zeros(100)])
    candidate = samples(np.r_[np.ones(100), np.ones(20), np.zeros(80)])  # +0.1 over the baseline, significant
    strict = POLICY.model_copy(update={"baselines": POLICY.baselines.model_copy(update={"min_gain": 0.15})})
    lenient = POLICY.model_copy(update={"baselines": POLICY.baselines.model_copy(update={"min_gain": 0.05})})
    assert not decide(base, candidate, strict, 500, 1, baselines={"prompt": baseline})["passed"]
    assert decide(base, candidate, lenient, 500, 1, baselines={"prompt": baseline})["passed"]
    tied = samples(np.r_[np.ones(100), np.zeros(100)])  # the same answers as the baseline: lower bound 0
    assert not decide(
        base,
        tied,
        POLICY.model_copy(update={"baselines": lenient.baselines.model_copy(update={"min_gain": 0.0})}),
        500,
        1,
        baselines={"prompt": baseline},
    )["passed"]


def test_flipped_items_are_exactly_the_items_whose_outcome_changed():
    rng = np.random.default_rng(3)
    ref, cand = samples(rng.random(60) < 0.5), samples(rng.random(60) < 0.6)
    got = flips(TARGET, ref, cand)
    lost = [i for i in range(60) if ref["t"][i]["m"] > cand["t"][i]["m"]]
    won = [i for i in range(60) if ref["t"][i]["m"] < cand["t"][i]["m"]]
    assert [x["doc_id"] for x in got["lost"]] == lost and [x["doc_id"] for x in got["won"]] == won
    first = got["lost"][0]
    assert first["prompt"] == f"q{first['doc_id']}" and first["target"] == f"ref{first['doc_id']}"
    assert (first["reference_score"], first["candidate_score"]) == (1.0, 0.0)
    lower = Check(task="t", metric="m", role="target", direction="lower")
    assert flips(lower, ref, cand)["won"] == got["lost"]


def test_the_report_names_the_cheaper_path_and_lists_what_flipped(tmp_path):
    """A candidate that loses to a baseline: the recommendation names it with its score and cost; the markdown and
    HTML reports carry the baselines' table, the cost chart and every lost item."""
    from stages.gate import flipped, recommendation
    from tunegate import gate_report

    rng = np.random.default_rng(5)
    base, candidate = samples(np.zeros(80)), samples(rng.random(80) < 0.5)
    strong = samples(rng.random(80) < 0.9)
    costs = {"retrieval-5": {"prompt_tokens": 212.0, "plain_prompt_tokens": 28.0, "examples_shown": 5.0,
                             "items": 80, "items_trimmed": 0, "examples_dropped": 0}}  # fmt: skip
    verdict = decide(base, candidate, POLICY, 500, 1, baselines={"retrieval-5": strong})
    verdict["costs"] = costs
    verdict["recommendation"] = recommendation(verdict, costs)
    assert verdict["recommendation"].startswith("The cheaper path: prompting with retrieval of 5 examples gets 0.")
    assert "at 212 prompt tokens per request against 28" in verdict["recommendation"]
    changed = flipped(verdict, POLICY, {"base": base, "retrieval-5": strong}, candidate)
    assert [f["against"] for f in changed] == ["base", "retrieval-5"]
    gate_report.chart(verdict, tmp_path / "chart.png")
    gate_report.cost_chart(gate_report.cost_points(verdict, costs), tmp_path / "cost.png")
    md = gate_report.markdown(verdict, changed, costs)
    lost = changed[1]["lost"]
    assert "## Against the cheaper alternatives" in md and "retrieval-5 (prompting with retrieval of 5 examples)" in md
    assert f"### t/m vs retrieval-5: lost {len(lost)}, won {len(changed[1]['won'])}" in md
    assert all(f"- doc {item['doc_id']}: 1.000 -> 0.000" in md for item in lost)
    page = gate_report.page(verdict, changed, costs, tmp_path)
    assert page.count("data:image/png;base64,") == 2 and "The cheaper path" in page
    assert recommendation(decide(base, candidate, POLICY, 500, 1), {}) is None
    # a baseline no better than the base (prompting gets nothing either) is not named as a path to ship
    weak = decide(base, samples(np.zeros(80)), POLICY, 500, 1, baselines={"retrieval-5": samples(np.zeros(80))})
    assert any(not c["passed"] and c["against"] == "retrieval-5" for c in weak["checks"])
    assert recommendation(weak, costs) is None


GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role'])"
    " + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def test_a_template_that_refuses_a_system_turn_is_given_the_instructions_in_the_first_user_turn(
    manifest, tmp_path, monkeypatch
):
    """lm-eval's own chat path drops a system turn the template refuses, instructions and all, so the prompt
    baseline would be the base with no prompt; the instructions go before the first user turn instead, as training
    rows get them (a real lm-eval run of the base)."""
    import shutil

    from tunegate.paths import COSTS, SAMPLES, Layout

    base = tmp_path / "gemma-like"
    shutil.copytree(manifest["path"], base)
    (base / "chat_template.jinja").write_text(GEMMA_TEMPLATE)
    monkeypatch.chdir(ROOT)
    (tmp_path / "dedup").mkdir()
    write_jsonl(tmp_path / "dedup" / "domain.jsonl", POOL_ROWS)
    write_jsonl(tmp_path / "dedup" / "general.jsonl", [row("What is the capital of Zyxland?", "Qorvath")])
    (tmp_path / "prompt.md").write_text("Reply with the ticket as JSON.\n")
    cfg = _config(tmp_path, few_shot=2, retrieval=0)
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"limit": 4})})
    out = tmp_path / "out"
    costs = baselines.run(cfg, {**manifest, "path": str(base)}, Layout.of(cfg.paths), out)
    items = read_jsonl(ROOT / "evals/data/support_gen.jsonl")[:4]
    for s in read_jsonl(out / "prompt" / SAMPLES / "support_gen.jsonl"):
        assert "<start_of_turn>system" not in s["prompt"]
        assert f"<start_of_turn>user\nReply with the ticket as JSON.\n\n{items[s['doc_id']]['message']}" in s["prompt"]
    for s in read_jsonl(out / "few_shot-2" / SAMPLES / "support_gen.jsonl"):  # in the first example's user turn
        first_user = s["prompt"][s["prompt"].index("<start_of_turn>user\n") :]
        assert first_user.startswith("<start_of_turn>user\nReply with the ticket as JSON.\n\n")
        assert s["prompt"].count("Reply with the ticket as JSON.") == 1 and first_user.count("<start_of_turn>user") >= 2
    assert costs["prompt"]["prompt_tokens"] > costs["prompt"]["plain_prompt_tokens"]
    assert json.loads((out / COSTS).read_text()).keys() == costs.keys()


def test_examples_go_before_an_items_own_earlier_turns():
    """An item held out of a multi-turn conversation comes with its earlier turns (utils.EarlierTurns): a baseline's
    instructions and the item's system text lead, the examples follow, then the item's conversation as it was."""
    example = [{"role": "user", "content": "Ticket 9: lost"}, {"role": "assistant", "content": "lost"}]
    chat = [
        {"role": "system", "content": "Desk 3."},
        {"role": "user", "content": "Ticket 3: late"},
        {"role": "assistant", "content": "late"},
        {"role": "user", "content": "And now?"},
    ]
    prompter = baselines.Prompter("few_shot-1", "Reply with one word.", lambda query: [example])
    assert prompter.messages(chat, [example]) == [
        {"role": "system", "content": "Reply with one word.\n\nDesk 3."},
        *example,
        *chat[1:],
    ]
