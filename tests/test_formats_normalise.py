"""Normalisation record by record: each accepted shape's exact row, and each bad shape's exact reason and detail
(what the quarantine report shows). Small inputs and exact answers, so a mutation run over formats is sharp."""

from collections import Counter

import msgspec
import pytest

from tunegate import formats
from tunegate.errors import UserError
from tunegate.formats import (
    NormaliseError,
    alpaca_user,
    detect_format,
    infer_source_format,
    normalise,
)

U, A = {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}
CALL = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"id": 7}'}}
CALLED = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": {"id": 7}}}


def error(record, fmt="messages") -> tuple[str, str]:
    with pytest.raises(NormaliseError) as caught:
        normalise(record, fmt)
    assert str(caught.value) == f"{caught.value.reason}: {caught.value.detail}"
    return caught.value.reason, caught.value.detail


def chat(*messages, **extra) -> dict:
    return {"messages": list(messages), **extra}


@pytest.mark.parametrize(
    ("keys", "fmt"),
    [
        (("messages", "chosen", "instruction", "prompt"), "messages"),
        (("chosen", "instruction"), "preference"),
        (("rejected", "output"), "preference"),
        (("instruction", "prompt"), "alpaca"),
        (("output", "completion"), "alpaca"),
        (("prompt",), "prompt_completion"),
        (("completion",), "prompt_completion"),
        (("text", "input"), None),
    ],
)
def test_detect_format_by_keys(keys, fmt):
    assert detect_format(dict.fromkeys(keys, "x")) == fmt


def test_infer_source_format_takes_the_most_common_shape():
    records = [{"prompt": 1}, {"messages": 1}, {"prompt": 1, "completion": 2}, "not a record", {"other": 1}]
    assert infer_source_format(records) == "prompt_completion"
    with pytest.raises(UserError, match=r"^no record has a known shape \(messages / prompt\+completion / "):
        infer_source_format([{"other": 1}, ["x"]])


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("messages", '[{"role": "user", "content": "u"}]', [U]),
        ("chosen", '[{"role": "user", "content": "u"}]', [U]),
        ("completion", '{"intent": "refund"}', '{"intent": "refund"}'),  # an answer that looks like JSON
        ("completion", "[1, 2]", "[1, 2]"),
        ("completion", "[]", "[]"),
        ("prompt", "[not json", "[not json"),
        ("prompt", "[" * 100_000, "[" * 100_000),  # nested too deeply for json: text
        ("output", '[{"role": "user", "content": "u"}]', '[{"role": "user", "content": "u"}]'),
        ("messages", 7, 7),
    ],
)
def test_from_table_reads_message_lists_saved_as_json_text(key, value, expected):
    assert formats._from_table(key, value) == expected


def test_content_parts_are_joined_and_non_text_parts_refused():
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    assert normalise(chat({"role": "user", "content": parts}, A), "messages")["messages"][0]["content"] == "one\ntwo"
    bad = {"role": "user", "content": [{"type": "text", "text": "ok"}, {"type": "image_url", "image_url": "x"}]}
    assert error(chat(bad, A)) == (
        "non_text_content",
        "messages[0].content[1] is a 'image_url' part; only text parts can be trained",
    )
    bad = {"role": "user", "content": [{"type": "text", "text": 3}]}
    assert error(chat(bad, A)) == ("wrong_type", "messages[0].content[0].text must be a string")
    for content in ([], ["text"], 5):
        bad = {"role": "user", "content": content}
        assert error(chat(bad, A)) == ("wrong_type", "messages[0].content must be a string or a list of text parts")


def test_tool_calls_are_read_with_parsed_arguments():
    row = normalise(chat(U, {"role": "assistant", "content": None, "tool_calls": [CALL]}), "messages")
    assert row["messages"][1] == {"role": "assistant", "content": "", "tool_calls": [CALLED]}
    assert list(row["messages"][1]["tool_calls"][0]) == ["id", "type", "function"]
    bare = {"function": {"name": "f"}}  # no id, no type, no arguments
    row = normalise(
        chat(U, {"role": "assistant", "tool_calls": [bare, {**bare, "function": {"name": "g", "arguments": " "}}]}),
        "messages",
    )
    assert row["messages"][1]["tool_calls"] == [
        {"type": "function", "function": {"name": "f", "arguments": {}}},
        {"type": "function", "function": {"name": "g", "arguments": {}}},
    ]
    assert row["messages"][1]["content"] == ""


