"""Watch the base model for a new revision and announce it as a Prefect event.

    python -m flows.watch              # check once (ephemeral Prefect, or $PREFECT_API_URL's server)
    tunegate deploy                    # every 10 minutes, beside the retrain deployment it triggers

The check is cheap: the hub's commit sha for `base.model`@branch (one API call, nothing downloaded),
or the ref of a local model repository. It is compared with the base revision recorded on the
champion in the MLflow registry, not with a local file, so a second machine or a fresh clone decides
alike. A moved base emits `tunegate.base.updated` (resource: the model id; payload: old and new
revision), which triggers the retrain deployment (flows/retrain.py). A revision is announced once: not
again after a version was trained on it (whatever its gate said), nor while its announcement stands.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.states import Completed, Failed

from flows.pipeline import ROOT

EVENT = "tunegate.base.updated"


def resource(model: str, root: str) -> dict[str, str]:
    """The event's resource: the base model, labelled with the project so two projects on one server
    trigger only their own retrain."""
    return {"prefect.resource.id": f"tunegate.base.{model}", "prefect.resource.name": model, "tunegate.project": root}


def announced_key(root: str) -> str:
    """The Prefect variable holding the last revision announced for this project."""
    return f"tunegate_announced_{hashlib.sha256(root.encode()).hexdigest()[:12]}"


def tracking_uri(uri: str, root: str) -> str:
    """register.tracking_uri as the pipeline sees it: a relative SQLite path is relative to the project."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not Path(uri.removeprefix(prefix)).is_absolute():
        return prefix + str(Path(root).resolve() / uri.removeprefix(prefix))
    return uri


def registered_bases(cfg, root: str) -> tuple[dict | None, dict[str, str]]:
    """(the champion's base {version, model, revision} or None, {base revision: version} of every version
    trained on this base model)."""
    from tunegate.provenance import BASE_MODEL, BASE_REVISION
    from tunegate.registry import champion, client

    c = client(tracking_uri(cfg.register_.tracking_uri, root))
    name = cfg.register_.model_name
    versions = c.search_model_versions(f"name = '{name}'")  # none registered yet: an empty list
    tried = {v.tags.get(BASE_REVISION): str(v.version) for v in versions if v.tags.get(BASE_MODEL) == cfg.base.model}
    current = champion(c, name, cfg.register_.alias)
    if current is None:
        return None, tried
    tags = current.tags
    recorded = {"version": str(current.version), "model": tags.get(BASE_MODEL), "revision": tags.get(BASE_REVISION)}
    return recorded, tried


@flow(name="tunegate-watch-base", log_prints=True)
def watch_base(root: str = str(ROOT), track: str | None = None):
    """Compare base.model@track (default: base.revision) with the champion's base; announce a new revision."""
    from prefect.events import emit_event
    from prefect.variables import Variable

    from tunegate.config import load_config
    from tunegate.errors import UserError
    from tunegate.models import revision_of
    from tunegate.paths import PARAMS

    log = get_run_logger()
    try:
        cfg = load_config(Path(root) / PARAMS)
        if cfg.base.is_demo:
            return Completed(
                message="nothing to watch: base.model is 'demo', built by the pipeline from committed data; "
                "publish a revision with `tunegate demo-base` and set base.model to its folder"
            )
        model, branch = cfg.base.model, track or cfg.base.revision
        current = revision_of(model, branch, root)
        champ, tried = registered_bases(cfg, root)
    except UserError as err:
        return Failed(message=f"watch failed: {err}")
    old = champ["revision"] if champ and champ["model"] == model else None
    if old == current:
        return Completed(message=f"unchanged: {model}@{branch} is {current[:12]}, champion v{champ['version']}'s base")
    if current in tried:
        return Completed(
            message=f"{model}@{branch} is {current[:12]}, already trained as v{tried[current]} "
            f"(champion: {'v' + champ['version'] if champ else 'none'}); not announced again"
        )
    key = announced_key(root)
    if Variable.get(key, default=None) == {"model": model, "revision": current}:
        return Completed(message=f"{model}@{branch} is {current[:12]}: announced already, its retrain is pending")
    emit_event(
        event=EVENT,
        resource=resource(model, root),
        payload={"model": model, "branch": branch, "old_revision": old or "", "new_revision": current},
    )
    Variable.set(key, {"model": model, "revision": current}, overwrite=True)
    log.info("base moved: %s %s -> %s (%s)", model, (old or "none")[:12], current[:12], EVENT)
    return Completed(message=f"base moved: {model} {(old or 'none')[:12]} -> {current[:12]}; announced {EVENT}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(ROOT))
    parser.add_argument("--track", default=None, help="branch to follow (default: base.revision)")
    args = parser.parse_args()
    state = watch_base(root=args.root, track=args.track, return_state=True)
    print(state.message)


if __name__ == "__main__":
    main()
