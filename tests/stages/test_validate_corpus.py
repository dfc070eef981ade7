"""validate on malformed input: the adversarial corpus (tests/corpus/validate) file by file, then
systematic sweeps over every secret kind and every invisible-character class.

Every case goes through the stage's real `run()`. What must hold for all of them: no traceback (a
problem with a file as a whole is one UserError line naming it), every valid row kept, every invalid
row quarantined with the expected reason, and in = kept + quarantined.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from stages import validate
from tests.corpus.validate.build import EXPECTED, build
from tunegate.config import Source, Validate
from tunegate.errors import UserError
from tunegate.io import read_jsonl

CASES = yaml.safe_load(EXPECTED.read_text(encoding="utf-8"))
COUNTS = ("pii_masked", "pii_reported", "pii_quarantined", "invisible_stripped", "invisible_reported")
COUNTS += ("invisible_quarantined", "read")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("corpus") / "validate")


def _run(cfg: Validate, sources: dict[str, Source], tokenizer, out: Path) -> dict:
    """validate's metrics; a preference source is validated both ways it can be read (string-form pairs as columns,
    and as row objects), which must give the same error, or the same metrics and files."""
    if not any(source.role == "preference" for source in sources.values()):
        return validate.run(cfg, sources, tokenizer, out)
    results = []
    for columns in (True, False):
        try:
            metrics = validate.run(cfg, sources, tokenizer, out.with_name(f"{out.name}-{columns}"), use_columns=columns)
            files = {f.name: f.read_bytes() for f in out.with_name(f"{out.name}-{columns}").iterdir()}
            results.append((json.loads(json.dumps(metrics)), files))
        except UserError as err:
            results.append(str(err).replace(f"{out.name}-{columns}", f"{out.name}"))
    assert results[0] == results[1]
    if isinstance(results[0], str):
        raise UserError(results[0])
    out.with_name(f"{out.name}-True").rename(out)
    return results[0][0]


def _contents(path: Path) -> str:
    rows = read_jsonl(path)
    return "\n".join(
        m["content"] for r in rows for k in ("messages", "prompt", "chosen", "rejected") for m in r.get(k, [])
    )


def test_corpus_is_large_and_covers_every_kind():
    files = {spec.get("file", case) for case, spec in CASES.items()}
    assert len(files) >= 40
    for suffix in (".jsonl", ".json", ".csv", ".parquet"):
        assert sum(f.endswith(suffix) for f in files) >= 3, suffix
    assert sum("error" in spec for spec in CASES.values()) >= 15


@pytest.mark.parametrize("case", sorted(CASES))
def test_corpus_file(case, corpus, tokenizer, tmp_path):
    spec = CASES[case]
    path = corpus / spec.get("file", case)
    cfg = Validate(**{"max_invalid_share": 1.0, **spec.get("settings", {})})
    source = Source(path=str(path), role=spec.get("role", "domain"), format=spec.get("format", "auto"))
    out = tmp_path / "out"
    if "error" in spec:
        with pytest.raises(UserError) as err:
            _run(cfg, {"s": source}, tokenizer, out)
        message = str(err.value)
        assert "\n" not in message and spec["error"] in message, message
        assert path.name in message, f"the message does not name the file: {message}"
        return
    metrics = _run(cfg, {"s": source}, tokenizer, out)["sources"]["s"]
    expected = spec.get("quarantined", {})
    assert metrics["kept"] == spec["kept"], metrics
    assert metrics["reasons"] == dict(sorted(expected.items())), metrics
    assert metrics["in"] == metrics["kept"] + metrics["quarantined"] == spec["kept"] + sum(expected.values())
    assert len(read_jsonl(out / "s.jsonl")) == spec["kept"]
    quarantine = read_jsonl(out / validate.QUARANTINE)
    assert len(quarantine) == metrics["quarantined"] and all(q["source"] == "s" for q in quarantine)
    for reason, lines in spec.get("lines", {}).items():
        assert sorted(q["line"] for q in quarantine if q["reason"] == reason) == lines, (reason, quarantine)
    for key in COUNTS:
        assert metrics.get(key, {}) == spec.get(key, {}), (key, metrics)
    text = _contents(out / "s.jsonl")
    for needle in spec.get("absent", []):
        assert needle not in text, needle
    for needle in spec.get("present", []):
        assert needle in text, needle


def test_unreadable_file_is_one_line(tmp_path, tokenizer, monkeypatch):
    path = tmp_path / "locked.jsonl"
    path.write_text('{"prompt": "Where is order 12345?", "completion": "It ships today."}\n')
    path.chmod(0)
    if os.geteuid() == 0:  # root reads a file whatever its mode: make the read fail as it would for a user

        def denied(self):
            raise PermissionError(13, "Permission denied", str(self))

        monkeypatch.setattr(Path, "read_bytes", denied)
    with pytest.raises(UserError) as err:
        _run(Validate(), {"s": Source(path=str(path), role="domain")}, tokenizer, tmp_path / "out")
    assert str(err.value) == f"{path}: permission denied; make the file readable (chmod +r) for the user running it"


# --- every secret kind: found, named, masked or quarantined; near misses left alone -------------

# kind -> [(text, the secret in it that must not survive)]
SECRETS = {
    "api_key": [
        ("sk-proj-abcdefghijklmnopqrstuvwx", "abcdefghijklmnopqrstuvwx"),
        ("hf_abcdefghijklmnopqrstuvwxyz", "abcdefghijklmnopqrstuvwxyz"),
        ("ghp_abcdefghijklmnopqrstuvwxyz012345", "abcdefghijklmnopqrstuvwxyz012345"),
        ("github_pat_11ABCDEFG0123456789_abcdefghij", "11ABCDEFG0123456789_abcdefghij"),
        ("xoxb-123456789012-abcdefghijklmnop", "123456789012-abcdefghijklmnop"),
        ("glpat-abcdefghijklmnopqrst", "abcdefghijklmnopqrst"),
    ],
    "aws_access_key": [("key AKIAIOSFODNN7EXAMPLE", "IOSFODNN7EXAMPLE"), ("ASIAY34FZKBOKMUTVV7A", "Y34FZKBOKMUTVV7A")],
    "aws_secret_key": [
        (
            "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        ),
        (
            "AWS_SECRET_ACCESS_KEY=Zt1ZalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKE",
            "Zt1ZalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKE",
        ),
        ('"SecretAccessKey": "Qx9alrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"', "Qx9alrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ],
    "gcp_api_key": [("AIzaSyD-1234567890abcdefghijklmnopqrstu", "SyD-1234567890abcdefghijklmnopqrstu")],
    "private_key": [
        (
            "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7bq9\n-----END RSA PRIVATE KEY-----",
            "MIIEowIBAAKCAQEA7bq9",
        ),
        ("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0\n-----END PRIVATE KEY-----", "MIIEvQIBADANBgkqhkiG9w0"),
        (
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----",
            "b3BlbnNzaC1",
        ),
        (
            "-----BEGIN PGP PRIVATE KEY BLOCK-----\nlQOYBF0AAAABCDEF\n-----END PGP PRIVATE KEY BLOCK-----",
            "lQOYBF0AAAAB",
        ),
        # a GCP service-account key file pasted as text: the key's newlines are \n escapes
        (
            '{"type": "service_account", "private_key": "-----BEGIN PRIVATE KEY-----\\nMIIEvQIBADAN\\n'
            '-----END PRIVATE KEY-----\\n"}',
            "MIIEvQIBADAN",
        ),
        ("-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg4LVWM9nuwNSk3y", "MHcCAQEEIBkg4LVWM9nuwNSk3y"),  # cut off, no END
    ],
    "azure_key": [
        ("DefaultEndpointsProtocol=https;AccountName=shop;AccountKey=" + "Ab1+" * 22 + "==;x", "Ab1+" * 22),
        ("Endpoint=sb://ns/;SharedAccessKeyName=Root;SharedAccessKey=" + "Zx9/" * 11 + "=", "Zx9/" * 11),
        ("https://shop.blob.core.windows.net/c?sv=2022-11-02&sig=" + "AbCd%2B" * 6, "AbCd%2B" * 6),
    ],
    "bearer_token": [
        ("Authorization: Bearer abcdefghijklmnopqrstuvwx0123456789", "abcdefghijklmnopqrstuvwx0123456789"),
        ("bearer 0123456789abcdefghijKLMN", "0123456789abcdefghijKLMN"),
    ],
    "jwt": [
        (
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
            "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        )
    ],
    "url_credentials": [
        ("postgres://admin:s3cretPass@db/orders", "s3cretPass"),
        ("mongodb+srv://app:hunter22@cluster0/x", "hunter22"),
        ("redis://default:pa55word@cache:6379", "pa55word"),
        ("https://oauth2:tok3nvalue@git.example/repo.git", "tok3nvalue"),
    ],
    "password_assignment": [
        ("Server=db;User Id=sa;Password=Hunter2!;", "Hunter2!"),
        ("DB_PASSWORD=hunter22", "hunter22"),
        ('"password": "hunter23"', "hunter23"),
    ],
}
# Text that looks a little like a secret and must pass untouched.
NEAR_MISSES = [
    "Reset your password: click the link we sent.",
    "The bearer of this note may collect order 12345.",
    "Keys start with AKIA, then 16 more characters.",
    "See https://example.com:8080/path for the form.",
    "Our skills-based routing sends you to the right team.",
    "-----BEGIN PUBLIC KEY----- is safe to share.",
    "Set password=? in the form (three stars are shown).",
]


def _sweep_file(tmp_path: Path, texts: list[str]) -> Path:
    path = tmp_path / "sweep.jsonl"
    rows = [{"prompt": f"Please check this: {t}", "completion": "Checked."} for t in texts]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("kind", sorted(SECRETS))
def test_every_secret_kind_is_masked_and_named(kind, tmp_path, tokenizer):
    samples = SECRETS[kind]
    path = _sweep_file(tmp_path, [text for text, _ in samples])
    metrics = _run(Validate(), {"s": Source(path=str(path), role="domain")}, tokenizer, tmp_path / "out")
    masked = metrics["sources"]["s"]["pii_masked"]
    assert masked.get(f"pii_{kind}") == len(samples), masked
    assert metrics["sources"]["s"]["kept"] == len(samples)
    text = _contents(tmp_path / "out" / "s.jsonl")
    assert text.count(f"[{kind.upper()}]") == len(samples), text
    for _, secret in samples:
        assert secret not in text, (secret, text)


@pytest.mark.parametrize("kind", sorted(SECRETS))
def test_every_secret_kind_quarantines_with_its_reason(kind, tmp_path, tokenizer):
    samples = SECRETS[kind]
    path = _sweep_file(tmp_path, [text for text, _ in samples])
    cfg = Validate(pii="quarantine", max_invalid_share=1.0)
    metrics = _run(cfg, {"s": Source(path=str(path), role="domain")}, tokenizer, tmp_path / "out")
    quarantine = read_jsonl(tmp_path / "out" / validate.QUARANTINE)
    assert [q["line"] for q in quarantine] == list(range(1, len(samples) + 1))
    assert all(f"pii_{kind}" in q["detail"].split(", ") for q in quarantine), quarantine
    assert metrics["sources"]["s"]["pii_quarantined"][f"pii_{kind}"] == len(samples)


def test_near_misses_are_not_secrets(tmp_path, tokenizer):
    path = _sweep_file(tmp_path, NEAR_MISSES)
    metrics = _run(Validate(), {"s": Source(path=str(path), role="domain")}, tokenizer, tmp_path / "out")
    assert metrics["sources"]["s"]["pii_masked"] == {} and metrics["sources"]["s"]["kept"] == len(NEAR_MISSES)


def test_secret_patterns_run_on_the_fast_engine():
    """pandas hands a pattern to Arrow's RE2 unless it needs Python's re (look-around, back-references,
    \\s); the PII check is one combined pattern, so one such pattern would slow all of them down."""
    import pandas as pd

    cfg = Validate()
    combined = "|".join(f"(?:{p})" for p in cfg.pii_patterns.values())
    ascii_text = pd.Series(["order 12345 please"], dtype="str")
    assert not ascii_text.array._needs_python_regex(combined)
    for name, samples in SECRETS.items():
        assert ascii_text.str.contains(cfg.pii_patterns[name]).tolist() == [False], name
        assert pd.Series([t for t, _ in samples], dtype="str").str.contains(cfg.pii_patterns[name]).all(), name


# --- every invisible character: each code point of each class, under each setting ---------------


def _code_points(name: str) -> list[str]:
    return [chr(c) for lo, hi in validate.INVISIBLE[name] for c in range(lo, hi + 1)]


@pytest.mark.parametrize("name", sorted(validate.INVISIBLE))
@pytest.mark.parametrize("mode", ["strip", "quarantine", "report"])
def test_every_invisible_character(name, mode, tmp_path, tokenizer):
    chars = _code_points(name)
    path = tmp_path / "chars.jsonl"
    rows = [{"prompt": f"Where is order {i}{c}12345?", "completion": f"It{c} ships."} for i, c in enumerate(chars)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))  # escaped as \uXXXX where JSON must
    cfg = Validate(invisible=mode, max_invalid_share=1.0)
    metrics = _run(cfg, {"s": Source(path=str(path), role="domain")}, tokenizer, tmp_path / "out")["sources"]["s"]
    reason = f"invisible_{name}"
    assert metrics[validate.INVISIBLE_KEY[mode]] == {reason: len(chars)}
    text = _contents(tmp_path / "out" / "s.jsonl")
    if mode == "quarantine":
        assert metrics["kept"] == 0 and metrics["reasons"] == {reason: len(chars)}
    else:
        assert metrics["kept"] == len(chars) and metrics["quarantined"] == 0
        assert all((c in text) == (mode == "report") for c in chars)
        if mode == "strip":
            assert "Where is order 012345?" in text and "It ships." in text


@pytest.mark.parametrize("mode", ["strip", "report"])
def test_the_text_checks_see_the_text_as_it_will_be_trained(mode, tmp_path, tokenizer):
    """A placeholder or an address split by a zero-width space matches no check; stripped, it is what the model
    would learn, so the checks run again on the stripped text: the placeholder is quarantined, the address masked.
    Reported only, the text stays as it was, and so do the checks' answers."""
    texts = ["Dear {cus\u200btomer_name}, order 12345 ships.", "Write to alice@exa\u200bmple.com about 12345."]
    path = _sweep_file(tmp_path, texts)
    cfg = Validate(invisible=mode, max_invalid_share=1.0)
    metrics = _run(cfg, {"s": Source(path=str(path), role="domain")}, tokenizer, tmp_path / "out")["sources"]["s"]
    text = _contents(tmp_path / "out" / "s.jsonl")
    if mode == "strip":
        assert metrics["reasons"] == {"template_leftover": 1} and metrics["pii_masked"] == {"pii_email": 1}
        assert "Write to [EMAIL] about 12345." in text and "alice" not in text
    else:
        assert metrics["quarantined"] == 0 and metrics["pii_masked"] == {} and "alice@exa\u200bmple.com" in text


