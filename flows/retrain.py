"""Retrain on a new base revision: pin it, run every stage, and say in one line what came of it.

    python -m flows.retrain                        # retrain on the tracked branch's current revision
    python -m flows.retrain --revision <commit>    # on a given revision
    tunegate deploy                                # as a deployment: on `tunegate.base.updated` and on a cron

The revision is pinned in params.yaml (`base.revision: <commit>`, edited in place, comments kept), so
`dvc.lock` records it, `base` rebuilds from it and the registered version carries it as
`base_revision`; commit params.yaml with dvc.lock to keep the run. Then every DVC stage runs as a task
run of this flow (flows/pipeline.py), and `gate` and `register` decide, without a human, whether the
candidate becomes the champion. The final state says which, in one line: `Promoted`, `Rejected` (the
gate, or the champion comparison, with the failed checks) or `Failed` (the stage and its error line).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.states import Completed, Failed

from flows.pipeline import ROOT, StageFailed, run_stages

# `base:` block's `revision:` line in params.yaml; value replaced in place so the comments stay
REVISION_LINE = re.compile(r"^(base:\n(?:[ \t]+.*\n|[ \t]*\n)*?[ \t]+revision:[ \t]*)(\S+)", re.M)


def pin_base_revision(params: Path, revision: str) -> str:
    """Set base.revision in params.yaml to `revision` (one line changed); returns the value it had."""
    text = params.read_text(encoding="utf-8")
    match = REVISION_LINE.search(text)
    if match is None:
        from tunegate.errors import UserError

        raise UserError(f"{params}: no `revision:` under `base:` to pin")
    params.write_text(text[: match.start(2)] + revision + text[match.end(2) :], encoding="utf-8")
    return match.group(2)


def outcome(result: dict, base: str, ran: bool) -> tuple[str, str]:
    """(state name, one line) from register's result: promoted, rejected by the gate, or not promoted."""
    name, version = result["model_name"], result["version"]
    stays = f"champion stays at v{result['champion']}" if result["champion"] else "no champion yet"
    if not ran:
        now = f"{name} champion stays at v{result['champion']}" if result["champion"] else f"{name} has no champion yet"
        return "Completed", f"unchanged: nothing was stale; {now} (base {base})"
    if result["gate_passed"] and result["champion"] == version:
        was = f", was v{result['previous_champion']}" if result.get("previous_champion") else ""
        return "Promoted", f"promoted: {name} v{version} is champion (base {base}{was})"
    if not result["gate_passed"]:
        failed = [line for line in result.get("lines", []) if line.startswith("FAIL")] or [result["champion_check"]]
        why = "; ".join(failed)
        cheaper = f". {result['recommendation']}" if result.get("recommendation") else ""
        return "Rejected", f"gate rejected {name} v{version} (base {base}): {why}; {stays}{cheaper}"
    notes = "; ".join(result.get("notes", [])) or "see reports/register.json"
    return "Completed", f"not promoted: {name} v{version} passed the gate (base {base}) but {notes}"


@flow(name="tunegate-retrain", log_prints=True)
def retrain(root: str = str(ROOT), revision: str | None = None, track: str | None = None, reason: str = "by hand"):
    """Pin base.revision to `revision` (default: base.model@track's current commit), run every stage."""
    from tunegate.config import load_config
    from tunegate.errors import UserError
    from tunegate.io import read_json
    from tunegate.models import revision_of
    from tunegate.paths import PARAMS, Layout

    log = get_run_logger()
    params = Path(root) / PARAMS
    try:
        cfg = load_config(params)
        if not cfg.base.is_demo:
            revision = revision or revision_of(cfg.base.model, track or cfg.base.revision, root)
            was = pin_base_revision(params, revision)
            log.info("retrain (%s): base %s pinned to %s (was %s)", reason, cfg.base.model, revision, was)
        stages = run_stages(root)
        result = read_json(Layout.of(cfg.paths, root).register)
    except (StageFailed, UserError) as err:
        return Failed(message=f"failed: {err}")
    base = f"{cfg.base.model}@{(revision or 'demo')[:12]}"
    state, line = outcome(result, base, ran=stages.get("register") == "ran")
    log.info("%s", line)
    return Completed(name=state, message=line, data={"stages": stages, "register": result})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(ROOT))
    parser.add_argument("--revision", default=None, help="commit to pin (default: the tracked branch's current one)")
    parser.add_argument("--track", default=None, help="branch to follow (default: base.revision)")
    args = parser.parse_args()
    state = retrain(root=args.root, revision=args.revision, track=args.track, return_state=True)
    print(f"{state.name}: {state.message}")
    raise SystemExit(0 if state.is_completed() else 1)


if __name__ == "__main__":
    main()
