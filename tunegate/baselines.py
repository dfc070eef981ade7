"""Baselines: the base model given the cheaper alternatives to fine-tuning, scored on the target tasks.

Fine-tuning is worth its pipeline only when it beats what prompting gets from the same base. Each
baseline is one lm-eval run of the base on the target tasks, with the prompt built differently:

- `prompt`: the user's instructions (paths.prompt, e.g. evals/prompt.md) as a system turn (folded into the first
  user turn for a template that refuses a system turn, as training rows are: `tunegate.chat.fold_system`);
- `few_shot-k`: the instructions and k training rows, drawn once with the seed, as earlier turns;
- `retrieval-k`: the instructions and, per eval item, the k training rows most similar to its prompt
  (BM25 over the rows' user turns, through bm25s; or, with `baselines.embedder`, the cosine similarity of an
  embedding model's mean-pooled hidden states), most similar last (nearest the question).

Examples come from the deduplicated domain rows (data/dedup), which hold no eval item (the dedup stage
removed every row leaked from the eval sets); a training row whose prompt equals the item's is skipped
as well. A prompt that would not leave `eval.max_gen_toks` of the base's context free loses examples,
least similar first, whole examples only; every trimmed item and dropped example is counted.

The prompts are built in lm-eval's own chat path (`apply_chat_template` of its HF model), so the
per-sample outcomes are recorded exactly as eval_base's and the gate pairs them item by item.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunegate.config import Baselines, Config
from tunegate.errors import UserError
from tunegate.io import read_jsonl
from tunegate.paths import Layout

log = logging.getLogger(__name__)

Turns = list[dict[str, str]]
WORD = re.compile(r"\w+")


def _user_text(turns: Iterable[dict[str, Any]]) -> str:
    return "\n".join(t["content"] for t in turns if t.get("role") == "user" and isinstance(t.get("content"), str))


def _key(text: str) -> str:
    return " ".join(WORD.findall(text.lower()))


def example_turns(row: dict[str, Any]) -> Turns | None:
    """A training row as in-context turns: its user and assistant turns with text content, ending with an
    assistant turn; None for rows that cannot be shown as such (tool calls, content parts, no answer)."""
    turns = []
    for message in row.get("messages") or []:
        role, content = message.get("role"), message.get("content")
        if role == "system":
            continue
        if role not in ("user", "assistant") or not isinstance(content, str) or message.get("tool_calls"):
            return None
        turns.append({"role": role, "content": content})
    while turns and turns[-1]["role"] != "assistant":
        turns.pop()
    return turns if len(turns) >= 2 and turns[0]["role"] == "user" else None


def training_examples(cfg: Config, layout: Layout) -> list[Turns]:
    """The pool of examples: every domain row the dedup stage kept, in file order, as turns."""
    pool: list[Turns] = []
    for name, source in cfg.data.sources.items():
        if source.role != "domain":
            continue
        path = layout.dedup_source(name)
        if not path.exists():
            raise UserError(f"{path}: missing; run the dedup stage first (dvc repro dedup)")
        pool += [turns for row in read_jsonl(path) if (turns := example_turns(row))]
    if not pool:
        raise UserError(f"{layout.dedup}: no domain row has user and assistant text turns to show as an example")
    return pool


class Retriever:
    """BM25 over the pool's user turns (bm25s); ties broken by pool order, so results are deterministic."""

    identity: dict[str, str] = {"ranking": "bm25"}  # noqa: RUF012 - read only

    def __init__(self, pool: list[Turns]) -> None:
        import bm25s

        self.pool = pool
        self.keys = [_key(_user_text(turns)) for turns in pool]
        self.index = bm25s.BM25()
        self.index.index(bm25s.tokenize(self.keys, stopwords="en", show_progress=False), show_progress=False)
        self._tokenize = bm25s.tokenize

    def nearest(self, query: str, k: int) -> list[Turns]:
        """The k most similar rows, least similar first; rows whose prompt equals the query never."""
        want = min(len(self.pool), k + 8)  # room for rows skipped as equal to the query
        tokens = self._tokenize([_key(query)], stopwords="en", show_progress=False)
        if not tokens.vocab:  # a query of stop words only: nothing to match on
            return []
        ids, scores = self.index.retrieve(tokens, k=want, show_progress=False, n_threads=1)
        order = sorted(zip(ids[0].tolist(), scores[0].tolist(), strict=True), key=lambda p: (-p[1], p[0]))
        query_key = _key(query)
        picked = [i for i, score in order if score > 0 and self.keys[i] != query_key][:k]
        return [self.pool[i] for i in reversed(picked)]


