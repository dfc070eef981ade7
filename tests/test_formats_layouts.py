"""The layouts other tools export (ShareGPT, OpenAI preference, Gemini / Vertex AI, implicit-prompt and HH pairs,
KTO's labelled answers, the developer role, legacy function calls): a generated corpus in each layout reads as
exactly the rows of the same corpus in OpenAI's format, and each malformed variant is quarantined with its reason."""

from __future__ import annotations

import json
import random

import pytest

from tunegate.formats import load_source

N = 120


def corpus(seed: int = 0) -> list[dict]:
    """OpenAI chat rows of every kind a layout can carry: a system turn or none, one to three exchanges, tool calls
    with their results and the tools list."""
    rng = random.Random(seed)
    rows = []
    for i in range(N):
        messages = [{"role": "system", "content": f"You are agent {i}."}] if rng.random() < 0.4 else []
        for turn in range(rng.randint(1, 3)):
            messages.append(
                {"role": "user", "content": f"question {i}.{turn}: {rng.choice(['refund', 'track', 'cancel'])}"}
            )
            if rng.random() < 0.2:
                args = {"order": str(rng.randint(10000, 99999))}
                call = {"type": "function", "function": {"name": "lookup", "arguments": args}}
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
                messages.append({"role": "tool", "content": json.dumps({"status": "shipped"})})
            messages.append({"role": "assistant", "content": f"answer {i}.{turn}"})
        row = {"messages": messages}
        if any("tool_calls" in m for m in messages):
            row["tools"] = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
        rows.append(row)
    return rows


