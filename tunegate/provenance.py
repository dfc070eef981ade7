"""The provenance record: the names of the tags every registered version carries (one owner: every other
module reads and writes them through these constants), the record itself, and how what is logged with it
(params, params.yaml, dvc.lock) is redacted.

    tags = record(cfg, base, mix, verdict, scores, fingerprint, trained)   # flat tags, before redaction
    redact(tags)                                                           # tunegate.decisions: the one rule

"Which model is this and what was it trained on?" is answered by these tags (`tunegate show`); the
redaction rule itself (secret-looking keys and values, URL passwords) is a pure function of
tunegate.decisions, mutation-tested there.
"""

from __future__ import annotations

import os
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from tunegate.config import Config, flatten
from tunegate.io import sha256_of
from tunegate.paths import DVC_LOCK, PARAMS

# -- what it was trained from ------------------------------------------------------------------------
BASE_MODEL = "base_model"  # hub id, folder or `demo`
BASE_REVISION = "base_revision"  # the resolved commit
BASE_WEIGHTS = "base_weights_sha256"
TOKENIZER = "tokenizer_sha256"
CHAT_TEMPLATE = "chat_template_sha256"
BASE_ARTIFACT = "base_artifact"  # a local base stored once: runs:/<run>/base
BASE_FILES = "base_files_sha256"  # sha256 over that base's files
TRAIN_DATA = "train_sha256"
TRAIN_ROWS = "train_rows"
GENERAL_SHARE = "general_share"
# -- how it was trained ------------------------------------------------------------------------------
METHOD = "method"
ADAPTER = "adapter"  # the adapter kind (tunegate.adapters): how the version is logged, fetched and loaded
SEED = "seed"
GIT_COMMIT = "git_commit"
DVC_LOCK_SHA = "dvc_lock_sha256"
ORCHESTRATOR = "orchestrated_by"  # `dvc` or `prefect:<flow run id>`
EFFECTIVE_BATCH = "effective_batch_size"
TRAIN_PROCESSES = "train_processes"
TRAIN_DEVICE = "train_device"
DETERMINISTIC = "deterministic_kernels"
ATTENTION = "train_attention"  # the attention implementation the model trained with (sdpa, flash_attention_2, ...)
LIGER = "train_liger_kernels"  # Liger's fused layer kernels on or off
PACKED = "train_packing"  # false, or the packed layout: rows (block-diagonal masks) or padding-free
# -- what it is ------------------------------------------------------------------------------------------
FINGERPRINT = "adapter_sha256"  # sha256 of the trained weights: idempotent registration, the tamper check
# -- what was decided ------------------------------------------------------------------------------------
GATE_PASSED = "gate_passed"
GATE_FAILED = "gate_failed"
GATE_POLICY = "gate_policy_sha256"
CHAMPION_CHECK = "champion_check"
PROMOTIONS = "promotion_log"  # promotion_log.<time>: every alias move and its reason
PREVIOUS = "previous_champion"  # the champion a version replaced when it was promoted
ROLLED_BACK = "rolled_back"  # when and why the champion was moved back from a version
# -- on the registration's MLflow run ----------------------------------------------------------------------
EXPORTS = "exports"  # the exported artifacts the gate checked: merged, gguf-f16, ...
EXPORT_SHA = "export_sha256"  # sha256 of export.json, which lists every exported file with its sha256
EXPORT_ARTIFACTS = "export"  # where a version's exported files are logged (runs:/<run>/export)
EVAL_ARTIFACTS = "eval/candidate_samples"  # the version's per-sample outcomes: the champion comparison, `tunegate diff`
CHAMPION_FLIPPED = "reports/gate/champion_flipped.json"  # the items the version lost and won against the champion
BASE_EVAL_ARTIFACTS = "eval/base_samples"  # its base's, on the same items: `tunegate diff VERSION base`
REGISTRATION = "registration"  # `started`, then `complete`: a cut-off registration is settled next time
RUN_ID = "run_id"

PACKAGES = ("torch", "transformers", "peft", "trl", "bitsandbytes", "lm-eval", "datasets", "mlflow", "tunegate")


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def lock_sha256(lock: Path) -> str:
    """sha256 of dvc.lock's upstream stages (register's own entry excluded: it is written after this runs)."""
    if not lock.exists():
        return "none"
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
    return sha256_of({k: v for k, v in stages.items() if k != "register"})


