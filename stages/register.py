"""register: one MLflow run per pipeline run, the model version with its provenance, and the gated alias.

    python -m stages.register        # what dvc.yaml runs

Logs every hyperparameter (flattened), data-stage and training metrics, eval scores base vs
candidate, the gate verdict and the reports; the training set and each source as MLflow dataset
inputs with their real sha256 as digest; the model with `mlflow.transformers.log_model` as adapter +
tokenizer pointing at its base (`base_model_path` for local bases). The version carries the full
provenance record as tags. Re-running for the same adapter reuses its version (fingerprint =
adapter sha256). `champion` moves only when the gate passed; otherwise the version is tagged with the
failed checks and the run ends with a FAILED banner.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from tunegate.adapters import ADAPTERS
from tunegate.config import Config, flatten, load_config
from tunegate.decisions import redact, redact_value
from tunegate.errors import UserError
from tunegate.evaluation import load_samples
from tunegate.gate import Policy, Samples, decide, flipped_check, load_policy
from tunegate.io import read_json, sha256_file, write_json
from tunegate.paths import DVC_LOCK, PARAMS, REPORT, RESULTS, SAMPLES, Layout
from tunegate.provenance import (
    ADAPTER,
    BASE_ARTIFACT,
    BASE_EVAL_ARTIFACTS,
    BASE_FILES,
    BASE_MODEL,
    BASE_REVISION,
    CHAMPION_CHECK,
    CHAMPION_FLIPPED,
    DVC_LOCK_SHA,
    EVAL_ARTIFACTS,
    EXPORT_ARTIFACTS,
    EXPORT_SHA,
    EXPORTS,
    FINGERPRINT,
    GATE_FAILED,
    GATE_PASSED,
    GATE_POLICY,
    GIT_COMMIT,
    REGISTRATION,
    ROLLED_BACK,
    RUN_ID,
    logged_params,
    provenance_file,
    record,
)
from tunegate.registry import (
    BASES_EXPERIMENT,
    adapter_fingerprint,
    champion,
    client,
    find_version,
    log_base,
    logged_samples,
    move_champion,
    reachable,
    settle,
)
from tunegate.registry import (
    fingerprint as model_fingerprint,
)
from tunegate.runtime import stage_main

log = logging.getLogger(__name__)


def _log_curves(path: Path) -> None:
    """Training curves (loss, learning rate, grad norm, forgetting probe; tokens/s) as stepped MLflow metrics."""
    import csv

    import mlflow
    from mlflow.entities import Metric

    if not path.exists():
        return
    now = int(time.time() * 1000)
    metrics = [
        Metric(f"curve.{key}", float(value), now, int(row["step"]))
        for row in csv.DictReader(path.open())
        for key, value in row.items()
        if key != "step" and value
    ]
    run_id = mlflow.active_run().info.run_id
    for start in range(0, len(metrics), 1000):
        mlflow.tracking.MlflowClient().log_batch(run_id, metrics=metrics[start : start + 1000])


def _log_datasets(cfg: Config, mix: dict) -> None:
    """Training set, sources and eval sets as MLflow dataset inputs, with the real sha256 as digest."""
    import mlflow
    import pandas as pd

    layout = Layout.of(cfg.paths)
    files = [(layout.mix_train, "training", "train", mix["train_sha256"])]
    files += [(layout.dedup_source(n), "source", n, s.get("sha256")) for n, s in mix["sources"].items()]
    files += [(p, "eval", p.stem, None) for p in sorted(layout.eval_data.glob("*.jsonl"))]
    for path, context, name, digest in files:
        if not path.exists():
            continue
        frame = pd.read_json(path, lines=True)
        # MLflow's own digest ignores list columns such as `messages`: pass the file's sha256 instead.
        ds = mlflow.data.from_pandas(
            frame.head(0) if len(frame) == 0 else frame,
            source=str(path),
            name=name,
            digest=(digest or sha256_file(path))[:36],
        )
        mlflow.log_input(ds, context=context)


def _local_base(base: dict) -> bool:
    """The demo's base or a folder: no hub id to refer to."""
    return base["model"] == "demo" or Path(base["model"]).expanduser().is_dir()


