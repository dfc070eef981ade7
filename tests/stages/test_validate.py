"""validate catches every planted defect, conserves rows, and fails in one line on broken sources."""

import json

import pytest

from stages import validate
from tunegate import rendering
from tunegate.config import Source, Validate
from tunegate.errors import UserError
from tunegate.io import read_jsonl

REASONS = [
    "malformed_json",
    "missing_field",
    "empty_content",
    "wrong_role",
    "template_leftover",
    "chosen_equals_rejected",
]


def test_planted_defects_are_quarantined(validated, ledger):
    out, metrics = validated
    quarantine = read_jsonl(out / validate.QUARANTINE)
    for source in ("domain", "general", "preferences"):
        planted = ledger[f"{source}.jsonl"]
        got = {}
        for q in quarantine:
            if q["source"] == source:
                got.setdefault(q["reason"], set()).add(q["line"])
        for reason in REASONS:
            if reason in planted:
                assert got.get(reason, set()) == set(planted[reason]["lines"]), (source, reason)
        assert set(got) <= set(REASONS), got


def test_rows_are_conserved(validated, ledger):
    out, metrics = validated
    assert metrics["conserved"]
    for source, m in metrics["sources"].items():
        assert m["in"] == ledger[f"{source}.jsonl"]["total_lines"]
        assert m["in"] == m["kept"] + m["quarantined"]
        assert len(read_jsonl(out / f"{source}.jsonl")) == m["kept"]


def test_pii_is_masked_not_lost(validated, ledger):
    out, metrics = validated
    assert metrics["sources"]["domain"]["pii_masked"] == {"pii_email": ledger["domain.jsonl"]["pii_email"]["count"]}
    text = (out / "domain.jsonl").read_text()
    assert "@example.com" not in text and "[EMAIL]" in text


def test_bad_lines_report_file_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"prompt": "Cancel order 12345 please", "completion": "ok"})
    path.write_bytes((good + "\n").encode() * 20 + b"\xff\xfe broken\n" + b'{"prompt": "trunc')
    with pytest.raises(UserError) as err:
        validate.run(
            Validate(max_invalid_share=0.05), {"s": Source(path=str(path), role="domain")}, tokenizer, tmp_path / "out"
        )
    msg = str(err.value)
    assert "bad.jsonl" in msg and "2/22 rows invalid" in msg and "\n" not in msg
    q = read_jsonl(tmp_path / "out" / validate.QUARANTINE)
    assert [(r["line"], r["reason"]) for r in q] == [(21, "encoding"), (22, "malformed_json")]
    assert "file ends mid-record" in q[1]["detail"]


def test_wrong_schema_fails_clearly(tmp_path, tokenizer):
    path = tmp_path / "odd.jsonl"
    path.write_text('{"question": "a", "reply": "b"}\n')
    with pytest.raises(UserError, match="odd.jsonl: no record has a known shape"):
        validate.run(Validate(), {"s": Source(path=str(path), role="domain")}, tokenizer, tmp_path / "out")


def test_data_docs_are_built(tmp_path, tokenizer):
    path = tmp_path / "ok.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"Track order {10000 + i}", "completion": "ok"}) + "\n" for i in range(5))
    )
    validate.run(
        Validate(), {"s": Source(path=str(path), role="domain")}, tokenizer, tmp_path / "out", tmp_path / "docs"
    )
    assert (tmp_path / "docs" / "index.html").exists()
    assert list((tmp_path / "docs").rglob("*.html"))


def test_token_bounds_decide_exactly_like_counting(tokenizer):
    """The byte-bound shortcut never changes a length verdict; rows near a limit are really tokenised."""
    import random

    rng = random.Random(0)
    words = ["ok", "order", "12345", "refund", "été", "🙂", "the", "a", "\n", "   "]
    texts = [" ".join(rng.choices(words, k=rng.randint(0, 120))) for _ in range(400)] + ["", "x", "xy"]
    exact = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    for low, high in [(2, 256), (1, 40), (10, 12), (0, 1000)]:
        counter = rendering.TokenCounter(tokenizer, low, high)
        assert counter.longest, "the demo tokenizer is byte-level BPE: the bounds apply"
        counts = counter.count(texts)
        assert [low <= c <= high for c in counts] == [low <= e <= high for e in exact], (low, high)
        assert all(c == e for c, e in zip(counts, exact, strict=True) if not low <= e <= high)


