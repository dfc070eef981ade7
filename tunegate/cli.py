"""The `tunegate` command: user actions that are not pipeline stages (the stages run under `dvc repro`).

    tunegate init --model M --data F   # set the project up for your base model, data and target eval
    tunegate check                 # validate params.yaml and the gate policy, without running anything
    tunegate status                # registered versions, gate verdicts, base revisions, champion
                                   # (registry commands work from any folder with --tracking-uri/--model)
    tunegate show VERSION          # the full provenance record of a version
    tunegate diff A B              # the items that flipped between two versions (or `base`, a version's base)
    tunegate fetch [VERSION|ALIAS] # download a version (adapter + base, or a full model) anywhere, sha256-checked
    tunegate fetch champion --format gguf  # one exported format (merged, gguf, ollama, vllm), sha256-checked
    tunegate export VERSION        # export a registered version (merged, GGUF, Ollama, vLLM) and log it on it
    tunegate chat [VERSION]        # talk to a version in the terminal (transformers, or llama.cpp with --format gguf)
    tunegate promote VERSION       # move `champion` (gate must have passed; files must match sha256)
    tunegate rollback              # move `champion` back to the previous champion
    tunegate reproduce VERSION     # re-run a version's training from its commit + params; compare sha256
    tunegate warm                  # keep the stages' libraries imported: `dvc repro` skips seconds per stage
    tunegate deploy                # Prefect: watch the base, retrain on a new revision (event) and on a cron
    tunegate team up               # the team setup here: PostgreSQL, MLflow (model files on disk), Prefect, a worker
    tunegate demo-base             # publish a new revision of the demo base model (models/demo-hub)
    tunegate demo-data             # regenerate the embedded demo data (seeded, byte-identical)

Heavy libraries are imported inside the commands, so `tunegate --help` starts instantly.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import typer

from tunegate.errors import UserError
from tunegate.warm import DEFAULT_SOCKET

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Reproducible, gated fine-tuning: registry and project commands."
)

PARAMS = typer.Option(None, "--params", "-p", help="params.yaml to read (default: ./params.yaml or $TUNEGATE_PARAMS)")


def fail(err: UserError) -> None:
    typer.echo(f"tunegate: error: {err}", err=True)
    raise typer.Exit(2)


TRACKING = typer.Option(
    None, "--tracking-uri", help="MLflow server (default: register.tracking_uri, else $MLFLOW_TRACKING_URI)"
)
MODEL = typer.Option(None, "--model", help="registered model name (default: register.model_name, else $TUNEGATE_MODEL)")


@dataclass(frozen=True)
class Registry:
    """Which registry a command talks to: the project's params.yaml, or (from any folder, no project
    needed) --tracking-uri/--model or $MLFLOW_TRACKING_URI/$TUNEGATE_MODEL."""

    tracking_uri: str
    model_name: str
    alias: str = "champion"


def _registry(params: Path | None, tracking_uri: str | None = None, model: str | None = None):
    from tunegate.config import load_config, params_path
    from tunegate.registry import client
    from tunegate.runtime import configure

    found = params_path(params)
    # in a project, what MLflow logs or warns goes to reports/logs/cli.log; elsewhere nothing is written
    configure(stage="cli" if found.exists() else None)
    if found.exists() or params:
        reg = load_config(params).register_
        target = Registry(tracking_uri or reg.tracking_uri, model or reg.model_name, reg.alias)
    else:
        uri, name = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"), model or os.environ.get("TUNEGATE_MODEL")
        if not uri or not name:
            raise UserError(
                f"{found}: not found; outside a project, name the registry with --tracking-uri and --model "
                "(or $MLFLOW_TRACKING_URI and $TUNEGATE_MODEL)"
            )
        target = Registry(uri, name)
    return target, client(target.tracking_uri)


@app.command()
def check(
    params: Path | None = PARAMS,
    memory: str | None = typer.Option(
        None, "--memory", help="answer for a GPU you do not have yet: a size (24GiB, 80GB) or a name (a100-80gb, h100)"
    ),
) -> None:
    """Validate params.yaml, the gate policy, the eval tasks and dvc.yaml; estimate training memory from base.model's
    config.json (no weights load), on this machine's device or the one --memory names. The memory answer is given
    whatever else is wrong: a run that cannot fit is one more problem, one that fits is said before the problems."""
    try:
        from tunegate.config import load_config
        from tunegate.gate import load_policy

        cfg = load_config(params)
        policy = load_policy(Path(cfg.gate.policy))
        from tunegate import consistency

        for line in consistency.warnings(cfg):
            typer.echo(f"warning: {line}")
        found = consistency.problems(cfg)
        try:
            line = _memory_line(cfg, memory)
        except UserError as err:
            found, line = [*found, str(err)], ""
        if found:
            if line:
                typer.echo(line)
            raise UserError("\n".join(found) if len(found) == 1 else f"{len(found)} problems:\n" + "\n".join(found))
    except UserError as err:
        fail(err)
    typer.echo(
        f"ok: {len(cfg.data.sources)} sources, method {cfg.train.method}/{cfg.train.adapter}, "
        f"{len(policy.checks)} gate checks; {line}"
    )


def _memory_line(cfg, memory: str | None) -> str:
    """The memory estimate from base.model's own config.json, or why there is none yet; a run that cannot fit
    ends in the preflight's one-line refusal with the changes that would make it fit."""
    from tunegate.io import read_json
    from tunegate.paths import Layout
    from tunegate.training import base_config_dir, memory_budget, preflight

    layout = Layout.of(cfg.paths)
    built = read_json(layout.base_manifest).get("model") if layout.base_manifest.exists() else None
    folder, source = base_config_dir(cfg.base.model, layout.base, built)
    if folder is None:
        return f"memory: preflight skipped: {source}"
    budget = memory_budget(memory) if memory else None
    from tunegate.preflight import GIB

    est, device, free = preflight(cfg.train, folder, budget=budget)
    return (
        f"memory: training {source} needs about {est['total'] / GIB:.2f} GiB per device; fits {device} "
        f"({free / GIB:.1f} GiB)"
    )


