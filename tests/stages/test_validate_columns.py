"""String-form preference pairs held as columns (tunegate.pair_columns) give validate's outputs byte for byte.

Every test here compares the two ways of reading the same file through the stage's real `run()`: the pairs as
columns (`use_columns=True`, the default) and as one `Row` per line (`use_columns=False`). The generated corpus
holds what can make them differ: strings JSON must escape (quotes, backslashes, control characters, U+2028),
non-ASCII text, characters that do not show (stripped, reported or quarantined), secrets (masked, reported or
quarantined), placeholders, empty and blank answers, chosen equal to rejected, repeats of the same content (ids
numbered), rows too long for the token bounds, extra keys, `tools: null`, malformed lines, a line that is not UTF-8,
a lone surrogate escape, blank lines, CRLF endings and a last line without its newline.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import msgspec
import pytest

from stages import validate
from tunegate.config import Source, Validate
from tunegate.formats import assign_ids, load_rows
from tunegate.pair_columns import PairRows, read_pairs

PIECES = [
    "Where is order 12345?",
    "refund",
    'a "quoted" word',
    "back\\slash",
    "tab\there",
    "line\nbreak",
    "bell\x07",
    "del\x7f",
    "café",
    "注文",
    "😀",
    "para\u2028sep",
    "zero\u200bwidth",
    "bidi\u202eoverride",
    "ann@example.com",
    "ghp_" + "a1B2" * 9,
    "Dear {name},",
    "  padded  ",
    "{{ leftover }}",
]


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(PIECES) for _ in range(rng.randint(1, 6)))


def _pair(rng: random.Random) -> dict:
    chosen = _text(rng)
    rejected = rng.choice([_text(rng), f" {chosen}\n", "", "   "]) if rng.random() < 0.15 else _text(rng)
    row = {"prompt": _text(rng), "chosen": chosen, "rejected": rejected}
    if rng.random() < 0.05:
        row["prompt"] = "word " * 400  # past max_tokens: quarantined as length
    if rng.random() < 0.1:
        row["score_chosen"] = rng.random()  # a key the pair does not read
    if rng.random() < 0.05:
        row["tools"] = None
    return row


MALFORMED = [
    '{"prompt": "Where is it?", "chosen": "Here."',  # broken JSON
    '{"prompt": "Where is it?", "rejected": "No."}',  # a missing field
    '{"prompt": 5, "chosen": "Here.", "rejected": "No."}',  # a number for a string
    '{"prompt": "Where is it?", "chosen": null, "rejected": "No."}',
    "[1, 2, 3]",
    '"just a string"',
    '{"prompt": "a lone \\ud800 surrogate", "chosen": "Here.", "rejected": "No."}',
]
NOT_UTF8 = b'{"prompt": "caf\xe9 in Latin-1", "chosen": "Here.", "rejected": "No."}'  # quarantined as encoding


def write_pairs(path: Path, n: int, seed: int, repeats: bool = True) -> Path:
    """n lines of generated pairs, with malformed lines, blank lines, repeats (unless not) and CRLF endings among
    them."""
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.05 and lines and repeats:
            lines.append(rng.choice(lines))  # a repeat of an earlier line: its id gets -2, -3, ...
        elif roll < 0.09:
            lines.append(rng.choice(MALFORMED))
        elif roll < 0.1:
            lines.append("")
        else:
            lines.append(json.dumps(_pair(rng), ensure_ascii=rng.random() < 0.5))
    data = "".join(line + ("\r\n" if rng.random() < 0.1 else "\n") for line in lines).encode()
    middle = data.index(b"\n", len(data) // 2) + 1
    path.write_bytes(data[:middle] + NOT_UTF8 + b"\n" + data[middle:].rstrip(b"\r\n"))  # the last line: no newline
    return path


def _outputs(out: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(out.iterdir())}


def _both(
    cfg: Validate, path: Path, tokenizer, tmp_path: Path, role: str = "preference", fmt: str = "auto"
) -> tuple[dict, dict]:
    """(metrics, outputs) of validate with the pairs as columns, checked equal to those with rows as objects."""
    sources = {"prefs": Source(path=str(path), role=role, format=fmt)}
    got = {}
    for columns in (True, False):
        out = tmp_path / f"out-{columns}"
        metrics = validate.run(cfg, sources, tokenizer, out, use_columns=columns)
        got[columns] = (json.loads(json.dumps(metrics)), _outputs(out))
    assert got[True][0] == got[False][0]
    for name, data in got[False][1].items():
        assert got[True][1][name] == data, f"{name} differs"
    return got[True]


@pytest.mark.parametrize(
    ("pii", "invisible", "seed"),
    [("mask", "strip", 1), ("report", "report", 2), ("quarantine", "quarantine", 3), ("mask", "report", 4)],
)
def test_pairs_as_columns_write_what_rows_write(pii, invisible, seed, tmp_path, tokenizer):
    path = write_pairs(tmp_path / "prefs.jsonl", 900, seed, repeats=seed != 4)  # ids without repeats, or with
    assert isinstance(read_pairs("prefs", path, "auto")[0], PairRows)  # the column path is the one taken
    cfg = Validate(pii=pii, invisible=invisible, max_invalid_share=1.0, max_tokens=300)
    metrics, outputs = _both(cfg, path, tokenizer, tmp_path)
    source = metrics["sources"]["prefs"]
    # the corpus reaches what it is there for: each kind of finding, and repeats
    assert source["reasons"].get("malformed_json") and source["reasons"].get("length") and source["reasons"]["encoding"]
    assert source["reasons"].get("chosen_equals_rejected") and source["reasons"].get("empty_content")
    assert any(source[key] for key in source if key.startswith("pii_"))
    assert any(source[key] for key in source if key.startswith("invisible_"))
    assert (b'-2"' in outputs["prefs.jsonl"] + outputs["quarantine.jsonl"]) == (seed != 4)
    assert source["in"] == source["kept"] + source["quarantined"]


def test_a_line_of_another_shape_sends_the_file_to_the_row_path(tmp_path, tokenizer):
    """A conversation among string pairs (or a tools list): the file is read as rows, with the same outputs."""
    path = write_pairs(tmp_path / "prefs.jsonl", 200, 5)
    conversation = {
        "prompt": [{"role": "user", "content": "Where is order 12345?"}],
        "chosen": [{"role": "assistant", "content": "It ships today."}],
        "rejected": [{"role": "assistant", "content": "No idea."}],
    }
    for extra in (conversation, {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go away.", "tools": []}):
        path.write_bytes(path.read_bytes() + b"\n" + json.dumps(extra).encode())
        assert read_pairs("prefs", path, "auto") is None
        metrics, _ = _both(Validate(max_invalid_share=1.0), path, tokenizer, tmp_path)
        assert metrics["sources"]["prefs"]["in"] > 190


def test_pairs_in_a_source_of_another_role_or_format_are_read_as_rows(tmp_path, tokenizer):
    path = write_pairs(tmp_path / "prefs.jsonl", 100, 6)
    assert read_pairs("prefs", path, "prompt_completion") is None
    assert read_pairs("prefs", tmp_path / "missing.jsonl", "auto") is None
    metrics, _ = _both(Validate(max_invalid_share=1.0), path, tokenizer, tmp_path, role="domain")
    assert metrics["sources"]["prefs"]["reasons"].get("wrong_format")


def test_a_file_of_no_valid_pair_is_read_alike(tmp_path, tokenizer):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(line + "\n" for line in MALFORMED), encoding="utf-8")
    assert isinstance(read_pairs("prefs", path, "preference")[0], PairRows)
    cfg = Validate(max_invalid_share=1.0)
    metrics, outputs = _both(cfg, path, tokenizer, tmp_path, fmt="preference")
    assert metrics["sources"]["prefs"]["kept"] == 0 and outputs["prefs.jsonl"] == b""


def test_a_template_that_refuses_the_pairs_quarantines_them_alike(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(
        tokenizer,
        "chat_template",
        "{% if messages[0]['role'] == 'user' %}{{ raise_exception('no user turns here') }}{% endif %}",
    )
    path = write_pairs(tmp_path / "prefs.jsonl", 100, 7)
    metrics, _ = _both(Validate(max_invalid_share=1.0), path, tokenizer, tmp_path)
    assert metrics["sources"]["prefs"]["reasons"]["template_refused"] and not metrics["sources"]["prefs"]["kept"]


@pytest.mark.parametrize("repeats", [True, False])
def test_pair_rows_are_the_rows_the_row_path_reads(tmp_path, repeats):
    """As a sequence, PairRows holds the very rows (ids included) `load_rows` gives for the file."""
    path = write_pairs(tmp_path / "prefs.jsonl", 300, 8, repeats)
    pairs, problems, fmt, notes = read_pairs("prefs", path, "auto")
    rows, row_problems, row_fmt, row_notes = load_rows("prefs", path, ids=False)
    assert (problems, fmt, notes) == (row_problems, row_fmt, row_notes)
    assign_ids("prefs", rows)
    pairs.assign_ids()
    assert pairs.ids == [r.id for r in rows] and len(set(pairs.ids)) == len(rows) > 250
    assert list(pairs) == rows and len(pairs) == len(rows)
    assert pairs[-1] == rows[-1] and pairs[3] is pairs[3]  # a row is made once, then the same object
    assert list(pairs[10:20:3]) == rows[10:20:3]
    picked = pairs.take([0, 5, 7]).take([1, 2])
    assert list(picked) == [rows[5], rows[7]] and picked.ids == [rows[5].id, rows[7].id]
    with pytest.raises(IndexError):
        pairs[len(rows)]
    # written lines: as msgspec writes the rows, a row changed since written from the row
    pairs[7].chosen[0].content = "changed"
    rows[7].chosen[0].content = "changed"
    kept = pairs.take([k for k in range(len(rows)) if k % 4])
    expected = msgspec.json.Encoder().encode_lines([r for k, r in enumerate(rows) if k % 4])
    assert b"".join(kept.chunks()) == expected and b"changed" in expected


def test_rows_made_are_written_in_runs_and_any_source_name_frames_the_lines(tmp_path):
    """Most rows made (a mask on every row, say) are encoded together, not a write per row; a source's name cannot
    clash with the markers the line framing is found with."""
    path = write_pairs(tmp_path / "prefs.jsonl", 3000, 9, repeats=False)  # ids made in Arrow, names escaped
    for name in ("prefs", "\0prompt", "\0id", 'a "quoted"\\name'):
        pairs = read_pairs(name, path, "auto")[0]
        rows = load_rows(name, path, ids=False)[0]
        pairs.assign_ids()
        assign_ids(name, rows)
        made = [pairs[k] for k in range(20, 2500)] + [pairs[2600]]
        chunks = list(pairs.chunks())
        assert len(chunks) < 10 and made[0] is pairs[20]
        assert b"".join(chunks) == msgspec.json.Encoder().encode_lines(rows), name


def test_a_quarantined_line_with_tools_leaves_the_pairs_as_columns(tmp_path, tokenizer):
    """A line read and quarantined (here for a lone surrogate) is not counted as a row with tools, and the pairs stay
    columns: no row is made for the tools check."""
    path = write_pairs(tmp_path / "prefs.jsonl", 200, 10)
    bad = {
        "prompt": "\ud800",
        "chosen": "c",
        "rejected": "r",
        "tools": [{"type": "function", "function": {"name": "f"}}],
    }
    path.write_bytes(path.read_bytes() + b"\n" + json.dumps(bad).encode() + b"\n")
    pairs, problems, _, notes = read_pairs("prefs", path, "auto")
    assert problems[-1].reason == "encoding" and "chat_extras" not in notes
    checks = validate._Checks(Validate(), None, tokenizer, {}, None, None)
    assert validate._trainable_tools(checks, "prefs", pairs, True)[0] is pairs and not pairs._columns.made
    metrics, _ = _both(Validate(max_invalid_share=1.0), path, tokenizer, tmp_path)
    assert "chat_extras" not in metrics["sources"]["prefs"]["read"]


def test_the_corpus_has_pairs_read_as_columns():
    """tests/corpus/validate holds a file the column path reads (its cases run both ways there)."""
    from tests.corpus.validate.build import FILES

    assert isinstance(read_pairs("s", FILES / "pref_strings.jsonl", "auto")[0], PairRows)
