"""dedup drops exactly the planted duplicates, near duplicates, eval leaks and contradictions, with pointers."""

import pytest

from stages import dedup
from tests.conftest import ROOT, sft
from tunegate.dedup import jaccard, shingles
from tunegate.formats import row_text
from tunegate.io import read_jsonl


@pytest.mark.parametrize("reason", ["exact_duplicate", "near_duplicate", "eval_leak", "contradiction"])
def test_planted_drops_found_exactly(result, ledger, reason):
    kept, dropped, metrics = result
    for source in ("domain", "general", "preferences"):
        planted = ledger[f"{source}.jsonl"].get(reason, {"lines": []})
        got = sorted(d["line"] for d in dropped if d["source"] == source and d["reason"] == reason)
        assert got == sorted(planted["lines"]), (source, reason)


def test_drops_point_at_what_they_duplicate(result, ledger):
    kept, dropped, _ = result
    by_id = {r["id"]: r for rows in kept.values() for r in rows}
    planted = ledger["domain.jsonl"]
    of_line = dict(zip(planted["exact_duplicate"]["lines"], planted["exact_duplicate"]["of_lines"], strict=True))
    for d in dropped:
        if d["reason"] == "exact_duplicate" and d["source"] == "domain":
            assert by_id[d["of"]]["line"] == of_line[d["line"]]
    leaks = {d["line"]: d["of"] for d in dropped if d["reason"] == "eval_leak" and d["source"] == "domain"}
    expected = dict(zip(planted["eval_leak"]["lines"], planted["eval_leak"]["eval_ids"], strict=True))
    assert {line: of.split(":")[1] for line, of in leaks.items()} == expected


def test_near_duplicates_point_at_a_kept_row_they_resemble(cfg, validated, result):
    """A near duplicate's `of` names a different, kept row whose text passes the Jaccard threshold (not itself)."""
    kept, dropped, _ = result
    out, _ = validated
    every = {r["id"]: r for name in cfg.data.sources for r in read_jsonl(out / f"{name}.jsonl")}
    kept_ids = {r["id"] for rows in kept.values() for r in rows}
    near = [d for d in dropped if d["reason"] == "near_duplicate"]
    assert near
    for d in near:
        assert d["of"] != d["id"] and d["of"] in kept_ids, d
        a, b = (shingles(row_text(every[i]), cfg.dedup.ngram) for i in (d["id"], d["of"]))
        assert jaccard(a, b) >= cfg.dedup.threshold, d


def test_counts_conserved(result):
    kept, dropped, metrics = result
    assert metrics["conserved"]
    for name, m in metrics["sources"].items():
        assert m["in"] == m["kept"] + m["dropped"] == len(kept[name]) + sum(d["source"] == name for d in dropped)


@pytest.mark.parametrize(
    "policy, kept_answers", [("keep_majority", ["A", "A"]), ("keep_first", ["B"]), ("drop_all", [])]
)
def test_contradiction_policies(cfg, policy, kept_answers):
    rows = [
        sft("Cancel order 12345", "B", "r0", line=1),
        sft("Cancel order 12345", "A", "r1", line=2),
        sft("cancel ORDER 12345!", "A", "r2", line=3),
    ]
    kept, dropped, _ = dedup.run(cfg.dedup.model_copy(update={"contradictions": policy}), {"domain": rows}, [], 0)
    answers = [r["messages"][-1]["content"] for r in kept["domain"]]
    if policy == "keep_majority":
        assert answers == ["A"]  # the majority answer survives; its normalised copy is then an exact duplicate
        assert {d["reason"] for d in dropped} == {"contradiction", "exact_duplicate"}
    else:
        assert answers == kept_answers


def test_tie_without_majority_drops_all(cfg):
    rows = [sft("Where is 55555", "A", "r0"), sft("Where is 55555", "B", "r1")]
    kept, dropped, _ = dedup.run(cfg.dedup, {"domain": rows}, [], 0)
    assert kept["domain"] == [] and all("no majority" in d["detail"] for d in dropped)


def labelled(prompt: str, answer: str, label: bool, rid: str) -> dict:
    user, said = [{"role": "user", "content": prompt}], [{"role": "assistant", "content": answer}]
    return {
        "id": rid,
        "source": "fb",
        "line": int(rid[1:]),
        "kind": "unpaired",
        "prompt": user,
        "completion": said,
        "label": label,
    }


