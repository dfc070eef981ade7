"""The retraining loop as two Prefect deployments, served from this process.

    prefect server start &                 # or PREFECT_API_URL pointing at a team server
    tunegate deploy                        # = python -m flows.deploy --root . (stays in the foreground)

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
from pathlib import Path

from flows.pipeline import ROOT
from flows.retrain import retrain
from flows.watch import EVENT, watch_base

WATCH, RETRAIN = "watch-base", "retrain"
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


def deployments(root: str, interval: float, cron: str, track: str) -> list:
    """The watcher on an interval and the retrain on the event and a cron, both for the project at root."""
    from prefect.events import DeploymentEventTrigger

    watcher = watch_base.to_deployment(
        name=WATCH,
        interval=interval,
        parameters={"root": root, "track": track},
        tags=["tunegate"],
        description=f"Announces a new revision of the base model ({EVENT}) when it differs from the champion's.",
    )
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
    trainer = retrain.to_deployment(
        name=RETRAIN,
        cron=cron,
        parameters={"root": root, "track": track, "reason": "schedule"},
        triggers=[on_new_base],
        concurrency_limit=1,  # one retrain at a time per project; a second one waits in the queue
        tags=["tunegate"],
        description="Pins the new base revision, runs every DVC stage, gates, registers: Promoted / Rejected / Failed.",
    )
    return [watcher, trainer]


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
    args = parser.parse_args()
    from prefect import serve

    root = str(Path(args.root).resolve())
    if args.notify:
        print(f"automation: {notify_on_rejection(args.notify)} -> {args.notify}")
    serve(*deployments(root, args.interval, args.cron, tracked_branch(root, args.track)))


if __name__ == "__main__":
    main()
