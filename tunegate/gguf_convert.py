"""Run llama.cpp's own HF → GGUF converter (as shipped in the pinned llama-cpp-python sdist) in this process.

    python -m tunegate.gguf_convert CONVERTER_DIR MODEL_DIR --outfile F.gguf --outtype f16 [--vocab-only]

Run as a subprocess by `tunegate.llamacpp.convert` (the converter configures logging and imports its own
`gguf` package; it stays out of the caller's process). One change to the converter's behaviour, and
only where it would otherwise refuse: llama.cpp names a BPE tokenizer's pre-tokenizer by hashing the
token ids of a test string, so any tokenizer trained on one's own corpus (a different vocabulary) is
"not recognized" even when its pre-tokenization is exactly one llama.cpp implements. When the hash is
unknown, the pre-tokenizer is read from tokenizer.json's structure instead (`pre_tokenizer_of`); the
export check then confirms by behaviour that llama.cpp tokenizes every eval prompt to the same ids as
transformers (`tunegate.llamacpp.GGUFModel`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# Byte-level BPE with GPT-2's own split (tokenizers' ByteLevel(use_regex=True)).
_GPT2 = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
# Byte-level BPE after an explicit split regex, as tokenizer.json writes it: the regexes llama.cpp implements
# under these names (src/llama-vocab.cpp quotes the same originals). Qwen2's and Llama 3's tokenizers carry
# an NFC normaliser, which llama.cpp's implementation of them does not apply either.
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SPLITS = {_WORDS + r"\p{N}" + _REST: "qwen2", _WORDS + r"\p{N}{1,3}" + _REST: "llama-bpe"}


def pre_tokenizer_of(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's name of the pre-tokenizer a tokenizer.json describes, where its structure says so
    unambiguously (byte-level BPE with GPT-2's split and no normaliser, or with Qwen2's or Llama 3's split
    regex); None otherwise."""
    model = tokenizer_json.get("model") or {}
    pre = tokenizer_json.get("pre_tokenizer") or {}
    normalizer = tokenizer_json.get("normalizer")
    if model.get("type") != "BPE":
        return None
    if normalizer is None and {k: pre.get(k) for k in _GPT2} == _GPT2 and pre.get("trim_offsets", True):
        return "gpt-2"
    parts = pre.get("pretokenizers") or []
    if pre.get("type") != "Sequence" or len(parts) != 2 or normalizer not in (None, {"type": "NFC"}):
        return None
    split, byte_level = parts
    plain_split = split.get("type") == "Split" and split.get("behavior") == "Isolated" and not split.get("invert")
    if plain_split and byte_level.get("type") == "ByteLevel" and byte_level.get("use_regex") is False:
        return _SPLITS.get((split.get("pattern") or {}).get("Regex"))
    return None


def _patch(converter_dir: Path) -> None:
    sys.path.insert(0, str(converter_dir))
    sys.path.insert(1, str(converter_dir / "gguf-py"))
    import conversion.base as base  # the converter's own package

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            path = Path(self.dir_model) / "tokenizer.json"
            found = pre_tokenizer_of(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None
            if found is None:
                raise
            base.logger.info(
                "pre-tokenizer %r read from tokenizer.json's structure (hash not in llama.cpp's list)", found
            )
            return found

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre


def main(argv: list[str]) -> None:
    converter_dir = Path(argv[0])
    _patch(converter_dir)
    import convert_hf_to_gguf

    sys.argv = ["convert_hf_to_gguf.py", *argv[1:]]
    convert_hf_to_gguf.main()


if __name__ == "__main__":
    main(sys.argv[1:])
