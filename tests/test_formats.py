"""Reading the formats people use, and one clear line when a source cannot be read."""

import json

import pandas as pd
import pytest

from tunegate.errors import UserError
from tunegate.formats import load_source, normalise

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize(
    "record, fmt, expected",
    [
        (CHAT, "messages", CHAT["messages"]),
        ({"prompt": "hi", "completion": "hello"}, "prompt_completion", CHAT["messages"]),
        (
            {"instruction": "Reverse.", "input": "abc", "output": "cba"},
            "alpaca",
            [{"role": "user", "content": "Reverse.\n\nabc"}, {"role": "assistant", "content": "cba"}],
        ),
    ],
)
def test_sft_shapes_normalise_to_messages(record, fmt, expected):
    assert normalise(record, fmt) == {"kind": "sft", "messages": expected}


def test_preference_strings_and_message_lists():
    row = normalise({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}, "preference")
    assert row["prompt"] == [{"role": "user", "content": "q"}]
    assert row["chosen"] == [{"role": "assistant", "content": "a"}] and row["rejected"] == [
        {"role": "assistant", "content": "b"}
    ]


def test_labelled_answers_read_as_unpaired_rows_with_a_boolean_label(tmp_path):
    row = normalise({"prompt": "q", "completion": "a", "label": "true", "tools": []}, "unpaired")
    assert row == {
        "kind": "unpaired",
        "prompt": [{"role": "user", "content": "q"}],
        "completion": [{"role": "assistant", "content": "a"}],
        "label": True,
    }
    frame = pd.DataFrame({"prompt": ["q1", "q2"], "completion": ["a", "b"], "label": [True, False]})
    for path in (tmp_path / "f.csv", tmp_path / "f.parquet"):  # a CSV cell is text, a Parquet column a boolean
        frame.to_csv(path, index=False) if path.suffix == ".csv" else frame.to_parquet(path)
        rows, problems, fmt = load_source("fb", path)
        assert fmt == "unpaired" and not problems and [r["label"] for r in rows] == [True, False]


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json"])
def test_table_files(tmp_path, suffix):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(5)]
    path = tmp_path / f"d{suffix}"
    if suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    elif suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        path.write_text(json.dumps(rows))
    loaded, problems, fmt = load_source("s", path)
    assert fmt == "prompt_completion" and not problems and len(loaded) == 5
    assert loaded[0]["messages"][1]["content"] == "c0"


def test_ids_are_stable_and_unique(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text((json.dumps(CHAT) + "\n") * 2)
    rows, _, _ = load_source("s", path)
    assert rows[0]["id"] != rows[1]["id"] and rows[1]["id"] == rows[0]["id"] + "-2"
    path.write_text("\n" + (json.dumps(CHAT) + "\n") * 2)  # moving rows does not change ids
    assert [r["id"] for r in load_source("s", path)[0]] == [r["id"] for r in rows]


def test_ids_left_to_the_caller_are_the_ids_load_rows_gives(tmp_path):
    """validate hashes the ids itself (beside other work): `load_rows(ids=False)` then `assign_ids` on the same rows
    gives each row the id `load_rows` would have, repeats numbered in file order."""
    from tunegate.formats import assign_ids, load_rows

    path = tmp_path / "d.jsonl"
    other = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path.write_text("".join(json.dumps(r) + "\n" for r in (CHAT, other, CHAT, CHAT)))
    rows = load_rows("s", path, ids=False)[0]
    assert {r.id for r in rows} == {""}
    assign_ids("s", rows)
    expected = [r.id for r in load_rows("s", path)[0]]
    assert [r.id for r in rows] == expected and expected[2:] == [expected[0] + "-2", expected[0] + "-3"]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_ids_of_distinct_rows_survive_reordering_the_file(tmp_path, suffix):
    """An id names a row's content, not its position: shuffling distinct rows gives each row the id it had."""
    records = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(6)]
    ids = []
    for order in (records, [records[k] for k in (3, 5, 0, 4, 1, 2)]):
        path = tmp_path / f"{len(ids)}{suffix}"
        if suffix == ".parquet":
            pd.DataFrame(order).to_parquet(path)
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in order))
        rows, problems, _ = load_source("s", path)
        assert not problems
        ids.append({r["messages"][0]["content"]: r["id"] for r in rows})
    assert ids[0] == ids[1] and len(set(ids[0].values())) == len(records)
    assert all(i.startswith("s-") and "-" not in i[2:] for i in ids[0].values())  # no occurrence suffix