@pytest.mark.parametrize(
    ("call", "detail"),
    [
        ("lookup", "messages[1].tool_calls[0] needs function.name"),
        ({"function": "lookup"}, "messages[1].tool_calls[0] needs function.name"),
        ({"function": {"name": ""}}, "messages[1].tool_calls[0] needs function.name"),
        ({"function": {"name": 3}}, "messages[1].tool_calls[0] needs function.name"),
        ({"type": "tool", "function": {"name": "f"}}, "messages[1].tool_calls[0].type 'tool' is not 'function'"),
        (
            {"function": {"name": "f", "arguments": "{"}},
            "messages[1].tool_calls[0].function.arguments is not valid JSON",
        ),
        (
            {"function": {"name": "f", "arguments": "[" * 100_000}},
            "messages[1].tool_calls[0].function.arguments is not valid JSON",
        ),
        (
            {"function": {"name": "f", "arguments": "[1]"}},
            "messages[1].tool_calls[0].function.arguments must be a JSON object",
        ),
        (
            {"function": {"name": "f", "arguments": 1}},
            "messages[1].tool_calls[0].function.arguments must be a JSON object",
        ),
        ({"id": 1, "function": {"name": "f"}}, "messages[1].tool_calls[0].id must be a string"),
    ],
)
def test_bad_tool_calls_are_named(call, detail):
    assert error(chat(U, {"role": "assistant", "content": "", "tool_calls": [call]})) == ("bad_tool_call", detail)


def test_message_fields_are_checked():
    assert error(chat({"content": "x"}, A)) == ("missing_field", "messages[0] needs 'role' and 'content'")
    assert error(chat(U, {"role": "assistant"})) == ("missing_field", "messages[1] needs 'role' and 'content'")
    assert error(chat(U, {"role": "assistant", "tool_calls": []})) == (
        "missing_field",
        "messages[1] needs 'role' and 'content'",
    )
    assert error(chat({"role": 1, "content": "x"}, A)) == (
        "wrong_type",
        "messages[0].content and .role must be strings",
    )
    assert error(chat({"role": "user", "content": None, "tool_calls": [CALL]}, A)) == (
        "wrong_type",
        "messages[0].content must be a string or a list of text parts",
    )
    assert error(chat({**U, "name": 5}, A)) == ("wrong_type", "messages[0].name must be a string")
    assert normalise(chat({**U, "name": "ann"}, {**A, "name": None}), "messages")["messages"] == [
        {**U, "name": "ann"},
        A,
    ]
    on_user = ("bad_tool_call", "messages[0].tool_calls must be a list on an assistant message")
    assert error(chat({**U, "tool_calls": [CALL]}, A)) == on_user
    assert error(chat(U, {**A, "tool_calls": CALL})) == (
        "bad_tool_call",
        "messages[1].tool_calls must be a list on an assistant message",
    )
    assert normalise(chat(U, {**A, "tool_calls": []}), "messages")["messages"] == [U, A]
    wrong_id = ("bad_tool_call", "messages[1].tool_call_id belongs on a tool message, as a string")
    assert error(chat(U, {**A, "tool_call_id": "c1"})) == wrong_id
    tool_turns = [U, {**A, "tool_calls": [CALL]}, {"role": "tool", "content": "r", "tool_call_id": 1}, A]
    assert error(chat(*tool_turns)) == (
        "bad_tool_call",
        "messages[2].tool_call_id belongs on a tool message, as a string",
    )


@pytest.mark.parametrize(("weight", "kept"), [(0, 0), (1, 1), (True, 1), (False, 0), (None, None)])
def test_assistant_weights_0_or_1(weight, kept):
    row = normalise(chat(U, {**A, "weight": weight}, A), "messages")
    assert row["messages"][1] == (A if kept is None else {**A, "weight": kept})
    assert type(row["messages"][1].get("weight", 0)) is int


