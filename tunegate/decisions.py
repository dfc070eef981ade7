"""The registry's decisions as pure functions: no MLflow, no I/O, no clock.

`tunegate/registry.py` asks MLflow, hands what it got here as plain data (a `Version` per model
version, dicts of tags, a lookup callable for the rollback walk) and writes back what these functions
decide: which version an adapter already has, what `settle` keeps and deletes, where a rollback goes,
the promotion record, what may be logged (redaction), the rows of `tunegate status`.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tunegate.provenance import (
    BASE_MODEL,
    BASE_REVISION,
    FINGERPRINT,
    GATE_FAILED,
    GATE_PASSED,
    PREVIOUS,
    PROMOTIONS,
    REGISTRATION,
    ROLLED_BACK,
    TRAIN_DATA,
)

SECRET_KEY = re.compile(r"(^|[._-])(token|password|passwd|secret|api[_-]?key|credentials?)($|[._-])", re.I)
SECRET_VALUE = re.compile(
    r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,}|ghp_[A-Za-z0-9]{20,}|xox[bp]-[A-Za-z0-9-]{10,})\b"
)
# scheme://user:password@host: the password is masked, the rest still says which server it was
URL_PASSWORD = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s/:@]*:)[^\s/]+@")
REDACTED = "[redacted]"
MAX_VALUE = 5000  # characters of a tag or param value logged (MLflow's limit for a param)
MODEL_PREFIX = "models:/"  # a version's source when it was made from a logged model: models:/<model_id>


@dataclass(frozen=True)
class Version:
    """What the decisions read of one registered model version (registry.py makes one per MLflow version)."""

    version: str
    tags: Mapping[str, str] = field(default_factory=dict)
    run_id: str | None = None
    source: str | None = None
    model_id: str | None = None
    created_ms: int = 0  # creation time, milliseconds since the epoch


# --- redaction: what may be logged ---


def redact_value(key: str, text: str) -> str:
    """text as it may be logged under key: "[redacted]" for a secret-looking key or value, URL passwords masked."""
    if SECRET_KEY.search(key) or SECRET_VALUE.search(text):
        return REDACTED
    return URL_PASSWORD.sub(rf"\1{REDACTED}@", text)


def redact(items: dict[str, Any]) -> dict[str, str]:
    """Stringify values for MLflow, dropping anything that is, or looks like, a secret."""
    return {key: redact_value(key, "" if value is None else str(value))[:MAX_VALUE] for key, value in items.items()}


# --- one version per adapter ---


def versions_filter(name: str) -> str:
    """The search for every version of registered model `name`."""
    return f"name = '{name}'"


def stale_runs_filter(fingerprint: str) -> str:
    """The search for registration runs of this adapter that were cut off before they completed."""
    return f"tags.adapter_sha256 = '{fingerprint}' and tags.registration = 'started'"


def oldest_with(versions: Iterable[Version], fingerprint: str) -> Version | None:
    """The version registered for this adapter fingerprint, if any: the oldest, should a retried request
    have left a duplicate (settle removes it)."""
    return min(
        (v for v in versions if v.tags.get(FINGERPRINT) == fingerprint), key=lambda v: int(v.version), default=None
    )


def duplicates(versions: Iterable[Version], fingerprint: str, run_id: str | None) -> tuple[Version, list[Version]]:
    """(the version kept, the duplicates to delete) among this run's versions of this adapter: the oldest is
    kept. IndexError when the run has none."""
    mine = sorted(
        (v for v in versions if v.tags.get(FINGERPRINT) == fingerprint and v.run_id == run_id),
        key=lambda v: int(v.version),
    )
    return mine[0], mine[1:]


def logged_model_id(version: Version) -> str | None:
    """The logged model a version was made from: its model_id, or (the REST API leaves model_id out) the id
    in a `models:/m-...` source; None for a version made from files."""
    source = version.source or ""
    return version.model_id or (source.removeprefix(MODEL_PREFIX) if source.startswith(MODEL_PREFIX + "m-") else None)


def relinked(links: list[dict[str, Any]], name: str, version: str) -> list[dict[str, Any]] | None:
    """A logged model's list of the versions made from it (the MLflow UI links them) with `name` linked to
    `version` alone, other models' links kept in order; None when it already is so."""
    if {str(link.get("version")) for link in links if link.get("name") == name} == {version}:
        return None
    return [link for link in links if link.get("name") != name] + [{"name": name, "version": version}]


