"""Resolve and load base models: the demo model, a local folder, or a Hugging Face hub id.

Weights are only ever read from safetensors (no pickle), and `trust_remote_code` is off unless
`base.trust_remote_code: true`. The manifest (`base.json`) written by the `base` stage is what every
later stage loads from, so they all see the same resolved revision and files.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tunegate.errors import UserError, first_line
from tunegate.io import read_json, sha256_file, sha256_of
from tunegate.paths import BASE_MANIFEST, REPO_REFS, REPO_SNAPSHOTS

log = logging.getLogger(__name__)

WEIGHT_GLOBS = ("*.safetensors",)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
)
SNAPSHOT_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer.model", "*.txt"]
# For a base whose tokenizer has no chat template (most pretrained-only checkpoints): plain role
# prefixes, and the tokenizer's own EOS after each assistant turn so the model learns to stop. Saved
# with the adapter's tokenizer, so evaluation and serving render exactly what training saw.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def snapshot(model: str, revision: str, root: str | Path = ".", setting: str = "base.model") -> tuple[Path, str]:
    """A local folder with the model's files and the commit sha it came from (downloads if needed).
    A relative local folder is taken relative to the project `root`; errors name `setting`."""
    local = _local(model, root)
    if local.is_dir():
        return local_snapshot(local, model, revision, setting)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = Path(snapshot_download(model, revision=revision, allow_patterns=SNAPSHOT_PATTERNS))
    except (LocalEntryNotFoundError, OSError, HfHubHTTPError) as err:
        if isinstance(err, RepositoryNotFoundError):
            raise UserError(
                f"{setting} {model!r}: no such model on the Hugging Face hub (or it is private: set HF_TOKEN)"
            ) from None
        raise UserError(
            f"{setting} {model!r} (revision {revision!r}): cannot reach the Hugging Face hub "
            f"and it is not in the local cache ({type(err).__name__}); "
            f"download it once with network access, or set {setting} to a local folder"
            + (" or 'demo'" if setting == "base.model" else "")
        ) from None
    return path, path.name  # snapshot folders are named by the resolved commit sha


def describe(path: Path, model: str, revision: str, resolved: str, setting: str = "base.model") -> dict[str, Any]:
    """The manifest: identity of the base model down to the sha256 of every weight and tokenizer file."""
    weights = sorted(p for g in WEIGHT_GLOBS for p in path.glob(g))
    if not weights:
        found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (
            f" (found {', '.join(found)}: pickle-based weights are not loaded; convert them to safetensors)"
            if found
            else ""
        )
        raise UserError(f"{setting} {model!r}: no .safetensors weights in {path}{hint}")
    tokenizer = {name: sha256_file(path / name) for name in TOKENIZER_FILES if (path / name).exists()}
    if not tokenizer:
        raise UserError(f"{setting} {model!r}: no tokenizer files in {path}")
    try:
        template = saved_chat_template(path)
    except (UnicodeDecodeError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        raise UserError(f"{setting} {model!r}: a tokenizer file in {path} cannot be read ({err})") from None
    return {
        "model": model,
        "revision": revision,
        "resolved_revision": resolved,
        "path": str(path),
        "weights_sha256": {p.name: sha256_file(p) for p in weights},
        "tokenizer_sha256": tokenizer,
        "chat_template_sha256": sha256_of(template) if template else None,
    }


def saved_chat_template(path: Path, config: dict[str, Any] | None = None) -> str | list[dict[str, str]] | None:
    """The chat template the tokenizer saved in `path` loads with, as transformers reads it: chat_template.jinja first,
    then tokenizer_config.json's `chat_template` (a string, or named templates); `config` is that file when read."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    if config is None:
        config = read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    return config.get("chat_template") or None


def check_loadable(path: Path, model: str, trust_remote_code: bool = False) -> None:
    """What later stages will load, checked when the base is resolved rather than halfway through the
    pipeline: config.json, the tokenizer, every safetensors header, and a tokenizer that fits the
    model's embeddings. Each problem ends in one line naming base.model and the file."""
    import json

    name = f"base.model {model!r}"
    config_path = path / "config.json"
    if not config_path.is_file():
        raise UserError(f"{name}: no config.json in {path}; a transformers model folder needs one (save_pretrained)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{name}: {config_path} is not valid JSON ({err}); re-download or re-save the model") from None
    tokenizer = load_tokenizer({"path": str(path)}, trust_remote_code)
    from safetensors import safe_open

    for weights in sorted(p for g in WEIGHT_GLOBS for p in path.glob(g)):
        try:
            with safe_open(str(weights), "np") as fh:
                fh.keys()
        except Exception as err:  # a truncated or overwritten file: safetensors' own error types vary
            raise UserError(
                f"{name}: {weights} is not a readable safetensors file ({first_line(err)}); re-download it"
            ) from None
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise UserError(
            f"{name}: the tokenizer in {path} has {len(tokenizer)} tokens but the model's embeddings have {vocab} "
            "(config.json vocab_size); use the tokenizer saved with these weights"
        )


def load_manifest(base_dir: str | Path) -> dict[str, Any]:
    path = Path(base_dir) / BASE_MANIFEST
    if not path.exists():
        raise UserError(f"{path}: missing; run the base stage first (dvc repro base)")
    manifest = read_json(path)
    if manifest["path"] == ".":  # the demo model lives inside the stage output itself
        manifest["path"] = str(Path(base_dir).resolve())
    return manifest


