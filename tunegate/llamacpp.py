"""llama.cpp for the export: its converter (HF → GGUF), its quantiser, and an lm-eval model that runs a GGUF.

Everything comes from one pinned release, llama-cpp-python (`LLAMA_CPP_PYTHON`): the Python binding and
library are built from its source distribution by pip (once per machine; pip caches the wheel), and the
converter (`convert_hf_to_gguf.py` with its `conversion/` and `gguf-py/` packages) is unpacked from the
very same sdist into the environment by `python -m tunegate.llamacpp` (what `make setup-export` runs). Nothing
is downloaded at run time.

    python -m tunegate.llamacpp              # unpack the converter into <venv>/share/llama.cpp (make setup-export)
    TUNEGATE_LLAMA_CPP=~/src/llama.cpp       # or use a llama.cpp checkout of one's own

`GGUFModel` is what the export check scores a GGUF with: the file loaded by llama.cpp, prompts rendered
with the chat template stored *in the GGUF* and tokenized by llama.cpp's tokenizer, requests answered the
way lm-eval's `hf` model answers them (same context/continuation split, same truncation, greedy
generation until the task's stop strings or end of turn), so any difference from the candidate's
per-item outcomes comes from the artifact, not from the harness.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from tunegate.errors import UserError

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON = "0.3.36"  # the pinned release (constraints.txt pins the same)
CONVERTER_ENV = "TUNEGATE_LLAMA_CPP"
_SDIST_ROOT = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
_CONVERTER_PARTS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")

# GGUF types the converter writes directly, and those llama.cpp's quantiser makes from the f16 file
# (value: llama_ftype). K-quants need rows that are multiples of 256; llama.cpp falls back to a
# compatible type per tensor where they are not (small models), and says so in its log.
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
QUANTISER_TYPES = {"q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q3_k_m": 12, "q4_k_s": 14, "q4_k_m": 15,
                   "q5_k_s": 16, "q5_k_m": 17, "q6_k": 18}  # fmt: skip
GGUF_TYPES = (*CONVERTER_TYPES, *QUANTISER_TYPES)


def converter_dir() -> Path:
    """Where llama.cpp's converter lives: $TUNEGATE_LLAMA_CPP, else <environment>/share/llama.cpp."""
    folder = Path(os.environ.get(CONVERTER_ENV) or Path(sys.prefix) / "share" / "llama.cpp")
    if not (folder / "convert_hf_to_gguf.py").is_file():
        raise UserError(
            f"llama.cpp's converter not found in {folder}: `make setup-export` (or `python -m tunegate.llamacpp`) "
            f"or set {CONVERTER_ENV} to a llama.cpp checkout"
        )
    return folder


def install_converter(dest: Path | None = None) -> Path:
    """Unpack the converter of the pinned llama-cpp-python sdist into dest (pip fetches the sdist, or
    takes it from its cache: the same file pip builds the binding from)."""
    dest = dest or Path(sys.prefix) / "share" / "llama.cpp"
    stamp = dest / ".version"
    if stamp.is_file() and stamp.read_text().strip() == LLAMA_CPP_PYTHON:
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp],
            check=True,
        )  # fmt: skip
        (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
        staging = Path(tempfile.mkdtemp(dir=dest.parent if dest.parent.exists() else None))
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(_SDIST_ROOT)]
            for m in members:
                m.name = m.name[len(_SDIST_ROOT) :]
            chosen = [m for m in members if m.name.startswith(_CONVERTER_PARTS) and (m.isfile() or m.isdir())]
            tar.extractall(staging, members=chosen, filter="data")
        (staging / ".version").write_text(LLAMA_CPP_PYTHON + "\n")
        if dest.exists():
            import shutil

            shutil.rmtree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(dest)
    return dest


def convert(model_dir: Path, out: Path, outtype: str = "f16", vocab_only: bool = False) -> None:
    """HF folder → GGUF with llama.cpp's converter (in a subprocess); a refusal ends in its one line."""
    cmd = [sys.executable, "-m", "tunegate.gguf_convert", str(converter_dir()), str(model_dir),
           "--outfile", str(out), "--outtype", outtype]  # fmt: skip
    if vocab_only:
        cmd.append("--vocab-only")
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "NO_LOCAL_GGUF": ""})
    if done.returncode != 0:
        raise UserError(f"llama.cpp's converter refused {model_dir}: {_converter_reason(done.stderr)}")


def _converter_reason(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if "is not supported" in line or line.startswith(("NotImplementedError", "ValueError", "KeyError")):
            return line.split(":", 1)[-1].strip() if line.startswith("ERROR") else line
    return lines[-1] if lines else "no output"


def quantize(src: Path, out: Path, kind: str, threads: int | None = None) -> None:
    """The f16 GGUF at src quantised to `kind` (llama.cpp's quantiser, as `llama-quantize` runs it)."""
    import llama_cpp

    _route_logs()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTISER_TYPES[kind]
    params.nthread = threads or os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), params) != 0:
        raise UserError(f"llama.cpp could not quantise {src} to {kind}")


_LOG_CALLBACK: list[Any] = []  # the ctypes callback must outlive every call llama.cpp makes to it


def _route_logs() -> None:
    """llama.cpp's own messages (it prints them to stderr) go to the `llama.cpp` logger instead: the stage's log
    file, not the console."""
    import ctypes

    import llama_cpp

    if _LOG_CALLBACK:
        return
    logger = logging.getLogger("llama.cpp")

    levels = {4: logging.ERROR, 3: logging.WARNING, 2: logging.INFO}  # ggml_log_level: 1 debug, 5 continuation

    @llama_cpp.llama_log_callback
    def callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        message = text.decode("utf-8", errors="replace").rstrip()
        if message:
            logger.log(levels.get(level, logging.DEBUG), "%s", message)

    _LOG_CALLBACK.append(callback)
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def open_gguf(path: Path, n_ctx: int = 0, seed: int = 0, logits_all: bool = True):
    """A GGUF loaded by llama.cpp on the CPU (all cores), quietly; n_ctx 0 is the model's own context length."""
    import llama_cpp

    _route_logs()
    try:
        return llama_cpp.Llama(
            str(path), n_ctx=n_ctx, n_batch=n_ctx or 512, logits_all=logits_all, seed=seed, verbose=False,
            n_threads=os.cpu_count(), n_gpu_layers=0,
        )  # fmt: skip
    except ValueError as err:
        raise UserError(f"{path}: llama.cpp cannot load it ({err})") from None


def render(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool, **special: str) -> str:
    """A chat template rendered the way transformers and llama.cpp's server render it: a sandboxed Jinja
    environment with `tojson` and `raise_exception`."""
    import json

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise UserError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **special)


if __name__ == "__main__":
    print(f"llama.cpp converter {LLAMA_CPP_PYTHON}: {install_converter()}")
