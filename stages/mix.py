"""mix: combine deduplicated domain rows with general rows at the configured ratio (seeded).

    python -m stages.mix        # what dvc.yaml runs

General data in the training set is the usual guard against forgetting (10-20%). With
`mix.general_ratio: r`, general rows make up r of the training set, counted in examples or in tokens
of the base tokenizer (`mix.by`). Several general sources share the general budget by `weight`.
Sampling rules: a source with more rows than its share is downsampled without replacement; a source
with fewer is repeated whole and the remainder drawn without replacement (and the manifest says so).
Preference rows are passed on for DPO in their own file. The manifest records per-source counts,
tokens and sha256, and the sha256 of the training file: the dataset hash used for provenance.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from tunegate.config import Mix, Source, load_config
from tunegate.io import read_jsonl, sha256_file, write_json, write_jsonl
from tunegate.paths import Layout
from tunegate.runtime import stage_main

log = logging.getLogger(__name__)

PROBE_ROWS = 64


def _sample(rows: list[dict], k: int, rng: random.Random) -> list[dict]:
    """k rows: without replacement when possible, otherwise whole repeats plus a sampled remainder."""
    if not rows or k <= 0:
        return []
    repeats, rest = divmod(k, len(rows))
    return rows * repeats + rng.sample(rows, rest)


def _take_tokens(rows: list[dict], tokens: list[int], budget: int, rng: random.Random) -> list[dict]:
    """Rows in a seeded order (repeating the source if needed) until `budget` tokens are reached."""
    out, used = [], 0
    while rows and used < budget:
        for i in rng.sample(range(len(rows)), len(rows)):
            if used >= budget:
                break
            out.append(rows[i])
            used += tokens[i]
    return out


def _trained(row: dict) -> dict:
    """What training reads of a row: its conversation, and the tools it was given."""
    out = {"id": row["id"], "source": row["source"], "messages": row["messages"]}
    if row.get("tools"):
        out["tools"] = row["tools"]
    return out


def run(
    cfg: Mix, sources: dict[str, Source], rows: dict[str, list[dict]], n_tokens, seed: int
) -> tuple[list[dict], list[dict], list[dict], dict]:
    """Returns (training rows, preference rows, probe rows, manifest without file hashes). n_tokens(row) -> int.

    The probe is up to PROBE_ROWS general rows that were *not* mixed in: the trainer's held-out
    forgetting probe. One seeded generator draws, in this order: the domain cap, the general share, the
    probe, the shuffle (the order is part of what a seed reproduces).
    """
    rng = random.Random(seed)
    domain = [n for n, s in sources.items() if s.role == "domain"]
    general = [n for n, s in sources.items() if s.role == "general"]
    prefs = [r for n, s in sources.items() if s.role == "preference" for r in rows[n]]
    chosen = _domain_rows(cfg, domain, rows, rng)
    upsampled = _general_rows(cfg, sources, domain, general, rows, chosen, n_tokens, rng)
    used_ids = {r["id"] for n in general for r in chosen[n]}
    unused = [r for n in general for r in rows[n] if r["id"] not in used_ids]
    probe = [_trained(r) for r in rng.sample(unused, min(PROBE_ROWS, len(unused)))]
    train = [_trained(r) for n in domain + general for r in chosen[n]]
    rng.shuffle(train)
    per_source = {
        n: {
            "role": sources[n].role,
            "available": len(rows[n]),
            "used": len(chosen[n]),
            "tokens": sum(n_tokens(r) for r in chosen[n]),
            "upsampled": upsampled.get(n, False),
        }
        for n in domain + general
    }
    for n in general:
        if upsampled.get(n):
            log.warning(
                "mix: general source %s has %d rows, repeated to %d to reach its share", n, len(rows[n]), len(chosen[n])
            )
    return train, prefs, probe, _manifest(cfg, per_source, general, len(train), len(prefs), len(probe))


def _domain_rows(cfg: Mix, domain: list[str], rows: dict[str, list[dict]], rng: random.Random) -> dict[str, list]:
    """Every domain row, or with mix.max_rows each domain source's proportional part of the domain's share."""
    chosen = {n: list(rows[n]) for n in domain}
    if cfg.max_rows is not None:
        domain_cap = round(cfg.max_rows * (1 - cfg.general_ratio))
        total_domain = sum(len(chosen[n]) for n in domain)
        for n in domain:
            keep = round(domain_cap * len(chosen[n]) / max(1, total_domain))
            chosen[n] = rng.sample(chosen[n], min(keep, len(chosen[n])))
    return chosen


def _general_rows(  # noqa: PLR0913 - the sources, their rows and the rows chosen so far, and how to count
    cfg: Mix,
    sources: dict[str, Source],
    domain: list[str],
    general: list[str],
    rows: dict[str, list[dict]],
    chosen: dict[str, list],
    n_tokens,
    rng: random.Random,
) -> dict[str, bool]:
    """Add each general source's share (by examples or tokens, split by weight) to `chosen`; returns which
    sources had to repeat rows to reach it."""
    tokens = {n: [n_tokens(r) for r in rows[n]] for n in domain + general}
    weights = {n: sources[n].weight for n in general if rows[n]}
    total_w = sum(weights.values())
    upsampled = {}
    if cfg.by == "examples":
        budget = round(sum(len(chosen[n]) for n in domain) * cfg.general_ratio / (1 - cfg.general_ratio))
        for n, w in weights.items():
            k = round(budget * w / total_w)
            chosen[n] = _sample(rows[n], k, rng)
            upsampled[n] = k > len(rows[n])
    else:
        domain_tokens = sum(n_tokens(r) for n in domain for r in chosen[n])
        budget = round(domain_tokens * cfg.general_ratio / (1 - cfg.general_ratio))
        for n, w in weights.items():
            chosen[n] = _take_tokens(rows[n], tokens[n], round(budget * w / total_w), rng)
            upsampled[n] = len(chosen[n]) > len(rows[n])
    for n in general:
        chosen.setdefault(n, [])
    return upsampled


def _manifest(cfg: Mix, per_source: dict, general: list[str], total: int, prefs: int, probe: int) -> dict[str, Any]:
    """What the mix is: its shares by examples and by tokens, its sizes, each source's part."""
    total_tokens = sum(s["tokens"] for s in per_source.values())
    gen_rows = sum(per_source[n]["used"] for n in general)
    gen_tokens = sum(per_source[n]["tokens"] for n in general)
    return {
        "by": cfg.by,
        "general_ratio_target": cfg.general_ratio,
        "general_share_examples": round(gen_rows / total, 4) if total else 0.0,
        "general_share_tokens": round(gen_tokens / total_tokens, 4) if total_tokens else 0.0,
        "rows": total,
        "tokens": total_tokens,
        "preference_rows": prefs,
        "probe_rows": probe,
        "sources": per_source,
    }