def record(
    cfg: Config, base: dict, mix: dict, verdict: dict, scores: dict, fingerprint: str, trained: dict | None = None
) -> dict[str, Any]:
    """The provenance record (docs/ARCHITECTURE.md) as flat tags; `trained` is train's metrics (how it ran)."""
    trained = trained or {}
    tags: dict[str, Any] = {
        BASE_MODEL: base["model"],
        BASE_REVISION: base["resolved_revision"],
        BASE_WEIGHTS: sha256_of(base["weights_sha256"]),
        TOKENIZER: sha256_of(base["tokenizer_sha256"]),
        CHAT_TEMPLATE: base.get("chat_template_sha256"),
        TRAIN_DATA: mix["train_sha256"],
        TRAIN_ROWS: mix["rows"],
        GENERAL_SHARE: f"{mix['general_share_' + mix['by']]} of {mix['by']}",
        METHOD: cfg.train.method,
        ADAPTER: cfg.train.adapter,
        SEED: cfg.seed,
        GIT_COMMIT: git_commit(),
        DVC_LOCK_SHA: lock_sha256(DVC_LOCK),
        ORCHESTRATOR: os.environ.get("TUNEGATE_ORCHESTRATOR", "dvc"),
        GATE_PASSED: str(verdict["passed"]).lower(),
        GATE_POLICY: verdict.get("policy_sha256"),
        FINGERPRINT: fingerprint,
        # how training ran: what a reproduction needs to know to compare like with like
        EFFECTIVE_BATCH: trained.get("effective_batch_size"),
        TRAIN_PROCESSES: trained.get("processes", 1),
        TRAIN_DEVICE: trained.get("device"),
        DETERMINISTIC: str(trained.get("deterministic", True)).lower(),
        ATTENTION: trained.get("attn_implementation"),
        LIGER: str(trained.get("liger_kernels", False)).lower(),
        PACKED: trained.get("packing_layout") or str(trained.get("packing", False)).lower(),
    }
    if not verdict["passed"]:
        tags[GATE_FAILED] = "; ".join(verdict["failed"])
    for name, s in mix["sources"].items():
        tags[f"source.{name}.sha256"] = s.get("sha256")
        tags[f"source.{name}.rows"] = s.get("used")
    for pkg in PACKAGES:
        try:
            tags[f"pkg.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    for side, by_task in scores.items():
        for task, metrics in by_task.items():
            for m, v in metrics.items():
                if m != "n":
                    tags[f"eval.{side}.{task}.{m}"] = v
    tags.update(_baseline_and_reward_tags(verdict, trained))
    tags.update({f"hp.{k}": v for k, v in flatten(cfg.train).items()})
    return tags


def _baseline_and_reward_tags(verdict: dict, trained: dict) -> dict[str, Any]:
    """The baselines' scores and prompt costs, and (GRPO) the code each reward was computed by."""
    tags: dict[str, Any] = {}
    costs = verdict.get("costs") or {}
    for name, by_check in (verdict.get("baselines") or {}).items():
        for check, value in by_check.items():
            tags[f"eval.baseline.{name}.{check.replace('/', '.')}"] = value
        if name in costs:
            tags[f"eval.baseline.{name}.prompt_tokens"] = costs[name]["prompt_tokens"]
            if "retriever" in costs[name]:  # how the retrieval baseline ranked its rows
                tags[f"eval.baseline.{name}.retriever"] = costs[name]["retriever"]
    for name, code in (trained.get("reward_code") or {}).items():  # what the model was trained toward
        tags[f"reward.{name}.code_sha256"] = code
    return tags


def logged_params(cfg: Config) -> dict[str, str]:
    """Every setting as an MLflow param, flattened, under the same redaction as the tags."""
    from tunegate.decisions import redact

    return redact(flatten(cfg))


def _scrub(node: Any, key: str) -> Any:
    """A parsed YAML document with the redaction of `redact` applied to every leaf (key = its dotted path)."""
    from tunegate.decisions import SECRET_KEY, redact_value

    if SECRET_KEY.search(key):
        return node if node in (None, "") else "[redacted]"
    if isinstance(node, dict):
        return {k: _scrub(v, f"{key}.{k}" if key else str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [_scrub(v, key) for v in node]
    return redact_value(key, node) if isinstance(node, str) else node


def redacted_yaml(text: str) -> str:
    """params.yaml or dvc.lock (which records every stage's params) as logged with the run: values under
    secret-looking keys (train.args.hub_token), secret-looking values and URL passwords replaced, so an
    artifact carries no more than the tags and params do. A file with nothing to redact is logged as written,
    comments included; otherwise as its redacted values (comments dropped: one could hold the secret too)."""
    from tunegate.decisions import SECRET_VALUE, URL_PASSWORD

    doc = yaml.safe_load(text)
    clean = _scrub(doc, "")
    if clean == doc and not SECRET_VALUE.search(text) and not URL_PASSWORD.search(text):
        return text
    return "# secrets redacted by the register stage\n" + yaml.safe_dump(clean, sort_keys=False, allow_unicode=True)


def provenance_file(path: Path, scratch: Path) -> Path:
    """The file to log for one provenance artifact: params.yaml and dvc.lock redacted into scratch."""
    if path.name not in (PARAMS.name, DVC_LOCK.name):
        return path
    copy = scratch / path.name
    copy.write_text(redacted_yaml(path.read_text(encoding="utf-8")), encoding="utf-8")
    return copy