@pytest.mark.parametrize("weight", [2, -1, 1.0, "1", [1]])
def test_other_weights_are_refused(weight):
    assert error(chat(U, {**A, "weight": weight})) == (
        "bad_weight",
        f"messages[1].weight must be 0 or 1, got {weight!r}",
    )


def test_weights_only_on_assistant_turns_and_never_all_zero():
    assert error(chat({**U, "weight": 1}, A)) == ("bad_weight", "messages[0].weight is read on assistant messages only")
    assert error(chat(U, {**A, "weight": 0}, U, {**A, "weight": 0})) == (
        "no_trained_turn",
        "every assistant turn has weight 0: nothing to train on",
    )
    assert normalise(chat(U, {**A, "weight": 0}, U, A), "messages")["kind"] == "sft"
    assert normalise(chat(U), "messages") == {"kind": "sft", "messages": [U]}  # no assistant turn: not refused here
    pref = {"prompt": "q", "chosen": [{**A, "weight": 1}], "rejected": "b"}
    assert error(pref, "preference") == (
        "bad_weight",
        "weight has no meaning in a preference row (chosen vs rejected is)",
    )
    pref = {"prompt": [{**U, "name": "x"}], "chosen": "a", "rejected": [{**A, "weight": None}]}
    assert normalise(pref, "preference")["rejected"] == [A]


def test_tool_results_follow_their_calls():
    call2 = {**CALL, "id": "c2"}
    good = [U, {**A, "tool_calls": [CALL, call2]}, {"role": "tool", "content": "r1", "tool_call_id": "c1"}]
    good += [{"role": "tool", "content": "r2", "tool_call_id": "c2"}, A]
    assert [m["role"] for m in normalise(chat(*good), "messages")["messages"]] == [
        "user",
        "assistant",
        "tool",
        "tool",
        "assistant",
    ]
    no_ids = [U, {**A, "tool_calls": [{"function": {"name": "f"}}]}, {"role": "tool", "content": "r"}, A]
    assert normalise(chat(*no_ids), "messages")["messages"][2] == {"role": "tool", "content": "r"}
    assert error(chat(U, {"role": "tool", "content": "r"}, A)) == (
        "bad_tool_call",
        "messages[1] is a tool result with no tool call before it",
    )
    assert error(chat({"role": "tool", "content": "r"}, A)) == (
        "bad_tool_call",
        "messages[0] is a tool result with no tool call before it",
    )
    after_plain = [U, {**A, "tool_calls": [CALL]}, {"role": "tool", "content": "r", "tool_call_id": "c1"}, A]
    after_plain += [{"role": "tool", "content": "r", "tool_call_id": "c1"}]
    assert error(chat(*after_plain)) == ("bad_tool_call", "messages[4] is a tool result with no tool call before it")
    after_user = [U, {**A, "tool_calls": [CALL]}, U, {"role": "tool", "content": "r", "tool_call_id": "c1"}, A]
    assert error(chat(*after_user)) == ("bad_tool_call", "messages[3] is a tool result with no tool call before it")
    wrong = [U, {**A, "tool_calls": [CALL]}, {"role": "tool", "content": "r", "tool_call_id": "c9"}, A]
    assert error(chat(*wrong)) == ("bad_tool_call", "messages[2].tool_call_id 'c9' names none of the calls before it")
    missing = [U, {**A, "tool_calls": [CALL]}, {"role": "tool", "content": "r"}, A]
    assert error(chat(*missing)) == ("bad_tool_call", "messages[2].tool_call_id None names none of the calls before it")
    prompt = [U, {**A, "tool_calls": [CALL]}, {"role": "tool", "content": "r", "tool_call_id": "c9"}]
    assert error({"prompt": prompt, "completion": "a"}, "prompt_completion") == (
        "bad_tool_call",
        "prompt[2].tool_call_id 'c9' names none of the calls before it",
    )


