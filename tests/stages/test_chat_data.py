"""OpenAI-format chat data end to end: content parts, names, tool calls and tool results, a tools list and
per-turn weights are read (nothing valid quarantined, every bad shape with its own reason), seen by dedup
and the mix, and trained on every assistant turn whose weight is not 0.

The loss mask is checked token by token against an independent oracle: transformers' own assistant mask
from the demo template's `{% generation %}` markers, with the weight-0 turns taken out.
"""

from __future__ import annotations

import copy
import json
import random
import string

import pytest

from stages import dedup, mix, train, validate
from tests.conftest import ROOT
from tests.tiny import TRAINABLE, build_base, tiny
from tunegate.chat import Renderer, template_messages, tokenize, tool_support
from tunegate.config import Dedup, Lora, Mix, Source, Train, Validate
from tunegate.io import read_jsonl

TINY = tiny(**TRAINABLE, max_position=512, steps=10, warmup_steps=2)
N_VALID = 60
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name.replace('_', ' ')} by id",
            "parameters": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]},
        },
    }
    for name in ("lookup_order", "track_parcel")
]


def _words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 7))) for _ in range(n))


def conversation(rng: random.Random) -> dict:
    """A valid OpenAI-format conversation: optional system turn, 1-3 user turns, each answered after 0-2
    tool rounds of 1-2 calls; content as a string or text parts; names and weights here and there."""
    msgs: list[dict] = []
    if rng.random() < 0.3:
        msgs.append({"role": "system", "content": _words(rng, 6)})
    used_tools = False
    for t in range(rng.randint(1, 3)):
        user: dict = {"role": "user", "content": _words(rng, 8)}
        if rng.random() < 0.3:
            user["content"] = [{"type": "text", "text": _words(rng, 4)}, {"type": "text", "text": _words(rng, 4)}]
        if rng.random() < 0.2:
            user["name"] = rng.choice(["alice", "bob"])
        msgs.append(user)
        for r in range(rng.choice([0, 0, 1, 2])):
            used_tools = True
            calls = [
                {
                    "id": f"call_{t}_{r}_{k}_{rng.randint(0, 10**6)}",
                    "type": "function",
                    "function": {"name": rng.choice(TOOLS)["function"]["name"], "arguments": json.dumps({"id": k})},
                }
                for k in range(rng.randint(1, 2))
            ]
            call: dict = {"role": "assistant", "content": None, "tool_calls": calls}
            if rng.random() < 0.3:
                call["weight"] = rng.choice([0, 1])
            msgs.append(call)
            msgs += [{"role": "tool", "tool_call_id": c["id"], "content": _words(rng, 3)} for c in calls]
        answer: dict = {"role": "assistant", "content": _words(rng, 7)}
        if rng.random() < 0.4:
            answer["weight"] = rng.choice([0, 1])
        msgs.append(answer)
    if all(m.get("weight") == 0 for m in msgs if m["role"] == "assistant"):
        msgs[-1]["weight"] = 1
    row: dict = {"messages": msgs}
    if used_tools:
        row["tools"] = TOOLS
    return row