class EmbeddingRetriever:
    """The pool's user turns ranked by cosine similarity to the query under an embedding model (`baselines.embedder`:
    a local folder or hub id, safetensors only, no remote code): the last hidden states mean-pooled over the tokens,
    unit length. The pool is embedded once; ties are broken by pool order, as for BM25."""

    BATCH = 64

    def __init__(self, pool: list[Turns], embedder: str) -> None:
        from transformers import AutoModel, AutoTokenizer

        from tunegate.models import describe, snapshot

        path, resolved = snapshot(embedder, "main", setting="baselines.embedder")
        described = describe(path, embedder, "main", resolved, setting="baselines.embedder")
        self.identity = {"ranking": "embedding", "embedder": embedder, "revision": resolved, **_weights(described)}
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        import torch

        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        model = AutoModel.from_pretrained(path, use_safetensors=True, trust_remote_code=False)
        self.model = model.to(self.device).eval()
        self.pool = pool
        self.keys = [_key(_user_text(turns)) for turns in pool]
        self.matrix = self.embed([_user_text(turns) for turns in pool], progress=True)

    def embed(self, texts: list[str], progress: bool = False):
        import numpy as np
        import torch
        from tqdm import tqdm

        out = []
        starts = range(0, len(texts), self.BATCH)
        for start in tqdm(starts, desc="embed training rows", unit="batch", disable=not progress, mininterval=2):
            batch = self.tokenizer(
                texts[start : start + self.BATCH], padding=True, truncation=True, max_length=512, return_tensors="pt"
            )
            batch = batch.to(self.device)
            with torch.no_grad():
                hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)

    def nearest(self, query: str, k: int) -> list[Turns]:
        import numpy as np

        scores = self.matrix @ self.embed([query])[0]
        order = np.lexsort((np.arange(len(scores)), -scores))  # most similar first; ties: pool order
        query_key = _key(query)
        picked = [int(i) for i in order[: k + 8] if self.keys[i] != query_key][:k]
        return [self.pool[i] for i in reversed(picked)]


def ranking(identity: dict[str, str]) -> str:
    """How a retrieval baseline ranked its rows, in one line: `bm25`, or `embedding <model>@<revision> sha256:<12>`."""
    if identity["ranking"] != "embedding":
        return identity["ranking"]
    return f"embedding {identity['embedder']}@{identity['revision'][:12]} sha256:{identity['sha256'][:12]}"


def _weights(described: dict[str, Any]) -> dict[str, str]:
    """One sha256 over an embedding model's weight and tokenizer files (provenance of the retrieval baseline)."""
    from tunegate.io import sha256_of

    return {"sha256": sha256_of({**described["weights_sha256"], **described["tokenizer_sha256"]})}


@dataclass
class Prompter:
    """How one baseline builds its prompt around an eval item's turns, and what it cost."""

    name: str
    system: str | None
    examples: Callable[[str], list[Turns]]
    retriever: dict[str, str] | None = None  # how the examples were ranked (retrieval only), for provenance
    tokens: list[int] = field(default_factory=list)
    plain_tokens: list[int] = field(default_factory=list)
    shown: list[int] = field(default_factory=list)
    dropped: int = 0
    trimmed: int = 0

    def messages(self, chat: Turns, examples: list[Turns]) -> Turns:
        head: Turns = [t for ex in examples for t in ex]
        chat = list(chat)
        system = self.system
        if chat and chat[0].get("role") == "system":  # the task's own system turn comes after the instructions
            system = f"{system}\n\n{chat[0]['content']}" if system else chat[0]["content"]
            chat = chat[1:]
        return ([{"role": "system", "content": system}] if system else []) + head + chat

    def cost(self) -> dict[str, Any]:
        n = len(self.tokens)
        return {
            "items": n,
            "prompt_tokens": round(sum(self.tokens) / n, 1) if n else 0.0,
            "plain_prompt_tokens": round(sum(self.plain_tokens) / n, 1) if n else 0.0,
            "examples_shown": round(sum(self.shown) / n, 2) if n else 0.0,
            "examples_shown_total": sum(self.shown),
            "items_trimmed": self.trimmed,
            "examples_dropped": self.dropped,
        } | ({"retriever": ranking(self.retriever)} if self.retriever else {})


def prompters(settings: Baselines, system: str | None, pool: list[Turns], seed: int) -> list[Prompter]:
    """One Prompter per baseline the section turns on, in the order of Baselines.names()."""
    out = []
    for name in settings.names():
        if name == "prompt":
            out.append(Prompter(name, system, lambda query: []))
        elif name.startswith("few_shot-"):
            drawn = random.Random(seed).sample(pool, min(settings.few_shot, len(pool)))
            out.append(
                Prompter(
                    name, system, lambda query, drawn=drawn: [ex for ex in drawn if _key(_user_text(ex)) != _key(query)]
                )
            )
        else:
            retriever = EmbeddingRetriever(pool, settings.embedder) if settings.embedder else Retriever(pool)
            ranked = retriever.identity
            out.append(Prompter(name, system, lambda query, r=retriever: r.nearest(query, settings.retrieval), ranked))
    return out


