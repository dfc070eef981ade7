"""The demo data generator: determinism, the defect ledger, eval hold-out, and clean rows that are clean.

Checks are written independently of the generator's own helpers where it matters (normalisation,
shingles, containment), so a bug there cannot hide itself.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
import unicodedata
from collections import defaultdict
from pathlib import Path

import pytest

from demo import data as demo

ROOT = Path(__file__).resolve().parents[1]
RAW = {"domain.jsonl": demo.RAW_DOMAIN, "general.jsonl": demo.RAW_GENERAL, "preferences.jsonl": demo.RAW_PREFERENCES}
PLANTED = {
    "domain.jsonl": demo.DOMAIN_DEFECTS,
    "general.jsonl": demo.GENERAL_DEFECTS,
    "preferences.jsonl": demo.PREFERENCE_DEFECTS,
}
CLEAN = {
    "domain.jsonl": demo.DOMAIN_CLEAN,
    "general.jsonl": demo.GENERAL_CLEAN,
    "preferences.jsonl": demo.PREFERENCE_CLEAN,
}
REQUIRED = {
    "domain.jsonl": ("messages",),
    "general.jsonl": ("instruction", "output"),
    "preferences.jsonl": ("prompt", "chosen", "rejected"),
}
EVAL_FILES = (demo.SUPPORT_GEN, demo.SUPPORT_MC, demo.GENERAL_GEN, demo.GENERAL_MC)
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
PLACEHOLDER = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*\}|\{\{[^}]*\}\}")


def norm(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(re.sub(r"[^\w\s]+", " ", text).split())


def shingle_set(text: str, n: int = 3) -> frozenset[str]:
    w = norm(text).split()
    return frozenset({" ".join(w)}) if len(w) <= n else frozenset(" ".join(w[i : i + n]) for i in range(len(w) - n + 1))


def jac(a: str, b: str) -> float:
    x, y = shingle_set(a), shingle_set(b)
    return len(x & y) / len(x | y)


def digests(files: dict[str, list]) -> dict[str, str]:
    return {path: hashlib.sha256(demo.serialise(path, rows)).hexdigest() for path, rows in files.items()}


def prompt_answer(name: str, rec: dict) -> tuple[str, str]:
    """(user turn, answer) the way the pipeline builds them from each raw format."""
    if name == "domain.jsonl":
        return rec["messages"][0]["content"], rec["messages"][-1]["content"]
    if name == "general.jsonl":
        return rec["instruction"] + (f"\n\n{rec['input']}" if rec.get("input") else ""), rec["output"]
    return rec["prompt"], rec["chosen"]


def row_text(name: str, rec: dict) -> str:
    prompt, answer = prompt_answer(name, rec)
    return f"{prompt}\n{answer}" + (f"\n{rec['rejected']}" if name == "preferences.jsonl" else "")


@pytest.fixture(scope="module")
def files() -> dict[str, list]:
    return demo.generate()


@pytest.fixture(scope="module")
def ledger(files) -> dict:
    return files[demo.LEDGER][0]


@pytest.fixture(scope="module")
def clean(files, ledger) -> dict[str, list[dict]]:
    """The parsed rows of each raw file that the ledger does not list."""
    out = {}
    for name, path in RAW.items():
        listed = {line for entry in ledger[name].values() if isinstance(entry, dict) for line in entry["lines"]}
        out[name] = [json.loads(line) for n, line in enumerate(files[path], 1) if n not in listed]
    return out


# --- determinism ----------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes(files):
    assert digests(demo.generate()) == digests(files)


def test_other_seed_changes_every_file(files):
    ours, theirs = digests(files), digests(demo.generate(seed=7))
    assert [p for p in ours if ours[p] == theirs[p]] == []


def test_output_does_not_depend_on_hash_randomisation(files):
    code = (
        "import hashlib, json; from demo import data as d; "
        "print(json.dumps({p: hashlib.sha256(d.serialise(p, r)).hexdigest() for p, r in d.generate().items()}))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "4321"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == digests(files)


# --- sizes and the ledger -------------------------------------------------------------------------


def test_file_sizes(files, ledger):
    assert len(files[demo.PRETRAIN]) == demo.PRETRAIN_ROWS
    assert len(files[demo.SUPPORT_GEN]) == len(files[demo.SUPPORT_MC]) == demo.SUPPORT_EVAL
    assert len(files[demo.GENERAL_GEN]) == demo.GENERAL_GEN_PER_TASK * len(demo.GENERAL_GEN_TASKS)
    assert len(files[demo.GENERAL_MC]) == demo.GENERAL_MC_PER_TASK * len(demo.GENERAL_MC_TASKS)
    assert set(ledger) == set(RAW)
    for name, path in RAW.items():
        entry = ledger[name]
        planted = {k: v["count"] for k, v in entry.items() if isinstance(v, dict)}
        assert planted == PLANTED[name]
        assert entry["clean_rows"] == CLEAN[name]
        assert entry["total_lines"] == len(files[path]) == CLEAN[name] + sum(planted.values())


def test_ledger_lines_are_distinct_and_in_range(files, ledger):
    for name, path in RAW.items():
        lines = [line for e in ledger[name].values() if isinstance(e, dict) for line in e["lines"]]
        assert len(lines) == len(set(lines))
        assert all(1 <= n <= len(files[path]) for n in lines)
        for e in ledger[name].values():
            if isinstance(e, dict):
                assert e["lines"] == sorted(e["lines"]) and len(e["lines"]) == e["count"]
                for extra in ("of_lines", "eval_ids"):
                    assert len(e.get(extra, e["lines"])) == e["count"]


def _check_defect(name: str, defect: str, line: str, original: str | None, eval_row: dict | None) -> None:
    if defect == "malformed_json":
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)
        return
    rec = json.loads(line)
    assert isinstance(rec, dict)
    if defect == "missing_field":
        assert any(rec.get(f) is None for f in REQUIRED[name])
        return
    if defect == "wrong_role":
        assert [m["role"] for m in rec["messages"]] != ["user", "assistant"]
        return
    if defect == "chosen_equals_rejected":
        assert rec["chosen"].strip() == rec["rejected"].strip()
        return
    prompt, answer = prompt_answer(name, rec)
    if defect == "empty_content":
        assert answer.strip() == ""
    elif defect == "template_leftover":
        assert PLACEHOLDER.search(prompt)
    elif defect == "pii_email":
        assert EMAIL.search(prompt)
        assert [m["role"] for m in rec["messages"]] == ["user", "assistant"] and json.loads(answer)[
            "order_id"
        ] in prompt
    elif defect == "eval_leak":
        assert prompt == eval_row.get("message", eval_row.get("prompt"))
        assert answer == eval_row["answer"]
    else:
        orig = json.loads(original)
        orig_prompt, orig_answer = prompt_answer(name, orig)
        if defect == "exact_duplicate":
            assert norm(row_text(name, rec)) == norm(row_text(name, orig))
        elif defect == "near_duplicate":
            assert norm(prompt) != norm(orig_prompt) and answer == orig_answer
            assert jac(row_text(name, rec), row_text(name, orig)) >= demo.NEAR_THRESHOLD
        elif defect == "contradiction":
            assert norm(answer) != norm(orig_answer)
            if name == "domain.jsonl":
                assert prompt == orig_prompt and json.loads(answer)["intent"] != json.loads(orig_answer)["intent"]
            else:
                assert (rec["instruction"], rec["input"]) == (orig["instruction"], orig["input"])
        else:
            raise AssertionError(f"no check for {defect}")


def test_ledger_lines_really_have_their_defect(files, ledger):
    evals = {row["id"]: row for path in (demo.SUPPORT_GEN, demo.GENERAL_GEN) for row in files[path]}
    for name, path in RAW.items():
        lines = files[path]
        for defect, entry in ledger[name].items():
            if not isinstance(entry, dict):
                continue
            for k, n in enumerate(entry["lines"]):
                of = entry.get("of_lines", [None] * entry["count"])[k]
                if of is not None:
                    assert of < n, "a copy must follow the clean row it copies"
                eval_row = evals[entry["eval_ids"][k]] if "eval_ids" in entry else None
                try:
                    _check_defect(name, defect, lines[n - 1], lines[of - 1] if of else None, eval_row)
                except AssertionError as err:
                    raise AssertionError(f"{name}:{n} ({defect}): {lines[n - 1]}") from err


def test_eval_leaks_point_at_the_right_eval_set(ledger):
    assert all(
        i.startswith("support-") and not i.startswith("support-mc")
        for i in ledger["domain.jsonl"]["eval_leak"]["eval_ids"]
    )
    assert all(re.fullmatch(r"general-\d{4}", i) for i in ledger["general.jsonl"]["eval_leak"]["eval_ids"])


# --- clean rows -----------------------------------------------------------------------------------


def test_unlisted_rows_are_clean(clean):
    for name, rows in clean.items():
        assert len(rows) == CLEAN[name]
        prompts = [norm(prompt_answer(name, r)[0]) for r in rows]
        assert len(prompts) == len(set(prompts)), f"{name}: clean prompts repeat after normalisation"
        for rec in rows:
            text = row_text(name, rec)
            assert not EMAIL.search(text) and not PLACEHOLDER.search(text), text
            assert all(s.strip() for s in prompt_answer(name, rec)), text
            if name == "domain.jsonl":
                assert [m["role"] for m in rec["messages"]] == ["user", "assistant"]
            if name == "general.jsonl":
                assert list(rec) == ["instruction", "input", "output"]
            if name == "preferences.jsonl":
                assert (
                    list(rec) == ["prompt", "chosen", "rejected"] and rec["chosen"].strip() != rec["rejected"].strip()
                )
            if name != "general.jsonl":
                _assert_ticket(*prompt_answer(name, rec))


def test_domain_and_preference_prompts_do_not_overlap(clean):
    domain = {norm(r["messages"][0]["content"]) for r in clean["domain.jsonl"]}
    assert not domain & {norm(r["prompt"]) for r in clean["preferences.jsonl"]}


def _near_pairs(texts: list[str], threshold: float) -> list[tuple[int, int, float]]:
    """Every pair with shingle Jaccard >= threshold (exact: prefix filtering, rarest shingles first)."""
    sets = [shingle_set(t) for t in texts]
    freq: dict[str, int] = defaultdict(int)
    for s in sets:
        for g in s:
            freq[g] += 1
    index: dict[str, list[int]] = defaultdict(list)
    pairs = []
    for i, s in enumerate(sets):
        ordered = sorted(s, key=lambda g: (freq[g], g))
        prefix = ordered[: len(ordered) - math.ceil(threshold * len(ordered)) + 1]
        candidates = {j for g in prefix for j in index[g]}
        for j in sorted(candidates):
            sim = len(s & sets[j]) / len(s | sets[j])
            if sim >= threshold:
                pairs.append((j, i, sim))
        for g in prefix:
            index[g].append(i)
    return pairs


def test_clean_rows_have_no_near_duplicates(clean):
    # The dedup stage compares rows of all sources together, so do the same.
    texts = [row_text(name, rec) for name, rows in clean.items() for rec in rows]
    assert _near_pairs(texts, demo.NEAR_THRESHOLD) == []


def test_near_pair_search_finds_planted_pairs():
    texts = [
        "Please refund the lamp from order 12345.",
        "Hi, please refund the lamp from order 12345.",
        "What is 2 + 2?",
    ]
    assert [(i, j) for i, j, _ in _near_pairs(texts, 0.7)] == [(0, 1)]


# --- eval hold-out --------------------------------------------------------------------------------


def _training_texts(files, clean) -> dict[str, list[str]]:
    out = {"pretrain": [f"{r['prompt']}\n{r['completion']}" for r in files[demo.PRETRAIN]]}
    out.update({name: [row_text(name, r) for r in rows] for name, rows in clean.items()})
    return out


def test_no_eval_prompt_in_training_text(files, clean):
    """No eval prompt occurs, as a run of whole words, in pretraining or clean training rows."""
    prompts = [row.get("prompt", row.get("message")) for p in EVAL_FILES for row in files[p]]
    assert all(prompts)
    for name, texts in _training_texts(files, clean).items():
        haystack = "\n".join(f" {norm(t)} " for t in set(texts))
        leaked = [p for p in prompts if f" {norm(p)} " in haystack]
        assert leaked == [], f"{name} contains eval prompts: {leaked[:5]}"


def test_no_support_eval_text_in_domain_training_rows(files, clean):
    """Support answers carry a unique order id, so no training row may contain one either."""
    texts = [t for row in files[demo.SUPPORT_GEN] for t in (row["message"], row["answer"])]
    texts += [row["choices"][row["label"]] for row in files[demo.SUPPORT_MC]]
    for name in ("domain.jsonl", "preferences.jsonl"):
        haystack = "\n".join(f" {norm(row_text(name, r))} " for r in clean[name])
        assert [t for t in texts if f" {norm(t)} " in haystack] == []


def test_eval_sets_have_distinct_prompts(files):
    for paths in ((demo.SUPPORT_GEN, demo.SUPPORT_MC), (demo.GENERAL_GEN, demo.GENERAL_MC)):
        prompts = [norm(row.get("prompt", row.get("message"))) for p in paths for row in files[p]]
        assert len(prompts) == len(set(prompts))


# --- eval items -----------------------------------------------------------------------------------


def _assert_ticket(message: str, answer: str) -> dict:
    ticket = json.loads(answer)
    assert list(ticket) == list(demo.TICKET_KEYS)
    assert answer == json.dumps(ticket), "compact form with the default separators"
    assert ticket["intent"] in demo.INTENTS and ticket["product"] in demo.PRODUCTS
    assert re.fullmatch(r"\d{5}", ticket["order_id"]) and (
        f"order {ticket['order_id']}" in message or f"#{ticket['order_id']}" in message
    )
    assert re.search(rf"\b{ticket['product']}\b", message)
    assert ticket["urgency"] == demo.urgency_of(message)
    return ticket


def test_support_gen_items(files):
    rows = files[demo.SUPPORT_GEN]
    assert [r["id"] for r in rows] == [f"support-{i:04d}" for i in range(1, len(rows) + 1)]
    for row in rows:
        assert list(row) == ["id", "message", "answer", "intent"]
        assert _assert_ticket(row["message"], row["answer"])["intent"] == row["intent"]
        assert len(row["message"].split()) <= 20
    assert {r["intent"] for r in rows} == set(demo.INTENTS)


def test_support_mc_items(files):
    rows = files[demo.SUPPORT_MC]
    for row in rows:
        assert list(row) == ["id", "message", "choices", "label"]
        choices = [json.loads(c) for c in row["choices"]]
        assert len(choices) == 4 and len(set(row["choices"])) == 4
        right = _assert_ticket(row["message"], row["choices"][row["label"]])
        for c in choices:
            assert (c["order_id"], c["product"]) == (right["order_id"], right["product"])
    assert {r["label"] for r in rows} == {0, 1, 2, 3}, "the correct position is shuffled"


def test_general_gen_items(files):
    rows = files[demo.GENERAL_GEN]
    counts = {t: sum(r["task"] == t for r in rows) for t in demo.GENERAL_GEN_TASKS}
    assert counts == dict.fromkeys(demo.GENERAL_GEN_TASKS, demo.GENERAL_GEN_PER_TASK)
    for row in rows:
        assert list(row) == ["id", "task", "prompt", "answer"] and "\n" not in row["prompt"]
        assert len(row["prompt"].split()) <= 20 and row["answer"]
        if row["task"] == "add":
            assert int(row["answer"]) == sum(int(x) for x in re.findall(r"\d+", row["prompt"]))
        elif row["task"] == "upper":
            assert row["answer"] == row["prompt"].split(": ", 1)[1].upper()
        elif row["task"] == "reverse":
            assert row["answer"][::-1] in row["prompt"].rstrip(".").split()
        elif row["task"] == "capital":
            assert row["answer"] in dict(demo.CAPITALS).values()
        elif row["task"] == "plural":
            assert row["answer"] in dict(demo.PLURALS).values()


def test_general_mc_items(files):
    rows = files[demo.GENERAL_MC]
    counts = {t: sum(r["task"] == t for r in rows) for t in demo.GENERAL_MC_TASKS}
    assert counts == dict.fromkeys(demo.GENERAL_MC_TASKS, demo.GENERAL_MC_PER_TASK)
    for row in rows:
        assert list(row) == ["id", "task", "prompt", "choices", "label"]
        assert len(row["choices"]) == (2 if row["task"] == "mood" else 4) and len(set(row["choices"])) == len(
            row["choices"]
        )
        assert 0 <= row["label"] < len(row["choices"])
        if row["task"] == "add":
            assert int(row["choices"][row["label"]]) == sum(int(x) for x in re.findall(r"\d+", row["prompt"]))


# --- the pretraining corpus -----------------------------------------------------------------------


def test_pretraining_corpus_has_domain_vocabulary_but_not_the_domain_task(files):
    rows = files[demo.PRETRAIN]
    vocab = {w for r in rows for w in norm(f"{r['prompt']} {r['completion']}").split()}
    wanted = {
        *demo.PRODUCTS,
        *demo.INTENTS,
        *demo.TICKET_KEYS,
        *demo.URGENCIES,
        "order",
        "asap",
        "today",
        "urgent",
        "immediately",
        "rush",
    }
    assert wanted - vocab == set()
    for r in rows:
        assert list(r) == ["prompt", "completion"]
        assert not re.search(r"(order |#)\d{5}", r["prompt"]), "support messages belong to the domain task"
        if r["completion"].startswith("{"):
            assert len(set(json.loads(r["completion"])) & set(demo.TICKET_KEYS)) <= 2


def test_families_are_balanced_in_pretraining(files):
    rows = files[demo.PRETRAIN]
    answers = [r["completion"] for r in rows]
    mood = sum(a in ("happy", "unhappy") for a in answers)
    assert abs(mood - len(rows) / len(demo.TEMPLATES)) <= 1


# --- writing --------------------------------------------------------------------------------------


def test_write_and_cli(tmp_path, files, capsys):
    written = demo.write(tmp_path)
    assert written == digests(files)
    for rel, digest in written.items():
        assert hashlib.sha256((tmp_path / rel).read_bytes()).hexdigest() == digest
    assert not list(tmp_path.rglob("*.tmp"))
    assert (tmp_path / demo.RAW_DOMAIN).read_bytes().count(b"\n") == len(files[demo.RAW_DOMAIN])

    demo.main(["--root", str(tmp_path / "cli"), "--seed", "1234"])
    out = capsys.readouterr().out
    assert all(rel in out for rel in written)
    assert {rel: hashlib.sha256((tmp_path / "cli" / rel).read_bytes()).hexdigest() for rel in written} == written
