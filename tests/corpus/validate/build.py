"""The adversarial corpus for `validate`, assembled in a folder: the committed files (files/) plus those
built here, deterministically, because they are binary or are not plain files (Parquet, UTF-16 and
UTF-32 text, a file past the format-sniffing window, symlinks, folders, saved datasets, a missing path).

    python -m tests.corpus.validate.build /tmp/corpus    # to look at them

expected.yaml (next to this file) holds every file's expected outcome.
"""

from __future__ import annotations

import codecs
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FILES = HERE / "files"
EXPECTED = HERE / "expected.yaml"


def _chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


ROWS = [
    _chat("Where is order 12345?", "It ships today."),
    _chat("Cancel order 23456 please.", "Order 23456 is cancelled."),
    _chat("Où est la commande 34567 ?", "Elle arrive demain, 🙂."),
]


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _parquet(path: Path, columns: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path)


def _text_files(dest: Path) -> None:
    text = _jsonl(ROWS)
    (dest / "chat_utf16le_bom.jsonl").write_bytes(codecs.BOM_UTF16_LE + text.encode("utf-16-le"))
    (dest / "chat_utf16be_bom.jsonl").write_bytes(codecs.BOM_UTF16_BE + text.encode("utf-16-be"))
    (dest / "chat_utf32le_bom.jsonl").write_bytes(codecs.BOM_UTF32_LE + text.encode("utf-32-le"))
    (dest / "chat_utf16le_no_bom.jsonl").write_bytes(text.encode("utf-16-le"))
    # a byte order mark, one good line, then a lone low surrogate (0xDC00) in line 2: not decodable
    (dest / "chat_utf16_broken.jsonl").write_bytes(
        codecs.BOM_UTF16_LE + _jsonl(ROWS[:1]).encode("utf-16-le") + b"\x00\xdc" + "x\n".encode("utf-16-le")
    )
    csv = "prompt,completion\r\nWhere is order 12345?,It ships today.\r\nCode?,007\r\nOù ?,Là.\r\n"
    (dest / "pc_utf16le_bom.csv").write_bytes(codecs.BOM_UTF16_LE + csv.encode("utf-16-le"))
    # 1,000 good lines fill the window `format: auto` samples; line 1,001 has bytes that are not UTF-8
    good = [json.dumps(_chat(f"Where is order {10000 + i}?", "It ships today.")) for i in range(1000)]
    bad = b'{"messages": [{"role": "user", "content": "caf\xe9"}, {"role": "assistant", "content": "ok"}]}'
    tail = json.dumps(_chat("And order 99999?", "Tomorrow."))
    (dest / "chat_invalid_utf8_after_sniff.jsonl").write_bytes(
        ("\n".join(good) + "\n").encode() + bad + b"\n" + tail.encode() + b"\n"
    )


def _parquet_files(dest: Path) -> None:
    messages = [r["messages"] for r in ROWS]
    _parquet(dest / "chat.parquet", {"messages": messages})
    _parquet(
        dest / "pc.parquet",
        {
            "prompt": ["Where is order 12345?", "What is 6 times 7?", "Track 23456"],
            "completion": ["It ships today.", "42", None],  # a null completion: missing_field
        },
    )
    _parquet(dest / "pc_int_completion.parquet", {"prompt": ["6 times 7?", "3 plus 4?"], "completion": [42, 7]})
    _parquet(
        dest / "alpaca.parquet",
        {
            "instruction": ["Reverse the word.", "Name a colour.", ""],
            "input": ["lamp", None, "Capital of France?"],  # null input: none; empty instruction: input used
            "output": ["pmal", "Blue.", "Paris."],
        },
    )
    _parquet(
        dest / "pref.parquet",
        {
            "prompt": ["Where is order 12345?", "Refund 23456?", "Same?"],
            "chosen": ["It ships today.", "Refund issued.", "Yes."],
            "rejected": ["Dunno.", "No.", "Yes."],  # the last: chosen_equals_rejected
        },
    )


def _paths(dest: Path) -> None:
    (dest / "symlink_to_chat.jsonl").symlink_to("chat_clean.jsonl")
    (dest / "broken_symlink.jsonl").symlink_to("no_such_target.jsonl")
    (dest / "folder.jsonl").mkdir()
    (dest / "folder.jsonl" / "rows.jsonl").write_text(_jsonl(ROWS))
    (dest / "plain_folder").mkdir()


def _saved_datasets(dest: Path) -> None:
    from datasets import Dataset, DatasetDict

    Dataset.from_list(ROWS).save_to_disk(str(dest / "saved_dataset"))
    DatasetDict({"train": Dataset.from_list(ROWS)}).save_to_disk(str(dest / "saved_dataset_dict"))
    broken = dest / "broken_saved_dataset"
    Dataset.from_list(ROWS).save_to_disk(str(broken))
    for arrow in broken.glob("*.arrow"):  # the data is gone, the metadata says it is there
        arrow.unlink()


def build(dest: Path) -> Path:
    """The whole corpus in `dest` (created; must not exist)."""
    shutil.copytree(FILES, dest)
    _text_files(dest)
    _parquet_files(dest)
    _paths(dest)
    _saved_datasets(dest)
    return dest


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
