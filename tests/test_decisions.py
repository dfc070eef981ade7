"""The registry's decisions as pure functions: exact outputs on constructed versions, tags and links.

tests/test_registry.py runs the same decisions through a real (SQLite) MLflow; these run in milliseconds
and are the selection `make mutation` runs against tunegate/decisions.py.
"""

import datetime as dt

import pytest

from tunegate.decisions import (
    PREVIOUS,
    ROLLED_BACK,
    Version,
    duplicates,
    gate_refusal,
    incomplete_runs,
    logged_model_id,
    needs_completion,
    oldest_with,
    promotion_tags,
    redact,
    redact_value,
    relinked,
    rollback_tags,
    rollback_target,
    stale_runs_filter,
    timestamp,
    version_rows,
    versions_filter,
)

HF = "hf_" + "a" * 20  # the shortest token of each kind that is taken for a secret
SK = "sk-" + "a" * 20
GHP = "ghp_" + "a" * 20
SLACK_BOT = "xoxb-" + "1" * 10
SLACK_USER = "xoxp-" + "1" * 10


# --- redaction ---


@pytest.mark.parametrize(
    "key",
    [
        "token",
        "TOKEN",
        "hf_token",
        "hub-token",
        "train.args.hub_token",
        "token.value",
        "token_file",
        "token-x",
        "password",
        "db.password",
        "Password",
        "passwd",
        "x_passwd",
        "secret",
        "client_secret",
        "secret.key",
        "api_key",
        "api-key",
        "apikey",
        "API_KEY",
        "openai.api_key",
        "credential",
        "credentials",
        "aws.credentials.file",
    ],
)
def test_a_secret_looking_key_redacts_any_value(key):
    assert redact_value(key, "plain value") == "[redacted]"
    assert redact_value(key, "") == "[redacted]"


@pytest.mark.parametrize(
    "key",
    [
        "tokenizer",  # the word must stand alone between separators
        "tokenizer_sha256",
        "max_tokens",
        "mytoken",
        "tokens",
        "passwords",
        "secretary",
        "top_secrets",
        "api.key",  # only _ or - or nothing between api and key
        "api__key",
        "apikeys",
        "credentialsfile",
        "uri",
        "",
    ],
)
def test_near_miss_keys_keep_their_value(key):
    assert redact_value(key, "plain value") == "plain value"


@pytest.mark.parametrize(
    "text",
    [
        HF,
        SK,
        "sk-" + "a_b-" * 5 + "c",  # sk- tokens may carry _ and -
        GHP,
        SLACK_BOT,
        SLACK_USER,
        "xoxb-" + "1-2" * 4,
        f"use {HF} here",
        f"({SK})",
        "hf_" + "A1" * 30,
    ],
)
def test_a_secret_looking_value_is_redacted_under_any_key(text):
    assert redact_value("note", text) == "[redacted]"


@pytest.mark.parametrize(
    "text",
    [
        "hf_" + "a" * 19,  # one character short of each kind
        "sk-" + "a" * 19,
        "ghp_" + "a" * 19,
        "xoxb-" + "1" * 9,
        "xoxp-" + "1" * 9,
        "xoxa-" + "1" * 10,  # neither a bot nor a user token
        "HF_" + "a" * 20,  # prefixes are lower case
        "SK-" + "a" * 20,
        "task-" + "a" * 20,  # sk- inside a word
        "xhf_" + "a" * 20,
        "hf-" + "a" * 20,
        "ghp-" + "a" * 20,
        "hf_" + "a" * 20 + "_more",  # no word boundary after it
        "hf_" + "a" * 10 + "-" + "a" * 10,  # - is not in an hf_ token
        "tokenizer_sha256",
    ],
)
def test_near_miss_values_are_kept(text):
    assert redact_value("note", text) == text


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://user:pw@host", "http://user:[redacted]@host"),
        ("https://tunegate:s3cr3t@mlflow.internal:5000", "https://tunegate:[redacted]@mlflow.internal:5000"),
        ("postgresql+psycopg://u:p@db:5432/mlflow", "postgresql+psycopg://u:[redacted]@db:5432/mlflow"),
        ("s3.x-y://u:p@b", "s3.x-y://u:[redacted]@b"),
        ("http://:pw@host", "http://:[redacted]@host"),
        ("http://u:p@ss:w@host/x", "http://u:[redacted]@host/x"),  # up to the last @ before a /
        ("a http://u:p@h and ftp://v:q@k", "a http://u:[redacted]@h and ftp://v:[redacted]@k"),
        ("http://user@host", "http://user@host"),  # no password
        ("http://host:5000/path", "http://host:5000/path"),  # a port, no user
        ("http://host:5000/a@b", "http://host:5000/a@b"),  # the @ is in the path
        ("http://u/x:p@h", "http://u/x:p@h"),  # a / ends the user part
        ("http://u:p q@h", "http://u:p q@h"),  # whitespace ends the password
        ("://u:p@h", "://u:p@h"),  # no scheme
        ("1http://u:p@h", "1http://u:[redacted]@h"),  # the scheme starts at the letter
        ("user:pw@host", "user:pw@host"),  # no ://
    ],
)
def test_url_passwords_are_masked_and_the_rest_kept(text, shown):
    assert redact_value("uri", text) == shown


