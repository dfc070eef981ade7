"""MLflow registry operations shared by the `register` stage and the `tunegate` CLI.

Provenance lives on the model version as tags (see docs/ARCHITECTURE.md, "Provenance record"), so "which model is
this and what was it trained on?" is one `tunegate show VERSION` away. The champion alias only moves
to versions whose gate passed and whose adapter files still match the recorded sha256.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from pathlib import Path
from typing import Any

from tunegate import decisions
from tunegate.adapters import ADAPTERS, AdapterKind
from tunegate.decisions import Version, redact_value
from tunegate.decisions import redact as redact  # re-exported: callers that import it from here
from tunegate.errors import UserError
from tunegate.io import sha256_tree
from tunegate.paths import PARAMS
from tunegate.provenance import (
    ADAPTER,
    BASE_ARTIFACT,
    BASE_FILES,
    BASE_MODEL,
    BASE_REVISION,
    DETERMINISTIC,
    EXPORT_ARTIFACTS,
    EXPORT_SHA,
    EXPORTS,
    FINGERPRINT,
    GIT_COMMIT,
    REGISTRATION,
    ROLLED_BACK,
)

log = logging.getLogger(__name__)


def _plain(v) -> Version:
    """What the decisions read of an MLflow model version."""
    return Version(str(v.version), dict(v.tags), v.run_id, v.source, v.model_id, v.creation_timestamp)


def client(tracking_uri: str, timeout_s: int = 10, retries: int = 3):
    """An MlflowClient with bounded HTTP retries (exponential backoff in MLflow's own HTTP layer)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(timeout_s))
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def reachable(tracking_uri: str) -> None:
    """Fail in one line, before any write, when an HTTP tracking server cannot be reached."""
    if not tracking_uri.startswith("http"):
        return
    import requests

    try:
        requests.get(tracking_uri.rstrip("/") + "/health", timeout=5).raise_for_status()
    except requests.RequestException as err:
        shown = redact_value("uri", tracking_uri)  # a password in the URI stays out of the console and the log
        raise UserError(
            f"register.tracking_uri {shown}: MLflow server not reachable ({type(err).__name__}); nothing was registered"
        ) from None


def find_version(c, name: str, fingerprint: str):
    """The existing version of `name` with this adapter fingerprint, if any (idempotent registration)."""
    # No except here: a server error must not read as "not registered yet" (that would register twice).
    versions = c.search_model_versions(decisions.versions_filter(name))
    found = decisions.oldest_with(map(_plain, versions), fingerprint)
    return None if found is None else next(v for v in versions if str(v.version) == found.version)


def settle(c, name: str, fingerprint: str, run_id: str) -> str:
    """Leave this adapter with exactly one version and one complete run, whatever an earlier cut-off or a
    retried request left behind; returns the version kept.

    MLflow's HTTP layer retries a POST whose answer was lost, so a blip of the server can make one
    registration create its run or its version twice; a registration cut off before this point left
    its run marked `registration=started` (and runs of earlier cut-offs with no version at all).
    Every step is idempotent, and the run is marked complete last: a cut-off here is settled next time.
    """
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    versions = c.search_model_versions(decisions.versions_filter(name))
    kept, extras = decisions.duplicates(map(_plain, versions), fingerprint, run_id)
    for extra in extras:
        log.warning(
            "register: removing %s v%s, a duplicate of v%s made by a retried request", name, extra.version, kept.version
        )
        c.delete_model_version(name, extra.version)
    # The logged model lists the versions made from it (the MLflow UI links them): none deleted above.
    model_id = decisions.logged_model_id(kept)
    if model_id:
        links = json.loads(c.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
        wanted = decisions.relinked(links, name, kept.version)
        if wanted is not None:
            c.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(wanted)})
    if not run_id:  # a version registered by hand, outside any run: nothing more to settle
        return kept.version
    run = c.get_run(run_id)
    stale = c.search_runs([run.info.experiment_id], filter_string=decisions.stale_runs_filter(fingerprint))
    for old in decisions.incomplete_runs((old.info.run_id for old in stale), run_id):
        log.warning("register: removing incomplete registration run %s of this adapter", old)
        c.delete_run(old)
    if decisions.needs_completion(run.data.tags):
        c.set_tag(run_id, REGISTRATION, "complete")
    return kept.version