def pairs(seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(N):
        prompt = [{"role": "system", "content": "Be brief."}] if rng.random() < 0.3 else []
        prompt += [{"role": "user", "content": f"prompt {i}"}]
        if rng.random() < 0.3:  # an earlier exchange both sides share
            prompt += [{"role": "assistant", "content": f"earlier {i}"}, {"role": "user", "content": f"and then {i}?"}]
        out.append(
            {
                "prompt": prompt,
                "chosen": [{"role": "assistant", "content": f"good answer {i}"}],
                "rejected": [{"role": "assistant", "content": f"bad answer {i} {rng.random():.3f}"}],
            }
        )
    return out


def write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def read(path) -> tuple[list[dict], list, str]:
    rows, problems, fmt = load_source("src", path)
    return [{k: v for k, v in r.items() if k != "source"} for r in rows], problems, fmt


SHAREGPT_FROM = {"system": "system", "user": "human", "assistant": "gpt", "tool": "observation"}


def to_sharegpt(row: dict) -> dict:
    turns, out = [], {}
    messages = row["messages"]
    if messages[0]["role"] == "system":
        out["system"] = messages[0]["content"]
        messages = messages[1:]
    for m in messages:
        if m.get("tool_calls"):
            (call,) = m["tool_calls"]
            turns.append({"from": "function_call", "value": json.dumps(call["function"])})
        else:
            turns.append({"from": SHAREGPT_FROM[m["role"]], "value": m["content"]})
    if "tools" in row:
        out["tools"] = json.dumps([t["function"] for t in row["tools"]])  # LLaMA-Factory's tools: JSON text
    return {"conversations": turns, **out}


def to_gemini(row: dict, snake: bool = False) -> dict:
    """An OpenAI chat row as Gemini / Vertex AI tuning writes it (camelCase, or the Python SDK's snake_case)."""

    def key(camel: str) -> str:
        return "".join(f"_{c.lower()}" if c.isupper() else c for c in camel) if snake else camel

    out, messages = {}, row.get("messages") or row["prompt"]
    if messages[0]["role"] == "system":
        out[key("systemInstruction")] = {"parts": [{"text": messages[0]["content"]}]}
        messages = messages[1:]
    out["contents"] = [gemini_content(m, key) for m in messages]
    if "tools" in row:
        out["tools"] = [{key("functionDeclarations"): [t["function"] for t in row["tools"]]}]
    return out


def gemini_content(m: dict, key=str) -> dict:
    if m["role"] == "tool":
        return {
            "role": "user",
            "parts": [{key("functionResponse"): {"name": "lookup", "response": json.loads(m["content"])}}],
        }
    calls = [
        {key("functionCall"): {"name": c["function"]["name"], "args": c["function"]["arguments"]}}
        for c in m.get("tool_calls", [])
    ]
    text = [{"text": m["content"]}] if m["content"] or not calls else []
    return {"role": "model" if m["role"] == "assistant" else m["role"], "parts": text + calls}


def to_gemini_preference(pair: dict, chosen_first: bool = True) -> dict:
    """A pair as Vertex AI's preference tuning writes it: the prompt's contents, then two scored completions."""
    out = to_gemini({"messages": pair["prompt"]})
    scored = [{"score": 1, "completion": gemini_content(pair["chosen"][0])}]
    scored.append({"score": 0, "completion": gemini_content(pair["rejected"][0])})
    return {**out, "completions": scored if chosen_first else scored[::-1]}


def to_openai_preference(pair: dict) -> dict:
    return {
        "input": {"messages": pair["prompt"]},
        "preferred_output": pair["chosen"],
        "non_preferred_output": pair["rejected"],
    }


def to_implicit(pair: dict) -> dict:
    return {"chosen": pair["prompt"] + pair["chosen"], "rejected": pair["prompt"] + pair["rejected"]}


def to_hh(pair: dict) -> dict:
    def text(turns):
        return "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in turns)

    return {"chosen": text(pair["prompt"] + pair["chosen"]), "rejected": text(pair["prompt"] + pair["rejected"])}


def test_sharegpt_reads_as_the_same_rows_as_openai_chat(tmp_path):
    rows = corpus()
    want, _, _ = read(write(tmp_path / "openai.jsonl", rows))
    got, problems, fmt = read(write(tmp_path / "sharegpt.jsonl", [to_sharegpt(r) for r in rows]))
    assert fmt == "sharegpt" and problems == []
    assert got == want and any("tools" in r for r in got) and any(r["messages"][0]["role"] == "system" for r in got)


@pytest.mark.parametrize("snake", [False, True])
def test_gemini_reads_as_the_same_rows_as_openai_chat(tmp_path, snake):
    """Vertex AI's tuning JSONL (and the Python SDK's snake_case dump of it): system instruction, model turns,
    function calls and responses and the declared functions read as the OpenAI rows they came from."""
    rows = corpus()
    want, _, _ = read(write(tmp_path / "openai.jsonl", rows))
    got, problems, fmt = read(write(tmp_path / "gemini.jsonl", [to_gemini(r, snake) for r in rows]))
    assert fmt == "gemini" and problems == []
    assert got == want and any("tools" in r for r in got) and any(r["messages"][0]["role"] == "system" for r in got)


def test_gemini_preference_reads_as_the_same_pairs_whichever_completion_comes_first(tmp_path):
    records = pairs()
    want, _, _ = read(write(tmp_path / "explicit.jsonl", records))
    layout = [to_gemini_preference(p, chosen_first=i % 2 == 0) for i, p in enumerate(records)]
    got, problems, fmt = read(write(tmp_path / "gemini_preference.jsonl", layout))
    assert fmt == "gemini" and problems == [] and got == want and len(got) == N


@pytest.mark.parametrize("layout", [to_openai_preference, to_implicit, to_hh])
def test_preference_layouts_read_as_the_same_pairs_as_prompt_chosen_rejected(tmp_path, layout):
    records = pairs()
    if layout is to_hh:  # HH transcripts carry user and assistant turns only
        records = [{**p, "prompt": [m for m in p["prompt"] if m["role"] != "system"]} for p in records]
    want, _, _ = read(write(tmp_path / "explicit.jsonl", records))
    got, problems, fmt = read(write(tmp_path / f"{layout.__name__}.jsonl", [layout(p) for p in records]))
    assert problems == [] and got == want and len(got) == N
    assert fmt == ("openai_preference" if layout is to_openai_preference else "preference")


def to_labelled(pair: dict) -> list[dict]:
    """A pair as KTO's two labelled answers (TRL's unpaired layout), tools kept."""
    extra = {"tools": pair["tools"]} if "tools" in pair else {}
    return [
        {"prompt": pair["prompt"], "completion": pair[side], "label": side == "chosen", **extra}
        for side in ("chosen", "rejected")
    ]


def test_labelled_answers_read_as_the_pairs_answers_with_their_labels(tmp_path):
    """A generated corpus of pairs written as labelled answers: every row is read, each with its pair's prompt,
    one of its answers and the label saying which, on the fast path and the general path (tools) alike."""
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    records = [{**p, "tools": tools} if i % 4 == 0 else p for i, p in enumerate(pairs())]
    want, _, _ = read(write(tmp_path / "explicit.jsonl", records))
    got, problems, fmt = read(write(tmp_path / "labelled.jsonl", [r for p in records for r in to_labelled(p)]))
    assert fmt == "unpaired" and problems == [] and len(got) == 2 * N
    for pair, desirable, undesirable in zip(want, got[::2], got[1::2], strict=True):
        for row, side, label in ((desirable, "chosen", True), (undesirable, "rejected", False)):
            assert row["kind"] == "unpaired" and row["label"] is label
            assert (row["prompt"], row["completion"], row.get("tools")) == (
                pair["prompt"],
                pair[side],
                pair.get("tools"),
            )
    assert any("tools" in r for r in got)


def test_developer_role_and_legacy_function_calls_become_system_and_tool_turns(tmp_path):
    from tunegate.formats import load_rows

    rows = corpus()
    legacy = []
    for row in rows:
        messages = []
        for m in row["messages"]:
            if m["role"] == "system":
                m = {**m, "role": "developer"}
            elif m.get("tool_calls"):
                m = {"role": "assistant", "content": None, "function_call": m["tool_calls"][0]["function"]}
            elif m["role"] == "tool":
                m = {**m, "role": "function", "name": "lookup"}
            messages.append(m)
        legacy.append({**row, "messages": messages})
    want, _, _ = read(write(tmp_path / "openai.jsonl", rows))
    got, problems, _ = read(write(tmp_path / "legacy.jsonl", legacy))
    assert problems == []
    strip = lambda rows: [  # a tool turn's kept `name` changes the content hash (the id): compared without both
        {**r, "id": None, "messages": [{k: v for k, v in m.items() if k != "name"} for m in r["messages"]]}
        for r in rows
    ]
    assert strip(got) == strip(want)
    _, _, _, notes = load_rows("src", tmp_path / "legacy.jsonl")
    systems = sum(r["messages"][0]["role"] == "system" for r in rows)
    assert notes["developer_as_system"] == systems and notes["legacy_function_call"] > 0
    fast = [
        {
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a"},
            ]
        }
    ]
    got_fast, _, _ = read(write(tmp_path / "fast.jsonl", fast))  # plain rows take the fast path: mapped there too
    assert got_fast[0]["messages"][0]["role"] == "system"


