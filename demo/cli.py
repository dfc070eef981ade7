"""The demo's commands, added to the `tunegate` CLI through its `tunegate.commands` entry point
(pyproject.toml), so the library never imports the demo:

    tunegate demo-base      # publish a new revision of the demo base model (models/demo-hub)
    tunegate demo-data      # regenerate the embedded demo data (seeded, byte-identical)
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