# Each invalid shape of the format, with the reason it must be quarantined under.
INVALID = {
    "non_text_content": lambda: {
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
            {"role": "assistant", "content": "a cat"},
        ]
    },
    "bad_weight": lambda: {
        "messages": [{"role": "user", "content": "hi", "weight": 1}, {"role": "assistant", "content": "hello"}]
    },
    "no_trained_turn": lambda: {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "weight": 0}]
    },
    "bad_tool_call": lambda: {
        "messages": [
            {"role": "user", "content": "where is my parcel"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "track", "arguments": "{oops"}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "in transit"},
            {"role": "assistant", "content": "in transit"},
        ]
    },
    "wrong_role": lambda: {
        "messages": [
            {"role": "user", "content": "where is my parcel"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "c9", "type": "function", "function": {"name": "track", "arguments": "{}"}}],
            },
            {"role": "user", "content": "hello?"},
            {"role": "assistant", "content": "in transit"},
        ]
    },
}
UNANSWERED_CALL = {  # a tool result that names no call before it
    "messages": [
        {"role": "user", "content": "where is my parcel"},
        {"role": "tool", "tool_call_id": "c1", "content": "in transit"},
        {"role": "assistant", "content": "in transit"},
    ]
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_base(tmp_path_factory.mktemp("chat-base"), TINY, rows=600, seed=3)


@pytest.fixture(scope="module")
def tok(base):
    from tunegate.models import load_tokenizer

    return load_tokenizer(base)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    rng = random.Random(7)
    valid = [conversation(rng) for _ in range(N_VALID)]
    exact_copy = copy.deepcopy(next(r for r in valid if "tools" in r))
    other_args = copy.deepcopy(exact_copy)  # the same words, another tool argument: not a duplicate
    call = next(m for m in other_args["messages"] if m.get("tool_calls"))
    call["tool_calls"][0]["function"]["arguments"] = json.dumps({"id": 99})
    invalid = [(reason, make()) for reason, make in INVALID.items()] + [("bad_tool_call", UNANSWERED_CALL)]
    prefs = [
        {
            "prompt": [
                {"role": "system", "content": _words(rng, 5)},
                {"role": "user", "content": _words(rng, 6)},
                *(
                    [
                        {
                            "role": "assistant",
                            "content": "",
                            "tool_calls": [
                                {
                                    "id": f"p{i}",
                                    "type": "function",
                                    "function": {"name": "lookup_order", "arguments": {"id": i}},
                                }
                            ],
                        },
                        {"role": "tool", "tool_call_id": f"p{i}", "content": _words(rng, 3)},
                    ]
                    if i % 2
                    else []
                ),
            ],
            "chosen": [{"role": "assistant", "content": _words(rng, 5)}],
            "rejected": [{"role": "assistant", "content": _words(rng, 5)}],
            **({"tools": TOOLS} if i % 2 else {}),
        }
        for i in range(12)
    ]
    d = tmp_path_factory.mktemp("chat-data")
    lines = [*valid, exact_copy, other_args, *(row for _, row in invalid)]
    (d / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    general = [
        {"prompt": r["prompt"], "completion": r["completion"]}
        for r in read_jsonl(ROOT / "data/pretrain/general.jsonl")[:40]
    ]
    (d / "general.jsonl").write_text("".join(json.dumps(r) + "\n" for r in general))
    (d / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))
    sources = {
        "chat": Source(path=str(d / "chat.jsonl"), role="domain"),
        "general": Source(path=str(d / "general.jsonl"), role="general"),
        "prefs": Source(path=str(d / "prefs.jsonl"), role="preference"),
    }
    return sources, valid, invalid, prefs


@pytest.fixture(scope="module")
def validated(files, tok, tmp_path_factory):
    sources = files[0]
    out = tmp_path_factory.mktemp("chat-validated")
    metrics = validate.run(Validate(max_tokens=1024, max_invalid_share=0.5), sources, tok, out)
    return out, metrics


def test_every_valid_shape_is_kept_and_every_invalid_one_named(files, validated):
    _, valid, invalid, prefs = files
    out, metrics = validated
    quarantine = read_jsonl(out / validate.QUARANTINE)
    first_bad = N_VALID + 2 + 1  # file line of the first invalid row
    assert {(q["line"], q["reason"]) for q in quarantine if q["source"] == "chat"} == {
        (first_bad + i, reason) for i, (reason, _) in enumerate(invalid)
    }
    assert not [q for q in quarantine if q["source"] == "prefs"]
    assert metrics["sources"]["chat"] == {**metrics["sources"]["chat"], "in": len(valid) + 2 + len(invalid)}
    assert metrics["sources"]["chat"]["kept"] == len(valid) + 2 and metrics["conserved"]
    kept = read_jsonl(out / "chat.jsonl")
    # read in full: parts joined, calls parsed, ids, names, weights and tools kept
    for row, raw in zip(kept, valid, strict=False):
        assert [m["role"] for m in row["messages"]] == [m["role"] for m in raw["messages"]]
        for m, r in zip(row["messages"], raw["messages"], strict=True):
            content = r["content"] or ""
            if isinstance(content, list):
                content = "\n".join(p["text"] for p in content)
            assert m["content"] == content
            assert m.get("weight") == r.get("weight") and m.get("name") == r.get("name")
            assert m.get("tool_call_id") == r.get("tool_call_id")
            if r.get("tool_calls"):
                assert [c["function"]["arguments"] for c in m["tool_calls"]] == [
                    json.loads(c["function"]["arguments"]) for c in r["tool_calls"]
                ]
        assert row.get("tools") == raw.get("tools")


def oracle_mask(tok, messages: list[dict], tools) -> tuple[list[int], list[int]]:
    """transformers' assistant mask from the template's generation markers, weight-0 turns removed."""
    enc = tok.apply_chat_template(
        template_messages(messages), tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    mask = list(enc["assistant_masks"])
    weights = [m.get("weight") for m in messages if m["role"] == "assistant"]
    runs, j = [], 0
    while j < len(mask):
        if mask[j]:
            start = j
            while j < len(mask) and mask[j]:
                j += 1
            runs.append((start, j))
        j += 1
    assert len(runs) == len(weights)  # one run per assistant turn
    for (a, b), weight in zip(runs, weights, strict=True):
        if weight == 0:
            mask[a:b] = [0] * (b - a)
    return list(enc["input_ids"]), mask


def test_loss_mask_is_every_assistant_turn_with_weight_not_zero(validated, tok):
    out, _ = validated
    rows = read_jsonl(out / "chat.jsonl")
    render = Renderer(tok)
    multi = 0
    for row in rows:
        ids, mask, stable = tokenize(tok, render, row["messages"], row.get("tools"))
        assert stable
        assert (ids, mask) == oracle_mask(tok, row["messages"], row.get("tools"))
        trained = [m for m in row["messages"] if m["role"] == "assistant" and m.get("weight") != 0]
        runs = [j for j, k in enumerate(mask) if k and (j == 0 or not mask[j - 1])]
        assert len(runs) == len(trained)  # a multi-turn row contributes loss on each of its assistant turns
        for start, msg in zip(runs, trained, strict=True):
            end = next((j for j in range(start, len(mask)) if not mask[j]), len(mask))
            text = tok.decode(ids[start:end])  # exactly the turn: its text, its calls, the end-of-turn marker
            calls = "".join(f"<tool_call>{json.dumps(c['function'])}</tool_call>" for c in msg.get("tool_calls") or [])
            assert text == msg["content"] + calls + "<|end|>"
        multi += len(trained) > 1
    assert multi >= 10


def test_single_turn_rows_tokenise_exactly_as_trl_prompt_completion(base, tok, tmp_path):
    """For the rows the demo trains on, the stage's own tokenisation is TRL's prompt/completion one (the
    same ids and labels), so what the demo learns did not change."""
    from tunegate.formats import load_source
    from tunegate.models import load_model

    rows = [
        r
        for r in load_source("domain", ROOT / "data/raw/domain.jsonl")[0]
        if [m["role"] for m in r["messages"]] == ["user", "assistant"]
    ][:16]
    cfg = Train(adapter="lora", lora=Lora(r=4, alpha=8), args={"max_steps": 1, "max_length": 512})
    config = train._trainer_config(cfg, train._trainer_args(cfg, 1, tmp_path / "ckpt", with_probe=False))
    _, trainer_cls = train.METHODS["sft"].classes()
    model = load_model(base)

    def prepared(dataset):
        trainer = trainer_cls(model=model, args=config, train_dataset=dataset, processing_class=tok)
        return [(r["input_ids"], r["labels"]) for r in trainer.train_dataset]

    from datasets import Dataset

    ours = prepared(Dataset.from_list(train.sft_examples(rows, tok)[0]))
    trl = prepared(Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows]))
    assert ours == trl