def test_tools_lists():
    tools = [{"type": "function", "function": {"name": "lookup"}}]
    assert normalise(chat(U, A, tools=tools), "messages") == {"kind": "sft", "messages": [U, A], "tools": tools}
    assert normalise(chat(U, A, tools=[]), "messages") == {"kind": "sft", "messages": [U, A]}
    assert normalise(chat(U, A, tools=None), "messages") == {"kind": "sft", "messages": [U, A]}
    pc = normalise({"prompt": "u", "completion": "a", "tools": tools}, "prompt_completion")
    assert pc == {"kind": "sft", "messages": [U, A], "tools": tools}
    pref = normalise({"prompt": "u", "chosen": "a", "rejected": "b", "tools": tools}, "preference")
    assert pref["tools"] == tools and list(pref) == ["kind", "prompt", "chosen", "rejected", "tools"]
    assert "tools" not in normalise({"prompt": "u", "chosen": "a", "rejected": "b", "tools": []}, "preference")
    for bad in ({"name": "lookup"}, ["lookup"], "lookup"):
        assert error(chat(U, A, tools=bad)) == ("wrong_type", "tools must be a list of tool definitions (objects)")


def test_record_shapes_and_missing_fields():
    assert error(["not", "an", "object"]) == ("wrong_type", "expected a JSON object, got list")
    assert error({"prompt": None}, "preference") == ("missing_field", "prompt, chosen, rejected")
    assert error({"prompt": "p", "rejected": "r"}, "preference") == ("missing_field", "chosen")
    assert error({"instruction": "i"}, "alpaca") == ("missing_field", "output")
    assert error({"messages": {"role": "user"}}) == (
        "wrong_type",
        "messages must be a string or a list of messages, got dict",
    )
    assert error({"messages": [U, "a"]}) == ("wrong_type", "messages must be a string or a list of messages, got list")
    assert error({"prompt": 3, "completion": "c"}, "prompt_completion") == (
        "wrong_type",
        "prompt must be a string or a list of messages, got int",
    )
    assert normalise({"messages": "hi"}, "messages") == {"kind": "sft", "messages": [{"role": "user", "content": "hi"}]}
    pc = normalise({"prompt": [{"role": "system", "content": "s"}, U], "completion": [A, U]}, "prompt_completion")
    assert pc == {"kind": "sft", "messages": [{"role": "system", "content": "s"}, U, A, U]}
    pref = normalise({"prompt": "u", "chosen": "a", "rejected": [A]}, "preference")
    assert pref == {"kind": "preference", "prompt": [U], "chosen": [A], "rejected": [A]}


@pytest.mark.parametrize("field", ["instruction", "output", "input"])
def test_alpaca_fields_are_strings(field):
    record = {"instruction": "i", "output": "o", "input": "x", field: 1}
    assert error(record, "alpaca") == ("wrong_type", f"{field} must be a string")


def test_alpaca_user_turn():
    notes: Counter = Counter()
    assert alpaca_user("Do it.", None, notes) == "Do it." and alpaca_user("Do it.", "", notes) == "Do it."
    assert alpaca_user("Do it.", "x", notes) == "Do it.\n\nx" and not notes
    assert alpaca_user(" \n", "x", notes) == "x" and notes == {"alpaca_input_as_instruction": 1}
    assert alpaca_user("", "x") == "x"
    row = normalise({"instruction": "", "input": "x", "output": "o"}, "alpaca", notes)
    assert row == {"kind": "sft", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "o"}]}
    assert notes["alpaca_input_as_instruction"] == 2


def test_the_general_path_makes_rows_and_counts_extras():
    notes: Counter = Counter()
    row = formats._row(chat(U, A), "messages", "src", 4, notes)
    assert msgspec.to_builtins(row) == {"id": "", "source": "src", "line": 4, "kind": "sft", "messages": [U, A]}
    assert all(type(m) is formats.Message for m in row.messages) and not notes
    row = formats._row(chat({**U, "name": "ann"}, A), "messages", "src", 5, notes)
    assert type(row.messages[0]) is formats.RichMessage and row.messages[0].name == "ann"
    assert type(row.messages[1]) is formats.Message and notes == {"chat_extras": 1}
    tools = [{"type": "function", "function": {"name": "f"}}]
    row = formats._row(chat(U, A, tools=tools), "messages", "src", 6, notes)
    assert row.tools == tools and notes == {"chat_extras": 2}
    pref = formats._row({"prompt": "u", "chosen": "a", "rejected": "b"}, "preference", "src", 7, notes)
    assert (
        msgspec.to_builtins(pref)["rejected"] == [{"role": "assistant", "content": "b"}] and notes["chat_extras"] == 2
    )
    assert [m.content for m in pref.all_messages()] == ["u", "a", "b"]


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("ok \udcff", "not UTF-8 (byte 0xff)"),
        ("\udc80", "not UTF-8 (byte 0x80)"),
        ("x\ud800", "lone surrogate \\ud800 (not valid Unicode text)"),
        ("\udc7f", "lone surrogate \\udc7f (not valid Unicode text)"),
        ("\udd00", "lone surrogate \\udd00 (not valid Unicode text)"),
    ],
)
def test_text_that_cannot_be_written_as_utf8(text, detail):
    for record in (chat(U, {**A, "content": text}), chat({**U, "role": text}, A)):
        with pytest.raises(NormaliseError) as caught:
            formats._row(record, "messages", "src", 1, Counter())
        assert (caught.value.reason, caught.value.detail) == ("encoding", detail)