def adapter_fingerprint(adapter_dir: Path) -> str:
    """The fingerprint versions recorded before `fingerprint`: sha256 over the safetensors files by file name."""
    from tunegate.io import sha256_of

    files = {Path(rel).name: sha for rel, sha in sha256_tree(adapter_dir, "*.safetensors").items()}
    if not files:
        raise UserError(f"{adapter_dir}: no .safetensors files to fingerprint")
    return sha256_of(files)


def fingerprint(folder: Path) -> str:
    """A trained model's identity (the `adapter_sha256` tag: idempotent registration and the tamper check):
    sha256 over its weights' names, shapes and values (`sha256_tensors`), so the trained folder and the copy
    MLflow re-saved into the artifact store (its own shards; a bf16 adapter widened to float32) agree.
    Versions registered before this hash recorded `adapter_fingerprint`, which `matches` still accepts."""
    from tunegate.io import sha256_tensors

    if not list(Path(folder).rglob("*.safetensors")):
        raise UserError(f"{folder}: no .safetensors files to fingerprint")
    return sha256_tensors(folder)


def matches(folder: Path, recorded: str | None, current: str | None = None) -> bool:
    """Whether the weights in folder are those a version recorded (either fingerprint of them); `current` is
    the folder's `fingerprint` when the caller has already computed it (the weights are hashed once)."""
    if recorded == adapter_fingerprint(folder):
        return True
    try:
        return recorded == (current or fingerprint(folder))
    except UserError:  # a file that is not safetensors any more: altered
        return False


def kind_of(tags: dict[str, str]) -> AdapterKind:
    """The adapter kind a version was trained with (its `adapter` tag; versions predating the tag were LoRA)."""
    return ADAPTERS.get(tags.get(ADAPTER, "lora"), ADAPTERS["lora"])


def store_of(uri: str) -> str:
    """Where an artifact URI's files live, in words: the tracking server's artifact store, or a URL/folder."""
    import mlflow

    if uri.startswith(("mlflow-artifacts:", "runs:", "models:")):
        return f"the artifact store of {redact_value('uri', mlflow.get_tracking_uri())}"
    return redact_value("uri", uri.split("/artifacts/", 1)[0] if "/artifacts/" in uri else uri)


def missing(name: str, version: str, what: str, uri: str, detail: str = "") -> UserError:
    """The one line for files a version's record names that the artifact store no longer holds."""
    why = f" ({detail})" if detail else ""
    return UserError(
        f"{name} v{version}: its {what} are missing from {store_of(uri)}: nothing at {uri}{why}; the registry "
        "still lists the version, but its files were deleted or the store lost them (an object store that keeps "
        "data in memory loses it on restart)"
    )


def download(name: str, version: str, what: str, uri: str, dest: Path | None = None) -> Path:
    """Download `uri` (a folder or file of a version), or say in one line that it is missing or unreachable."""
    import mlflow

    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest) if dest else None))
    except Exception as err:  # noqa: BLE001 - whatever the store raises: missing, unreachable, refused
        text = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        if _absent(err):
            raise missing(name, version, what, uri, text) from None
        raise UserError(
            f"{name} v{version}: its {what} at {uri} cannot be read from {store_of(uri)} ({type(err).__name__}: {text})"
        ) from None
    if local.is_dir() and not any(p.is_file() for p in local.rglob("*")):
        raise missing(name, version, what, uri)
    return local


def _absent(err: Exception) -> bool:
    """Whether a download error says the files are not there (as opposed to a store that cannot be reached)."""
    text = f"{type(err).__name__} {err}".lower()
    absent = ("not found", "nosuchkey", "404", "does not exist", "no such file", "ensure that the path is correct")
    return any(word in text for word in absent)