def test_a_secret_key_or_value_wins_over_url_masking():
    assert redact_value("password", "http://u:p@h") == "[redacted]"
    assert redact_value("uri", f"http://u:p@h/{HF}") == "[redacted]"


def test_redact_stringifies_every_value_and_keeps_every_key_in_order():
    out = redact({"b": None, "a": 0, "c": False, "d": 1.5, "token": None, "e": [1], "f": "x"})
    assert out == {"b": "", "a": "0", "c": "False", "d": "1.5", "token": "[redacted]", "e": "[1]", "f": "x"}
    assert list(out) == ["b", "a", "c", "d", "token", "e", "f"]
    assert redact({}) == {}


def test_redact_cuts_values_at_5000_characters_after_masking():
    assert redact({"k": "x" * 5000}) == {"k": "x" * 5000}
    assert redact({"k": "x" * 5001}) == {"k": "x" * 5000}
    masked = redact({"k": "x" * 4990 + " http://u:p@h"})["k"]  # masking makes it longer than 5000: then cut
    assert masked == ("x" * 4990 + " http://u:[redacted]@h")[:5000] and len(masked) == 5000
    assert redact({"k": "http://u:" + "p" * 4995 + "@h"}) == {"k": "http://u:[redacted]@h"}  # masked, then cut


# --- one version per adapter ---


def test_search_filters_are_spelled_as_mlflow_reads_them():
    assert versions_filter("m") == "name = 'm'"
    assert versions_filter("my-model") == "name = 'my-model'"
    assert stale_runs_filter("ab12") == "tags.adapter_sha256 = 'ab12' and tags.registration = 'started'"


def _v(number, sha="f", run="r", **kw) -> Version:
    tags = kw.pop("tags", {"adapter_sha256": sha} if sha is not None else {})
    return Version(str(number), tags, run, **kw)


def test_the_oldest_version_of_a_fingerprint_is_its_version():
    versions = [_v(10), _v(9), _v(2, sha="g"), _v(11)]
    assert oldest_with(versions, "f") == versions[1]  # 9 < 10 as numbers, not as text
    assert oldest_with(versions, "g") == versions[2]
    assert oldest_with(versions, "h") is None
    assert oldest_with([], "f") is None
    assert oldest_with([_v(1, sha=None)], "f") is None  # a version without the tag is no one's
    assert oldest_with(iter([_v(3), _v(1)]), "f").version == "1"  # any iterable, read once


def test_a_tie_on_the_number_keeps_the_first_seen():
    first, second = _v("07"), _v("7")
    assert oldest_with([first, second], "f") is first
    assert oldest_with([second, first], "f") is second