def test_compiled_template_renders_like_apply_chat_template(tokenizer):
    render = rendering.renderer(tokenizer)
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi {x}"},
        {"role": "assistant", "content": "Hello."},
    ]
    assert render(msgs) == tokenizer.apply_chat_template(msgs, tokenize=False)


TEMPLATES = {
    # verbatim content, fixed text per role (ChatML)
    "chatml": "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}",
    # trimmed content (Llama 3)
    "trim": "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}",
    # text that depends on the whole role sequence (a default system prompt when there is none)
    "default_system": "{% if messages[0]['role'] != 'system' %}{{ 'system: be kind\n' }}{% endif %}"
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}",
    # repeats the last message: the probe fails and rows are rendered one by one
    "repeats": "{% for m in messages %}{{ m['content'] }}{% endfor %}{{ messages[-1]['content'] }}",
    # rewrites content: a content-dependent template, rendered row by row
    "rewrites": "{% for m in messages %}{{ m['content'] | replace('a', 'aa') }}{% endfor %}",
    # rejects some role orders (the row keeps a joined-text size; the roles check quarantines it)
    "strict": "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate') }}{% endif %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}",
}


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_rendered_sizes_equal_real_renders(name, tokenizer, monkeypatch):
    """The size shortcut gives exactly the UTF-8 size of what the template renders, for every kind of template."""
    import random

    from tunegate.formats import Message

    monkeypatch.setattr(tokenizer, "chat_template", TEMPLATES[name])
    rng = random.Random(0)
    words = ["ok", "a", "banana", "été", "🙂", "{x}", "\n", "  ", "\t", "\u3000", "\x1c"]
    orders = [
        ("user", "assistant"),
        ("system", "user", "assistant"),
        ("user", "assistant", "user", "assistant"),
        ("assistant", "user"),
        ("user",),
        (),
    ]
    convs = [
        [Message(role, "".join(rng.choices(words, k=rng.randint(0, 12)))) for role in orders[i % len(orders)]]
        for i in range(300)
    ]
    render = rendering.renderer(tokenizer)
    expected = [len(render([{"role": m.role, "content": m.content} for m in c]).encode()) for c in convs]
    sizes = rendering.RenderedSize(tokenizer)
    assert sizes.sizes(rendering.Flat(convs)).tolist() == expected
    probed = {roles for roles, layout in sizes.layouts.items() if layout is not None and roles}
    assert bool(probed) == (name in {"chatml", "trim", "default_system", "strict"}), sizes.layouts


def test_whitespace_set_is_str_strip():
    assert rendering.PY_WHITESPACE == "".join(chr(c) for c in range(0x110000) if chr(c).isspace())


def test_default_pii_patterns_run_on_the_fast_engine():
    """Every default pattern compiles in RE2 (Arrow's engine); look-around would fall back to Python's re."""
    import pyarrow as pa
    import pyarrow.compute as pc

    texts = [
        "call +1 (555) 123-4567 today",
        "or 555-123-4567.",
        "order 12345 of 2024",
        "abc12345678901",
        "mail anna.berg@example.com",
        "key sk-abcdefghijklmnop1234",
    ]
    got = {
        name: pc.match_substring_regex(pa.array(texts), p).to_pylist() for name, p in Validate().pii_patterns.items()
    }
    assert got["phone"] == [True, True, False, False, False, False]
    assert got["email"] == [False, False, False, False, True, False]
    assert got["api_key"] == [False, False, False, False, False, True]


@pytest.mark.parametrize("mode", ["quarantine", "report"])
def test_pii_checked_in_one_pass_named_per_pattern(tmp_path, tokenizer, mode):
    """All PII patterns are one GX check; each flagged row still gets one reason per pattern that matched."""
    rows = [
        ("Mail me at ann@example.com about order 12345", "ok"),
        ("Call +44 20 7946 0958 about order 12345", "ok"),
        ("ann@example.com or +44 20 7946 0958, order 12345", "ok"),
        ("Where is order 12345?", "It ships today."),
    ]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in rows))
    cfg = Validate(pii=mode, max_invalid_share=1.0)
    assert len([c for c in validate._expectations(cfg, "sft") if c.meta["reason"].startswith("pii")]) == 1
    metrics = validate.run(cfg, {"s": Source(path=str(path), role="domain")}, tokenizer, tmp_path / "out")
    q = read_jsonl(tmp_path / "out" / validate.QUARANTINE)
    if mode == "quarantine":
        assert [(r["line"], r["reason"], r["detail"]) for r in q] == [
            (1, "pii_email", "pii_email"),
            (2, "pii_phone", "pii_phone"),
            (3, "pii_email", "pii_email, pii_phone"),
        ]
        assert (
            metrics["sources"]["s"]["pii_quarantined"] == {"pii_email": 2, "pii_phone": 2}
            and metrics["sources"]["s"]["kept"] == 1
        )
    else:
        assert not q and metrics["sources"]["s"]["pii_reported"] == {"pii_email": 2, "pii_phone": 2}
        assert "ann@example.com" in (tmp_path / "out" / "s.jsonl").read_text()  # reported, not masked