def _log_model(cfg: Config, base: dict, adapter_dir: Path, tags: dict[str, str]):
    """The trained model via mlflow.transformers, as its adapter kind wrote it.

    A PEFT kind (lora, qlora, dora): adapter + tokenizer pointing at the base. For a local base, MLflow
    records the registering machine's folder; the model's metadata also names the copy in the artifact
    store and its sha256, which any client with access to the server loads (`tunegate fetch`).
    `full`: the fine-tuned model itself (weights in the dtype it was trained in, tokenizer, chat template);
    it needs no base to load. MLflow re-saves either in its own way: the fingerprint is of the weights, not files."""
    import mlflow

    requirements = [
        f"{p}=={metadata.version(p)}"
        for p in ("torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers")
    ]
    meta = {
        key: tags[key]
        for key in (BASE_MODEL, BASE_REVISION, BASE_ARTIFACT, BASE_FILES, FINGERPRINT, ADAPTER)
        if tags.get(key)
    }
    if not ADAPTERS[cfg.train.adapter].peft:  # the fine-tuned weights as trained (dtype kept), its own tokenizer
        from tunegate.models import load_model, load_tokenizer

        folder = {"model": base["model"], "path": str(adapter_dir)}
        return mlflow.transformers.log_model(
            transformers_model={
                "model": load_model(folder, cfg.base.trust_remote_code, dtype="auto"),
                "tokenizer": load_tokenizer(folder, cfg.base.trust_remote_code),
            },
            name="model",
            task="text-generation",
            pip_requirements=requirements,
            metadata=meta | {"load_with": "tunegate fetch (the full fine-tuned model, sha256-checked)"},
        )
    from tunegate.models import load_tokenizer, load_with_adapter

    model = load_with_adapter(base, adapter_dir, cfg.base.trust_remote_code)
    tokenizer = load_tokenizer({"path": str(adapter_dir)}, cfg.base.trust_remote_code)
    return mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        name="model",
        task="text-generation",
        pip_requirements=requirements,
        base_model_path=base["path"] if _local_base(base) else None,
        metadata=meta | {"load_with": "tunegate fetch (adapter, tokenizer and base, sha256-checked)"},
    )


def artifact_location(cfg: Config, experiment_name: str | None = None) -> str | None:
    """Where a new experiment keeps its artifacts: for a tracking server, wherever the server says (its
    artifact proxy, or its default root), so they reach the team's store; for a local store,
    register.artifact_root (a folder per experiment other than the main one)."""
    if cfg.register_.tracking_uri.startswith(("http://", "https://", "databricks")):
        return None
    root = Path(cfg.register_.artifact_root).resolve()
    return (root / experiment_name if experiment_name else root).as_uri()


def experiment(c, name: str, location: str | None) -> str:
    """The id of experiment `name`, created with `location` the first time. On a tracking server, an
    experiment whose artifacts live on one machine's disk (made by an older client, or a server
    without an artifact proxy) is named in a warning: only that machine can fetch its models."""
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return c.create_experiment(name, artifact_location=location)
    where = exp.artifact_location or ""
    if location is None and (where.startswith("file:") or where.startswith("/")):
        log.warning(
            "register: experiment %s keeps its artifacts at %s, on one machine's disk; teammates cannot fetch or "
            "promote its versions (start the server with --serve-artifacts, or register into a new experiment)",
            name,
            where,
        )
    return exp.experiment_id