@app.command()
def init(  # noqa: PLR0913 - one parameter per command-line option
    model: str = typer.Option(..., "--model", help="hub id (org/name) or local folder of the base model"),
    data: list[str] = typer.Option(..., "--data", help="a file of your domain data (repeat for several)"),
    general: list[str] = typer.Option(None, "--general", help="general data to mix in (default: the embedded set)"),
    preferences: list[str] = typer.Option(None, "--preferences", help="preference pairs (then sft+dpo)"),
    task: str = typer.Option(
        None, help="name of the target eval task (default: <data file>_gen, or <its folder>_gen for train.jsonl etc.)"
    ),
    eval_size: int = typer.Option(None, help="rows held out for the target eval (default: 10%, 30..200)"),
    label: str = typer.Option(None, help="JSON key of the answers to stratify the eval by (default: detected)"),
    general_tasks: str = typer.Option(
        ",".join(("arc_easy", "hellaswag")),
        help="forgetting checks: lm-eval tasks, task or task:metric, comma-separated",
    ),
    revision: str = typer.Option("main", help="hub branch, tag or commit of the base"),
    force: bool = typer.Option(False, help="write params.yaml again when it is already set up"),
) -> None:
    """Set the project up for your model and data: held-out eval task, gate policy, params.yaml, dvc.yaml."""
    from tunegate.project import init as setup
    from tunegate.project import summary

    try:
        plan = setup(
            model,
            data,
            general or None,
            preferences or None,
            task=task,
            eval_size=eval_size,
            label=label,
            general_tasks=[t.strip() for t in general_tasks.split(",") if t.strip()],
            revision=revision,
            force=force,
        )
    except UserError as err:
        fail(err)
    typer.echo(summary(plan))