def test_visible_and_joining_characters_are_left_alone(tmp_path, tokenizer):
    """Tab, newline, carriage return, the zero-width joiners of emoji and scripts, variation selectors."""
    keep = ["\t", "\n", "\r", "\u200c", "\u200d", "\ufe0f", "\u00a0", "\u2028"]
    path = _sweep_file(tmp_path, [f"a{c}b order 12345" for c in keep])
    metrics = _run(Validate(), {"s": Source(path=str(path), role="domain")}, tokenizer, tmp_path / "out")
    assert metrics["sources"]["s"]["invisible_stripped"] == {} and metrics["sources"]["s"]["kept"] == len(keep)
    assert all(f"a{c}b" in _contents(tmp_path / "out" / "s.jsonl") for c in keep)


def test_report_names_secrets_invisible_characters_and_reading(corpus, tokenizer, tmp_path):
    sources = {
        "secrets": Source(path=str(corpus / "chat_secrets.jsonl"), role="domain"),
        "hidden": Source(path=str(corpus / "chat_invisible.jsonl"), role="domain"),
        "alpaca": Source(path=str(corpus / "alpaca_edge.jsonl"), role="general"),
    }
    _run(Validate(max_invalid_share=1.0), sources, tokenizer, tmp_path / "out")
    report = (tmp_path / "out" / validate.REPORT).read_text()
    assert "- secrets: pii masked: " in report and "pii_aws_access_key 1" in report and "pii_private_key 1" in report
    assert "- hidden: invisible stripped: invisible_bidi 1" in report
    assert "- alpaca: read: alpaca_input_as_instruction 2" in report
