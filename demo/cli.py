"""The demo's commands, added to the `tunegate` CLI through its `tunegate.commands` entry point
(pyproject.toml), so the library never imports the demo:

    tunegate demo-base      # publish a new revision of the demo base model (models/demo-hub)
    tunegate demo-data      # regenerate the embedded demo data (seeded, byte-identical)
    tunegate demo-lookup    # turn this demo project into the lookup variant, where retrieval beats fine-tuning
"""

from __future__ import annotations

from pathlib import Path

import typer

from tunegate.cli import PARAMS, fail
from tunegate.errors import UserError


def register(app: typer.Typer) -> None:
    """The `tunegate.commands` entry point: adds the demo's commands to the app."""
    app.command("demo-base")(demo_base)
    app.command("demo-data")(demo_data)
    app.command("demo-lookup")(demo_lookup)


def demo_base(
    into: Path = typer.Option(Path("models/demo-hub"), help="local model repository to publish into"),
    steps: int = typer.Option(200, help="more pretraining steps on the demo's general corpus (0: publish as is)"),
    seed: int = typer.Option(1, help="seed of those steps (another seed, another revision)"),
    source: Path | None = typer.Option(
        None, help="model folder to start from (default: the branch's revision, else the built demo base)"
    ),
    branch: str = typer.Option("main", help="branch to move to the new revision"),
    params: Path | None = PARAMS,
) -> None:
    """Publish a new revision of the demo base model; with base.model set to that folder, the watcher sees it."""
    import tempfile

    from demo.publish import continue_pretraining, head, publish
    from tunegate.config import load_config
    from tunegate.io import read_jsonl
    from tunegate.paths import Layout
    from tunegate.runtime import configure

    configure(stage="cli")
    try:
        cfg = load_config(params)
        start = source or head(into, branch) or Layout.of(cfg.paths).base
        if not start.is_dir():
            raise UserError(f"{start}: no model to start from; build the demo base first (dvc repro base)")
        with tempfile.TemporaryDirectory() as scratch:
            if steps:
                loss = continue_pretraining(
                    start, read_jsonl(Path(cfg.paths.pretrain)), cfg.base.demo, steps, seed, Path(scratch)
                )
                typer.echo(f"{steps} more pretraining steps from {start} (seed {seed}): loss {loss:.3f}")
                start = Path(scratch)
            commit = publish(start, into, branch)
    except UserError as err:
        fail(err)
    typer.echo(
        f"published {into}@{commit} ({branch}); `base.model: {into}` follows it, `base.revision: {commit}` pins it"
    )


def demo_data(
    root: Path = typer.Option(Path("."), help="project root to write data/ and evals/data/ into"), seed: int = 1234
) -> None:
    """Regenerate the embedded demo data (deterministic: the committed files are its output)."""
    from demo.data import write

    for path, sha in write(root, seed).items():
        typer.echo(f"{sha[:12]}  {path}")


def demo_lookup(
    steps: int = typer.Option(400, help="pretraining steps that teach the demo base to read its context"),
    seed: int = typer.Option(1, help="seed of those steps"),
    params: Path | None = PARAMS,
) -> None:
    """Turn this demo project into the lookup variant (demo/lookup.py): a task retrieval already solves.

    Writes its data, eval task, instructions and gate policy, publishes a revision of the built demo base that uses
    its context into models/demo-hub, and points params.yaml at all of it; `git checkout params.yaml` and removing
    the written files goes back. Then `dvc repro`: the gate fails the fine-tune and names retrieval as the cheaper
    path."""
    import tempfile

    from demo import lookup
    from demo.publish import continue_pretraining, publish
    from tunegate.config import load_config
    from tunegate.io import read_jsonl
    from tunegate.paths import Layout
    from tunegate.runtime import configure

    configure(stage="cli")
    try:
        path = params or Path("params.yaml")
        cfg = load_config(params)
        built = Layout.of(cfg.paths).base
        if cfg.base.model != "demo":
            raise UserError(
                f"{path}: base.model is {cfg.base.model!r}; the lookup variant starts from the demo project "
                "(already switched? `git checkout params.yaml` first)"
            )
        if not (built / "config.json").is_file():
            raise UserError(f"{built}: the demo base is not built yet; run `dvc repro base` first")
        for rel in lookup.write_files(Path("."), cfg.seed):
            typer.echo(f"wrote {rel}")
        general = read_jsonl(Path(cfg.paths.pretrain))
        rows = lookup.recall_corpus(general, seed, lookup.EPISODES)
        with tempfile.TemporaryDirectory() as scratch:
            loss = continue_pretraining(built, rows, cfg.base.demo, steps, seed, Path(scratch), lookup.LR_SHARE)
            commit = publish(Path(scratch), Path(lookup.HUB))
        typer.echo(f"{steps} steps of recall episodes from {built}: loss {loss:.3f}; published {lookup.HUB}@{commit}")
        lookup.set_params(path, lookup.PARAMS)
    except UserError as err:
        fail(err)
    typer.echo(
        f"{path}: the lookup variant (base {lookup.HUB}, target lookup_gen, model {lookup.MODEL_NAME}); now `dvc repro`"
    )