def test_settle_keeps_the_oldest_of_this_runs_versions_and_deletes_the_rest():
    versions = [_v(12), _v(3), _v(20, run="other"), _v(1, sha="g"), _v(5), _v(9)]
    kept, extras = duplicates(versions, "f", "r")
    assert kept == versions[1]
    assert extras == [versions[4], versions[5], versions[0]]  # oldest first, numerically
    kept, extras = duplicates(versions, "f", "other")
    assert (kept, extras) == (versions[2], [])
    by_hand = [_v(4, run=None), _v(2, run=None), _v(1, run="r")]  # registered outside any run
    assert duplicates(by_hand, "f", None) == (by_hand[1], [by_hand[0]])
    with pytest.raises(IndexError):
        duplicates(versions, "f", "missing")
    with pytest.raises(IndexError):
        duplicates(versions, "none", "r")


def test_the_logged_model_of_a_version():
    assert logged_model_id(Version("1", model_id="m-1", source="models:/m-2")) == "m-1"
    assert logged_model_id(Version("1", source="models:/m-2")) == "m-2"  # the REST API leaves model_id out
    assert logged_model_id(Version("1", model_id="", source="models:/m-abc")) == "m-abc"
    assert logged_model_id(Version("1", source="models:/m-")) == "m-"
    assert logged_model_id(Version("1", source="models:/other/1")) is None  # a registered model's URI
    assert logged_model_id(Version("1", source="models:/M-2")) is None
    assert logged_model_id(Version("1", source="xmodels:/m-2")) is None
    assert logged_model_id(Version("1", source="runs:/abc/model")) is None
    assert logged_model_id(Version("1", source="/local/folder")) is None
    assert logged_model_id(Version("1", source="")) is None
    assert logged_model_id(Version("1")) is None


def test_links_already_naming_the_kept_version_alone_are_left_as_they_are():
    assert relinked([{"name": "m", "version": "3"}], "m", "3") is None
    assert relinked([{"name": "m", "version": 3}], "m", "3") is None  # numbers compare as text
    assert relinked([{"name": "o", "version": "1"}, {"name": "m", "version": "3"}], "m", "3") is None
    assert relinked([{"name": "m", "version": "3"}, {"name": "m", "version": "3"}], "m", "3") is None


def test_links_are_rewritten_to_the_kept_version_keeping_other_models_links_in_order():
    kept = {"name": "m", "version": "3"}
    links = [{"name": "m", "version": "3"}, {"name": "o", "version": "1"}, {"name": "m", "version": "4"}]
    assert relinked(links, "m", "3") == [{"name": "o", "version": "1"}, kept]
    assert relinked([{"name": "m", "version": "4"}], "m", "3") == [kept]
    assert relinked([], "m", "3") == [kept]
    assert relinked([{"name": "o", "version": "3"}], "m", "3") == [{"name": "o", "version": "3"}, kept]
    assert relinked([{"version": "3"}, {"name": "m"}], "m", "3") == [{"version": "3"}, kept]
    assert relinked([{"name": "m", "version": "None"}], "m", "None") is None  # a link without version reads "None"
    assert relinked([{"name": "m"}], "m", "None") is None


def test_cut_off_runs_other_than_the_one_settled_are_deleted():
    assert incomplete_runs(["a", "r", "b"], "r") == ["a", "b"]
    assert incomplete_runs(iter(["r"]), "r") == []
    assert incomplete_runs([], "r") == []


def test_a_run_is_marked_complete_unless_it_already_is():
    assert needs_completion({"registration": "complete"}) is False
    assert needs_completion({"registration": "started"}) is True
    assert needs_completion({"registration": "Complete"}) is True
    assert needs_completion({}) is True


# --- champion moves and rollback history ---


def test_timestamps_are_utc_to_the_microsecond_and_sort_in_time_order():
    moment = dt.datetime(2026, 1, 2, 3, 4, 5, 999999, tzinfo=dt.UTC)
    assert timestamp(moment) == "2026-01-02T03:04:05.999999Z"
    later = moment + dt.timedelta(microseconds=1)  # the next second: a record key never collides or misorders
    assert timestamp(later) == "2026-01-02T03:04:06.000000Z" and timestamp(later) > timestamp(moment)