@pytest.mark.parametrize("kind", ["sft", "preference", "unpaired"])
def test_table_columns_equal_a_row_by_row_reference(kind, tokenizer):
    """The Arrow-built columns equal what a plain loop over rows computes, edge cases included
    (empty parts, padded and unicode content, chosen == rejected up to whitespace, odd roles)."""
    import random

    from tunegate.formats import Message, Row

    rng = random.Random(1)
    words = ["ok", "order", "12345", "été", "🙂", "{x}", " ", "\n", "\x1c", "ship it"]

    def msgs(roles):
        return [Message(r, "".join(rng.choices(words, k=rng.randint(0, 6)))) for r in roles]

    rows = []
    for i in range(400):
        if kind == "sft":
            rows.append(
                Row(
                    f"s-{i}",
                    "s",
                    i,
                    "sft",
                    msgs(
                        rng.choice(
                            [("user", "assistant"), ("system", "user", "assistant"), ("user",), (), ("bot", "user")]
                        )
                    ),
                )
            )
        elif kind == "unpaired":
            prompt = msgs(rng.choice([("user",), (), ("system", "user")]))
            completion = msgs(rng.choice([("assistant",), (), ("assistant", "assistant")]))
            rows.append(Row(f"u-{i}", "u", i, "unpaired", prompt=prompt, completion=completion, label=i % 2 == 0))
        else:
            chosen = msgs(rng.choice([("assistant",), (), ("assistant", "assistant")]))
            rejected = [Message(m.role, f" {m.content}\n") for m in chosen] if i % 5 == 0 else msgs(("assistant",))
            rows.append(
                Row(
                    f"p-{i}",
                    "p",
                    i,
                    "preference",
                    None,
                    msgs(rng.choice([("user",), (), ("system", "user")])),
                    chosen,
                    rejected,
                )
            )
    low, high = 3, 12
    frame = validate._table(rows, rendering.TokenCounter(tokenizer, low, high), rendering.RenderedSize(tokenizer))
    render = rendering.renderer(tokenizer)

    def tokens(conv):
        return len(
            tokenizer(render([{"role": m.role, "content": m.content} for m in conv]), add_special_tokens=False)[
                "input_ids"
            ]
        )

    for row, got in zip(rows, frame.to_dict(orient="records"), strict=True):
        parts = [row.prompt, row.chosen, row.rejected] if kind == "preference" else [row.conversation()]
        every = [m for part in parts for m in part]
        assert got["roles"] == "|".join(",".join(m.role for m in part) for part in parts)
        assert got["text"] == "\n".join(m.content for m in every)
        assert got["min_chars"] == min((len(m.content.strip()) for m in every), default=0)
        convs = [row.prompt + row.chosen, row.prompt + row.rejected] if kind == "preference" else [row.conversation()]
        exact = max(tokens(c) for c in convs)
        assert (low <= got["n_tokens"] <= high) == (low <= exact <= high), row
        if kind == "preference":
            assert got["chosen_equals_rejected"] == (
                [m.content.strip() for m in row.chosen] == [m.content.strip() for m in row.rejected]
            )