@dataclass(frozen=True)
class Candidate:
    """What `register` reads of one pipeline run (main() loads it from the stage folders)."""

    base: dict  # the base manifest
    mix: dict  # the mix manifest
    train_metrics: dict
    verdict: dict  # the gate's
    scores: dict  # {side: {task: {metric: value}}}
    adapter_dir: Path  # the trained adapter, or the fully fine-tuned model
    reports: list[Path]  # logged with the run (folders as folders, files under provenance/)
    samples: Samples  # the candidate's per-sample outcomes: the champion comparison
    policy: Policy
    export_dir: Path | None = None  # the export stage's folder, logged with the version when present


def run(cfg: Config, cand: Candidate) -> dict[str, Any]:
    """Register the candidate (once per fingerprint), decide the champion, describe the version; a server
    lost or refusing mid-way ends in one line (the next run completes or cleans up what this one left)."""
    from mlflow.exceptions import MlflowException
    from requests import RequestException

    uri = cfg.register_.tracking_uri
    reachable(uri)
    try:
        return _register(cfg, cand)
    except (MlflowException, RequestException, ConnectionError) as err:
        detail = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        try:
            reachable(uri)
        except UserError:  # the server went away mid-registration
            shown = redact_value("uri", uri)  # a password in the URI stays out of the console and the log
            raise UserError(
                f"register.tracking_uri {shown}: lost the MLflow server during registration ({detail}); "
                "run `dvc repro` again once it is "
                "back: a cut-off registration is completed or cleaned up, and the adapter ends registered exactly once"
            ) from None
        raise UserError(f"register: MLflow refused a request ({detail})") from None


def _register(cfg: Config, cand: Candidate) -> dict[str, Any]:
    c = client(cfg.register_.tracking_uri)
    name = cfg.register_.model_name
    fingerprint = model_fingerprint(cand.adapter_dir)
    found = _reuse(c, name, fingerprint, cand.verdict)
    if found is None:  # a version registered before the weights' fingerprint carries the files' one
        legacy = adapter_fingerprint(cand.adapter_dir)
        found = _reuse(c, name, legacy, cand.verdict)
        fingerprint = legacy if found else fingerprint
    if found:
        _attach_export(c, name, found, cand)
    version, run_id = found or _log_run(c, cfg, cand, fingerprint)
    version = settle(c, name, fingerprint, run_id)  # one version, one complete run, whatever an earlier cut-off left
    result = {"model_name": name, "version": str(version), "run_id": run_id, "adapter_sha256": fingerprint}
    result |= _decide(c, cfg, cand, str(version))
    described = c.get_model_version(name, str(version))
    c.update_model_version(
        name, str(version), description=description(cfg, cand.base, cand.mix, result, described.tags)
    )
    return result


def _reuse(c, name: str, fingerprint: str, verdict: dict) -> tuple[str, str] | None:
    """(version, run id) of the version this fingerprint already has, re-tagged with the latest verdict
    (the same model re-gated, e.g. after a policy change); None when it has none yet."""
    existing = find_version(c, name, fingerprint)
    if existing is None:
        return None
    log.info("register: adapter %s already registered as %s v%s; reusing it", fingerprint[:12], name, existing.version)
    c.set_model_version_tag(name, str(existing.version), GATE_PASSED, str(verdict["passed"]).lower())
    c.set_model_version_tag(name, str(existing.version), GATE_FAILED, "; ".join(verdict["failed"]))
    c.set_model_version_tag(name, str(existing.version), GATE_POLICY, str(verdict.get("policy_sha256")))
    return existing.version, existing.run_id