RENAMED = {  # what other tools call the roles, as they write them
    "system": ["System", "SYSTEM"],
    "user": ["User", "human", "Human", "USER"],
    "assistant": ["Assistant", "model", "gpt", "Chatbot", "CHATBOT"],
    "tool": ["Tool"],
}


def test_other_names_for_the_roles_read_as_the_roles_and_are_counted(tmp_path):
    """Any case of the four roles, Gemini's model, ShareGPT's human/gpt and Cohere's Chatbot inside OpenAI-shaped
    messages read as the same rows as the OpenAI corpus (on the fast path's rows and the general path's alike), each
    renamed message counted; a role that is none of them is left for the role check."""
    from tunegate.formats import load_rows

    rng = random.Random(5)
    rows = corpus()
    renamed, count = [], 0
    for row in rows:
        messages = []
        for m in row["messages"]:
            if rng.random() < 0.5:
                m, count = {**m, "role": rng.choice(RENAMED[m["role"]])}, count + 1
            messages.append(m)
        renamed.append({**row, "messages": messages})
    want, _, _ = read(write(tmp_path / "openai.jsonl", rows))
    got, problems, _ = read(write(tmp_path / "renamed.jsonl", renamed))
    assert problems == [] and got == want
    _, _, _, notes = load_rows("src", tmp_path / "renamed.jsonl")
    assert notes["role_renamed"] == count > 100
    (other,), _, _ = read(write(tmp_path / "bot.jsonl", [{"messages": [user("q"), {"role": "bot", "content": "a"}]}]))
    assert other["messages"][1]["role"] == "bot"  # validate's role check quarantines it as wrong_role


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