def test_labelled_answers_contradict_only_when_the_same_answer_has_both_labels(cfg):
    """KTO's rows: one answer labelled desirable twice and undesirable once keeps the majority label; other answers
    to the same prompt, of either label, stay (they are what KTO contrasts), however alike their words."""
    prompt = "My parcel for order 12345 arrived broken and the box was open, what can you do about it?"
    rows = [
        labelled(prompt, "We will refund you today.", True, "r1"),
        labelled(prompt, "We will refund you today.", False, "r2"),
        labelled(prompt, "we will refund you today", True, "r3"),
        labelled(prompt, "Not our problem.", False, "r4"),
        labelled(prompt, "We will send a new one today.", True, "r5"),
    ]
    kept, dropped, metrics = dedup.run(cfg.dedup, {"fb": rows}, [], 0)
    assert {d["id"]: d["reason"] for d in dropped} == {"r2": "contradiction", "r3": "exact_duplicate"}
    assert "2 different labels of this answer" in next(d["detail"] for d in dropped if d["id"] == "r2")
    assert [r["id"] for r in kept["fb"]] == ["r1", "r4", "r5"] and metrics["conserved"]
    # the same rows read as SFT answers to one prompt are contradictions of each other
    as_sft = [sft(prompt, r["completion"][0]["content"], r["id"]) for r in rows]
    assert len(dedup.run(cfg.dedup, {"domain": as_sft}, [], 0)[0]["domain"]) < 3


def test_demo_drops_the_same_rows_as_the_previous_numpy_path(cfg, validated, result):
    """rensa signatures + exact verification drop exactly the rows, with the same pointers and similarities,
    that the previous numpy-signature, string-set path dropped on the demo data."""
    out, _ = validated
    sources = {name: read_jsonl(out / f"{name}.jsonl") for name in cfg.data.sources}
    _, dropped, metrics = dedup.run(
        cfg.dedup, sources, dedup.eval_items(ROOT / "evals/data"), cfg.seed, minhash="numpy"
    )
    assert dropped == result[1] and metrics == result[2]
    assert sum(d["reason"] == "near_duplicate" for d in dropped) >= 10


def test_a_source_that_loses_most_of_its_rows_is_named_with_the_main_reason_and_its_setting():
    from stages.dedup import heavy_losses

    metrics = {
        "sources": {
            "domain": {"in": 1000, "kept": 960, "dropped": 40, "reasons": {"exact_duplicate": 40}},
            "prefs": {
                "in": 200,
                "kept": 10,
                "dropped": 190,
                "reasons": {"eval_leak": 29, "near_duplicate": 159, "x": 2},
            },
        }
    }
    (line,) = heavy_losses(metrics, 0.5)
    assert line.startswith("dedup: source prefs lost 190 of 200 rows (95%, kept 10): near_duplicate 159, eval_leak 29")
    assert "near_duplicate is decided by dedup.threshold" in line and "dedup.warn_share 0.5" in line
    assert heavy_losses(metrics, 0.96) == [] and len(heavy_losses(metrics, 0.01)) == 2


def test_an_item_held_out_of_a_conversation_leaks_only_with_its_conversation(cfg, tmp_path):
    """An item held out of a multi-turn conversation is often a short follow-up ("Thanks, and the refund?"): matched
    whole on its own, it would drop every training row that says as much. Its leak text is its conversation up to
    that turn (its earlier exchanges, then the prompt), which the held-out row holds and other rows do not, or the
    prompt followed by its answer, wherever they are."""
    import json

    history = [{"user": "My parcel 4411 is late, where is it?", "assistant": "Parcel 4411 left the depot today."}]
    item = {"id": "t-1", "prompt": "Thanks, and the refund?", "answer": "Soon.", "history": history}
    (tmp_path / "t.jsonl").write_text(json.dumps(item) + "\n")
    held = sft(history[0]["user"], history[0]["assistant"], "held", line=1)
    held["messages"] += [{"role": "user", "content": item["prompt"]}, {"role": "assistant", "content": "Soon."}]
    other = sft("Thanks, and the refund? I returned the lamp last week.", "It is on its way to you.", "other", line=2)
    # the same question and answer in another conversation is still a leak
    copied = sft("Hello there.", "Hi, how can I help?", "copied", line=3)
    copied["messages"] += held["messages"][-2:]
    _, dropped, _ = dedup.run(cfg.dedup, {"domain": [held, other, copied]}, dedup.eval_items(tmp_path), cfg.seed)
    assert [(d["id"], d["reason"], d["of"]) for d in dropped] == [
        ("held", "eval_leak", "t:t-1"),
        ("copied", "eval_leak", "t:t-1"),
    ]