def _log_run(c, cfg: Config, cand: Candidate, fingerprint: str) -> tuple[str, str]:
    """A new MLflow run with everything the version's provenance points at, and the version itself."""
    import mlflow

    exp_id = experiment(c, cfg.register_.experiment, artifact_location(cfg))
    tags = redact(record(cfg, cand.base, cand.mix, cand.verdict, cand.scores, fingerprint, cand.train_metrics))
    # a local base is stored once, by content, so another machine can load this version (tunegate fetch);
    # a fully fine-tuned model loads without it (its base stays in the provenance tags)
    if _local_base(cand.base) and ADAPTERS[cfg.train.adapter].peft:
        tags[BASE_ARTIFACT], tags[BASE_FILES] = log_base(c, cand.base, artifact_location(cfg, BASES_EXPERIMENT))
    with mlflow.start_run(
        experiment_id=exp_id,
        run_name=f"{cfg.train.method}-{cfg.train.adapter}-{fingerprint[:8]}",
        tags={FINGERPRINT: fingerprint, REGISTRATION: "started"},
    ) as active:
        run_id = active.info.run_id
        _log_params_and_metrics(cfg, cand)
        mlflow.set_tags({k: v for k, v in tags.items() if not k.startswith("hp.")})
        _log_datasets(cfg, cand.mix)
        _log_reports(cfg, cand.reports)
        tags |= _log_export(cand.export_dir, cand.verdict)
        mlflow.set_tags({k: v for k, v in tags.items() if k in (EXPORTS, EXPORT_SHA)})
        info = _log_model(cfg, cand.base, cand.adapter_dir, tags)
    version = mlflow.register_model(info.model_uri, cfg.register_.model_name, tags={**tags, RUN_ID: run_id}).version
    log.info("register: %s v%s (run %s)", cfg.register_.model_name, version, run_id)
    return version, run_id


def _log_params_and_metrics(cfg: Config, cand: Candidate) -> None:
    """Every setting (redacted), training metrics (the chain's as train.sft.*), eval scores and the verdict as
    metrics, the training curves step by step."""
    import mlflow

    params = logged_params(cfg)
    for start in range(0, len(params), 100):
        mlflow.log_params(dict(list(params.items())[start : start + 100]))
    numeric = {
        f"train.{k}": v
        for k, v in flatten(cand.train_metrics).items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    numeric |= {
        f"eval.{side}.{t}.{m}": v
        for side, by_task in cand.scores.items()
        for t, ms in by_task.items()
        for m, v in ms.items()
    }
    numeric["gate.passed"] = float(cand.verdict["passed"])
    mlflow.log_metrics(numeric)
    layout = Layout.of(cfg.paths)
    _log_curves(layout.train_plot)
    _log_curves(layout.throughput)


def _log_reports(cfg: Config, reports: list[Path]) -> None:
    """The candidate's eval samples (the champion comparison of later candidates reads them), the report
    folders, and the provenance files (params.yaml and dvc.lock redacted)."""
    import mlflow

    mlflow.log_artifacts(str(Layout.of(cfg.paths).eval("candidate") / SAMPLES), artifact_path=EVAL_ARTIFACTS)
    mlflow.log_artifacts(str(Layout.of(cfg.paths).eval("base") / SAMPLES), artifact_path=BASE_EVAL_ARTIFACTS)
    with tempfile.TemporaryDirectory() as scratch:
        for path in reports:
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=f"reports/{path.name}")
            elif path.exists():
                mlflow.log_artifact(str(provenance_file(path, Path(scratch))), artifact_path="provenance")


def _log_export(folder: Path | None, verdict: dict) -> dict[str, str]:
    """The exported files (runs:/<run>/export) and the tags that find and check them."""
    import mlflow

    from tunegate.paths import EXPORT_MANIFEST

    if folder is None or not (folder / EXPORT_MANIFEST).is_file():
        return {}
    mlflow.log_artifacts(str(folder), artifact_path=EXPORT_ARTIFACTS)
    return _export_tags(folder, verdict)


def _export_tags(folder: Path, verdict: dict) -> dict[str, str]:
    """Which artifacts were exported and whether the gate checked each, and the sha256 of export.json (which
    lists every file's)."""
    from tunegate.paths import EXPORT_MANIFEST

    record = read_json(folder / EXPORT_MANIFEST)
    names = [a["name"] for a in record["artifacts"]]
    checked = set(verdict.get("exports", []))
    shown = ",".join(f"{n}{'' if n in checked else ' (unchecked)'}" for n in names) or ",".join(record["formats"])
    return {EXPORTS: shown, EXPORT_SHA: sha256_file(folder / EXPORT_MANIFEST)}