@app.command()
def fetch(  # noqa: PLR0913 - one parameter per command-line option
    ref: str = typer.Argument("champion", help="version number or alias"),
    to: Path = typer.Option(Path("fetched"), "--to", help="folder to download into"),
    fmt: str | None = typer.Option(None, "--format", help="an exported format: merged, gguf, ollama or vllm"),
    params: Path | None = PARAMS,
    tracking_uri: str | None = TRACKING,
    model: str | None = MODEL,
) -> None:
    """Download a version (its adapter and base, its full model, or one exported format) and check it against the
    recorded sha256."""
    from tunegate.registry import fetch as download
    from tunegate.registry import fetch_export

    try:
        reg, c = _registry(params, tracking_uri, model)
        got = fetch_export(c, reg.model_name, ref, fmt, to) if fmt else download(c, reg.model_name, ref, to)
    except UserError as err:
        fail(err)
    typer.echo(export_lines(reg.model_name, got) if fmt else fetched_lines(reg.model_name, got))


def export_lines(name: str, got: dict) -> str:
    """What `tunegate fetch --format` and `tunegate export` print: the files and how to run them."""
    what = got.get("format") or ", ".join(got["formats"])
    lines = [f"{name} v{got['version']}: {what} in {got['folder']} (sha256 checked)"]
    if got.get("checked"):
        lines.append(f"gate-checked artifacts: {got['checked']}")
    lines += [f"{runtime:12} {command}" for runtime, command in got["commands"].items()]
    return "\n".join(lines)


@app.command()
def export(  # noqa: PLR0913 - one parameter per command-line option
    ref: str = typer.Argument("champion", help="version number or alias"),
    to: Path = typer.Option(Path("exported"), "--to", help="folder to write (replaced)"),
    formats: str = typer.Option("merged,gguf,ollama", "--formats", help="comma-separated: merged, gguf, ollama, vllm"),
    gguf: str = typer.Option("f16,q8_0", "--gguf", help="comma-separated GGUF types (f16, q8_0, q4_k_m, ...)"),
    params: Path | None = PARAMS,
    tracking_uri: str | None = TRACKING,
    model: str | None = MODEL,
) -> None:
    """Export a registered version to runtimes' formats and log the files (with sha256) on the version."""
    from tunegate.config import Export
    from tunegate.export import commands
    from tunegate.shipping import export_version

    try:
        cfg = _export_settings(Export, formats, gguf)
        reg, c = _registry(params, tracking_uri, model)
        record = export_version(c, reg.model_name, ref, list(cfg.formats), list(cfg.gguf), to)
    except UserError as err:
        fail(err)
    got = {
        "version": record["version"],
        "formats": record["formats"],
        "folder": str(to),
        "commands": commands(record, str(to)),
    }
    typer.echo(export_lines(reg.model_name, got))


def _export_settings(kind, formats: str, gguf: str):
    from pydantic import ValidationError

    try:
        return kind(
            formats=[f.strip() for f in formats.split(",") if f.strip()],
            gguf=[t.strip() for t in gguf.split(",") if t.strip()],
        )
    except ValidationError as err:
        e = err.errors()[0]
        raise UserError(f"--{'formats' if e['loc'][0] == 'formats' else 'gguf'}: {e['msg']}") from None


@app.command()
def chat(  # noqa: PLR0913 - one parameter per command-line option
    ref: str = typer.Argument("champion", help="version number or alias"),
    fmt: str = typer.Option("transformers", "--format", help="transformers (the registered model) or gguf (llama.cpp)"),
    message: list[str] | None = typer.Option(None, "--message", "-m", help="send these and exit (else: read lines)"),
    params: Path | None = PARAMS,
    tracking_uri: str | None = TRACKING,
    model: str | None = MODEL,
) -> None:
    """Talk to a version in the terminal, greedy decoding; /exit or end of input stops."""
    from tunegate.shipping import chat as answers

    if fmt not in ("transformers", "gguf"):
        fail(UserError(f"--format {fmt}: transformers or gguf"))
    interactive = not message and sys.stdin.isatty()
    if interactive:
        typer.echo("type a message, /exit to stop", err=True)

    def lines():
        yield from message or (line for line in iter(lambda: input("> ") if interactive else sys.stdin.readline(), ""))

    try:
        reg, c = _registry(params, tracking_uri, model)
        for answer in answers(c, reg.model_name, ref, fmt, lines()):
            typer.echo(answer)
    except (UserError, EOFError) as err:
        if isinstance(err, UserError):
            fail(err)


