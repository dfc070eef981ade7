"""The Ray Data near-duplicate path on a real local Ray: the same result as the single-machine path, for the
library call and for the dedup stage. One local cluster for the module (starting one takes most of a test's time)."""

import pytest

from benchmarks.dedup import make_corpus
from stages import dedup
from tests.conftest import ROOT
from tunegate.dedup import near_duplicates
from tunegate.dedup_ray import near_duplicates_ray
from tunegate.io import read_jsonl

pytestmark = pytest.mark.heavy  # a local Ray cluster


def test_unreachable_cluster_is_one_line():
    """Ray itself retries a dead address for half a minute and then exits the process; tunegate says so in one line."""
    from tunegate.errors import UserError

    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    with pytest.raises(UserError, match="dedup.ray_address '127.0.0.1:1': no Ray cluster answers there") as err:
        near_duplicates_ray(["a b c"], 3, 64, 16, 0.7, address="127.0.0.1:1")
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")  # installed by `make setup` (the `ray` extra); skipped only outside it
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def test_ray_equals_single_machine_on_the_labelled_corpus(ray_local):
    corpus = make_corpus(1500, seed=3)
    expected = near_duplicates(corpus.docs, ngram=2, num_perm=128, bands=32, threshold=0.4)
    got = near_duplicates_ray(corpus.docs, ngram=2, num_perm=128, bands=32, threshold=0.4)
    assert got == expected and len(expected) > 200


def test_ray_dataset_input_and_big_buckets(ray_local):
    """A Ray Dataset with row/text columns works, and a shared-template bucket larger than max_bucket
    is linked as a star, as on one machine."""
    docs = ["please refund the order now thanks"] * 80 + [f"unrelated words number {i} here" for i in range(40)]
    ds = ray_local.data.from_items([{"row": i, "text": t} for i, t in enumerate(docs)]).repartition(4)
    got = near_duplicates_ray(ds, ngram=3, num_perm=64, bands=16, threshold=0.7, max_bucket=16)
    assert got == near_duplicates(docs, 3, 64, 16, 0.7) == dict.fromkeys(range(1, 80), (0, 1.0))


def test_the_stage_with_engine_ray_drops_the_same_rows(ray_local, cfg, validated, result):
    """dedup.engine: ray gives the single-machine result (`result`), row for row, metrics and all."""
    out, _ = validated
    sources = {name: read_jsonl(out / f"{name}.jsonl") for name in cfg.data.sources}
    evals = dedup.eval_items(ROOT / "evals/data")
    _, dropped, metrics = dedup.run(cfg.dedup.model_copy(update={"engine": "ray"}), sources, evals, cfg.seed)
    assert dropped == result[1] and metrics == result[2]
    assert any(d["reason"] == "near_duplicate" for d in dropped)


def test_a_list_of_texts_gets_a_block_per_cpu_and_more_only_for_many_texts():
    """Ray's default of 200 blocks made a 1,500-text run 2.75x slower (benchmarks/dedup_ray.py)."""
    from types import SimpleNamespace

    from tunegate.dedup_ray import ROWS_PER_BLOCK, _blocks

    cluster = lambda cpus: SimpleNamespace(cluster_resources=lambda: {"CPU": float(cpus)})
    assert _blocks(1500, cluster(2)) == 2 and _blocks(10, cluster(64)) == 64
    assert _blocks(10 * ROWS_PER_BLOCK + 1, cluster(2)) == 11 and _blocks(10**9, cluster(2)) == 200
    assert _blocks(5, SimpleNamespace(cluster_resources=lambda: {})) == 1