def _attach_export(c, name: str, found: tuple[str, str], cand: Candidate) -> None:
    """A version registered again (same weights) gets this run's export when it has none or another one."""
    from tunegate.paths import EXPORT_MANIFEST

    folder = cand.export_dir
    if folder is None or not (folder / EXPORT_MANIFEST).is_file():
        return
    version, run_id = found
    if c.get_model_version(name, str(version)).tags.get(EXPORT_SHA) == sha256_file(folder / EXPORT_MANIFEST):
        return
    c.log_artifacts(run_id, str(folder), artifact_path=EXPORT_ARTIFACTS)
    tags = _export_tags(folder, cand.verdict)
    for key, value in tags.items():
        c.set_model_version_tag(name, str(version), key, value)
        c.set_tag(run_id, key, value)


def _decide(c, cfg: Config, cand: Candidate, version: str) -> dict[str, Any]:
    """The champion check (a passed gate only), the alias move, and what the result says of both."""
    name = cfg.register_.model_name
    lines, notes, promoted = list(cand.verdict["lines"]), [], None
    check = (
        champion_check(c, cfg, version, cand.samples, cand.policy)
        if cand.verdict["passed"]
        else {"passed": False, "tag": "not run: gate failed", "lines": []}
    )
    c.set_model_version_tag(name, version, CHAMPION_CHECK, check["tag"])
    if check.get("flipped"):  # beside the gate's report on the run: the items that flipped against the champion
        c.log_dict(c.get_model_version(name, version).run_id, check["flipped"], CHAMPION_FLIPPED)
    lines += check["lines"]
    notes += check.get("notes", [])
    passed = cand.verdict["passed"] and check["passed"]
    rolled_back = c.get_model_version(name, version).tags.get(ROLLED_BACK)
    if passed and rolled_back:  # the same adapter registered again after a rollback from it: a person decides
        notes.append(
            f"v{version} was rolled back ({rolled_back}); "
            f"it becomes champion again only by `tunegate promote {version}`"
        )
    elif passed:
        moved_from = move_champion(c, name, version, "gate passed in pipeline run", cfg.register_.alias)
        promoted = moved_from if moved_from != version else None
    current = champion(c, name, cfg.register_.alias)
    return {
        "gate_passed": passed,
        "champion": str(current.version) if current else None,
        "previous_champion": promoted,
        "champion_check": check["tag"],
        "lines": lines,
        "notes": notes,
        "baselines": baseline_summary(cand.verdict),
        "recommendation": cand.verdict.get("recommendation"),  # the cheaper path, when a baseline won
    }


def baseline_summary(verdict: dict[str, Any]) -> list[str]:
    """One line per baseline: its score on every target check and its prompt tokens per request."""
    costs = verdict.get("costs") or {}
    out = []
    for name, scores in (verdict.get("baselines") or {}).items():
        tokens = costs.get(name, {}).get("prompt_tokens")
        per_check = ", ".join(f"{key} {value:.3f}" for key, value in scores.items())
        out.append(f"{name}: {per_check}" + (f" at {tokens:.0f} prompt tokens per request" if tokens else ""))
    return out