def eval_queries(tasks, names: list[str]) -> set[str]:
    """Every eval item's prompt text (lm-eval's doc_to_text) on the baseline tasks, normalised: the training rows
    that equal one are left out of the pool, whatever item is being asked."""
    out = set()
    for task in tasks.manager.load(names)["tasks"].values():
        for doc in task.eval_docs:
            text = task.doc_to_text(doc)
            if isinstance(text, str):
                out.add(_key(text))
    return out


class Prompting:
    """What a baseline adds to lm-eval's model (hf or vllm): its chat rendering puts the current Prompter's
    instructions and examples around each item, trimmed to the context by whole examples; `prompter` is set per
    baseline, `reserve` is the answer's room."""

    prompter: Prompter | None = None
    reserve: int = 256

    def apply_chat_template(self, chat_history, add_generation_prompt=True):  # noqa: FBT002 - lm-eval's signature
        render = super().apply_chat_template  # tunegate.evaluation.SystemFolded's: a refused system turn is folded
        prompter = self.prompter
        if prompter is None:
            return render(chat_history, add_generation_prompt)
        examples = prompter.examples(_user_text(chat_history[-1:]) or _user_text(chat_history))
        text = render(prompter.messages(chat_history, examples), add_generation_prompt)
        kept = len(examples)
        while kept and len(self.tok_encode(text)) + self.reserve > self.max_length:
            kept -= 1  # the least similar (first) example goes first
            text = render(prompter.messages(chat_history, examples[len(examples) - kept :]), add_generation_prompt)
        if kept < len(examples):
            prompter.trimmed += 1
            prompter.dropped += len(examples) - kept
        prompter.shown.append(kept)
        prompter.tokens.append(len(self.tok_encode(text)))
        prompter.plain_tokens.append(len(self.tok_encode(render(chat_history, add_generation_prompt))))
        return text


def prompted_model(cfg: Config, manifest: dict[str, Any]):
    """lm-eval's model of the base (eval.backend), as eval_base loads it, with the baselines' chat rendering
    (Prompting)."""
    from tunegate.evaluation import lm_model

    lm = lm_model(cfg.eval, manifest, None, None, cfg.base.trust_remote_code, mixin=Prompting)
    lm.reserve = cfg.eval.max_gen_toks or 256
    return lm


def read_prompt(settings: Baselines, path: Path) -> str | None:
    """The instructions of the prompt baseline; a missing or empty file ends in one line naming it."""
    if not settings.prompt:
        return None
    try:
        text = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise UserError(
            f"{path}: missing; write the instructions a user would give the base model (paths.prompt), "
            "or set baselines.prompt: false"
        ) from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 (byte {err.start}); save it as UTF-8") from None
    if not text:
        raise UserError(f"{path}: empty; write the instructions, or set baselines.prompt: false")
    return text


def run(cfg: Config, manifest: dict[str, Any], layout: Layout, out: Path) -> dict[str, dict[str, Any]]:
    """Every baseline into out/<name>/ (results.json, samples/), their costs into out/costs.json."""
    from tunegate.evaluation import evaluate_lm, task_set
    from tunegate.io import write_json
    from tunegate.paths import COSTS

    settings = cfg.baselines
    out.mkdir(parents=True, exist_ok=True)
    costs: dict[str, dict[str, Any]] = {}
    if not settings.names():
        write_json(out / COSTS, costs)
        return costs
    eval_cfg = cfg.eval.model_copy(update={"tasks": list(settings.tasks)})
    tasks = task_set(eval_cfg, layout.eval_tasks)
    system = read_prompt(settings, layout.prompt)
    pool = training_examples(cfg, layout)
    held_out = eval_queries(tasks, list(settings.tasks))
    kept = [turns for turns in pool if _key(_user_text(turns)) not in held_out]
    if left_out := len(pool) - len(kept):
        log.warning(
            "baselines: %d training rows ask exactly what an eval item asks; left out of the examples", left_out
        )
    pool = kept
    lm = prompted_model(cfg, manifest)
    for prompter in prompters(settings, system, pool, cfg.seed):
        started = time.perf_counter()
        lm.prompter = prompter
        extra = {"baseline": prompter.name, "examples_in_pool": len(pool), "left_out_as_eval_items": left_out}
        extra |= {"retriever": prompter.retriever} if prompter.retriever else {}
        evaluate_lm(
            eval_cfg, lm, tasks, manifest, out / prompter.name, cfg.seed, f"baseline {prompter.name}", extra, started
        )
        costs[prompter.name] = {**prompter.cost(), "seconds": round(time.perf_counter() - started, 1)}
        cost = costs[prompter.name]
        log.info(
            "baseline %s: %.0f prompt tokens per request (plain %.0f), %.1f examples shown, %d items trimmed to the "
            "context (%d examples dropped), %.0fs",
            prompter.name,
            cost["prompt_tokens"],
            cost["plain_prompt_tokens"],
            cost["examples_shown"],
            cost["items_trimmed"],
            cost["examples_dropped"],
            cost["seconds"],
        )
    write_json(out / COSTS, {name: {k: v for k, v in c.items() if k != "seconds"} for name, c in costs.items()})
    return costs