def test_only_a_passed_gate_is_promotable():
    assert gate_refusal("m", "3", {"gate_passed": "true"}) is None
    assert gate_refusal("m", "3", {"gate_passed": "false", "gate_failed": "dom/acc gain 0.01 < 0.1"}) == (
        "m v3: gate did not pass (dom/acc gain 0.01 < 0.1); refusing to promote"
    )
    no_verdict = "m v3: gate did not pass (no verdict); refusing to promote"
    assert gate_refusal("m", "3", {}) == no_verdict
    assert gate_refusal("m", "3", {"gate_passed": "True"}) == no_verdict
    assert gate_refusal("m", "3", {"gate_passed": "true "}) is not None


def test_a_promotion_writes_its_record_first_then_the_version_it_replaced():
    tags = promotion_tags("champion", "3", "2", "better", "2026-01-02T03:04:05Z")
    assert tags == {
        "promotion_log.2026-01-02T03:04:05Z": "champion <- v3 (was v2): better",
        "previous_champion": "2",
    }
    assert list(tags) == ["promotion_log.2026-01-02T03:04:05Z", PREVIOUS]


def test_the_first_promotion_records_no_previous_champion():
    assert promotion_tags("prod", "1", None, "first", "S") == {
        "promotion_log.S": "prod <- v1 (was v-): first",
        "previous_champion": "",
    }
    assert promotion_tags("prod", "1", "", "r", "S") == {"promotion_log.S": "prod <- v1 (was v-): r", PREVIOUS: ""}


def test_promoting_the_champion_again_is_a_no_op():
    assert promotion_tags("champion", "3", "3", "again", "S") is None
    assert promotion_tags("champion", "3", "03", "r", "S") is not None  # versions are compared as given


def test_a_rollback_records_the_move_on_the_target_and_marks_the_version_left():
    on_target, on_current = rollback_tags("champion", "3", "2", "regression", "2026-01-02T03:04:05Z")
    assert on_target == {"promotion_log.2026-01-02T03:04:05Z": "champion <- v2 (rolled back from v3): regression"}
    assert on_current == {ROLLED_BACK: "2026-01-02T03:04:05Z: champion moved back to v2: regression"}
    assert ROLLED_BACK == "rolled_back"


class Registry:
    """Tags by version, None for a deleted one; records the versions looked up."""

    def __init__(self, tags: dict[str, dict[str, str] | None]):
        self.tags, self.asked = tags, []

    def __call__(self, version: str):
        self.asked.append(version)
        return self.tags[version]


def test_a_rollback_goes_to_the_champion_replaced():
    reg = Registry({"1": {}, "2": {PREVIOUS: "1"}})
    assert rollback_target("3", {PREVIOUS: "2"}, reg) == "2" and reg.asked == ["2"]
    reg = Registry({"1": {}})
    assert rollback_target("2", {PREVIOUS: "1"}, reg) == "1"  # an existing version with no tags at all


def test_nothing_to_roll_back_to_without_a_previous_champion():
    reg = Registry({})
    assert rollback_target("1", {}, reg) is None
    assert rollback_target("1", {PREVIOUS: ""}, reg) is None  # the first promotion records ""
    assert rollback_target("1", {"other": "2"}, reg) is None
    assert reg.asked == []


def test_the_walk_skips_versions_rolled_back_from():
    reg = Registry(
        {
            "3": {ROLLED_BACK: "...", PREVIOUS: "2"},
            "2": {ROLLED_BACK: "", PREVIOUS: "1"},  # an empty mark is still a mark
            "1": {PREVIOUS: ""},
        }
    )
    assert rollback_target("4", {PREVIOUS: "3"}, reg) == "1" and reg.asked == ["3", "2", "1"]


def test_the_walk_ends_at_a_version_rolled_back_from_that_replaced_nothing():
    reg = Registry({"2": {ROLLED_BACK: "x", PREVIOUS: ""}, "1": {}})
    assert rollback_target("3", {PREVIOUS: "2"}, reg) is None and reg.asked == ["2"]
    reg = Registry({"2": {ROLLED_BACK: "x"}})
    assert rollback_target("3", {PREVIOUS: "2"}, reg) is None


