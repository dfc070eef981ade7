"""Registered versions to runtimes: export a version after the fact, open it for a quick chat.

`tunegate export VERSION` writes a registered version in the formats asked (tunegate.export) and logs the
files with their sha256 on the version (runs:/<run>/export), so `tunegate fetch VERSION --format gguf`
brings them back anywhere; such an export is not scored (the pipeline's export stage is: the gate checks
it). `tunegate chat VERSION` opens a version in the terminal, in transformers or, with `--format gguf`,
in llama.cpp from its exported GGUF.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tunegate.errors import UserError


def export_version(c, name: str, ref: str, formats: list[str], gguf_types: list[str], out: Path) -> dict[str, Any]:
    """Export a registered version into out and log it on the version; returns export.json."""
    from tunegate.export import Source, run
    from tunegate.io import sha256_file
    from tunegate.paths import EXPORT_MANIFEST
    from tunegate.provenance import EXPORT_ARTIFACTS, EXPORT_SHA, EXPORTS
    from tunegate.registry import fetch

    with tempfile.TemporaryDirectory() as scratch:
        got = fetch(c, name, ref, Path(scratch))
        full = got["model"] is not None
        manifest = {"model": got["base_model"], "path": got["model"] if full else got["base"]}
        source = Source(manifest, _beside(got, Path(scratch) / "trained"), not full, name)
        record = run(source, formats, gguf_types, Path(out))
    v = c.get_model_version(name, got["version"])
    c.log_artifacts(v.run_id, str(out), artifact_path=EXPORT_ARTIFACTS)
    c.set_model_version_tag(name, got["version"], EXPORT_SHA, sha256_file(Path(out) / EXPORT_MANIFEST))
    names = ",".join(f"{a['name']} (unchecked)" for a in record["artifacts"]) or ",".join(record["formats"])
    c.set_model_version_tag(name, got["version"], EXPORTS, names)
    return record | {"version": got["version"]}


def _beside(got: dict[str, Any], folder: Path) -> Path:
    """The fetched weights (adapter or full model) with the tokenizer MLflow keeps apart, in one folder as train
    wrote it."""
    import shutil

    from tunegate.export import TOKENIZER_FILES

    shutil.copytree(got["model"] or got["adapter"], folder)
    for name in TOKENIZER_FILES:
        if got["tokenizer"] and (Path(got["tokenizer"]) / name).is_file():
            shutil.copy(Path(got["tokenizer"]) / name, folder / name)
    return folder


def _turns(lines: Iterable[str]) -> Iterator[str]:
    for line in lines:
        text = line.strip()
        if text in {"/exit", "/quit"}:
            return
        if text:
            yield text


def chat(c, name: str, ref: str, fmt: str, messages: Iterable[str], max_tokens: int = 256) -> Iterator[str]:
    """Answers of a version to each message, the conversation kept; greedy decoding."""
    with tempfile.TemporaryDirectory() as scratch:
        reply = _llama_cpp_reply if fmt == "gguf" else _transformers_reply
        answer = reply(c, name, ref, Path(scratch), max_tokens)
        history: list[dict[str, str]] = []
        for text in _turns(messages):
            history.append({"role": "user", "content": text})
            out = answer(history)
            history.append({"role": "assistant", "content": out})
            yield out


def _transformers_reply(c, name: str, ref: str, scratch: Path, max_tokens: int):
    import torch

    from tunegate.registry import fetch, load

    model, tokenizer = load(fetch(c, name, ref, scratch))
    model.eval()

    def answer(history: list[dict[str, str]]) -> str:
        ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    return answer


def _llama_cpp_reply(c, name: str, ref: str, scratch: Path, max_tokens: int):
    from tunegate.gguf_lm import GGUFModel
    from tunegate.registry import fetch_export

    got = fetch_export(c, name, ref, "gguf", scratch)
    ggufs = [f for f in got["files"] if f.endswith(".gguf")]
    if not ggufs:
        raise UserError(f"{name} v{got['version']}: its export holds no GGUF file")
    lm = GGUFModel(scratch / ggufs[-1], None, max_length=None, max_gen_toks=max_tokens)

    def answer(history: list[dict[str, str]]) -> str:
        room = min(max_tokens, lm.max_length // 2)
        ids = lm.tokens(lm.apply_chat_template(history))[-(lm.max_length - room) :]
        return lm.text(lm.greedy(ids, room)).strip()

    return answer