def model_files(c, name: str, v, dest: Path, refusing: str = "") -> Path:
    """A version's model files downloaded into dest and checked against the recorded sha256; one line when
    they are missing from the store, another when they are present but altered."""
    local = download(name, str(v.version), "model files", v.source, dest)
    if not list(local.rglob("*.safetensors")):
        raise missing(name, str(v.version), "model weights", v.source, "the folder holds no .safetensors file")
    if not matches(local, v.tags.get(FINGERPRINT)):
        tail = f"; {refusing}" if refusing else ""
        raise UserError(
            f"{name} v{v.version}: model files at {v.source} are present but no longer match the registered "
            f"sha256 (tampered?){tail}"
        )
    return local


def champion(c, name: str, alias: str = "champion"):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _now() -> str:
    return decisions.timestamp(dt.datetime.now(dt.UTC))


def _check_promotable(c, name: str, version: str, check_files: bool):
    v = c.get_model_version(name, version)
    refusal = decisions.gate_refusal(name, version, v.tags)
    if refusal:
        raise UserError(refusal)
    if check_files:
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:
            model_files(c, name, v, Path(scratch), "refusing to promote")
    return v


def move_champion(
    c, name: str, version: str, reason: str, alias: str = "champion", check_files: bool = True
) -> str | None:
    """Point `alias` at `version` after the gate and tamper checks; returns the previous champion version
    (the version itself when it already was the champion: nothing is moved or recorded then).

    Promoting a version by name also clears a rollback mark it may carry: a person chose it again.
    """
    v = _check_promotable(c, name, version, check_files)
    previous = champion(c, name, alias)
    prev = str(previous.version) if previous else None
    tags = decisions.promotion_tags(alias, str(version), prev, reason, _now())
    if tags is None:
        return prev
    # The record is written before the move: a move cut off in between is retried and recorded again,
    # but an alias never moves without a record of where it came from.
    for key, value in tags.items():
        c.set_model_version_tag(name, str(version), key, value)
    if ROLLED_BACK in v.tags:
        c.delete_model_version_tag(name, str(version), ROLLED_BACK)
    c.set_registered_model_alias(name, alias, str(version))
    return prev


def rollback_target(c, name: str, current) -> str | None:
    """The champion `current` replaced, walking back past versions that were themselves rolled back
    from (and past versions since deleted); None when there is nothing earlier on record."""
    from mlflow.exceptions import MlflowException

    def tags_of(version: str) -> dict[str, str] | None:
        try:
            return dict(c.get_model_version(name, version).tags)
        except MlflowException:  # deleted since
            return None

    return decisions.rollback_target(str(current.version), current.tags, tags_of)


def rollback(c, name: str, reason: str, alias: str = "champion", check_files: bool = True) -> tuple[str, str]:
    """Move `alias` back to the champion the current one replaced; returns (from, to).

    The version rolled back from is marked (`rolled_back`), and the version moved back to keeps its own
    `previous_champion`, so repeated rollbacks walk the promotion history backwards instead of toggling
    between two versions, and a marked version is never re-promoted unless someone promotes it by name.
    """
    current = champion(c, name, alias)
    if current is None:
        raise UserError(f"{name}: no {alias} to roll back from; use `tunegate promote VERSION`")
    target = rollback_target(c, name, current)
    if target is None:
        raise UserError(
            f"{name}: v{current.version} is the earliest {alias} on record; nothing to roll back to "
            "(use `tunegate promote VERSION` to choose a version by name)"
        )
    _check_promotable(c, name, target, check_files)
    on_target, on_current = decisions.rollback_tags(alias, str(current.version), str(target), reason, _now())
    for key, value in on_target.items():
        c.set_model_version_tag(name, str(target), key, value)
    for key, value in on_current.items():
        c.set_model_version_tag(name, str(current.version), key, value)
    c.set_registered_model_alias(name, alias, str(target))
    return str(current.version), str(target)


