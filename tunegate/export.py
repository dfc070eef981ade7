"""Export the trained model to what runtimes read: merged safetensors, GGUF (llama.cpp, Ollama, LM Studio),
an Ollama Modelfile, and vLLM's LoRA layout. Every file is listed with its sha256 in export.json.

    export/
      merged/              base + adapter folded, in the base's dtype, safetensors + tokenizer + chat template
      gguf/model-f16.gguf  llama.cpp's format, one file per `export.gguf` type, chat template in its metadata
      ollama/Modelfile     FROM ../gguf/model-<type>.gguf, TEMPLATE and stop tokens equal to the chat template
      vllm/adapter/        the adapter as vLLM's LoRA loader reads it; vllm/serve.sh the `vllm serve` line
      export.json          formats, artifacts (the ones the export check scores), files with sha256, commands

What can be refused is refused before any work, in one line (`preflight`): an architecture or tokenizer
llama.cpp's converter does not support, a chat template Ollama's TEMPLATE cannot express, a DoRA adapter
for vLLM. The export check (stage `eval_export`, gate role `export`) then scores every artifact through
the runtime that serves it and compares it with the candidate item by item.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunegate.errors import UserError
from tunegate.paths import EXPORT_MANIFEST as MANIFEST

log = logging.getLogger(__name__)

FORMATS = ("merged", "gguf", "ollama", "vllm")

MERGED, GGUF, OLLAMA, VLLM = FORMATS
MODELFILE = "Modelfile"
SERVE = "serve.sh"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json")  # fmt: skip
# {% generation %} marks the assistant's tokens for training (TRL's assistant-only loss); runtimes that read
# a GGUF's template (llama.cpp's minja, Ollama, LM Studio) do not know the tag, and it renders nothing.
_GENERATION_TAG = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")


@dataclass(frozen=True)
class Artifact:
    """One thing the export check scores: the merged folder or one GGUF file."""

    name: str  # merged | gguf-<type>
    path: str  # relative to the export folder
    runtime: str  # transformers | llama.cpp

    @property
    def gguf_type(self) -> str | None:
        return self.name.removeprefix("gguf-") if self.name.startswith("gguf-") else None


def gguf_file(kind: str) -> str:
    return f"model-{kind}.gguf"


def artifacts(formats: list[str], gguf_types: list[str]) -> list[Artifact]:
    """What an export with these settings produces that a runtime loads (and the export check scores)."""
    found = []
    if MERGED in formats:
        found.append(Artifact(MERGED, MERGED, "transformers"))
    if GGUF in formats or OLLAMA in formats:
        found += [Artifact(f"gguf-{t}", f"{GGUF}/{gguf_file(t)}", "llama.cpp") for t in gguf_types]
    return found


def strip_generation_tags(template: str) -> str:
    return _GENERATION_TAG.sub("", template)


# --- Ollama: a Go TEMPLATE equal to the chat template ---------------------------------------------------
@dataclass(frozen=True)
class Turns:
    """A chat template seen as text around each message: prefix, per-role (before, after), generation prompt."""

    prefix: str
    roles: dict[str, tuple[str, str]]
    generation: str

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        body = "".join(self.roles[m["role"]][0] + m["content"] + self.roles[m["role"]][1] for m in messages)
        return self.prefix + body + (self.generation if add_generation_prompt else "")


_PROBES = [
    [("system", "You answer tickets."), ("user", "Where is order 12?"), ("assistant", "Shipped."), ("user", "Thanks")],
    [("user", "hi")],
    [("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")],
]


def turns_of(template: str, special: dict[str, str]) -> Turns:
    """The template as per-message wrappers, checked to reproduce the template exactly on several conversations
    (with and without a system turn); a template that is not of that shape is refused in one line."""
    from tunegate.llamacpp import render

    def r(messages, gen):
        return render(template, [{"role": a, "content": b} for a, b in messages], gen, **special)

    why = ""
    try:
        prefix = r([], False)
        generation = r([], True)[len(prefix) :]
        roles = {}
        for role in ("system", "user", "assistant"):
            marker = f"\x00{role}\x00"
            before, _, after = r([(role, marker)], False)[len(prefix) :].partition(marker)
            roles[role] = (before, after)
        turns = Turns(prefix, roles, generation)
        as_turns = lambda p, g: turns.render([{"role": a, "content": b} for a, b in p], g)  # noqa: E731
        if not all(r(p, g) == as_turns(p, g) for p in _PROBES for g in (True, False)):
            why = "it renders some conversation differently, e.g. the system prompt inside the first user turn"
        elif any("{{" in s for pair in roles.values() for s in pair):
            why = "its text around a message holds '{{'"
    except Exception as err:  # noqa: BLE001 - any template error means "cannot be expressed", said in one line
        why = f"rendering one message alone fails: {' '.join(str(err).split())[:120]}"
    if why:
        raise UserError(
            f"export.formats ollama: the chat template is not one fixed wrapper per message ({why}), so Ollama's "
            "TEMPLATE cannot equal it; export gguf and let the runtime read the template stored in the GGUF"
        )
    return turns


def modelfile(turns: Turns, gguf_name: str, eos: str, n_ctx: int) -> str:
    """Ollama's Modelfile: the GGUF, a TEMPLATE rendering exactly as the chat template, and its stop tokens."""
    branches = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{before}{{{{ .Content }}}}{after}'
        for i, (role, (before, after)) in enumerate(turns.roles.items())
    )
    template = f"{turns.prefix}{{{{- range .Messages }}}}{branches}{{{{ end }}}}{{{{ end }}}}{turns.generation}"
    stops = sorted({s for s in (turns.roles["assistant"][1].strip(), eos) if s})
    lines = [f"FROM ../{GGUF}/{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [f"PARAMETER num_ctx {n_ctx}", "PARAMETER temperature 0"]
    return "\n".join(lines) + "\n"


# --- vLLM ------------------------------------------------------------------------------------------------
def vllm_problem(adapter_config: dict[str, Any] | None) -> str | None:
    """Why vLLM's LoRA loader would refuse this adapter, or None."""
    if adapter_config is None:
        return None
    if adapter_config.get("use_dora"):
        return "vLLM does not load DoRA adapters: serve the merged export instead (export.formats: [merged])"
    if adapter_config.get("modules_to_save"):
        return f"vLLM's LoRA loader cannot take modules_to_save {adapter_config['modules_to_save']}: serve merged"
    return None


def serve_lines(model_name: str, base_ref: str, has_adapter: bool, rank: int | None) -> str:
    lines = ["# serve the merged model as it is:", f"vllm serve ../{MERGED} --served-model-name {model_name}"]
    if has_adapter:
        lines += [
            "# or the base with this adapter (LoRA hot-swapping, several adapters on one base):",
            f"vllm serve {base_ref} --enable-lora --max-lora-rank {rank} --lora-modules {model_name}=./adapter",
        ]
    return "\n".join(lines) + "\n"


# --- the export -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Source:
    """What is exported: the base (its manifest), the trained folder and whether it is an adapter."""

    manifest: dict[str, Any]
    trained: Path  # the adapter folder, or the full fine-tuned model
    adapter: bool
    name: str  # the model's name in serving commands (register.model_name)
    trust_remote_code: bool = False


def preflight(source: Source, formats: list[str], gguf_types: list[str]) -> None:
    """Everything that can refuse, checked in seconds before the merge or any conversion."""
    from tunegate.llamacpp import GGUF_TYPES, convert, converter_dir

    unknown = [t for t in gguf_types if t not in GGUF_TYPES]
    if unknown:
        raise UserError(f"export.gguf: unknown type(s) {', '.join(unknown)} (one of {', '.join(GGUF_TYPES)})")
    if VLLM in formats and source.adapter and (why := vllm_problem(_adapter_config(source.trained))):
        raise UserError(f"export.formats vllm: {why}")
    if GGUF not in formats and OLLAMA not in formats:
        return
    converter_dir()
    try:
        import llama_cpp  # noqa: F401 - the quantiser and the export check need the binding
    except ImportError:
        raise UserError("llama-cpp-python is not installed: `make setup-export` (pip install -e '.[export]')") from None
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "in"
        probe.mkdir()
        shutil.copy(Path(source.manifest["path"]) / "config.json", probe / "config.json")
        _copy_tokenizer(source.trained, probe)
        convert(probe, Path(tmp) / "vocab.gguf", "f16", vocab_only=True)
    if OLLAMA in formats:
        turns_of(strip_generation_tags(_template(source.trained)), _special(source.trained))


def run(source: Source, formats: list[str], gguf_types: list[str], out_dir: Path) -> dict[str, Any]:
    """Write every asked format into out_dir (atomically) and return its export.json."""
    from tunegate.io import atomic_path, write_json

    preflight(source, formats, gguf_types)
    with atomic_path(out_dir) as tmp, tempfile.TemporaryDirectory() as scratch:
        tmp.mkdir()
        merged = tmp / MERGED if MERGED in formats else Path(scratch) / MERGED
        if {MERGED, GGUF, OLLAMA} & set(formats):  # GGUF is converted from the merged weights; vLLM reads its own
            write_merged(source, merged)
        if GGUF in formats or OLLAMA in formats:
            write_gguf(merged, tmp / GGUF, gguf_types, Path(scratch))
        if OLLAMA in formats:
            _write_modelfile(source, tmp, gguf_types)
        if VLLM in formats:
            _write_vllm(source, tmp / VLLM)
        record = _record(source, formats, gguf_types, tmp)
        write_json(tmp / MANIFEST, record)
    return record


def write_merged(source: Source, out: Path) -> None:
    """The adapter folded into the base, saved in the base's dtype with the tokenizer and chat template; a full
    fine-tune is already a whole model and is copied as it is."""
    if not source.adapter:
        shutil.copytree(source.trained, out)
        return
    from tunegate.models import load_tokenizer, load_with_adapter

    model = load_with_adapter(source.manifest, source.trained, source.trust_remote_code, merge=True)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer({"path": str(source.trained)}, source.trust_remote_code).save_pretrained(out)


def write_gguf(merged: Path, out: Path, gguf_types: list[str], scratch: Path) -> None:
    """One GGUF per type: converter types straight from the merged weights, the rest quantised from f16."""
    from tunegate.llamacpp import CONVERTER_TYPES, convert, quantize

    staged = scratch / "gguf-input"
    staged.mkdir()
    for item in merged.iterdir():
        if item.name not in TOKENIZER_FILES:
            (staged / item.name).symlink_to(item.resolve())
    _copy_tokenizer(merged, staged)
    out.mkdir(parents=True)
    f16 = out / gguf_file("f16") if "f16" in gguf_types else scratch / gguf_file("f16")
    for kind in gguf_types:
        target = out / gguf_file(kind)
        if kind in CONVERTER_TYPES:
            convert(staged, target, kind)
        else:
            if not f16.exists():
                convert(staged, f16, "f16")
            quantize(f16, target, kind)
        log.info("gguf %s: %.1f MB", kind, target.stat().st_size / 1e6)


def _copy_tokenizer(src: Path, dest: Path) -> None:
    """The tokenizer files, with the training-only {% generation %} tags removed from the chat template."""
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dest / name)
    if (dest / "chat_template.jinja").is_file():
        text = (dest / "chat_template.jinja").read_text(encoding="utf-8")
        (dest / "chat_template.jinja").write_text(strip_generation_tags(text), encoding="utf-8")
    config = dest / "tokenizer_config.json"
    if config.is_file():
        doc = json.loads(config.read_text(encoding="utf-8"))
        if isinstance(doc.get("chat_template"), str):
            doc["chat_template"] = strip_generation_tags(doc["chat_template"])
            config.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _template(folder: Path) -> str:
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    doc = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    if not isinstance(doc.get("chat_template"), str):
        raise UserError(f"{folder}: no chat template to export (tokenizer_config.json has none)")
    return doc["chat_template"]