def fetched_lines(name: str, got: dict) -> str:
    """What `tunegate fetch` prints: where each part landed, and the one call that loads it."""
    origin = f"base {got['base_model']}@{got['base_revision']}"
    if got["model"]:  # a fully fine-tuned model: no base to load it with
        return (
            f"{name} v{got['version']}: full model {got['model']} (sha256 checked; trained from {origin})\n"
            "load: from tunegate.registry import load; model, tokenizer = load("
            f"{{'model': {got['model']!r}, 'tokenizer': {got['tokenizer']!r}, 'base_model': {got['base_model']!r}}})\n"
            f"or in plain transformers: AutoModelForCausalLM.from_pretrained({got['model']!r}), "
            f"AutoTokenizer.from_pretrained({got['tokenizer']!r})"
        )
    return (
        f"{name} v{got['version']}: {got['kind']} adapter {got['adapter']}\n"
        f"{origin}: {got['base']} (sha256 checked)\n"
        "load: from tunegate.registry import load; model, tokenizer = load("
        f"{{'adapter': {got['adapter']!r}, 'tokenizer': {got['tokenizer']!r}, 'base': {got['base']!r}, "
        f"'base_model': {got['base_model']!r}}})"
    )


@app.command()
def status(params: Path | None = PARAMS, tracking_uri: str | None = TRACKING, model: str | None = MODEL) -> None:
    """Registered versions with gate verdict, base revision, data hash; * marks the champion."""
    from tunegate.registry import versions_table

    try:
        reg, c = _registry(params, tracking_uri, model)
        rows = versions_table(c, reg.model_name, reg.alias)
    except UserError as err:
        fail(err)
    if not rows:
        typer.echo(f"{reg.model_name}: no versions registered yet (run `dvc repro`)")
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{reg.model_name} ({reg.tracking_uri})")
    for col in rows[0]:
        table.add_column(col)
    for row in rows:
        table.add_row(*map(str, row.values()))
    Console().print(table)


@app.command()
def show(
    version: str, params: Path | None = PARAMS, tracking_uri: str | None = TRACKING, model: str | None = MODEL
) -> None:
    """The provenance record of one version: base, data, hyperparameters, evals, gate, code."""
    try:
        reg, c = _registry(params, tracking_uri, model)
        from mlflow.exceptions import MlflowException

        try:
            v = c.get_model_version(reg.model_name, version)
        except MlflowException:
            raise UserError(f"{reg.model_name} v{version}: no such version (see `tunegate status`)") from None
    except UserError as err:
        fail(err)
    groups: dict[str, list[tuple[str, str]]] = {}
    for key, value in sorted(v.tags.items()):
        group = key.split(".")[0] if "." in key else "model"
        groups.setdefault(group, []).append((key, value))
    typer.echo(f"{reg.model_name} v{v.version}  run {v.run_id}  source {v.source}")
    titles = {
        "model": "identity",
        "source": "data sources",
        "hp": "hyperparameters",
        "eval": "evaluation",
        "pkg": "packages",
        "promotion_log": "promotions",
    }
    for group in ("model", "source", "eval", "hp", "pkg", "promotion_log"):
        if group in groups:
            typer.echo(f"\n[{titles[group]}]")
            for key, value in groups[group]:
                typer.echo(f"  {key:44} {value}")