def test_preference_pairs_tokenise_exactly_as_trl(base, tok, tmp_path):
    from datasets import Dataset

    from tunegate.formats import load_source
    from tunegate.models import load_model

    rows = [r for r in load_source("p", ROOT / "data/raw/preferences.jsonl")[0] if r["chosen"] != r["rejected"]][:8]
    cfg = Train(method="dpo", adapter="lora", lora=Lora(r=4, alpha=8), args={"max_steps": 1, "max_length": 512})
    config = train._trainer_config(cfg, train._trainer_args(cfg, 1, tmp_path / "ckpt", with_probe=False))
    _, trainer_cls = train.METHODS["dpo"].classes()
    model = load_model(base)
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")

    def prepared(dataset):
        trainer = trainer_cls(
            model=model, args=config, train_dataset=dataset, processing_class=tok, peft_config=train.peft_config(cfg)
        )
        return [tuple(r[k] for k in keys) for r in trainer.train_dataset]

    ours = prepared(Dataset.from_list(train.preference_examples(rows, tok)))
    trl = prepared(Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]))
    assert ours == trl


def test_dedup_and_mix_see_tool_calls(files, validated, tok):
    out, _ = validated
    sources = files[0]
    rows = {name: read_jsonl(out / f"{name}.jsonl") for name in sources}
    kept, dropped, _ = dedup.run(Dedup(), rows, [], 1)
    # the exact copy is an exact duplicate; the copy with another tool argument only a near one, so tool
    # calls are part of the text dedup compares
    assert sorted(d["reason"] for d in dropped if d["source"] == "chat") == ["exact_duplicate", "near_duplicate"]
    assert len(kept["chat"]) == len(rows["chat"]) - 2
    render = Renderer(tok)
    n_tokens = {}

    def count(row):
        from tunegate.chat import token_count

        n = token_count(tok, render, row["messages"], row.get("tools"))
        n_tokens[row["id"]] = n
        return n

    train_rows, prefs, _, manifest = mix.run(Mix(general_ratio=0.2), sources, kept, count, 1)
    assert manifest["tokens"] == sum(n_tokens[r["id"]] for r in train_rows)
    with_tools = [r for r in train_rows if r.get("tools")]
    assert with_tools and len(prefs) == 12
    # the mix weighs a tool row by its rendered length, tools list and calls included
    row = with_tools[0]
    assert n_tokens[row["id"]] > len(tok(" ".join(m["content"] for m in row["messages"]))["input_ids"])