def _special(folder: Path) -> dict[str, str]:
    doc = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    return {k: doc[k] for k in ("bos_token", "eos_token") if isinstance(doc.get(k), str)}


def _adapter_config(folder: Path) -> dict[str, Any] | None:
    path = folder / "adapter_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def context_length(model_dir: Path) -> int:
    """The model's context length (config.json's max_position_embeddings; 4096 where it has none)."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    return int(config.get("max_position_embeddings") or 4096)


def _write_modelfile(source: Source, out: Path, gguf_types: list[str]) -> None:
    turns = turns_of(strip_generation_tags(_template(source.trained)), _special(source.trained))
    (out / OLLAMA).mkdir()
    text = modelfile(
        turns,
        gguf_file(gguf_types[-1]),
        _special(source.trained).get("eos_token", ""),
        context_length(Path(source.manifest["path"])),
    )
    (out / OLLAMA / MODELFILE).write_text(text, encoding="utf-8")


def _write_vllm(source: Source, out: Path) -> None:
    out.mkdir()
    config = _adapter_config(source.trained) if source.adapter else None
    if config is not None:
        (out / "adapter").mkdir()
        for item in source.trained.iterdir():
            if item.is_file():
                shutil.copy(item, out / "adapter" / item.name)
    rank = config.get("r") if config else None
    (out / SERVE).write_text(serve_lines(source.name, source.manifest["model"], config is not None, rank))


RUNTIMES = {MERGED: ("transformers",), GGUF: ("llama.cpp", "lm-studio"), OLLAMA: ("ollama",), VLLM: ("vllm",)}


def commands(record: dict[str, Any], folder: str, only: str | None = None) -> dict[str, str]:
    """How to run each exported format (or `only` one), with paths under `folder` (the export folder as the user
    sees it)."""
    every = _commands(record, folder)
    return {k: v for k, v in every.items() if only is None or k in RUNTIMES[only]}


def _commands(record: dict[str, Any], folder: str) -> dict[str, str]:
    name, out = record["name"], {}
    if MERGED in record["formats"]:
        out["transformers"] = f'AutoModelForCausalLM.from_pretrained("{folder}/{MERGED}")'
    ggufs = [a["path"] for a in record["artifacts"] if a["runtime"] == "llama.cpp"]
    if ggufs:
        out["llama.cpp"] = f"llama-cli -m {folder}/{ggufs[-1]} -cnv   # or llama-server -m … for an OpenAI-style API"
        out["lm-studio"] = f"lms import {folder}/{ggufs[-1]}"
    if OLLAMA in record["formats"]:
        out["ollama"] = f"ollama create {name} -f {folder}/{OLLAMA}/{MODELFILE} && ollama run {name}"
    if VLLM in record["formats"]:
        out["vllm"] = f"sh {folder}/{VLLM}/{SERVE}   # from inside {folder}/{VLLM}"
    return out


def _record(source: Source, formats: list[str], gguf_types: list[str], folder: Path) -> dict[str, Any]:
    from tunegate.io import sha256_file
    from tunegate.llamacpp import LLAMA_CPP_PYTHON

    files = {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    return {
        "name": source.name,
        "formats": [f for f in FORMATS if f in formats],
        "gguf": list(gguf_types) if GGUF in formats or OLLAMA in formats else [],
        "artifacts": [a.__dict__ for a in artifacts(formats, gguf_types)],
        "files": files,
        "llama_cpp_python": LLAMA_CPP_PYTHON,
    }


def verify(folder: Path, record: dict[str, Any], only: str | None = None) -> list[str]:
    """Files of an export (or of one format's folder) that are missing or differ from export.json's sha256."""
    from tunegate.io import sha256_file

    bad = []
    for rel, digest in record["files"].items():
        if only and not rel.startswith(f"{only}/") and not (only == OLLAMA and rel.startswith(f"{GGUF}/")):
            continue
        path = folder / rel
        if not path.is_file():
            bad.append(f"{rel} (missing)")
        elif sha256_file(path) != digest:
            bad.append(f"{rel} (sha256 differs)")
    return bad