def diff_lines(result: dict, show: int) -> list[str]:
    """Per task and metric: the two means, how many items were lost and won, and the first `show` of each."""

    def clip(text) -> str:
        text = " ".join(str(text if text is not None else "–").split())
        return text if len(text) <= 140 else text[:140] + "…"

    lines = [f"{result['a']} -> {result['b']}"]
    for c in result["checks"]:
        lines.append(
            f"{c['task']}/{c['metric']}: {c['a']:.3f} -> {c['b']:.3f} (n={c['n']}; lost {len(c['lost'])}, "
            f"won {len(c['won'])})"
        )
        for kind in ("lost", "won"):
            for item in c[kind][:show]:
                lines += [
                    f"  {kind} doc {item['doc_id']}: {item['reference_score']:.3f} -> {item['candidate_score']:.3f}",
                    f"    prompt:    {clip(item['prompt'])}",
                    f"    reference: {clip(item['target'])}",
                    f"    {result['a']}: {clip(item['reference_output'])}",
                    f"    {result['b']}: {clip(item['candidate_output'])}",
                ]
            if len(c[kind]) > show:
                lines.append(f"  … {len(c[kind]) - show} more {kind} (--show N, or --json FILE for all)")
    return lines


@app.command()
def diff(  # noqa: PLR0913 - one parameter per command-line option
    a: str = typer.Argument(..., help="version number or alias, or `base` / `base@VERSION` (a version's base)"),
    b: str = typer.Argument("champion", help="version number or alias"),
    task: str | None = typer.Option(None, "--task", help="only this task"),
    show: int = typer.Option(5, "--show", help="items listed per task for each direction"),
    json_out: Path | None = typer.Option(None, "--json", help="write every flipped item to this JSON file"),
    params: Path | None = PARAMS,
    tracking_uri: str | None = TRACKING,
    model: str | None = MODEL,
) -> None:
    """The items that flipped from A to B (lost and won), with prompt, reference and both outputs, on every task
    both were scored on."""
    from tunegate.io import write_json
    from tunegate.registry import diff as compare

    try:
        reg, c = _registry(params, tracking_uri, model)
        result = compare(c, reg.model_name, a, b)
        if task:
            result["checks"] = [x for x in result["checks"] if x["task"] == task]
            if not result["checks"]:
                raise UserError(f"--task {task}: not scored on both {result['a']} and {result['b']}")
    except UserError as err:
        fail(err)
    if json_out:
        write_json(json_out, result)
    typer.echo("\n".join(diff_lines(result, show)))


@app.command()
def promote(
    version: str,
    reason: str = typer.Option("manual promotion", help="recorded with the move"),
    params: Path | None = PARAMS,
    tracking_uri: str | None = TRACKING,
    model: str | None = MODEL,
) -> None:
    """Make VERSION the champion (refused unless its gate passed and its files match the recorded sha256)."""
    from tunegate.registry import move_champion

    try:
        reg, c = _registry(params, tracking_uri, model)
        prev = move_champion(c, reg.model_name, version, reason, reg.alias)
    except UserError as err:
        fail(err)
    if prev == str(version):
        typer.echo(f"{reg.alias}: v{version} already")
        return
    typer.echo(f"{reg.alias}: v{prev} -> v{version}" if prev else f"{reg.alias}: v{version} (no {reg.alias} before)")


@app.command()
def rollback(
    reason: str = typer.Option("rollback", help="recorded with the move"),
    params: Path | None = PARAMS,
    tracking_uri: str | None = TRACKING,
    model: str | None = MODEL,
) -> None:
    """Move the champion back to the version it replaced; repeated, walks the promotion history backwards."""
    from tunegate.registry import rollback as roll_back

    try:
        reg, c = _registry(params, tracking_uri, model)
        moved_from, moved_to = roll_back(c, reg.model_name, reason, reg.alias)
    except UserError as err:
        fail(err)
    typer.echo(f"{reg.alias}: v{moved_from} -> v{moved_to} (v{moved_from} marked rolled back)")


@app.command()
def reproduce(
    version: str,
    workdir: Path | None = typer.Option(None, help="empty folder for the re-run (default: a new temp folder)"),
    from_scratch: bool = typer.Option(
        False, help="rebuild every stage instead of restoring upstream stages from the DVC cache"
    ),
    params: Path | None = PARAMS,
) -> None:
    """Re-run VERSION's training from its recorded commit and params; report whether the adapter sha256 matches."""
    import tempfile

    from tunegate.registry import reproduce as reproduce_version

    try:
        reg, c = _registry(params)
        folder = workdir or Path(tempfile.mkdtemp(prefix=f"tunegate-v{version}-"))
        typer.echo(f"reproducing {reg.model_name} v{version} in {folder} ...")
        result = reproduce_version(c, reg.model_name, version, Path.cwd(), folder, share_cache=not from_scratch)
    except UserError as err:
        fail(err)
    verdict = "MATCH" if result["match"] else "MISMATCH"
    typer.echo(
        f"{verdict}: recorded adapter {result['recorded'][:16]}  "
        f"reproduced {result['reproduced'][:16]}  (commit {result['commit'][:12]})"
    )
    typer.echo(f"compared: {result['comparison']}")
    if not result["match"]:
        raise typer.Exit(1)