def test_sft_and_dpo_train_on_tool_conversations(files, validated, base, tmp_path):
    out, _ = validated
    rows = read_jsonl(out / "chat.jsonl")
    prefs = read_jsonl(out / "prefs.jsonl")
    args = {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 5e-3, "max_length": 512}
    for method in ("sft", "dpo"):
        cfg = Train(method=method, adapter="lora", lora=Lora(r=4, alpha=8), args=args, truncate=True)
        metrics = train.run(
            cfg,
            1,
            train.Inputs(base, rows, prefs),
            train.Outputs(tmp_path / method, tmp_path / f"{method}-ckpt", tmp_path / f"{method}.csv"),
        )
        assert metrics["steps"] == 2 and metrics["train_loss"] > 0


def test_a_template_without_tools_quarantines_tool_rows_in_one_line(files, tok, tmp_path, caplog):
    plain = copy.deepcopy(tok)
    plain.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    why = tool_support(plain)
    assert why and "tool calls" in why and "tools list" in why
    assert tool_support(tok) is None
    sources = {"chat": files[0]["chat"]}
    metrics = validate.run(Validate(max_tokens=1024, max_invalid_share=1.0), sources, plain, tmp_path / "out")
    quarantine = read_jsonl(tmp_path / "out" / validate.QUARANTINE)
    # the valid tool rows, their two copies, and the row with a call no tool answers (read, then refused here)
    tool_rows = sum(1 for r in files[1] if "tools" in r) + 2 + 1
    no_tools = [q for q in quarantine if q["reason"] == validate.NO_TOOLS]
    assert len(no_tools) == tool_rows
    assert f"chat template of {plain.name_or_path}" in no_tools[0]["detail"]
    assert metrics["sources"]["chat"]["in"] == metrics["sources"]["chat"]["kept"] + len(quarantine)
    line = [
        r.getMessage() for r in caplog.records if validate.NO_TOOLS in r.getMessage() or "tool rows" in r.getMessage()
    ]
    assert len(line) == 1 and "\n" not in line[0]


def test_secrets_in_tool_arguments_are_masked(tok, tmp_path):
    row = {
        "messages": [
            {"role": "user", "content": "email my receipt"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "send", "arguments": json.dumps({"to": "jane.doe@example.com"})},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sent"},
            {"role": "assistant", "content": "done"},
        ],
        "tools": TOOLS,
    }
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps(row) + "\n")
    metrics = validate.run(Validate(max_tokens=1024), {"s": Source(path=str(path), role="domain")}, tok, tmp_path / "o")
    kept = read_jsonl(tmp_path / "o" / "s.jsonl")
    assert metrics["sources"]["s"]["pii_masked"] == {"pii_email": 1}
    assert kept[0]["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"to": "[EMAIL]"}


def test_rows_longer_than_max_length_are_counted_and_refused_unless_truncating(validated, base, tmp_path):
    from tunegate.errors import UserError

    out, _ = validated
    rows = read_jsonl(out / "chat.jsonl")
    tok_lengths = sorted(len(train.sft_examples([r], _tok(base))[0][0]["input_ids"]) for r in rows)
    limit = tok_lengths[len(tok_lengths) // 2]
    over = sum(n > limit for n in tok_lengths)
    args = {"max_steps": 1, "per_device_train_batch_size": 4, "max_length": limit}
    cfg = Train(adapter="lora", lora=Lora(r=4, alpha=8), args=args)
    outputs = train.Outputs(tmp_path / "o", tmp_path / "c", tmp_path / "p.csv")
    message = (
        f"^train: {over} of {len(rows)} rows are longer than train.args.max_length {limit} tokens "
        f"\\(longest {tok_lengths[-1]}\\); training would cut them"
    )
    with pytest.raises(UserError, match=message):
        train.run(cfg, 1, train.Inputs(base, rows), outputs)
    with pytest.raises(UserError, match=message):  # packed, they would be cut just the same (TRL's best-fit decreasing)
        train.run(cfg.model_copy(update={"packing": True}), 1, train.Inputs(base, rows), outputs)
    cut = train.run(cfg.model_copy(update={"truncate": True}), 1, train.Inputs(base, rows), outputs)
    assert cut["steps"] == 1


def _tok(base):
    from tunegate.models import load_tokenizer

    return load_tokenizer(base)