def test_hub_dataset_offline_is_one_line():
    with pytest.raises(UserError) as err:
        load_source("s", "no-such-org/no-such-dataset")
    assert "cannot load from the Hugging Face hub" in str(err.value) and "\n" not in str(err.value)


def test_missing_file():
    with pytest.raises(UserError, match="not found"):
        load_source("s", "data/nope.jsonl")


TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
LINES = {
    "messages": [
        CHAT,
        {"messages": [{"role": "user", "content": "hi", "name": "ann", "weight": 1}], "extra": {"k": [1, 2]}},
        {"messages": "just a string"},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"role": "user"}]},
        {"messages": None},
        {"messages": []},
        {"messages": [{"role": "user", "content": "été 🙂 \u2028 \\u0000"}]},
        ["not", "an", "object"],
    ],
    "prompt_completion": [
        {"prompt": "p", "completion": "c"},
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "completion": "c"},
        {"prompt": "p", "completion": None},
        {"prompt": "p"},
        {"prompt": 3, "completion": "c"},
    ],
    "alpaca": [
        {"instruction": "i", "input": "x", "output": "o"},
        {"instruction": "i", "input": "", "output": "o"},
        {"instruction": "i", "output": "o"},
        {"instruction": "i", "input": None, "output": "o"},
        {"instruction": "i", "input": 1, "output": "o"},
        {"instruction": None, "output": "o"},
        {"instruction": "", "input": "x", "output": "o"},  # the input is the user turn (counted)
        {"instruction": " \n", "input": "x", "output": "o"},
        {"instruction": "", "input": "", "output": "o"},
    ],
    "preference": [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {
            "prompt": [{"role": "user", "content": "q"}],
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": "b",
        },
        {"prompt": "q", "chosen": "a"},
        {"prompt": "q", "chosen": {"role": "assistant"}, "rejected": "b"},
        {"prompt": "q", "chosen": "a", "rejected": "b", "tools": TOOLS},
    ],
    "unpaired": [
        {"prompt": "q", "completion": "a", "label": True},
        {
            "prompt": [{"role": "user", "content": "q"}],
            "completion": [{"role": "assistant", "content": "a"}],
            "label": False,
        },
        {"prompt": "q", "completion": "a", "label": 1},  # a number or a table's text: the general path reads it
        {"prompt": "q", "completion": "a", "label": "FALSE"},
        {"prompt": "q", "completion": "a", "label": "maybe"},
        {"prompt": "q", "completion": "a", "label": None},
        {"prompt": "q", "completion": "a"},
        {"prompt": "q", "completion": "a", "label": True, "tools": TOOLS},
        {"prompt": "q", "completion": [{"role": "assistant", "content": "a", "weight": 1}], "label": True},
    ],
}
LINES["messages"].append({**CHAT, "tools": TOOLS})  # a tools list beside plain turns stays on the row
LINES["messages"].append({**CHAT, "tools": []})
LINES["prompt_completion"].append({"prompt": "p", "completion": "c", "tools": TOOLS})


@pytest.mark.parametrize("fmt", sorted(LINES))
def test_fast_path_reads_exactly_like_the_general_path(tmp_path, fmt, monkeypatch):
    """Lines of the usual shape are decoded and type-checked by msgspec; every other line takes the
    general path. Forcing every line through the general path gives the same rows and problems."""
    import msgspec

    from tunegate import formats

    path = tmp_path / "d.jsonl"
    raw = [json.dumps(r, ensure_ascii=False) for r in LINES[fmt]]
    path.write_bytes(
        ("\n".join(raw) + "\r\n\n   \n" + raw[0] + "\n" + '{"broken\n' + b"\xff\n".decode("latin-1")).encode(
            "utf-8", "surrogateescape"
        )
        + b"\xff\xfe\n"
        + raw[0].encode()
    )
    fast = formats.load_rows("s", path, fmt)

    class Never(msgspec.Struct):
        never_a_field: int

    monkeypatch.setattr(formats, "FAST", {k: (Never, make) for k, (_, make) in formats.FAST.items()})
    general = formats.load_rows("s", path, fmt)
    assert msgspec.to_builtins(fast[0]) == msgspec.to_builtins(general[0])
    assert fast[1] == general[1] and fast[2] == general[2] == fmt and fast[3] == general[3]
    assert len(fast[0]) + len(fast[1]) == len(LINES[fmt]) + 5  # every non-blank line is a row or a problem
    assert fast[1][-1].reason == "encoding" and fast[1][-2].reason == "malformed_json"
