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
        ({"instruction": "Reverse.", "input": "abc", "output": "cba"}, "alpaca",
         [{"role": "user", "content": "Reverse.\n\nabc"}, {"role": "assistant", "content": "cba"}]),
    ],
)
def test_sft_shapes_normalise_to_messages(record, fmt, expected):
    assert normalise(record, fmt) == {"kind": "sft", "messages": expected}


def test_preference_strings_and_message_lists():
    row = normalise({"prompt": "q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}, "preference")
    assert row["prompt"] == [{"role": "user", "content": "q"}]
    assert row["chosen"] == [{"role": "assistant", "content": "a"}] and row["rejected"] == [{"role": "assistant", "content": "b"}]


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


def test_hub_dataset_offline_is_one_line():
    with pytest.raises(UserError) as err:
        load_source("s", "no-such-org/no-such-dataset")
    assert "cannot load from the Hugging Face hub" in str(err.value) and "\n" not in str(err.value)


def test_missing_file():
    with pytest.raises(UserError, match="not found"):
        load_source("s", "data/nope.jsonl")