def champion_check(c, cfg: Config, version, candidate: Samples, policy: Policy) -> dict[str, Any]:
    """When the policy asks, the candidate must also be non-inferior to the current champion on the
    target tasks, paired item by item with the per-sample outcomes logged with the champion's run.

    Returns {"passed", "tag" (one line for the version's `champion_check` tag), "lines" (gate-style
    lines, FAIL lines reach the banner), "notes" (decisions worth stating that are not failures)}.
    """
    current = champion(c, cfg.register_.model_name, cfg.register_.alias)
    rule = policy.champion
    if not rule.beat_on_target:
        return {"passed": True, "tag": "not required (champion.beat_on_target: false)", "lines": []}
    if current is None:
        return {"passed": True, "tag": "no champion yet", "lines": []}
    if str(current.version) == str(version):
        return {"passed": True, "tag": f"v{version} is the champion", "lines": []}
    samples, problem = champion_samples(current)
    if problem:
        what = f"champion v{current.version}'s eval samples cannot be read ({problem})"
        if rule.missing_samples == "skip":
            note = (
                f"champion comparison SKIPPED: {what}; "
                "decided on the checks against the base (champion.missing_samples: skip)"
            )
            return {"passed": True, "tag": f"skipped: {what}", "lines": [], "notes": [note]}
        line = (
            f"FAIL champion comparison: {what}; the candidate cannot be compared with it "
            f"(champion.missing_samples: block; `tunegate promote {version}` promotes it by name)"
        )
        return {"passed": False, "tag": f"blocked: {what}", "lines": [line]}
    verdict = decide(candidate, candidate, policy, cfg.gate.bootstrap, cfg.seed, champion=samples)
    against = [
        (ch, line) for ch, line in zip(verdict["checks"], verdict["lines"], strict=True) if ch["against"] == "champion"
    ]
    for _, line in against:
        log.info("%s", line)
    failed = [f"{ch['task']}/{ch['metric']}" for ch, _ in against if not ch["passed"]]
    tag = f"failed vs v{current.version}: {', '.join(failed)}" if failed else f"passed vs v{current.version}"
    flipped = [
        flipped_check(ch, f"champion v{current.version}", samples, candidate)
        for ch in policy.checks
        if ch.role == "target"
    ]
    for f in flipped:
        log.info("champion check %s: lost %d items, won %d", f["check"], len(f["lost"]), len(f["won"]))
    return {"passed": not failed, "tag": tag, "lines": [line for _, line in against], "flipped": flipped}


def champion_samples(current) -> tuple[Samples, str | None]:
    """The per-sample outcomes logged with the champion's run, or the reason they cannot be had."""

    if not current.run_id:
        return {}, "registered outside a pipeline run"
    try:
        samples = logged_samples(current.run_id, EVAL_ARTIFACTS)
    except Exception as err:  # whatever the store says (missing, unreadable, bad JSON): stated, never skipped silently
        return {}, f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else 'no detail'}"
    if not samples:
        return {}, f"no <task>.jsonl under {EVAL_ARTIFACTS}"
    return samples, None