def incomplete_runs(run_ids: Iterable[str], run_id: str) -> list[str]:
    """The cut-off registration runs to delete: every one found but the run being settled."""
    return [other for other in run_ids if other != run_id]


def needs_completion(run_tags: Mapping[str, str]) -> bool:
    """Whether the run still has to be marked `registration=complete` (the last step of settling)."""
    return run_tags.get(REGISTRATION) != "complete"


# --- champion moves and rollback history ---


def timestamp(moment: dt.datetime) -> str:
    """The stamp of a promotion record or a rollback mark, for a moment in UTC, to the microsecond: two
    moves of the same version within one second (a promotion, then a rollback to it) keep both records."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def gate_refusal(name: str, version: str, tags: Mapping[str, str]) -> str | None:
    """Why a version may not be promoted on its gate verdict; None when its gate passed."""
    if tags.get(GATE_PASSED) == "true":
        return None
    return f"{name} v{version}: gate did not pass ({tags.get(GATE_FAILED, 'no verdict')}); refusing to promote"


def promotion_tags(alias: str, version: str, previous: str | None, reason: str, stamp: str) -> dict[str, str] | None:
    """The tags a move of `alias` from `previous` to `version` writes on `version`, in the order written (the
    record first); None when `version` already holds the alias: nothing is moved or recorded then."""
    if previous == version:
        return None
    return {
        f"{PROMOTIONS}.{stamp}": f"{alias} <- v{version} (was v{previous or '-'}): {reason}",
        PREVIOUS: previous or "",
    }


def rollback_tags(
    alias: str, current: str, target: str, reason: str, stamp: str
) -> tuple[dict[str, str], dict[str, str]]:
    """(the tags written on `target`, the tags written on `current`) when `alias` moves back from `current`
    to `target`: the promotion record, and the mark that keeps `current` out of later rollbacks."""
    on_target = {f"{PROMOTIONS}.{stamp}": f"{alias} <- v{target} (rolled back from v{current}): {reason}"}
    on_current = {ROLLED_BACK: f"{stamp}: {alias} moved back to v{target}: {reason}"}
    return on_target, on_current


def rollback_target(
    current: str, tags: Mapping[str, str], tags_of: Callable[[str], Mapping[str, str] | None]
) -> str | None:
    """The champion version `current` (with these tags) replaced, walking back past versions that were
    themselves rolled back from; None when there is nothing earlier on record, when the walk reaches a
    version since deleted (`tags_of` gives None: what it had replaced is unknown) or one already seen."""
    seen = {current}
    target = tags.get(PREVIOUS) or None
    while target and target not in seen:
        seen.add(target)
        found = tags_of(target)
        if found is None:
            return None
        if ROLLED_BACK not in found:
            return target
        target = found.get(PREVIOUS) or None
    return None


# --- `tunegate status` ---


def version_rows(versions: Iterable[Version], champion: str | None) -> list[dict[str, str]]:
    """One row per version, oldest first: number, champion mark, gate verdict, base, data and adapter
    hashes (12 characters), creation time (UTC, to the minute)."""
    rows = []
    for v in sorted(versions, key=lambda v: int(v.version)):
        t = v.tags
        rows.append(
            {
                "version": v.version,
                "champion": "*" if champion == v.version else "",
                "gate": "pass" if t.get(GATE_PASSED) == "true" else f"FAIL {t.get(GATE_FAILED, '?').split(' vs ')[0]}",
                "base": f"{t.get(BASE_MODEL, '?')}@{t.get(BASE_REVISION, '?')[:12]}",
                "train_sha256": t.get(TRAIN_DATA, "")[:12],
                "adapter_sha256": t.get(FINGERPRINT, "")[:12],
                "created": dt.datetime.fromtimestamp(v.created_ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M"),
            }
        )
    return rows
