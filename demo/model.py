"""Build the embedded demo base model: a tiny Llama with its own byte-level BPE tokenizer and chat template.

The `base` stage calls `build()` when `base.model` is `demo`. Everything is seeded and single-threaded
where it matters, so the same params and corpus give byte-identical safetensors on any CPU.

Why pretrain at all: the forgetting gate needs a base model with general skill that fine-tuning can
measurably damage. The tokenizer is trained on the general corpus plus the chat template's markers;
the general corpus uses the domain's vocabulary (products, orders, JSON) the way a real base model's
pretraining data would, but never the domain task itself.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path

from tunegate.config import DemoBase

log = logging.getLogger(__name__)

BOS, EOS, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
# Roles become single special tokens and each turn ends with <|end|> (= eos), so generation stops
# after one assistant turn. The {% generation %} markers let TRL's assistant_only_loss find the
# assistant tokens; plain rendering ignores them. Tools (OpenAI chat format) render the way most
# tool-calling templates do: the tools list as a system turn of JSON lines, each assistant call as
# <tool_call>{"name", "arguments"}</tool_call>, each tool result as a user turn in <tool_response>.
# A conversation without tools renders exactly as it would without those branches.
CHAT_TEMPLATE = (
    "{% if tools %}<|system|>You can call these tools:"
    "{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}<|end|>{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}{{ message['content'] }}"
    "{% for call in message.tool_calls or [] %}<tool_call>{{ call.function | tojson }}</tool_call>{% endfor %}"
    "<|end|>{% endgeneration %}"
    "{% elif message['role'] == 'tool' %}<|user|><tool_response>{{ message['content'] }}</tool_response><|end|>"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE (no unknown tokens possible) wrapped as a transformers fast tokenizer."""
    os.environ["RAYON_NUM_THREADS"] = "1"  # merge ties are resolved deterministically on one thread
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, additional_special_tokens=ROLE_TOKENS
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 4096
    return fast


def _packed_blocks(tokenizer, rows: list[dict], block: int):
    """Render every row with the chat template, concatenate, and cut into full blocks (no padding)."""
    import torch

    stream: list[int] = []
    for row in rows:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}],
            tokenize=False,
        )
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    n = len(stream) // block
    return torch.tensor(stream[: n * block], dtype=torch.long).view(n, block)


def build(rows: list[dict], cfg: DemoBase, seed: int, out_dir: Path) -> dict:
    """Train the tokenizer, initialise and pretrain the model on `rows`, save both to out_dir (safetensors)."""
    import torch
    from tqdm import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    texts = [r["prompt"] for r in rows] + [r["completion"] for r in rows]
    tokenizer = train_tokenizer(texts, cfg.vocab_size)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=cfg.max_position,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    blocks = _packed_blocks(tokenizer, rows, cfg.max_position)
    log.info(
        "demo base: %.2fM parameters, %d blocks of %d tokens, %d steps",
        params / 1e6,
        len(blocks),
        cfg.max_position,
        cfg.steps,
    )

    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.95), weight_decay=0.01)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    bar = tqdm(range(cfg.steps), desc="pretrain demo base", unit="step", mininterval=2)
    for step in bar:
        idx = torch.randint(len(blocks), (cfg.batch_size,), generator=gen)
        batch = blocks[idx]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {
        "parameters": params,
        "pretrain_tokens": int(cfg.steps * cfg.batch_size * cfg.max_position),
        "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
    }