def versions_table(c, name: str, alias: str = "champion") -> list[dict[str, str]]:
    from mlflow.exceptions import MlflowException

    try:
        versions = c.search_model_versions(decisions.versions_filter(name))
    except MlflowException as err:
        raise UserError(f"registered model {name!r}: {err.message}") from None
    current = champion(c, name, alias)
    return decisions.version_rows(map(_plain, versions), str(current.version) if current else None)


def reproduce(c, name: str, version: str, project: Path, workdir: Path, share_cache: bool = True) -> dict[str, Any]:
    """Re-create a version's training run from its recorded commit and params, and compare the weights.

    The project is cloned at the recorded git commit into `workdir`, the params.yaml logged with the
    run replaces the checkout's (so `dvc exp run -S ...` runs reproduce too), and `train` is re-run.
    With share_cache the upstream stages are restored from this project's DVC cache (their hashes are
    checked by DVC) and only training is forced to run again. Data tracked with `dvc add` is restored
    from the cache (or pulled from the DVC remote), so private data need not be in git.
    """
    import shutil

    from tunegate.config import load_config
    from tunegate.paths import Layout

    v = c.get_model_version(name, version)
    commit = v.tags.get(GIT_COMMIT, "unknown")
    _checkout(name, version, commit, project, workdir)
    params = download(name, str(version), "provenance (params.yaml)", f"runs:/{v.run_id}/provenance/params.yaml")
    shutil.copy(params, workdir / PARAMS)
    _retrain(project, workdir, share_cache)
    folder = Layout.of(load_config(workdir / PARAMS).paths, workdir).adapter
    if v.tags.get(DETERMINISTIC, "true") == "true":
        comparison = "adapter sha256, bit for bit (the recorded run used deterministic kernels)"
    else:  # fast CUDA kernels sum in a different order from run to run: equal bytes are not to be expected
        comparison = (
            "adapter sha256; the recorded run used non-deterministic CUDA kernels, so bytes may differ: compare "
            "the eval scores, or set train.deterministic: true for bit-identical reruns"
        )
    reproduced = fingerprint(folder)
    return {
        "version": str(version),
        "commit": commit,
        "workdir": str(workdir),
        "recorded": v.tags.get(FINGERPRINT),
        "reproduced": reproduced,
        "match": matches(folder, v.tags.get(FINGERPRINT), reproduced),
        "comparison": comparison,
    }


def _checkout(name: str, version: str, commit: str, project: Path, workdir: Path) -> None:
    """The project cloned into the empty workdir at the version's recorded commit, or one line saying why not."""
    import subprocess

    if commit in ("", "unknown"):
        raise UserError(f"{name} v{version}: no git commit recorded; cannot reproduce")
    clean = commit.removesuffix("-dirty")
    if workdir.exists() and any(workdir.iterdir()):
        raise UserError(f"{workdir}: not empty; choose a new folder for the reproduction")
    run = lambda *args, cwd=workdir: subprocess.run(list(args), cwd=cwd, capture_output=True, text=True)  # noqa: E731
    if (
        run("git", "clone", "--quiet", str(project), str(workdir), cwd=project).returncode
        or run("git", "checkout", "--quiet", clean).returncode
    ):
        raise UserError(f"{name} v{version}: commit {clean[:12]} not found in {project}; was it pushed?")


def _retrain(project: Path, workdir: Path, share_cache: bool) -> None:
    """`dvc repro mix` then a forced `train` in workdir, upstream stages from this project's DVC cache."""
    import subprocess
    import sys

    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    dvc = lambda *args: subprocess.run([f"{bin_dir}/dvc", *args], cwd=workdir, env=env, capture_output=True, text=True)  # noqa: E731
    if share_cache:  # the project's cache, wherever its DVC config puts it (a team's shared cache dir included)
        here = subprocess.run([f"{bin_dir}/dvc", "cache", "dir"], cwd=project, env=env, capture_output=True, text=True)
        dvc("cache", "dir", "--local", here.stdout.strip() or str((project / ".dvc" / "cache").resolve()))
    # Data kept out of git (`dvc add`, a .dvc file in the commit) comes back from the DVC cache, or from the
    # project's DVC remote when the cache lacks it; anything still missing ends in DVC's own line below.
    if dvc("checkout", "--quiet").returncode and dvc("remote", "list").stdout.strip():
        dvc("pull", "--quiet")
    for args in (["repro", "mix"], ["repro", "--force", "--single-item", "train"]):
        proc = dvc(*args)
        if proc.returncode:
            stderr = proc.stderr.strip()
            last = stderr.splitlines()[-1] if stderr else proc.returncode
            raise UserError(f"reproduction failed at `dvc {' '.join(args)}` in {workdir}: {last}")