ASKED = [user("q"), bot("a")]
MALFORMED = [
    ("sharegpt", {"conversations": [{"from": "bot", "value": "x"}]}, "wrong_role"),
    ("sharegpt", {"conversations": [{"from": "human"}]}, "missing_field"),
    ("sharegpt", {"conversations": "hello"}, "wrong_type"),
    ("sharegpt", {"conversations": [{"from": "function_call", "value": "not json"}]}, "bad_tool_call"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}], "system": 3}, "wrong_type"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}], "tools": "[broken"}, "wrong_type"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"}},
     "missing_field"),
    ("gemini", {"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}, "wrong_role"),
    ("gemini", {"contents": [{"role": "user"}]}, "missing_field"),
    ("gemini", {"contents": [{"role": ["user"], "parts": [{"text": "q"}]}]}, "wrong_type"),
    ("gemini", {"contents": "hello"}, "wrong_type"),
    ("gemini", {"contents": [{"role": "user", "parts": []}]}, "wrong_type"),
    ("gemini", {"contents": [{"role": "user", "parts": [{"text": 3}]}]}, "wrong_type"),
    ("gemini", {"contents": [{"role": "user", "parts": [{"fileData": {"fileUri": "gs://b/x.png"}}]}]},
     "non_text_content"),
    ("gemini", {"contents": [{"role": "user", "parts": [{"inline_data": {"data": "AAAA"}}]}]}, "non_text_content"),
    ("gemini", {"contents": [{"role": "user", "parts": [{"video": 1}]}]}, "wrong_type"),
    ("gemini", {"contents": [{"role": "model", "parts": [{"functionCall": {"args": {}}}]}]}, "bad_tool_call"),
    ("gemini", {"contents": [{"role": "user", "parts": [{"functionCall": {"name": "f"}}]}]}, "bad_tool_call"),
    ("gemini", {"contents": [{"role": "user", "parts": [{"functionResponse": {"response": {}}}]}]},
     "missing_field"),
    ("gemini", {"contents": [{"role": "user", "parts": [{"text": "q"}]}], "systemInstruction": "Be brief."},
     "wrong_type"),
    # function responses answer the model's calls: not in a system instruction (one or several) or a model turn
    ("gemini", {"contents": [{"role": "user", "parts": [{"text": "q"}]}],
                "systemInstruction": {"parts": [{"functionResponse": {"name": "f", "response": {}}}] * 2}},
     "wrong_type"),
    ("gemini", {"contents": [{"role": "user", "parts": [{"text": "q"}]}],
                "systemInstruction": {"parts": [{"functionResponse": {"name": "f", "response": {}}}]}},
     "wrong_type"),
    ("gemini", {"contents": [{"role": "user", "parts": [{"text": "q"}]},
                             {"role": "model", "parts": [{"functionResponse": {"name": "f", "response": {}}}]}]},
     "wrong_type"),
    ("gemini", {"contents": [{"role": "user", "parts": [{"text": "q"}]}], "tools": [{"googleSearch": {}}]},
     "wrong_type"),
    ("gemini", {"contents": [{"role": "user", "parts": [{"text": "q"}]}],
                "completions": [{"score": 1, "completion": {"role": "model", "parts": [{"text": "a"}]}}]},
     "wrong_type"),
    ("gemini", {"contents": [{"role": "user", "parts": [{"text": "q"}]}],
                "completions": [{"score": 1, "completion": {"role": "model", "parts": [{"text": "a"}]}},
                                {"score": 0.5, "completion": {"role": "model", "parts": [{"text": "b"}]}}]},
     "wrong_type"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "q"}], "tools": [None]}, "wrong_type"),
    ("openai_preference", {"input": {"messages": [user("q")]}, "preferred_output": []}, "missing_field"),
    ("openai_preference", {"input": "q", "preferred_output": [], "non_preferred_output": []}, "missing_field"),
    ("preference", {"chosen": [user("a")], "rejected": [user("b")]}, "prompt_mismatch"),
    ("preference", {"chosen": ASKED, "rejected": ASKED}, "chosen_equals_rejected"),
    ("preference", {"chosen": [user("q"), {"content": "a"}], "rejected": [user("q"), bot("b")]}, "missing_field"),
    ("preference", {"chosen": [{"content": "q"}, bot("a")], "rejected": [user("q"), bot("b")]}, "missing_field"),
    ("preference", {"chosen": [*ASKED, user("x")], "rejected": [*ASKED, user("y")]}, "prompt_mismatch"),
    ("preference", {"chosen": "plain text", "rejected": "other text"}, "missing_field"),  # text, no prompt
    ("preference", {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "no transcript"}, "wrong_type"),
    ("preference", {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": 3}, "missing_field"),
    ("unpaired", {"prompt": "q", "completion": "a", "label": "maybe"}, "bad_label"),
    ("unpaired", {"prompt": "q", "completion": "a", "label": 2}, "bad_label"),
    ("unpaired", {"prompt": "q", "completion": "a"}, "missing_field"),
    ("unpaired", {"prompt": "q", "completion": {"role": "assistant"}, "label": True}, "wrong_type"),
    ("unpaired", {"prompt": "q", "completion": [{**bot("a"), "weight": 0}], "label": False}, "bad_weight"),
    # two problems in one row: the first in reading order is named (the label is read before any weight)
    ("unpaired", {"prompt": "q", "completion": [{**bot("a"), "weight": 0}], "label": "maybe"}, "bad_label"),
    ("unpaired", {"prompt": [{**user("q"), "weight": 1}], "completion": "a", "label": True}, "bad_weight"),
    ("preference", {"prompt": "q", "chosen": [{**bot("a"), "weight": 1}], "rejected": "b"}, "bad_weight"),
    ("preference", {"prompt": "q", "chosen": [{**bot("a"), "weight": 1}], "rejected": {"x": 1}}, "wrong_type"),
]  # fmt: skip


@pytest.mark.parametrize("fmt, record, reason", MALFORMED)
def test_each_malformed_variant_is_quarantined_with_its_reason(tmp_path, fmt, record, reason):
    """Among valid rows of the same layout, the malformed one is quarantined with its reason and the rest kept."""
    valid = {
        "sharegpt": [to_sharegpt(r) for r in corpus()[:5]],
        "gemini": [to_gemini(r) for r in corpus()[:5]],
        "openai_preference": [to_openai_preference(p) for p in pairs()[:5]],
        "preference": [to_implicit(p) for p in pairs()[:5]],
        "unpaired": [r for p in pairs()[:3] for r in to_labelled(p)][:5],
    }[fmt]
    rows, problems, got_fmt = load_source("src", write(tmp_path / "mixed.jsonl", [*valid, record]))
    assert got_fmt == fmt and len(rows) == 5
    assert [(p.line, p.reason) for p in problems] == [(6, reason)], [p.detail for p in problems]
    assert "\n" not in problems[0].detail


def test_a_folder_or_glob_of_shards_reads_as_one_source_and_a_bad_line_names_its_shard(tmp_path):
    import msgspec

    from tunegate.formats import load_rows
    from tunegate.readers import dependency

    rows = corpus()
    folder = tmp_path / "export"
    folder.mkdir()
    for k in range(3):  # three shards; the second has a broken line in the middle
        lines = [json.dumps(r) for r in rows[k * 40 : (k + 1) * 40]]
        if k == 1:
            lines.insert(5, '{"messages": [broken')
        (folder / f"part-{k:05d}.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "README.md").write_text("not data")
    whole, _, _ = read(write(tmp_path / "whole.jsonl", rows))
    for source in (folder, f"{folder}/part-*.jsonl"):
        got, problems, fmt, notes = load_rows("src", source)
        plain = [{k: v for k, v in msgspec.to_builtins(r).items() if k not in ("source", "line")} for r in got]
        assert plain == [{k: v for k, v in w.items() if k != "line"} for w in whole]  # the same rows as one file
        assert len(got) == N and notes["shards"] == 3 and fmt == "messages"
        assert [(p.line, p.reason) for p in problems] == [(46, "malformed_json")]
        assert problems[0].detail.startswith("part-00001.jsonl line 6: ")
    assert dependency("data/export/*.jsonl") == "data/export" and dependency("data/x.jsonl") == "data/x.jsonl"
    with pytest.raises(Exception, match="the pattern matches no data file"):
        load_rows("src", f"{folder}/nothing-*.jsonl")


def test_a_saved_dataset_dict_reads_the_split_asked_for_and_names_the_ones_it_has(tmp_path):
    import datasets

    from tunegate.errors import UserError
    from tunegate.formats import load_rows

    rows = [{"messages": r["messages"]} for r in corpus() if "tools" not in r][:20]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows[:12]), "validation": datasets.Dataset.from_list(rows[12:])}
    ).save_to_disk(str(tmp_path / "saved"))
    assert len(load_rows("src", tmp_path / "saved")[0]) == 12  # train by default
    assert len(load_rows("src", tmp_path / "saved", split="validation")[0]) == 8
    with pytest.raises(UserError, match=r"without a 'test' split \(it has train, validation\); set data.sources"):
        load_rows("src", tmp_path / "saved", split="test")