def main() -> None:
    def body() -> None:
        from tunegate.chat import Renderer, token_count
        from tunegate.models import load_manifest, load_tokenizer

        cfg = load_config()
        layout = Layout.of(cfg.paths)
        tok = load_tokenizer(load_manifest(layout.base), cfg.base.trust_remote_code)
        inputs = {n: layout.dedup_source(n) for n in cfg.data.sources}
        rows = {n: read_jsonl(p) for n, p in inputs.items()}

        render = Renderer(tok)

        def n_tokens(row: dict) -> int:  # the rendering training sees, tools and tool calls included
            return token_count(tok, render, row["messages"], row.get("tools"))

        train, prefs, probe, manifest = run(cfg.mix, cfg.data.sources, rows, n_tokens, cfg.seed)
        write_jsonl(layout.mix_train, train)
        write_jsonl(layout.mix_preferences, prefs)
        write_jsonl(layout.mix_probe, probe)
        for n, p in inputs.items():
            manifest["sources"].setdefault(n, {"role": cfg.data.sources[n].role, "used": len(rows[n])})["sha256"] = (
                sha256_file(p)
            )
        manifest["train_sha256"] = sha256_file(layout.mix_train)
        manifest["preferences_sha256"] = sha256_file(layout.mix_preferences)
        write_json(layout.mix_manifest, manifest)
        write_json(layout.metrics("mix"), {k: v for k, v in manifest.items() if not isinstance(v, dict)})
        log.info(
            "mix: %d rows (%.0f%% general by examples, %.0f%% by tokens), train sha256 %s",
            manifest["rows"],
            100 * manifest["general_share_examples"],
            100 * manifest["general_share_tokens"],
            manifest["train_sha256"][:12],
        )

    stage_main("mix", body)


if __name__ == "__main__":
    main()
