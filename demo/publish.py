"""Publish a new revision of the demo base into a local model repository, so a retrain can be watched.

    tunegate demo-base                              # 200 more pretraining steps -> a new revision in models/demo-hub
    tunegate demo-base --steps 0 --source DIR       # DIR's model files as the next revision, unchanged

A local model repository is laid out like the hub's cache (names in tunegate/paths.py: refs/<branch>
holds a commit id, snapshots/<commit>/ its files), so `base.model: models/demo-hub` with
`base.revision: main` follows new revisions the way a hub id does, and a commit id pins one. The commit
id is a hash of the files: publishing the same weights twice gives the same revision.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from tunegate.config import DemoBase
from tunegate.errors import UserError
from tunegate.io import sha256_file, sha256_of
from tunegate.paths import BASE_MANIFEST, REPO_REFS, REPO_SNAPSHOTS, partial_of

log = logging.getLogger(__name__)

MODEL_FILES = ("*.safetensors", "*.json", "*.jinja", "tokenizer.model")


def model_files(folder: Path) -> list[Path]:
    """The files a model revision consists of (the base stage's manifest is not one of them)."""
    return sorted({p for g in MODEL_FILES for p in folder.glob(g) if p.is_file() and p.name != BASE_MANIFEST})


def head(repo: Path, branch: str = "main") -> Path | None:
    """The files of the branch's current revision, or None for a new repository."""
    ref = repo / REPO_REFS / branch
    return repo / REPO_SNAPSHOTS / ref.read_text(encoding="utf-8").strip() if ref.is_file() else None


def publish(source: Path, repo: Path, branch: str = "main") -> str:
    """Copy source's model files into repo as a revision and point `branch` at it; returns the commit id."""
    files = model_files(source)
    if not any(p.suffix == ".safetensors" for p in files):
        raise UserError(f"{source}: no .safetensors weights to publish")
    commit = sha256_of({p.name: sha256_file(p) for p in files})[:40]
    snapshot = repo / REPO_SNAPSHOTS / commit
    if not snapshot.is_dir():  # assembled beside it and renamed: a revision is complete or absent
        partial = partial_of(snapshot)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for path in files:
            shutil.copy2(path, partial / path.name)
        partial.rename(snapshot)
    ref = repo / REPO_REFS / branch
    ref.parent.mkdir(parents=True, exist_ok=True)
    written = partial_of(ref)
    written.write_text(commit + "\n", encoding="utf-8")
    os.replace(written, ref)  # the branch moves last, so a watcher never sees a half-published revision
    return commit


def continue_pretraining(
    source: Path, rows: list[dict], cfg: DemoBase, steps: int, seed: int, out: Path, lr_share: float = 0.1
) -> float:
    """`steps` more pretraining steps of the model in source on `rows` (seeded), saved to out; returns the
    mean loss of the last steps. Constant learning rate, `lr_share` of the demo schedule's peak (10%: where the
    schedule ended)."""
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer, LlamaForCausalLM

    from demo.model import _packed_blocks

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = LlamaForCausalLM.from_pretrained(source, use_safetensors=True)
    blocks = _packed_blocks(tokenizer, rows, cfg.max_position)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate * lr_share, betas=(0.9, 0.95), weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="continue pretraining demo base", unit="step", mininterval=2):
        batch = blocks[torch.randint(len(blocks), (cfg.batch_size,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    tail = losses[-20:]
    return sum(tail) / len(tail) if tail else float("nan")