def load_tokenizer(manifest: dict[str, Any], trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(manifest["path"], trust_remote_code=trust_remote_code)
    except Exception as err:  # tokenizers, json and transformers raise many types for a damaged folder
        raise UserError(
            f"{manifest['path']}: the tokenizer cannot be loaded ({first_line(err)}); check base.model "
            "(the folder needs tokenizer.json or tokenizer.model, with tokenizer_config.json)"
        ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        log.warning(
            "%s: the tokenizer has no chat template; using tunegate's default (role: content, EOS after answers)",
            manifest["path"],
        )
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def load_model(
    manifest: dict[str, Any],
    trust_remote_code: bool = False,
    quantize_4bit: bool = False,
    dtype: Any = None,
    attn_implementation: str | None = None,
):
    """Load the base causal LM from safetensors; optionally as bitsandbytes NF4 with double quantisation, and with
    a named attention implementation (None: transformers' choice)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "use_safetensors": True}
    if quantize_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(manifest["path"], **kwargs)


def load_with_adapter(
    manifest: dict[str, Any], adapter: str | Path, trust_remote_code: bool = False, merge: bool = False
):
    """The base (unquantised, from safetensors) with a trained PEFT adapter applied.

    merge=True folds the adapter into the weights (`merge_and_unload`): a plain transformers model
    whose forward pass costs what the base's does. A QLoRA adapter is then applied to de-quantised
    weights (merging into 4-bit layers would round the update away). Used by training's `merge`,
    evaluation and registration alike, so all three see the same model.
    """
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(manifest, trust_remote_code), str(adapter))
    return model.merge_and_unload() if merge else model


def _local(model: str, root: str | Path) -> Path:
    local = Path(model).expanduser()
    return local if local.is_absolute() else Path(root) / local


def content_revision(folder: Path) -> str:
    """The revision of a plain model folder (no refs/): a commit-like id of its weight and tokenizer files."""
    files = sorted(p for g in (*WEIGHT_GLOBS, *TOKENIZER_FILES, "config.json") for p in folder.glob(g))
    return sha256_of({p.name: sha256_file(p) for p in files})[:40]


def local_snapshot(folder: Path, model: str, revision: str, setting: str = "base.model") -> tuple[Path, str]:
    """(files, commit) of a local base. In a model repository (refs/ + snapshots/, as `tunegate demo-base`
    publishes) `revision` is a branch under refs/ or a commit under snapshots/, as on the hub, so a branch
    follows new revisions and a commit pins one; a plain folder is its one revision, named by its content."""
    snapshots = folder / REPO_SNAPSHOTS
    if not snapshots.is_dir():
        return folder.resolve(), content_revision(folder)
    ref = folder / REPO_REFS / revision
    commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
    if not (snapshots / commit).is_dir():
        branches = sorted(p.name for p in (folder / REPO_REFS).glob("*")) or ["none"]
        raise UserError(
            f"{setting} {model!r}: no revision {revision!r} in {folder} "
            f"(branches: {', '.join(branches)}; or a commit under {REPO_SNAPSHOTS}/); set base.revision"
        )
    return (snapshots / commit).resolve(), commit


def revision_of(model: str, revision: str, root: str | Path = ".") -> str:
    """The commit `model`@`revision` points at now, without downloading anything: the hub's answer for a
    hub id (one API call), the ref file or the content id for a local folder. What the retrain watch
    compares with the champion's recorded base revision."""
    local = _local(model, root)
    if local.is_dir():
        return local_snapshot(local, model, revision)[1]
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    try:
        return HfApi().model_info(model, revision=revision).sha
    except RepositoryNotFoundError:
        raise UserError(
            f"base.model {model!r}: no such model on the Hugging Face hub (or it is private: set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise UserError(f"base.model {model!r}: the hub has no revision {revision!r}; check base.revision") from None
    except Exception as err:  # offline mode, DNS, timeouts: the HTTP client's own types
        raise UserError(
            f"base.model {model!r} (revision {revision!r}): cannot ask the Hugging Face hub for its current "
            f"revision ({type(err).__name__}); the watch needs network access (HF_HUB_OFFLINE unset)"
        ) from None


# The settings that ask for vLLM, each with what to set instead where vLLM cannot run.
VLLM_SETTINGS = {
    "eval.backend": "set eval.backend: hf",
    "train.grpo_args.use_vllm": "set use_vllm: false to generate with transformers",
}


def require_vllm(setting: str, instead: str | None = None) -> None:
    """vLLM runs on CUDA and must be installed: what is missing is said in one line naming `setting` and what to set
    instead (VLLM_SETTINGS, unless `instead` says otherwise), before any model loads."""
    import importlib.util

    import torch

    missing = [
        what
        for what, there in (
            ("a CUDA device", torch.cuda.is_available()),
            ("vLLM installed (pip install vllm)", importlib.util.find_spec("vllm") is not None),
        )
        if not there
    ]
    if missing:
        raise UserError(f"{setting}: vLLM needs {' and '.join(missing)}; {instead or VLLM_SETTINGS[setting]}")
