"""Near-duplicate detection on Ray Data: the single-machine steps of `tunegate.dedup`, sharded.

    dedup:
      engine: ray            # in params.yaml; `dedup.ray_address: auto` joins a running cluster

or, on a corpus that lives in Parquet on a cluster:

    ds = ray.data.read_parquet("s3://bucket/corpus/")        # columns: row (0..n-1), text
    near = near_duplicates_ray(ds, ngram=3, num_perm=128, bands=32, threshold=0.7)

1. signatures (rensa, from numpy-hashed n-grams) and band keys: `map_batches` over blocks, each block on
   any worker;
2. buckets: every (band, key) is counted with a grouped aggregate; only buckets with two or more rows
   (near-duplicate candidates, a small share) and their members come back to the driver;
3. candidate pairs from those buckets, by the same rule as `candidate_pairs` (all pairs, or a star
   on the first row of a bucket larger than `max_bucket`);
4. the signatures and texts of the rows in candidate pairs are fetched, and `verify_exact` + `leaders`
   run on the driver exactly as on one machine.

The result equals `tunegate.dedup.near_duplicates` on the same texts (tested). Row order decides
who is kept: `row` must number the rows 0..n-1 in that order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from tunegate.dedup import band_keys, bucket_pairs, leaders, signatures, verify_exact
from tunegate.errors import UserError

log = logging.getLogger(__name__)
ROWS_PER_BLOCK = 20_000  # texts per block when they come as a list (a Ray Dataset keeps its own blocks)


def near_duplicates_ray(
    data: Sequence[str] | Any,
    ngram: int,
    num_perm: int,
    bands: int,
    threshold: float,
    seed: int = 1,
    address: str | None = None,
    max_bucket: int = 64,
) -> dict[int, tuple[int, float]]:
    """{row: (representative row, verified similarity)} for every row that is a near copy of an earlier
    one. `data` is a list of texts, or a Ray Dataset with columns `row` and `text`."""
    ray = _ray(address)
    ds = (
        data
        if isinstance(data, ray.data.Dataset)
        else ray.data.from_items(
            [{"row": i, "text": t} for i, t in enumerate(data)], override_num_blocks=_blocks(len(data), ray)
        )
    )

    def sign(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sigs = signatures(batch["text"].tolist(), ngram, num_perm, seed)
        return {"row": batch["row"].astype(np.int64), "sig": sigs, "keys": band_keys(sigs, bands)}

    signed = ds.map_batches(sign, batch_format="numpy").materialize()

    def explode(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        m = len(batch["row"])
        return {
            "band": np.tile(np.arange(bands, dtype=np.int64), m),
            "key": batch["keys"].reshape(-1),
            "row": np.repeat(batch["row"], bands),
        }

    entries = signed.map_batches(explode, batch_format="numpy").materialize()
    counts = entries.groupby(["band", "key"]).count()
    shared = counts.map_batches(
        lambda b: {k: v[b["count()"] >= 2] for k, v in b.items()}, batch_format="numpy"
    ).take_all()
    by_band: dict[int, set[int]] = {}
    for r in shared:
        by_band.setdefault(int(r["band"]), set()).add(int(r["key"]))
    wanted = {b: np.array(sorted(keys), np.uint64) for b, keys in by_band.items()}

    def in_shared(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep = np.zeros(len(batch["row"]), bool)
        for b, keys in wanted.items():
            sel = batch["band"] == b
            keep[sel] = np.isin(batch["key"][sel], keys)
        return {k: v[keep] for k, v in batch.items()}

    members = entries.map_batches(in_shared, batch_format="numpy").take_all()
    pairs = _pairs(members, max_bucket)
    log.info("dedup on ray: %d shared buckets, %d candidate pairs", len(shared), len(pairs))
    if not len(pairs):
        return {}

    needed = np.unique(pairs)  # the rows in candidate pairs, renumbered 0..k-1 for verify()
    picked = {
        int(r["row"]): r["sig"]
        for r in signed.map_batches(lambda b: _select(b, needed, ("row", "sig")), batch_format="numpy").take_all()
    }
    texts = {
        int(r["row"]): str(r["text"])
        for r in ds.map_batches(lambda b: _select(b, needed, ("row", "text")), batch_format="numpy").take_all()
    }
    sigs = np.stack([picked[int(row)] for row in needed])
    edges = verify_exact(np.searchsorted(needed, pairs), [texts[int(row)] for row in needed], ngram, threshold, sigs)
    return leaders((int(needed[i]), int(needed[j]), sim) for i, j, sim in edges)


def _blocks(rows: int, ray) -> int:
    """Blocks for a list of texts: one per CPU of the cluster, more only past ROWS_PER_BLOCK texts each. Ray's own
    default (200 blocks whatever the size) makes every step, and the grouped count's shuffle, 200 tasks wide: 2.75x
    slower on 1,500 texts and 2 CPUs (33.9 s vs 12.4 s, the same rows; python -m benchmarks.dedup_ray)."""
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    return max(1, min(200, max(cpus, -(-rows // ROWS_PER_BLOCK))))


def _pairs(members: list[dict[str, Any]], max_bucket: int) -> np.ndarray:
    """Candidate pairs of every shared bucket, rows ascending within a bucket (as one machine sorts them)."""
    if not members:
        return np.empty((0, 2), np.int64)
    band, key, row = (np.array([m[c] for m in members]) for c in ("band", "key", "row"))
    order = np.lexsort((row, key, band))  # buckets as runs, each run in row order
    band, key = band[order], key[order]
    starts = np.flatnonzero(np.concatenate(([True], (np.diff(band) != 0) | (np.diff(key) != 0))))
    sizes = np.diff(np.append(starts, len(order)))
    return bucket_pairs(row[order].astype(np.int64), starts, sizes, max_bucket)  # verify_exact drops the repeats


def _select(batch: dict[str, np.ndarray], rows: np.ndarray, columns: tuple[str, ...]) -> dict[str, np.ndarray]:
    keep = np.isin(batch["row"], rows)
    return {c: batch[c][keep] for c in columns}


def _ray(address: str | None):
    try:
        import ray
    except ImportError:
        raise UserError("dedup.engine: ray needs Ray Data: pip install 'tunegate[ray]'") from None
    if not ray.is_initialized():
        _reachable(address)
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except ConnectionError as err:
            raise UserError(f"dedup.ray_address {address!r}: no Ray cluster there ({err})") from None
        ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


def _reachable(address: str | None) -> None:
    """A host:port (or ray://host:port) that does not answer ends in one line here: Ray itself retries
    for about half a minute and then exits the process."""
    if address in (None, "auto", "local"):
        return
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=3).close()
    except (OSError, ValueError) as err:
        raise UserError(f"dedup.ray_address {address!r}: no Ray cluster answers there ({err})") from None