@pytest.mark.parametrize("kind", ["sft", "preference", "unpaired"])
def test_rows_outside_the_token_bounds_are_quarantined_as_length(tmp_path, tokenizer, kind):
    """The token-length check runs for every kind: too long and too short rows leave with `length`,
    rows inside the bounds stay (with the chat template counted)."""
    long_text = " ".join(["the parcel arrived broken and nobody answers"] * 60)  # far past max_tokens
    texts = [
        long_text,
        "ok",
        "Where is order 12345? It left the depot on Monday and the tracking page still says it is on its way.",
    ]
    path = tmp_path / "d.jsonl"
    if kind == "sft":
        path.write_text("".join(json.dumps({"prompt": t, "completion": "Sorry about that."}) + "\n" for t in texts))
    elif kind == "preference":
        path.write_text(
            "".join(json.dumps({"prompt": t, "chosen": "We will refund you.", "rejected": "No."}) + "\n" for t in texts)
        )
    else:
        path.write_text(
            "".join(json.dumps({"prompt": t, "completion": "We will refund you.", "label": True}) + "\n" for t in texts)
        )
    cfg = Validate(min_tokens=30, max_tokens=120, max_invalid_share=1.0)
    role = "domain" if kind == "sft" else "preference"
    metrics = validate.run(cfg, {"s": Source(path=str(path), role=role)}, tokenizer, tmp_path / "out")
    q = {r["line"]: r["reason"] for r in read_jsonl(tmp_path / "out" / validate.QUARANTINE)}
    assert q == {1: "length", 2: "length"}, q
    assert metrics["sources"]["s"]["kept"] == 1


def test_a_preference_source_of_labelled_answers_keeps_them_and_sets_pairs_aside(tmp_path, tokenizer):
    """KTO's unpaired rows (TRL's prompt/completion/label) in a preference source: read, checked like a
    conversation, kept with their label; a pair among them (a source is read in one format) and a label that
    is not a boolean are quarantined with the field they lack or get wrong."""
    rows = [
        {
            "prompt": f"Where is order {10000 + i}? It has not arrived yet.",
            "completion": "It ships today.",
            "label": i % 2,
        }
        for i in range(6)
    ]
    rows.append({"prompt": "Refund order 12345", "chosen": "Refunded.", "rejected": "No."})
    rows.append({"prompt": "Refund order 12346", "completion": "Refunded.", "label": "maybe"})
    path = tmp_path / "feedback.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = Validate(min_tokens=1, max_invalid_share=1.0)
    metrics = validate.run(cfg, {"fb": Source(path=str(path), role="preference")}, tokenizer, tmp_path / "out")
    kept = read_jsonl(tmp_path / "out" / "fb.jsonl")
    assert [r["kind"] for r in kept] == ["unpaired"] * 6 and [r["label"] for r in kept] == [False, True] * 3
    assert kept[0]["completion"] == [{"role": "assistant", "content": "It ships today."}]
    q = {r["line"]: (r["reason"], r["detail"]) for r in read_jsonl(tmp_path / "out" / validate.QUARANTINE)}
    assert q[7] == ("missing_field", "completion, label")
    assert q[8][0] == "bad_label" and "'maybe'" in q[8][1]
    assert metrics["sources"]["fb"]["format"] == "unpaired" and metrics["sources"]["fb"]["in"] == 8


# Templates that refuse a system turn, as real models ship them: Gemma's raises on it; Mistral's first instruct
# template and the "strict" one above raise on any order that does not start with the user.
NO_SYSTEM = {
    "gemma": "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n' + m['content'] | trim"
    " + '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
    "mistral": "{{ bos_token }}{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% elif m['role'] == 'assistant' %}"
    "{{ m['content'] + eos_token }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}"
    "{% endif %}{% endfor %}",
    "strict": TEMPLATES["strict"],
}


def _system_rows(kind: str, n: int) -> list[dict]:
    """n rows of `kind`, every other one opening with a system turn (multi-turn SFT rows among them)."""
    rows = []
    for i in range(n):
        system = [{"role": "system", "content": f"You answer for shop {i % 3}."}] if i % 2 else []
        user = {"role": "user", "content": f"Where is order {1000 + i}? It has not arrived."}
        if kind == "sft":
            extra = [{"role": "assistant", "content": "Which address?"}, {"role": "user", "content": "Home."}]
            turns = [user, *(extra if i % 3 == 0 else []), {"role": "assistant", "content": f"It ships on day {i}."}]
            rows.append({"messages": system + turns})
        elif kind == "preference":
            rows.append({"prompt": system + [user], "chosen": f"It ships on day {i}.", "rejected": "No idea."})
        else:
            rows.append({"prompt": system + [user], "completion": f"It ships on day {i}.", "label": bool(i % 2)})
    return rows