def test_fast_path_rows():
    notes: Counter = Counter()
    pc = formats._from_prompt_completion(
        formats._PromptCompletion("u", [formats.Message("assistant", "a")]), "s", 3, notes
    )
    assert msgspec.to_builtins(pc) == {"id": "", "source": "s", "line": 3, "kind": "sft", "messages": [U, A]}
    al = formats._from_alpaca(formats._Alpaca("", "o", "x"), "s", 2, notes)
    assert msgspec.to_builtins(al)["messages"] == [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "o"},
    ]
    assert notes == {"alpaca_input_as_instruction": 1}
    pref = formats._from_preference(formats._Preference("u", "a", [formats.Message("assistant", "b")]), "s", 1, notes)
    assert msgspec.to_builtins(pref) == {
        "id": "",
        "source": "s",
        "line": 1,
        "kind": "preference",
        "prompt": [U],
        "chosen": [A],
        "rejected": [{"role": "assistant", "content": "b"}],
    }
    msgs = [formats.Message("user", "u")]
    pref = formats._from_preference(formats._Preference(msgs, msgs, msgs), "s", 1, notes)
    assert pref.prompt is msgs and pref.chosen is msgs and pref.rejected is msgs
    assert formats._from_chat(formats._Chat(msgs), "s", 9, notes).messages is msgs
    assert formats._turns("t", "system") == [formats.Message("system", "t")] and formats._turns(msgs, "user") is msgs


def test_a_problem_as_its_quarantine_row():
    problem = formats.Problem("src", 7, "encoding", "not UTF-8 (byte 0xff)", "x\udcff" + "y" * 600)
    row = problem.as_row()
    assert row == {
        "source": "src",
        "line": 7,
        "reason": "encoding",
        "detail": "not UTF-8 (byte 0xff)",
        "raw": "x\\udcff" + "y" * 498,  # the first 500 characters, bytes that were not UTF-8 as escapes
    }
    assert formats.Problem("s", 1, "r", "d", "").as_row()["raw"] == ""


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected", "completion"])
def test_each_field_of_a_record_is_named_in_its_problem(field):
    fmt = "prompt_completion" if field == "completion" else "preference"
    record = {"prompt": "q", "chosen": "a", "rejected": "b", "completion": "c", field: [{"role": "user"}]}
    assert error(record, fmt) == ("missing_field", f"{field}[0] needs 'role' and 'content'")


def test_only_tool_results_is_a_tool_result_without_a_call():
    assert error({"messages": [{"role": "tool", "content": "r"}]}) == (
        "bad_tool_call",
        "messages[0] is a tool result with no tool call before it",
    )


@pytest.mark.parametrize(
    ("fmt", "record"),
    [
        ("messages", {"messages": [U, A]}),
        ("prompt_completion", {"prompt": "u", "completion": [A]}),
        ("alpaca", {"instruction": "i", "input": "x", "output": "o"}),
        ("preference", {"prompt": [U], "chosen": "a", "rejected": "b"}),
    ],
)
def test_the_fast_path_makes_the_general_paths_row(fmt, record):
    shape, make = formats.FAST[fmt]
    fast = make(msgspec.convert(record, shape), "src", 3, Counter())
    assert fast == formats._row(record, fmt, "src", 3, Counter()) and fast.id == ""
