"""Scheduled retraining when the base model gets a new revision.

    python -m flows.retrain                        # check once, retrain if the base moved
    python -m flows.retrain --serve --cron "0 3 * * *"   # a deployment in the Prefect UI, on a schedule
    tunegate serve --cron "0 3 * * *"                    # the same

The watch resolves `base.model`@`base.revision` (a hub branch such as `main`, or a local folder) to
its current revision and compares it with the last built `base.json`. When it moved, the pipeline
flow rebuilds `base` (forced: the params did not change, the model behind them did) and everything
downstream; `gate` and `register` then decide, without a human, whether the new candidate becomes
the champion.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from prefect import flow, get_run_logger, task

from flows.pipeline import ROOT, pipeline


@task(retries=2, retry_delay_seconds=30)
def base_changed(root: str) -> tuple[bool, str, str]:
    """(changed?, last built revision, current revision) of the configured base model."""
    from tunegate.config import load_config
    from tunegate.io import read_json, sha256_of
    from tunegate.models import current_revision
    from tunegate.paths import PARAMS, Layout

    cfg = load_config(Path(root) / PARAMS)
    manifest_path = Layout.of(cfg.paths, root).base_manifest
    last = read_json(manifest_path) if manifest_path.exists() else None
    if cfg.base.is_demo:  # built from committed data: only a params/data change (DVC's job) moves it
        return last is None, last["resolved_revision"] if last else "-", last["resolved_revision"] if last else "-"
    current = current_revision(cfg.base.model, cfg.base.revision, root)
    resolved = current["resolved_revision"]
    if last is None:
        return True, "-", resolved
    moved = (resolved, sha256_of(current["weights_sha256"])) != (
        last["resolved_revision"],
        sha256_of(last["weights_sha256"]),
    )
    return moved, last["resolved_revision"], resolved


@flow(name="tunegate-retrain-on-base-update", log_prints=True)
def retrain_on_base_update(root: str = str(ROOT)) -> dict:
    log = get_run_logger()
    changed, last, current = base_changed(root)
    if not changed:
        log.info("base unchanged at %s; nothing to do", current)
        return {"retrained": False, "revision": current}
    log.info("base moved %s -> %s: retraining, re-gating and registering", last, current)
    outcome = pipeline(root=root, force_stages=["base"])
    return {"retrained": True, "from": last, "to": current, "stages": outcome}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="serve a scheduled deployment (needs a Prefect server)")
    parser.add_argument("--cron", default="0 3 * * *", help="schedule for --serve (default: daily 03:00)")
    parser.add_argument("--root", default=str(ROOT))
    args = parser.parse_args()
    if args.serve:
        retrain_on_base_update.serve(
            name="base-watch", cron=args.cron, parameters={"root": args.root}, tags=["tunegate"], global_limit=1
        )  # never two retrains at once
    else:
        print(retrain_on_base_update(root=args.root))


if __name__ == "__main__":
    main()
