"""An lm-eval model that answers through llama.cpp from a GGUF file: how the export check scores a GGUF.

It mirrors lm-eval's `hf` model request by request, so the per-item outcomes pair with the candidate's:
- prompts are rendered with the chat template stored in the GGUF (`tokenizer.chat_template`), the one
  llama.cpp's server, Ollama and LM Studio read; a template lost in conversion shows up as changed items; a
  system turn the template refuses is folded into the first user turn, as for the other models;
- text is tokenized by llama.cpp's tokenizer (special tokens parsed, no BOS added, as `hf` does for
  these prompts); `tokenizer_mismatches` counts contexts whose ids differ from transformers' tokenizer;
- loglikelihood splits context and continuation as lm-eval does (trailing spaces move to the
  continuation, the whole is encoded once) and keeps the last max_length + 1 tokens;
- generation is greedy, up to max_gen_toks, stopping at the end-of-turn token or a task stop string,
  with the context left-truncated to max_length - max_gen_toks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from lm_eval.api.model import LM
from lm_eval.models.utils import handle_stop_sequences, postprocess_generated_text
from tqdm import tqdm

from tunegate.evaluation import SystemFolded
from tunegate.llamacpp import open_gguf, render

log = logging.getLogger(__name__)
# llama.cpp's fallback for a GGUF without a chat template (its server's default, `chatml`)
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


class GGUFModel(SystemFolded, LM):
    def __init__(  # noqa: PLR0913 - the file, the reference tokenizer and lm-eval's limits
        self, path: Path, reference_tokenizer: Any, max_length: int | None, max_gen_toks: int, seed: int = 0
    ):
        super().__init__()
        self.path = Path(path)
        self.max_gen_toks = max_gen_toks
        self.llm = open_gguf(self.path, n_ctx=max_length + 1 if max_length else 0, seed=seed)
        self.max_length = max_length or self.llm.n_ctx() - 1
        meta = self.llm.metadata
        self.template = meta.get("tokenizer.chat_template")
        if not self.template:  # what llama.cpp's server does with a GGUF that carries no template
            log.warning("%s: no chat template in the GGUF's metadata; rendering with ChatML, as llama.cpp does", path)
            self.template = CHATML
        self.eos_id = self.llm.token_eos()
        self.eos_text = self.text([self.eos_id], special=True)
        self.reference = reference_tokenizer
        self.tokenizer_mismatches = 0
        self._checked: set[str] = set()

    # --- text <-> ids -----------------------------------------------------------------------------
    def tokens(self, text: str) -> list[int]:
        ids = self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) if text else []
        if self.reference is not None and text not in self._checked:
            self._checked.add(text)
            self.tokenizer_mismatches += ids != self.reference(text, add_special_tokens=False)["input_ids"]
        return ids

    def text(self, ids: list[int], special: bool = False) -> str:
        return self.llm.detokenize(ids, special=special).decode("utf-8", errors="replace")

    # --- lm-eval's interface ------------------------------------------------------------------------
    @property
    def tokenizer_name(self) -> str:
        return f"gguf:{self.path.name}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.template_renderer()(self.folded(chat_history), generation=add_generation_prompt)

    def template_renderer(self):
        """The GGUF's own template, rendered as llama.cpp's server renders it (`SystemFolded` probes it too)."""
        special = {"bos_token": self.text([self.llm.token_bos()], special=True), "eos_token": self.eos_text}
        return lambda messages, tools=None, generation=False: render(self.template, messages, generation, **special)

    def _logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of ids, reusing the evaluated prefix shared with the previous call."""
        llm = self.llm
        shared = 0
        previous = llm.input_ids[: llm.n_tokens]
        limit = min(len(previous), len(ids) - 1)
        while shared < limit and previous[shared] == ids[shared]:
            shared += 1
        llm.n_tokens = shared
        llm.eval(ids[shared:])
        return llm.scores[: len(ids)]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in tqdm(requests, desc="llama.cpp loglikelihood", disable=disable_tqdm, mininterval=5):
            context, continuation = req.args
            n_spaces = len(context) - len(context.rstrip())
            if n_spaces:
                context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
            whole = self.tokens(context + continuation)
            cont = whole[len(self.tokens(context)) :] if context else whole
            out.append(self._score(whole if context else [self.eos_id, *whole], cont))
        return out

    def _score(self, whole: list[int], cont: list[int]) -> tuple[float, bool]:
        """(log-probability of cont, the last tokens of whole, given what precedes it; whether it is greedy),
        on the last max_length + 1 tokens, as lm-eval's hf model scores a request."""
        window = whole[-(self.max_length + 1) :][:-1]
        logp = _log_softmax(self._logits(window)[-len(cont) :].astype(np.float64))
        picked = logp[np.arange(len(cont)), cont]
        return float(picked.sum()), bool((logp.argmax(axis=-1) == np.array(cont)).all())

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity tasks: each text in disjoint windows of max_length tokens, the first after the end-of-text
        token, each later one with the token before it as context (lm-eval's own windowing, as `hf` does)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for req in tqdm(requests, desc="llama.cpp loglikelihood_rolling", disable=disable_tqdm, mininterval=5):
            (text,) = req.args
            windows = get_rolling_token_windows(self.tokens(text), self.eos_id, self.max_length, 1)
            pairs = [make_disjoint_window(w) for w in windows]
            out.append(sum(self._score(ctx + cont, cont)[0] for ctx, cont in pairs))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in tqdm(requests, desc="llama.cpp generate", disable=disable_tqdm, mininterval=5):
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            until = handle_stop_sequences(kwargs.get("until"), eos=self.eos_text)
            max_gen = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self.tokens(context)[-(self.max_length - max_gen) :]
            generated = self.greedy(ids, max_gen, until)
            out.append(postprocess_generated_text(generation=self.text(generated), stop=until, think_end_token=None))
        return out

    def greedy(self, ids: list[int], max_new: int, until: list[str] = ()) -> list[int]:
        """Greedy continuation of ids: up to max_new tokens, stopping at the end-of-turn token or a stop string."""
        generated: list[int] = []
        for _ in range(max_new):
            next_id = int(np.argmax(self._logits(ids + generated)[-1]))
            if next_id == self.eos_id:
                break
            generated.append(next_id)
            if until and any(stop in self.text(generated) for stop in until):
                break
        return generated