# Local base models (the demo's, a folder of your own) are stored once in the artifact store, in this
# experiment, one run per content (sha256 over every file), so a version can be loaded on any machine
# that reaches the same tracking server and artifact store. A hub base is referenced by id + commit sha.
BASES_EXPERIMENT = "tunegate-bases"
FETCHED_MODEL = "model"  # fetch's folder for the version's logged model


def base_files(path: Path) -> dict[str, str]:
    """{relative path: sha256} of a base folder, less the manifest the base stage writes into it (it
    names this machine's path)."""
    from tunegate.paths import BASE_MANIFEST

    return {rel: sha for rel, sha in sha256_tree(path).items() if Path(rel).name != str(BASE_MANIFEST)}


def log_base(c, base: dict[str, Any], artifact_location: str | None = None) -> tuple[str, str]:
    """(runs:/<run>/base, content sha256) of the local base in the artifact store, logged the first time
    this content is registered and found by its sha256 afterwards."""
    import shutil
    import tempfile

    from tunegate.io import sha256_of

    folder = Path(base["path"])
    files = base_files(folder)
    key = sha256_of(files)
    exp = c.get_experiment_by_name(BASES_EXPERIMENT)
    exp_id = exp.experiment_id if exp else c.create_experiment(BASES_EXPERIMENT, artifact_location=artifact_location)
    for run in c.search_runs([exp_id], f"tags.{BASE_FILES} = '{key}'", max_results=10):
        if run.info.status == "FINISHED":
            return f"runs:/{run.info.run_id}/base", key
    run = c.create_run(exp_id, tags={BASE_FILES: key, BASE_MODEL: base["model"], "mlflow.runName": f"base {key[:12]}"})
    with tempfile.TemporaryDirectory() as scratch:  # the files alone, without this machine's manifest
        for rel in files:
            (Path(scratch) / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / rel, Path(scratch) / rel)
        c.log_artifacts(run.info.run_id, scratch, artifact_path="base")
    c.set_terminated(run.info.run_id)
    log.info("register: base %s stored once in the artifact store (%s, %d files)", base["model"], key[:12], len(files))
    return f"runs:/{run.info.run_id}/base", key


def resolve_version(c, name: str, ref: str, alias: str = "champion"):
    """A version by number or by alias (`champion`), or one line saying there is none."""
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version(name, ref) if ref.isdigit() else c.get_model_version_by_alias(name, ref)
    except MlflowException:
        what = f"v{ref}" if ref.isdigit() else f"no version has the alias {ref!r}"
        raise UserError(f"{name}: {what} not found (see `tunegate status`)") from None