def test_the_walk_stops_at_a_deleted_version_even_with_history_behind_it():
    reg = Registry({"3": {ROLLED_BACK: "x", PREVIOUS: "2"}, "2": None, "1": {}})
    assert rollback_target("4", {PREVIOUS: "3"}, reg) is None and reg.asked == ["3", "2"]
    reg = Registry({"2": None})
    assert rollback_target("3", {PREVIOUS: "2"}, reg) is None


def test_a_cycle_back_to_the_current_version_ends_the_walk():
    # v1 <- v3 <- v1 <- v2 (the CLI test's history): v3 was rolled back from and replaced v1, the champion
    reg = Registry({"3": {ROLLED_BACK: "x", PREVIOUS: "1"}})
    assert rollback_target("1", {PREVIOUS: "3"}, reg) is None and reg.asked == ["3"]
    assert rollback_target("2", {PREVIOUS: "2"}, Registry({})) is None  # a version that replaced itself


def test_a_cycle_among_rolled_back_versions_is_walked_once():
    reg = Registry({"3": {ROLLED_BACK: "x", PREVIOUS: "2"}, "2": {ROLLED_BACK: "x", PREVIOUS: "3"}})
    assert rollback_target("4", {PREVIOUS: "3"}, reg) is None and reg.asked == ["3", "2"]
    reg = Registry({"3": {ROLLED_BACK: "x", PREVIOUS: "3"}})
    assert rollback_target("4", {PREVIOUS: "3"}, reg) is None and reg.asked == ["3"]


# --- `tunegate status` ---

PASSED = {
    "gate_passed": "true",
    "base_model": "org/base",
    "base_revision": "0123456789abcdef",
    "train_sha256": "aaaaaaaaaaaaBBBB",
    "adapter_sha256": "ccccccccccccDDDD",
}


def test_status_rows_oldest_first_with_the_champion_marked():
    versions = [
        Version("10", PASSED, created_ms=1_700_000_039_999),
        Version("9", {"gate_passed": "false", "gate_failed": "dom/acc 0.50 vs 0.60; gen/acc"}, created_ms=0),
        Version("2", {}, created_ms=86_400_000 + 61_000),
    ]
    assert version_rows(versions, "10") == [
        {
            "version": "2",
            "champion": "",
            "gate": "FAIL ?",
            "base": "?@?",
            "train_sha256": "",
            "adapter_sha256": "",
            "created": "1970-01-02 00:01",
        },
        {
            "version": "9",
            "champion": "",
            "gate": "FAIL dom/acc 0.50",
            "base": "?@?",
            "train_sha256": "",
            "adapter_sha256": "",
            "created": "1970-01-01 00:00",
        },
        {
            "version": "10",
            "champion": "*",
            "gate": "pass",
            "base": "org/base@0123456789ab",
            "train_sha256": "aaaaaaaaaaaa",
            "adapter_sha256": "cccccccccccc",
            "created": "2023-11-14 22:13",
        },
    ]


def test_status_rows_without_a_champion_mark_none():
    rows = version_rows([Version("1", PASSED), Version("2", {"gate_passed": "True"})], None)
    assert [row["champion"] for row in rows] == ["", ""]
    assert [row["gate"] for row in rows] == ["pass", "FAIL ?"]
    assert version_rows([Version("1", PASSED)], "2")[0]["champion"] == ""
    assert version_rows([], "1") == []
    assert list(version_rows([Version("1")], None)[0]) == [
        "version",
        "champion",
        "gate",
        "base",
        "train_sha256",
        "adapter_sha256",
        "created",
    ]


@pytest.fixture
def away_from_utc(monkeypatch):
    """The process's local time zone set to UTC-5 (and back to what it was afterwards)."""
    import time

    monkeypatch.setenv("TZ", "EST+05")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_status_times_are_utc_whatever_the_machines_time_zone(away_from_utc):
    assert dt.datetime.fromtimestamp(0).hour == 19  # the local zone did move
    assert version_rows([Version("1", created_ms=0)], None)[0]["created"] == "1970-01-01 00:00"
