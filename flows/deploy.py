"""The retraining loop as Prefect deployments: served from this process, or run by a work pool's workers.

    prefect server start &                 # or PREFECT_API_URL pointing at a team server
    tunegate deploy                        # = python -m flows.deploy --root . (stays in the foreground)
    tunegate deploy --pool tunegate        # registered with a work pool instead; its workers run them

With `--pool`, the deployments are stored on the server and this command returns: a worker of the
pool (`prefect worker start --pool tunegate`, or infra/compose's worker) runs each flow run in the
project folder, which must be at the same path on the worker (a shared volume, or the worker's own
clone). The pool's deployments are these two and `tunegate-pipeline/pipeline` (every DVC stage once,
by hand: `prefect deployment run tunegate-pipeline/pipeline`).

- `tunegate-watch-base/watch-base`: flows/watch.py on an interval (default every 10 minutes);
  announces a new base revision as the event `tunegate.base.updated`.
- `tunegate-retrain/retrain`: flows/retrain.py, triggered by that event (a DeploymentEventTrigger,
  the new revision as its `revision` parameter), on its own cron (default 03:00 daily) and by hand
  (`prefect deployment run tunegate-retrain/retrain`). Concurrency limit 1: one retrain at a time,
  later ones wait their turn.
- with `--notify BLOCK`, an automation that sends the final message of every retrain the gate
  rejected through that Prefect notification block (e.g. `slack-webhook/ml-team`).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from flows.pipeline import ROOT
from flows.retrain import retrain
from flows.watch import EVENT, watch_base

WATCH, RETRAIN, PIPELINE = "watch-base", "retrain", "pipeline"
REJECTED = "Rejected"  # the retrain's final state name when the gate says no (flows/retrain.py: outcome)
COMMIT = re.compile(r"[0-9a-f]{40}")


def tracked_branch(root: str, track: str | None) -> str:
    """The branch the loop follows: --track, else base.revision unless a retrain already pinned it to a commit."""
    if track:
        return track
    from tunegate.config import load_config
    from tunegate.paths import PARAMS

    revision = load_config(Path(root) / PARAMS).base.revision
    return "main" if COMMIT.fullmatch(revision) else revision


def specs(root: str, interval: float, cron: str, track: str) -> list[tuple]:
    """(flow, entrypoint, settings) of each deployment: the watcher on an interval, the retrain on the
    event and a cron, both for the project at root. Served or sent to a pool, the settings are these."""
    from prefect.events import DeploymentEventTrigger

    watcher = {
        "name": WATCH,
        "interval": interval,
        "parameters": {"root": root, "track": track},
        "tags": ["tunegate"],
        "description": f"Announces a new revision of the base model ({EVENT}) when it differs from the champion's.",
    }
    on_new_base = DeploymentEventTrigger(
        name="retrain on a new base revision",
        expect={EVENT},
        match={"prefect.resource.id": "tunegate.base.*", "tunegate.project": root},
        parameters={
            "root": root,
            "track": track,
            "revision": "{{ event.payload.new_revision }}",
            "reason": "new base {{ event.payload.old_revision or 'none' }} -> {{ event.payload.new_revision }}",
        },
    )
    trainer = {
        "name": RETRAIN,
        "cron": cron,
        "parameters": {"root": root, "track": track, "reason": "schedule"},
        "triggers": [on_new_base],
        "concurrency_limit": 1,  # one retrain at a time per project; a second one waits in the queue
        "tags": ["tunegate"],
        "description": "Pins the new base revision, runs every DVC stage, gates, registers: Promoted/Rejected/Failed.",
    }
    return [(watch_base, "flows/watch.py:watch_base", watcher), (retrain, "flows/retrain.py:retrain", trainer)]


def deployments(root: str, interval: float, cron: str, track: str) -> list:
    """The deployments `tunegate deploy` serves from its own process."""
    return [flow.to_deployment(**settings) for flow, _, settings in specs(root, interval, cron, track)]


def to_pool(root: str, pool: str, interval: float, cron: str, track: str) -> list[str]:
    """Store the deployments on the server for work pool `pool` (the pipeline's as well); returns their
    names. Each flow is loaded from the project folder (`from_source`), and the worker runs it there."""
    from prefect import flow as prefect_flow

    from flows.pipeline import pipeline

    runs_in = {"working_dir": root, "env": {"PYTHONPATH": root}}
    everything = specs(root, interval, cron, track) + [
        (
            pipeline,
            "flows/pipeline.py:pipeline",
            {
                "name": PIPELINE,
                "parameters": {"root": root},
                "tags": ["tunegate"],
                "concurrency_limit": 1,
                "description": "Every DVC stage once, in DVC's order (the stale ones run), gate and register.",
            },
        )
    ]
    _check_pool(pool)
    names = []
    for flow, entrypoint, settings in everything:
        loaded = prefect_flow.from_source(source=root, entrypoint=entrypoint)
        loaded.deploy(
            work_pool_name=pool, job_variables=runs_in, build=False, push=False, print_next_steps=False, **settings
        )
        names.append(f"{flow.name}/{settings['name']}")
    return names


def _check_pool(pool: str) -> None:
    """One line, before anything is stored, when the Prefect API cannot be reached or has no such pool."""
    import httpx
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL
    from prefect.utilities.asyncutils import run_coro_as_sync

    from tunegate.errors import UserError

    async def read():
        async with get_client() as client:
            await client.read_work_pool(pool)

    try:
        run_coro_as_sync(read())
    except ObjectNotFound:
        raise UserError(
            f"work pool {pool}: not found on {PREFECT_API_URL.value() or 'the local Prefect API'}; create it "
            f"(`prefect work-pool create {pool} --type process`) or start a worker of it"
        ) from None
    except httpx.HTTPError as err:
        raise UserError(
            f"PREFECT_API_URL {PREFECT_API_URL.value()}: Prefect API not reachable ({type(err).__name__}); "
            "nothing was deployed"
        ) from None


def notify_on_rejection(block: str) -> str:
    """Create (or replace) the automation that sends a rejected retrain's final line through `block`
    ("<block type>/<name>", a Prefect notification block). Returns the automation's name."""
    from prefect.automations import Automation
    from prefect.blocks.core import Block
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    name = "tunegate: gate rejected a retrain"
    notifier = Block.load(block)
    try:
        Automation.read(name=name).delete()  # re-running deploy replaces it rather than adding a second one
    except ValueError:  # none yet
        pass
    Automation(
        name=name,
        trigger=EventTrigger(
            expect={f"prefect.flow-run.{REJECTED}"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": retrain.name},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[
            SendNotification(
                block_document_id=notifier._block_document_id,
                subject="tunegate: gate rejected a retrain",
                body="{{ flow_run.name }}: {{ flow_run.state.message }}",
            )
        ],
    ).create()
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(ROOT))
    parser.add_argument("--interval", type=float, default=600, help="seconds between base checks (default: 600)")
    parser.add_argument("--cron", default="0 3 * * *", help="the retrain's own schedule (default: daily 03:00)")
    parser.add_argument("--track", default=None, help="branch to follow (default: base.revision, or main if pinned)")
    parser.add_argument("--notify", default=None, help="notification block for rejected retrains (slack-webhook/ml)")
    parser.add_argument("--pool", default=None, help="work pool whose workers run the flows (default: serve them here)")
    args = parser.parse_args()
    root = str(Path(args.root).resolve())
    if args.notify:
        print(f"automation: {notify_on_rejection(args.notify)} -> {args.notify}")
    track = tracked_branch(root, args.track)
    if args.pool:
        from tunegate.errors import UserError

        try:
            names = to_pool(root, args.pool, args.interval, args.cron, track)
        except UserError as err:
            sys.exit(f"tunegate deploy: error: {err}")
        for name in names:
            print(f"deployment {name} -> work pool {args.pool}")
        return
    from prefect import serve

    stop_within(STOP_GRACE)
    serve(*deployments(root, args.interval, args.cron, track))


STOP_GRACE = 30.0  # seconds a SIGTERM'd `tunegate deploy` is given to stop its runner before the process ends


def stop_within(grace: float) -> None:
    """Make SIGTERM (systemd, Docker, Kubernetes stopping the process) end it within `grace` seconds. Prefect's
    runner (3.8) stops by raising SystemExit from its signal handler; landing while a flow run is being started, the
    exit is caught on the way and the runner serves on, unstoppable but by SIGKILL (seen in this project's tests).
    Prefect's graceful stop still runs first; if the process is still here after `grace`, it ends (exit code 143,
    as for SIGTERM)."""
    import os
    import threading

    from prefect.runner.runner import Runner

    graceful = Runner.handle_sigterm

    def handle_sigterm(self, *args, **kwargs) -> None:
        deadline = threading.Timer(grace, os._exit, args=(143,))
        deadline.daemon = True  # a graceful stop that works is not held up by it
        deadline.start()
        graceful(self, *args, **kwargs)

    Runner.handle_sigterm = handle_sigterm


if __name__ == "__main__":
    main()
