"""Scoring functions for the demo lm-eval tasks (referenced from the YAMLs as `!function utils.<name>`)."""

import json

FIELDS = ("intent", "order_id", "product", "urgency")


def exact(doc, results):
    """1.0 when the stripped generation equals the reference answer."""
    return {"exact": float(results[0].strip() == str(doc["answer"]).strip())}


def support_json(doc, results):
    """Parse the generated ticket; json_exact: every field right, json_fields: share of fields right."""
    want = json.loads(doc["answer"])
    try:
        got = json.loads(results[0].strip())
    except (json.JSONDecodeError, TypeError):
        got = None
    if not isinstance(got, dict):
        return {"json_exact": 0.0, "json_fields": 0.0}
    right = sum(str(got.get(f)) == str(want[f]) for f in FIELDS)
    return {"json_exact": float(right == len(FIELDS)), "json_fields": right / len(FIELDS)}