def fetch(c, name: str, ref: str, dest: Path) -> dict[str, Any]:
    """Download a registered version into dest and check it against the sha256 recorded at registration.

    Returns {"version", "kind", "model", "adapter", "tokenizer", "base", "base_model", "base_revision"}:
    for a PEFT kind (lora, qlora, dora) `adapter` is the adapter folder and `base` its base, a local folder
    (from the artifact store) or, for a hub base, the snapshot of the recorded commit from the Hugging Face
    hub or cache; for `full`, `model` is the fine-tuned model itself (its weights, tokenizer and template),
    which loads without its base (`base_model`/`base_revision` still say where it came from)."""
    from tunegate.io import sha256_of

    v = resolve_version(c, name, ref)
    kind, tags = kind_of(v.tags), v.tags
    files = model_files(c, name, v, Path(dest) / FETCHED_MODEL)
    got = {
        "version": str(v.version),
        "kind": kind.name,
        "model": None,
        "adapter": None,
        "tokenizer": None,
        "base": None,
        "base_model": tags.get(BASE_MODEL),
        "base_revision": tags.get(BASE_REVISION),
    }
    # the tokenizer the model was trained with: MLflow keeps it beside the weights (components/tokenizer)
    tokenizers = sorted(p.parent for p in files.rglob("tokenizer_config.json"))
    if not kind.peft:  # the weights folder (config.json beside the safetensors), loadable without its base
        configs = [p.parent for p in sorted(files.rglob("config.json")) if list(p.parent.glob("*.safetensors"))]
        folder = configs[0] if configs else files
        tokenizer = next((t for t in tokenizers if t == folder), tokenizers[0] if tokenizers else folder)
        return got | {"model": str(folder), "tokenizer": str(tokenizer)}
    configs = sorted(files.rglob("adapter_config.json"))
    adapter = configs[0].parent if configs else files
    tokenizer = next((t for t in tokenizers if t == adapter), tokenizers[0] if tokenizers else None)
    if tags.get(BASE_ARTIFACT):
        base = download(name, str(v.version), "base model files", tags[BASE_ARTIFACT], Path(dest))
        if sha256_of(base_files(base)) != tags.get(BASE_FILES):
            raise UserError(
                f"{name} v{v.version}: the base at {tags[BASE_ARTIFACT]} is present but does not match its "
                "recorded sha256 (tampered?)"
            )
    else:
        from huggingface_hub import snapshot_download

        try:
            base = Path(snapshot_download(tags[BASE_MODEL], revision=tags.get(BASE_REVISION)))
        except Exception as err:  # noqa: BLE001 - offline, gated: one line
            raise UserError(
                f"{name} v{v.version}: base {tags[BASE_MODEL]}@{tags.get(BASE_REVISION)} is not in the Hugging "
                f"Face cache and cannot be downloaded ({type(err).__name__})"
            ) from None
    return got | {"adapter": str(adapter), "tokenizer": str(tokenizer or base), "base": str(base)}


def load(fetched: dict[str, Any], trust_remote_code: bool = False):
    """(model, tokenizer) of a fetched version: a full model as it is, or the base with the adapter applied
    and the adapter's tokenizer."""
    from tunegate.models import load_model, load_tokenizer, load_with_adapter

    if fetched.get("model"):
        model = load_model({"model": fetched.get("base_model"), "path": fetched["model"]}, trust_remote_code)
        return model, load_tokenizer({"path": fetched.get("tokenizer") or fetched["model"]}, trust_remote_code)
    manifest = {"model": fetched["base_model"], "path": fetched["base"]}
    model = load_with_adapter(manifest, Path(fetched["adapter"]), trust_remote_code)
    return model, load_tokenizer({"path": fetched.get("tokenizer") or fetched["adapter"]}, trust_remote_code)


def logged_samples(run_id: str, artifact_path: str) -> dict[str, list[dict[str, Any]]]:
    """Per-sample outcomes logged on a run (`<task>.jsonl` files), downloaded to a temporary folder and read."""
    import tempfile

    import mlflow

    from tunegate.evaluation import read_samples

    quiet, before = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ[quiet] = "false"  # a few small files read back, not a download the user waits for
    try:
        with tempfile.TemporaryDirectory() as scratch:
            local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=scratch)
            return read_samples(Path(local))
    finally:
        if before is None:
            os.environ.pop(quiet)
        else:
            os.environ[quiet] = before