def description(cfg: Config, base: dict, mix: dict, result: dict[str, Any], tags: dict[str, str]) -> str:
    """The version's description in the MLflow UI (markdown): why it was or was not promoted, every gate
    check with its numbers, what it was trained from, and how to reproduce or load it."""
    verdict = "PASSED" if result["gate_passed"] else "FAILED"
    status = "champion" if result["champion"] == result["version"] else f"not champion ({_champion_now(result)})"
    lines = [
        f"**Gate {verdict}**; at registration: {status}. Champion check: {result['champion_check']}.",
        "",
        "| check |",
        "|---|",
        *[f"| `{line}` |" for line in result["lines"]],
        "",
        f"**Base**: `{base['model']}` at revision `{base['resolved_revision']}`"
        + (f" (stored as `{tags[BASE_ARTIFACT]}`)" if tags.get(BASE_ARTIFACT) else ""),
        "",
        f"**Training**: {cfg.train.method} / {cfg.train.adapter}, seed {cfg.seed}, {mix['rows']} rows "
        f"(general share {mix['general_share_' + mix['by']]} of {mix['by']}), train set sha256 "
        f"`{mix['train_sha256'][:12]}`",
        "",
        "| source | role | rows used | sha256 |",
        "|---|---|---|---|",
        *[
            f"| {name} | {src.get('role', '')} | {src.get('used', '')} | `{str(src.get('sha256', ''))[:12]}` |"
            for name, src in mix["sources"].items()
        ],
        "",
        f"**Reproduce**: `tunegate reproduce {result['version']}` (commit `{tags.get(GIT_COMMIT, '')[:12]}`, "
        f"dvc.lock sha256 `{tags.get(DVC_LOCK_SHA, '')[:12]}`). **Load**: `tunegate fetch {result['version']}`"
        + ("." if ADAPTERS[cfg.train.adapter].peft else " (a full model: loads without its base)."),
    ]
    if result.get("baselines"):
        lines += [
            "",
            "**Baselines** (the base given the cheaper alternatives; the report lists the items that flipped):",
        ]
        lines += [f"- {line}" for line in result["baselines"]]
    if result.get("recommendation"):
        lines += ["", f"**{result['recommendation']}**"]
    if tags.get(EXPORTS):
        lines += [
            "",
            f"**Exports**: {tags[EXPORTS]} (each checked by the gate against the candidate, item by item, unless "
            f"marked); `tunegate fetch {result['version']} --format gguf|merged|ollama|vllm`.",
        ]
    for note in result.get("notes", []):
        lines += ["", f"Note: {note}"]
    return "\n".join(lines)


def _champion_now(result: dict[str, Any], verb: str = "") -> str:
    """`champion stays at v2` / `champion: v2`, or `no champion yet` when no version has the alias."""
    if not result["champion"]:
        return "no champion yet"
    return f"champion {verb} v{result['champion']}" if verb else f"champion: v{result['champion']}"


def banner(result: dict[str, Any]) -> str:
    notes = [f"tunegate: {note}" for note in result.get("notes", [])]
    if result["gate_passed"] and result["champion"] == result["version"]:
        return "\n".join([*notes, f"tunegate: gate PASSED; {result['model_name']} v{result['version']} is champion"])
    if result["gate_passed"]:
        return "\n".join(
            [
                *notes,
                f"tunegate: gate PASSED; {result['model_name']} v{result['version']} registered; "
                f"{_champion_now(result, 'stays at')}",
            ]
        )
    bar = "!" * 72
    return "\n".join(
        [
            bar,
            f"!! GATE FAILED: {result['model_name']} v{result['version']} registered WITHOUT the champion alias",
            *[f"!!   {line}" for line in result["lines"] if line.startswith("FAIL")],
            *[f"!!   {note}" for note in result.get("notes", [])],
            *([f"!! {result['recommendation']}"] if result.get("recommendation") else []),
            f"!! {_champion_now(result, 'stays at')}; see reports/gate/report.md",
            bar,
        ]
    )


def main() -> None:
    def body() -> None:
        from tunegate.models import load_manifest

        cfg = load_config()
        layout = Layout.of(cfg.paths)
        scores = {side: read_json(layout.eval(side) / RESULTS)["scores"] for side in ("base", "candidate")}
        reports = [
            layout.validated / REPORT,
            layout.dedup / REPORT,
            layout.gate,
            PARAMS,
            DVC_LOCK,
            layout.base_manifest,
        ]
        candidate = Candidate(
            base=load_manifest(layout.base),
            mix=read_json(layout.mix_manifest),
            train_metrics=read_json(layout.metrics("train")),
            verdict=read_json(layout.verdict),
            scores=scores,
            adapter_dir=layout.adapter,
            reports=reports,
            samples=load_samples(layout.eval("candidate")),
            policy=load_policy(Path(cfg.gate.policy)),
            export_dir=layout.export if layout.export_manifest.is_file() else None,
        )
        result = run(cfg, candidate)
        write_json(layout.register, result)
        print(banner(result), file=sys.stderr)

    stage_main("register", body)


if __name__ == "__main__":
    main()
