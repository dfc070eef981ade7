"""Scoring functions for lm-eval tasks (referenced from the YAMLs as `!function utils.<name>`).

Generic: each reads the reference answer (`doc["answer"]`) and the model's first generation, so the
same functions score the demo's tasks and the tasks `tunegate init` writes for your data.

- `exact`: 1.0 when the stripped generation equals the reference.
- `json_fields`: both parsed as JSON objects; `json_fields` = share of the reference's own keys whose
  values the generation matches, `json_exact` = all of them (extra keys in the generation cost nothing).
- `text_overlap`: free text; `chrf` (character n-gram F-score, n = 1..6, beta = 2, as sacreBLEU's chrF
  with whitespace ignored) and `rouge_l` (F-measure of the longest common subsequence of words), both 0..1.

And one few-shot sampler: `EarlierTurns`, for items held out of multi-turn conversations (`doc["history"]`).
"""

import json
from collections import Counter

from lm_eval.api.samplers import ContextSampler

CHRF_ORDER = 6
CHRF_BETA = 2.0


def _generation(results) -> str:
    return results[0].strip() if results and isinstance(results[0], str) else ""


def exact(doc, results):
    """1.0 when the stripped generation equals the reference answer."""
    return {"exact": float(_generation(results) == str(doc["answer"]).strip())}


def json_fields(doc, results):
    """Field-by-field JSON scoring against the reference's own keys."""
    want = json.loads(doc["answer"]) if isinstance(doc["answer"], str) else doc["answer"]
    try:
        got = json.loads(_generation(results))
    except (json.JSONDecodeError, TypeError, RecursionError):
        got = None
    if not isinstance(got, dict) or not isinstance(want, dict) or not want:
        return {"json_exact": 0.0, "json_fields": 0.0}
    right = sum(key in got and _same(got[key], value) for key, value in want.items())
    return {"json_exact": float(right == len(want)), "json_fields": right / len(want)}


def _same(got, want) -> bool:
    """Values match as JSON, or as text (an id "51973" and 51973 are the same field)."""
    return got == want or str(got) == str(want)


def _char_ngrams(text: str, n: int) -> Counter:
    text = "".join(text.split())
    return Counter(text[i : i + n] for i in range(len(text) - n + 1))


def chrf(hypothesis: str, reference: str) -> float:
    """chrF (n = 1..6, beta = 2) on 0..1: the F-score of averaged character n-gram precision and recall."""
    precisions, recalls = [], []
    for n in range(1, CHRF_ORDER + 1):
        hyp, ref = _char_ngrams(hypothesis, n), _char_ngrams(reference, n)
        if not hyp or not ref:
            continue
        match = sum((hyp & ref).values())
        precisions.append(match / sum(hyp.values()))
        recalls.append(match / sum(ref.values()))
    if not precisions:
        return float(hypothesis.split() == reference.split())
    p, r = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if p == 0 and r == 0:
        return 0.0
    beta2 = CHRF_BETA**2
    return (1 + beta2) * p * r / (beta2 * p + r)


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F-measure over words: the longest common subsequence against both lengths."""
    hyp, ref = hypothesis.split(), reference.split()
    if not hyp or not ref:
        return float(hyp == ref)
    previous = [0] * (len(ref) + 1)
    for h in hyp:
        current = [0]
        for j, r in enumerate(ref, 1):
            current.append(previous[j - 1] + 1 if h == r else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(hyp), lcs / len(ref)
    return 2 * p * r / (p + r)


def text_overlap(doc, results):
    """chrF and ROUGE-L of the generation against the reference answer."""
    hypothesis, reference = _generation(results), str(doc["answer"]).strip()
    return {"chrf": chrf(hypothesis, reference), "rouge_l": rouge_l(hypothesis, reference)}


class EarlierTurns(ContextSampler):
    """An item's own earlier exchanges (`doc["history"]`: user and assistant texts, as its row had them) as the
    few-shot turns lm-eval puts before it, so that the chat template renders the conversation the item was held
    out of, up to its last user turn. The tasks `tunegate init` writes for multi-turn rows name it
    (`fewshot_config.sampler`, `fewshot_split` = the test split, so lm-eval hands over the item being asked)."""

    def sample(self, n, eval_doc=None, df=None, **kwargs):
        history = (eval_doc or {}).get("history") or []
        turns = [{"prompt": t["user"], "answer": t["assistant"]} for t in history]
        return turns[max(0, len(turns) - n) :] if n else []