def version_samples(c, name: str, ref: str) -> tuple[str, dict[str, list[dict[str, Any]]]]:
    """(label, per-sample outcomes) of a version by number or alias, or of a version's base as `base` or
    `base@VERSION` (the base's outcomes logged beside that version's: the champion's when no version is named)."""
    from tunegate.provenance import BASE_EVAL_ARTIFACTS, EVAL_ARTIFACTS

    side, _, of = ref.partition("@")
    v = resolve_version(c, name, of or "champion") if side == "base" else resolve_version(c, name, ref)
    artifact, label = (
        (BASE_EVAL_ARTIFACTS, f"base (of v{v.version})") if side == "base" else (EVAL_ARTIFACTS, f"v{v.version}")
    )
    if not v.run_id:
        raise UserError(f"{name} v{v.version}: registered outside a pipeline run; no per-sample outcomes logged")
    try:
        samples = logged_samples(v.run_id, artifact)
    except Exception as err:  # whatever the store says (missing, unreadable): one line naming the version
        detail = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise UserError(f"{name} v{v.version}: no {artifact} logged on its run ({detail})") from None
    if not samples:
        raise UserError(f"{name} v{v.version}: no <task>.jsonl under {artifact} (registered before they were logged?)")
    return label, samples


def _metrics_of(rows: list[dict[str, Any]]) -> set[str]:
    return {k for row in rows for k, v in row.items() if k != "doc_id" and isinstance(v, float)}


def diff(c, name: str, a: str, b: str) -> dict[str, Any]:
    """Items that flipped from version (or base) `a` to `b`, per task and metric they share: means, lost and won."""
    from tunegate.gate import Check, flips, paired

    label_a, first = version_samples(c, name, a)
    label_b, second = version_samples(c, name, b)
    out = []
    for task in sorted(first.keys() & second.keys()):
        for metric in sorted(_metrics_of(first[task]) & _metrics_of(second[task])):
            check = Check(task=task, metric=metric, role="target")
            values_a, values_b = paired(first[task], second[task], metric)
            n = len(values_a)
            means = {"a": float(values_a.mean()) if n else 0.0, "b": float(values_b.mean()) if n else 0.0}
            out.append({"task": task, "metric": metric, "n": n, **means, **flips(check, first, second)})
    if not out:
        raise UserError(f"{label_a} and {label_b} share no task: nothing to compare")
    return {"a": label_a, "b": label_b, "checks": out}


def fetch_export(c, name: str, ref: str, fmt: str, dest: Path) -> dict[str, Any]:
    """One exported format of a registered version (merged, gguf, ollama with its GGUF, vllm) downloaded into dest,
    every file checked against export.json, and export.json against the sha256 recorded on the version."""
    from tunegate.export import FORMATS, GGUF, OLLAMA, commands, verify
    from tunegate.io import read_json, sha256_file
    from tunegate.paths import EXPORT_MANIFEST

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: one of {', '.join(FORMATS)}")
    v = resolve_version(c, name, ref)
    if not v.tags.get(EXPORT_SHA):
        raise UserError(
            f"{name} v{v.version}: nothing exported with this version (export.formats in params.yaml exports at "
            f"registration; `tunegate export {v.version}` exports a registered version)"
        )
    root = f"runs:/{v.run_id}/{EXPORT_ARTIFACTS}"
    dest = Path(dest)
    record_path = download(name, str(v.version), "export manifest", f"{root}/{EXPORT_MANIFEST}", dest)
    if sha256_file(record_path) != v.tags[EXPORT_SHA]:
        raise UserError(f"{name} v{v.version}: {EXPORT_MANIFEST} no longer matches its recorded sha256 (tampered?)")
    record = read_json(record_path)
    if fmt not in record["formats"]:
        raise UserError(f"{name} v{v.version}: no {fmt} export (it has {', '.join(record['formats'])})")
    for part in [fmt, GGUF] if fmt == OLLAMA else [fmt]:
        download(name, str(v.version), f"{part} export", f"{root}/{part}", dest)
    bad = verify(dest, record, only=fmt)
    if bad:
        raise UserError(
            f"{name} v{v.version}: exported files differ from export.json: {', '.join(bad[:5])} (tampered?)"
        )
    files = sorted(rel for rel in record["files"] if (dest / rel).is_file())
    return {"version": str(v.version), "format": fmt, "folder": str(dest), "files": files,
            "checked": v.tags.get(EXPORTS, ""), "commands": commands(record, str(dest), only=fmt)}  # fmt: skip