@pytest.mark.parametrize("template", sorted(NO_SYSTEM))
@pytest.mark.parametrize("kind", ["sft", "preference", "unpaired"])
def test_a_template_that_refuses_a_system_turn_gets_it_folded_into_the_first_user_turn(
    tmp_path, tokenizer, monkeypatch, template, kind
):
    """Every row is kept, its system text and a blank line before its first user turn (the turn's id follows what
    is trained), the count is in the source's read notes, and every kept row renders under the template."""
    from tunegate.chat import Renderer, template_messages

    monkeypatch.setattr(tokenizer, "chat_template", NO_SYSTEM[template])
    rows = _system_rows(kind, 24)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = Validate(min_tokens=1, max_invalid_share=0.0)
    role = "domain" if kind == "sft" else "preference"
    metrics = validate.run(cfg, {"s": Source(path=str(path), role=role)}, tokenizer, tmp_path / "out")
    kept = read_jsonl(tmp_path / "out" / "s.jsonl")
    assert len(kept) == 24 and metrics["sources"]["s"]["read"] == {"system_folded": 12}
    render = Renderer(tokenizer)
    for row, written in zip(rows, kept, strict=True):
        turns = written["messages"] if kind == "sft" else written["prompt"]
        source = row["messages"] if kind == "sft" else row["prompt"]
        assert [t["role"] for t in turns] == [t["role"] for t in source if t["role"] != "system"]
        folded = f"{source[0]['content']}\n\n{source[1]['content']}" if source[0]["role"] == "system" else None
        assert turns[0]["content"] == (folded or source[0]["content"])
        answer = [] if kind == "sft" else written["chosen" if kind == "preference" else "completion"]
        render(template_messages(turns + answer))
    assert len({r["id"] for r in kept}) == 24


def test_a_template_that_takes_a_system_turn_keeps_it(tmp_path, tokenizer):
    rows = _system_rows("sft", 6)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    metrics = validate.run(
        Validate(min_tokens=1), {"s": Source(path=str(path), role="domain")}, tokenizer, tmp_path / "out"
    )
    kept = read_jsonl(tmp_path / "out" / "s.jsonl")
    assert [r["messages"] for r in kept] == [r["messages"] for r in rows] and metrics["sources"]["s"]["read"] == {}


def test_rows_the_template_refuses_are_quarantined_with_its_words_before_training(tmp_path, tokenizer, monkeypatch):
    """A role order the roles check accepts but the template raises on (here: more than one turn) leaves as
    template_refused with the template's own message; a role order the roles check refuses is still wrong_role."""
    monkeypatch.setattr(
        tokenizer,
        "chat_template",
        "{% if messages|length > 2 %}{{ raise_exception('only single-turn conversations') }}{% endif %}"
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}",
    )
    rows = _system_rows("sft", 12)
    rows.append({"messages": [{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Bye"}]})
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = Validate(min_tokens=1, max_invalid_share=1.0)
    metrics = validate.run(cfg, {"s": Source(path=str(path), role="domain")}, tokenizer, tmp_path / "out")
    quarantine = {q["line"]: q for q in read_jsonl(tmp_path / "out" / validate.QUARANTINE)}
    # a system turn is folded (the template takes the conversation without it); a second user turn is not
    long = {i + 1 for i, r in enumerate(rows[:12]) if sum(m["role"] != "system" for m in r["messages"]) > 2}
    assert {line for line, q in quarantine.items() if q["reason"] == "template_refused"} == long
    assert all("only single-turn conversations" in quarantine[line]["detail"] for line in long)
    assert quarantine[13]["reason"] == "wrong_role"
    kept = read_jsonl(tmp_path / "out" / "s.jsonl")
    assert len(kept) == 12 - len(long) and metrics["sources"]["s"]["in"] == 13 and metrics["conserved"]


def test_a_source_with_too_many_invalid_rows_names_the_first_row_of_its_main_reason(tmp_path, tokenizer):
    """The stopping line says what to look for: the first row of the most common reason with its detail (for
    wrong_role, the row's role order), and each wrong_role row's detail names its order."""
    bot = [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]
    rows = [{"messages": [{**m, "content": f"{m['content']} {i}"} for m in bot]} for i in range(9)]
    rows.insert(0, {"prompt": "Where is order 12345?", "chosen": "Today.", "rejected": "No."})  # missing_field
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError) as err:
        validate.run(Validate(min_tokens=1), {"s": Source(path=str(path), role="domain")}, tokenizer, tmp_path / "out")
    assert "10/10 rows invalid" in str(err.value) and "wrong_role 9, missing_field 1" in str(err.value)
    assert "e.g. line 2: wrong_role (user,bot)" in str(err.value) and "\n" not in str(err.value)