@app.command()
def deploy(
    root: Path = typer.Option(Path("."), help="project root"),
    interval: float = typer.Option(600, help="seconds between checks of the base model for a new revision"),
    cron: str = typer.Option("0 3 * * *", help="the retrain deployment's own schedule"),
    track: str | None = typer.Option(
        None, help="branch of base.model to follow (default: base.revision; main if pinned)"
    ),
    notify: str | None = typer.Option(None, help="Prefect notification block for rejected retrains (slack-webhook/ml)"),
    pool: str | None = typer.Option(
        None, help="work pool whose workers run the flows (stored on the server; default: served from here)"
    ),
) -> None:
    """Serve the retraining loop against PREFECT_API_URL: base watcher (interval), retrain (on its event + cron).

    With --pool, the deployments (and the pipeline's) go to that work pool's workers and this returns."""

    # The deployments are defined once, in flows/deploy.py; this command is their launcher (the library
    # does not import flows). The flows import `flows` and `tunegate` from the project root.
    project = root.resolve()
    args = [sys.executable, "-m", "flows.deploy", "--root", str(project), "--interval", str(interval), "--cron", cron]
    args += ["--track", track] if track else []
    args += ["--notify", notify] if notify else []
    args += ["--pool", pool] if pool else []
    path = os.environ.get("PYTHONPATH")
    os.chdir(project)
    os.execve(sys.executable, args, {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(project), path]))})


@app.command()
def warm(
    socket: Path = typer.Argument(Path(DEFAULT_SOCKET), help="the Unix socket to listen on"),
) -> None:
    """Keep the stages' libraries imported, so each stage `dvc repro` runs starts in a fraction of a second.

    Run it in the background, export the TUNEGATE_WARM line it prints, then `dvc repro` as usual; Ctrl-C stops it."""
    from tunegate.warm import main as serve_warm

    serve_warm(str(socket))


@app.command(hidden=True)
def serve(
    cron: str = typer.Option("0 3 * * *", help="the retrain deployment's own schedule"),
    root: Path = typer.Option(Path("."), help="project root"),
) -> None:
    """Former name of `tunegate deploy`."""
    deploy(root=root, interval=600, cron=cron, track=None, notify=None, pool=None)


# Commands other packages add to this CLI (the embedded demo's `demo-base` and `demo-data`): each entry point of
# the group is a function that takes the app. The library names no such package, so nothing here imports upward.
PLUGINS = "tunegate.commands"


def load_plugins() -> typer.Typer:
    """Add the commands of every `tunegate.commands` entry point to the app (once); returns the app."""
    from importlib.metadata import entry_points

    if not getattr(app, "_plugins_loaded", False):
        for entry in entry_points(group=PLUGINS):
            entry.load()(app)
        app._plugins_loaded = True
    return app


team = typer.Typer(no_args_is_help=True, help="The team setup (infra/compose's services) on this machine, no Docker.")
app.add_typer(team, name="team")


@team.command("up")
def team_up(
    home: Path = typer.Option(Path(".team"), "--dir", help="folder for the servers' data, logs, secrets"),
) -> None:
    """Start PostgreSQL, MLflow (basic auth; model files on disk behind its proxy), Prefect, a worker on 127.0.0.1."""
    from tunegate.team import up

    try:
        up(home)
    except UserError as err:
        fail(err)


def main() -> None:  # pragma: no cover - console entry point
    load_plugins()()


if __name__ == "__main__":  # pragma: no cover
    main()
