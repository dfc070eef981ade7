"""Registry helpers that need no server: secret redaction."""

from tunegate.registry import redact


def test_secrets_are_redacted_by_key_and_by_value():
    out = redact({"hf_token": "x", "db.password": "y", "hub_token": "<HUB_TOKEN>", "tokenizer_sha256": "abc",
                  "note": "use hf_" + "a" * 30 + " here", "api_key": "k", "max_tokens": 5})
    assert out["hf_token"] == out["db.password"] == out["hub_token"] == out["note"] == out["api_key"] == "[redacted]"
    assert out["tokenizer_sha256"] == "abc" and out["max_tokens"] == "5"
