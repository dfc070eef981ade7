"""`tunegate init`: set the project up for your base model, your data and an eval of your task.

    tunegate init --model Qwen/Qwen2.5-0.5B-Instruct --data data/my_tickets.jsonl
    tunegate init --model /models/llama --data a.jsonl --data b.jsonl --general general.parquet --preferences p.jsonl

What it writes, from what it reads:
- **A held-out eval of your task**, carved from your domain data before dedup and mixing: `eval_size`
  conversations (seeded; stratified by a label where the answers have one: a JSON key with few
  values, `--label`, or the answer itself when the answers are short labels), written to
  `evals/data/<task>.jsonl` as the last user turn + its answer, with the row's system turn and earlier
  exchanges where it has them (asked before the item, as in training). They stay in your file; `dedup` removes them from
  training as `eval_leak` (its decontamination reads evals/data), so they can never be trained on.
- **An lm-eval task** `evals/tasks/<task>.yaml` with a scorer chosen from the answers: JSON objects →
  field by field against the reference's own keys (`json_fields`); short answers → `exact`; free text →
  `chrf` (and `rouge_l`). It stops generation at the template's end-of-turn text.
- **A gate policy** `evals/gates.yaml`: the target check on that task, forgetting checks on general
  tasks (lm-eval built-ins for real models: arc_easy, hellaswag; or any local task), champion rule, and
  the rule that the candidate beats the baselines.
- **Baselines** (params.yaml `baselines:`) on the target task, and `evals/prompt.md`, a starting prompt written
  from the answers (their JSON keys, their labels or their length): the cheaper alternatives the fine-tune
  must beat (docs/gate.md#baselines).
- **params.yaml**: the base, the sources, settings for a real model (SFT lr 2e-4, DPO lr 5e-6, 2 epochs,
  LoRA r 16 / alpha 32 / dropout 0.05, gradient checkpointing above 1B parameters; bf16 and TF32 come
  with a CUDA device), `validate.max_tokens` and `train.args.max_length` covering your longest row
  under the base's own tokenizer and chat template, and `eval.max_gen_toks` covering the longest answer.
- **dvc.yaml**: every data file you named becomes a dependency of `validate`, so `dvc repro` re-runs
  when it changes.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from tunegate.errors import UserError
from tunegate.io import write_jsonl, write_text
from tunegate.paths import DVC_YAML, PARAMS

# lm-eval built-in tasks that make good forgetting checks, and the metric each is gated on.
BUILTIN_METRIC = {
    "arc_easy": "acc",
    "arc_challenge": "acc_norm",
    "hellaswag": "acc_norm",
    "piqa": "acc",
    "winogrande": "acc",
    "boolq": "acc",
    "openbookqa": "acc_norm",
    "mmlu": "acc",
    "gsm8k": "exact_match",
}
DEFAULT_GENERAL = ("arc_easy", "hellaswag")
EMBEDDED_GENERAL = "data/raw/general.jsonl"  # the demo's general instruction set, the mix's default guard
MIN_EVAL = 30  # the gate's min_items: fewer eval items decide nothing
LABEL_VALUES = 20  # a JSON key with 2..this many values across answers is a label to stratify by
BIG_MODEL = 1_000_000_000  # parameters above which gradient checkpointing is on


@dataclass
class Plan:
    """What init decided, for the summary it prints."""

    lines: list[str] = field(default_factory=list)
    written: list[str] = field(default_factory=list)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "data"


class _Item(NamedTuple):
    """A held-out eval item: a plain conversation's last user turn and the answer to it, with the row's system text
    ("" for none) and its earlier exchanges ({"user", "assistant"} texts, as the row had them)."""

    prompt: str
    answer: str
    system: str
    history: list[dict[str, str]]


def _exchange(row: dict[str, Any]) -> _Item | None:
    """The eval item a row gives: a plain conversation (an optional system turn, then user and assistant turns in
    turn, text only, no tools) asked its last user turn; None for any other row."""
    msgs = row.get("messages") or []
    if row.get("tools") or any(len(m) > 2 for m in msgs):
        return None
    system = msgs[0]["content"] if msgs and msgs[0]["role"] == "system" else ""
    turns = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
    if not turns or len(turns) % 2 or any(m["role"] != ("user", "assistant")[k % 2] for k, m in enumerate(turns)):
        return None
    if not all(isinstance(m["content"], str) for m in msgs):
        return None
    user, answer = turns[-2]["content"].strip(), turns[-1]["content"].strip()
    users, replies = turns[:-2:2], turns[1:-2:2]
    history = [{"user": u["content"], "assistant": a["content"]} for u, a in zip(users, replies, strict=True)]
    return _Item(user, answer, system, history) if user and answer else None


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def pick_label(answers: list[str], label: str | None) -> str | None:
    """The JSON key to stratify by: `label` if given (it must be in every answer), else a key every
    answer has with 2..LABEL_VALUES distinct values (the one with fewest values), else None."""
    objects = [_json_object(a) for a in answers]
    if any(o is None for o in objects) or not objects:
        if label:
            raise UserError(f"--label {label}: the answers are not all JSON objects, so there is no field to read")
        return None
    if label:
        missing = sum(label not in o for o in objects)
        if missing:
            raise UserError(f"--label {label}: missing from {missing} of {len(objects)} answers")
        return label
    common = set.intersection(*(set(o) for o in objects))
    counts = {k: len({json.dumps(o[k], sort_keys=True) for o in objects}) for k in common}
    fits = [k for k, n in counts.items() if 2 <= n <= LABEL_VALUES]
    return min(fits, key=lambda k: (counts[k], k)) if fits else None


ANSWER = "(the answer)"  # stratify by the answer itself: short labels (billing, shipping, ...), a classification


def short_labels(answers: list[str]) -> bool:
    """Answers that are class labels: not JSON objects, 2..LABEL_VALUES distinct values of a few words each."""
    values = {a.strip() for a in answers}
    return (
        2 <= len(values) <= LABEL_VALUES
        and all(_json_object(a) is None for a in values)
        and all(len(a.split()) <= 3 for a in values)
    )


def carve(items: list[tuple[str, ...]], size: int, seed: int, label: str | None) -> list[int]:
    """Indices of `size` items ((prompt, answer, ...) each), seeded; proportional per label value (largest remainder)
    when a label is given (a JSON key, or ANSWER: the answer itself), so rare classes are in the eval too."""
    rng = random.Random(seed)
    if not label:
        return sorted(rng.sample(range(len(items)), size))
    groups: dict[str, list[int]] = defaultdict(list)
    for i, (_, answer, *_) in enumerate(items):
        value = answer.strip() if label == ANSWER else json.dumps(_json_object(answer)[label], sort_keys=True)
        groups[value].append(i)
    quotas = {k: size * len(v) / len(items) for k, v in groups.items()}
    take = {k: math.floor(q) for k, q in quotas.items()}
    for k in sorted(groups, key=lambda k: (take[k] - quotas[k], k))[: size - sum(take.values())]:
        take[k] += 1
    chosen = [i for k in sorted(groups) for i in rng.sample(groups[k], min(take[k], len(groups[k])))]
    return sorted(chosen)


# File and folder names that say nothing about the task: the task is named after the next folder up instead
GENERIC_NAMES = {
    "train", "training", "data", "dataset", "datasets", "raw", "all", "test", "valid", "validation", "dev",
    "export", "exports", "output", "file", "chat", "messages", "sft", "jsonl", "input", "final", "clean",
}  # fmt: skip


def _telling_name(path: str) -> str | None:
    """The data file's name, or the first folder's above it whose name says more than `train` or `data`
    (data/support/train.jsonl -> support); None when none does."""
    p = Path(path)
    for name in (p.stem, p.parent.name, p.parent.parent.name):  # the file, its folder and the one above
        if re.search(r"[A-Za-z0-9]", name) and _slug(name) not in GENERIC_NAMES:
            return name
    return None


def task_name(path: str) -> str:
    """`<name>_gen` after the data (`_telling_name`); `target_gen` when nothing in its path says what it is."""
    name = _telling_name(path)
    return f"{name}_gen" if name else "target_gen"


def source_name(path: str, taken: Iterable[str]) -> str:
    """A data.sources name for a file: what `_telling_name` finds, else the file's own name, with _2, _3, ... where
    another source has it already (two exports both called train.jsonl are two sources, not one)."""
    name, taken = _slug(_telling_name(path) or Path(path).stem), set(taken)
    n = 1
    while (unique := name if n == 1 else f"{name}_{n}") in taken:
        n += 1
    return unique


def scorer(answers: list[str]) -> tuple[str, list[str], str]:
    """(utils function, metrics it reports, metric the gate checks) for these reference answers."""
    if all(_json_object(a) is not None for a in answers):
        return "json_fields", ["json_exact", "json_fields"], "json_fields"
    words = sorted(len(a.split()) for a in answers)
    if words[len(words) // 2] <= 3:
        return "exact", ["exact"], "exact"
    return "text_overlap", ["chrf", "rouge_l"], "chrf"


def end_of_turn(tokenizer) -> str:
    """The text the chat template puts after an assistant turn (`<|im_end|>`, `<|eot_id|>`, ...)."""
    from tunegate.chat import Renderer

    marker = "tgAnswerMarker"
    try:
        text = Renderer(tokenizer)([{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}])
    except Exception:  # noqa: BLE001 - no usable template: lm-eval stops at the tokenizer's EOS alone
        return ""
    tail = text[text.index(marker) + len(marker) :] if marker in text else ""
    return tail.strip().split()[0] if tail.strip() else ""


def task_yaml(  # noqa: PLR0913 - the settings of one lm-eval task file
    task: str,
    data: str,
    function: str,
    metrics: list[str],
    until: list[str],
    source: str,
    *,
    system: bool = False,
    earlier: int = 0,
) -> str:
    """An lm-eval task of held-out rows: each item's prompt, and with `system` its row's system turn (lm-eval's
    `description` naming the items' `system` field: a system message before the prompt, as in training). With
    `earlier` (the most earlier exchanges an item has), each item's `history` comes before its prompt as the turns
    its row had: lm-eval's few-shot turns, drawn by `utils.EarlierTurns` from the item itself, not from others."""
    lines = [
        f"# Target skill: {task}, held out from {source} by `tunegate init` (prompt -> answer"
        f"{', after the earlier turns of its conversation' if earlier else ''}).",
        f"# Scored by utils.{function}.",
        "include: _common.yaml",
        f"task: {task}",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {data}",
        "output_type: generate_until",
        'doc_to_text: "{{prompt}}"',
        'doc_to_target: "{{answer}}"',
        *(["description: system  # each item's system turn, as its row had it"] if system else []),
        *(
            [
                f"num_fewshot: {earlier}  # at most this many earlier exchanges: each item's own, as its row had them",
                "fewshot_split: test",
                "fewshot_config:",
                "  sampler: !function utils.EarlierTurns",
            ]
            if earlier
            else []
        ),
        'target_delimiter: ""',
        "generation_kwargs:",
        f"  until: {json.dumps(until)}",
        "  do_sample: false",
        f"process_results: !function utils.{function}",
        "metric_list:",
    ]
    for m in metrics:
        lines += [f"  - metric: {m}", "    aggregation: mean", "    higher_is_better: true"]
    return "\n".join(lines) + "\n"


def policy_yaml(task: str, metric: str, general: list[tuple[str, str]], items: int) -> str:
    lines = [
        "# Gate policy written by `tunegate init`: the candidate must improve the target task over the base",
        "# and must not forget the general tasks (one-sided paired bootstrap bounds at `confidence`).",
        "confidence: 0.95",
        f"min_items: {min(MIN_EVAL, items)}",
        "checks:",
        f"  - {{task: {task}, metric: {metric}, role: target, min_gain: 0.02}}",
    ]
    lines += [f"  - {{task: {t}, metric: {m}, role: general, margin: 0.02}}" for t, m in general]
    lines += ["champion:", "  beat_on_target: true", "  margin: 0.01"]
    lines += [
        "# The candidate must also beat the base given the cheaper alternatives (params.yaml `baselines:`: the",
        "# instructions in evals/prompt.md, few-shot and retrieved examples) on the target task: fine-tuning is",
        "# justified only by what prompting cannot do. `beat: false` (or baselines.tasks: []) turns this off.",
        "baselines:",
        "  beat: true",
        "  min_gain: 0.0",
    ]
    return "\n".join(lines) + "\n"


def starting_prompt(answers: list[str], metric: str) -> str:
    """The instructions of the prompt baseline, written from the held-out answers: the JSON keys they use, the labels
    they choose from, or their typical length. A start: the user edits it as they would a production prompt."""
    if metric == "json_fields":
        keys = sorted(set.union(*(set(_json_object(a)) for a in answers)))
        return f"Reply with one JSON object with the keys {', '.join(keys)}, and nothing else."
    labels = sorted({a.strip() for a in answers})
    if metric == "exact" and len(labels) <= LABEL_VALUES * 2:
        return f"Reply with exactly one of: {', '.join(labels)}."
    if metric == "exact":
        return "Reply with the answer only, in a few words."
    words = sorted(len(a.split()) for a in answers)[len(answers) // 2]
    return f"Answer the user's message helpfully and concisely, in about {words} words."


def add_validate_deps(text: str, paths: list[str]) -> str:
    """dvc.yaml with `paths` added to the validate stage's deps (text edit: comments stay)."""
    lines = text.splitlines(keepends=True)
    try:
        start = next(i for i, line in enumerate(lines) if re.match(r"^  validate:\s*$", line))
        deps = next(i for i in range(start, len(lines)) if re.match(r"^    deps:\s*$", lines[i]))
    except StopIteration:
        raise UserError(f"{DVC_YAML}: no `validate:` stage with `deps:`; add the data files to it by hand") from None
    end = deps + 1
    while end < len(lines) and lines[end].startswith("      - "):
        end += 1
    present = {line.strip()[2:].strip() for line in lines[deps + 1 : end]}
    new = [f"      - {p}\n" for p in paths if p not in present]
    return "".join(lines[:end] + new + lines[end:])


def _general_checks(names: list[str], tasks_dir: Path) -> list[tuple[str, str]]:
    from tunegate.consistency import local_task_info

    local = local_task_info(tasks_dir, tasks_dir.parent.parent)
    out = []
    for spec in names:
        name, _, metric = spec.partition(":")
        if not metric:
            if name in local and local[name].metrics:
                metric = sorted(local[name].metrics)[0]
            elif name in BUILTIN_METRIC:
                metric = BUILTIN_METRIC[name]
            else:
                raise UserError(
                    f"--general-tasks {name}: its metric is not known here; name it as {name}:<metric> "
                    f"(known: {', '.join(sorted(BUILTIN_METRIC))} and the tasks in {tasks_dir})"
                )
        out.append((name, metric))
    return out


def _measure(tokenizer, rows: list[dict[str, Any]]) -> tuple[int, list[str]]:
    """(the longest row's tokens under the chat template, what init says of the template): a template that refuses
    a system turn is measured as validate will train it (`fold_system`); rows it refuses otherwise are left out of
    the measure, counted (validate quarantines them as template_refused)."""
    from tunegate.chat import Renderer, first_line, fold_system, system_refusal, token_count

    render = Renderer(tokenizer)
    no_system = system_refusal(render)
    longest, folded, refused, why = 0, 0, 0, ""
    for r in rows:
        messages = fold_system(r["messages"]) if no_system else r["messages"]
        folded += messages is not r["messages"]
        try:
            longest = max(longest, token_count(tokenizer, render, messages, r.get("tools")))
        except Exception as err:  # raise_exception in the template, or any error rendering
            refused, why = refused + 1, why or first_line(err)
    if refused == len(rows) and rows:
        raise UserError(
            f"the chat template refuses every row of your data ({why}); "
            "see docs/data.md#chat-templates-that-refuse-a-role-order"
        )
    said = []
    if folded:
        said.append(
            f"the chat template refuses a system turn ({no_system}): validate folds it into the first user turn"
        )
    if refused:
        said.append(f"the chat template refuses {refused} of {len(rows)} rows ({why}): validate quarantines them")
    return longest, said


def _round_up(n: int, step: int = 64) -> int:
    return -(-n // step) * step


def _relative(path: str, root: Path) -> str:
    """A path as params.yaml and dvc.yaml name it: relative to the project when inside it, else absolute."""
    p = Path(path)
    if not p.is_absolute():
        return path
    try:
        return str(p.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(p.resolve())


def init(  # noqa: PLR0913 - one keyword per `tunegate init` option, as the CLI and the docs name them
    model: str,
    data: list[str],
    general: list[str] | None = None,
    preferences: list[str] | None = None,
    *,
    task: str | None = None,
    eval_size: int | None = None,
    label: str | None = None,
    general_tasks: list[str] | None = None,
    revision: str = "main",
    root: Path | str = ".",
    force: bool = False,
) -> Plan:
    """Set the project up for `model` and `data`: the held-out eval and its task, the gate policy, params.yaml
    sized for the model and data, the data files as validate's dependencies. Returns what was written and why."""
    root, plan = Path(root), Plan()
    params = _open_project(root, force)
    if not data:
        raise UserError("--data: name at least one file of your domain data")
    tokenizer = _tokenizer(model, revision, params)
    rows = _domain_rows(data, plan)
    held = _hold_out(rows, data, params, tokenizer, root, plan, task=task, eval_size=eval_size, label=label)
    general_checks = _general_checks(list(general_tasks or DEFAULT_GENERAL), root / params["paths"]["evals"] / "tasks")
    policy_file = params.get("gate", {}).get("policy", "evals/gates.yaml")
    write_text(root / policy_file, policy_yaml(held.task, held.metric, general_checks, held.size))
    plan.written.append(policy_file)
    sources = _sources(data, general, preferences, root, plan)
    second, answered = _preference_method(preferences or [], plan)
    measured = rows + answered  # validate.max_tokens must hold the preference rows too, each answer after its prompt
    _write_params(root, params, plan, model, revision, sources, tokenizer, measured, held, general_checks, second)
    dvc_yaml = root / DVC_YAML
    from tunegate.readers import dependency

    tracked = [
        dependency(p["path"]) for p in sources.values() if not p["path"].startswith(params["paths"]["raw"] + "/")
    ]
    write_text(dvc_yaml, add_validate_deps(dvc_yaml.read_text(encoding="utf-8"), tracked))
    plan.written.append(str(DVC_YAML))
    return plan


def _open_project(root: Path, force: bool) -> dict[str, Any]:
    """params.yaml of a project that init may (re)write, or one line saying why not."""
    import yaml

    params_path = root / PARAMS
    if not params_path.is_file() or not (root / DVC_YAML).is_file():
        raise UserError(
            f"{root.resolve()}: not a tunegate project (no {PARAMS} and {DVC_YAML}); run `tunegate init` in a "
            "clone of the project, which holds the stages, the eval tasks and the embedded general data"
        )
    params = yaml.safe_load(params_path.read_text(encoding="utf-8"))
    if params.get("base", {}).get("model") != "demo" and not force:
        raise UserError(
            f"{params_path}: already set up for {params['base']['model']}; `tunegate init --force` writes it again"
        )
    return params


def _each_once(paths: list[str]) -> list[str]:
    """The paths in order, each file once (the first way it was named)."""
    first: dict[Path, str] = {}
    for path in paths:
        first.setdefault(Path(path).resolve(), path)
    return list(first.values())


def _domain_rows(data: list[str], plan: Plan) -> list[dict[str, Any]]:
    """The domain rows, normalised as validate will read them (the eval is carved from them)."""
    from tunegate.formats import load_source, source_kind

    rows: list[dict[str, Any]] = []
    for path in _each_once(data):  # a file named twice is read once (`_sources` says so)
        source_kind(path)  # a missing file or an unsupported type: one line
        got, problems, _ = load_source(_slug(Path(path).stem), path)
        rows += got
        if problems:
            plan.lines.append(f"{path}: {len(problems)} unreadable rows (validate will quarantine them with reasons)")
    return rows


@dataclass(frozen=True)
class _HeldOut:
    """The target eval carved from the domain rows: its task name, size, answers and the gate's metric."""

    task: str
    size: int
    answers: list[str]
    metric: str


def _hold_out(  # noqa: PLR0913 - the rows, the project, and the init options it reads
    rows: list[dict[str, Any]],
    data: list[str],
    params: dict[str, Any],
    tokenizer,
    root: Path,
    plan: Plan,
    *,
    task: str | None,
    eval_size: int | None,
    label: str | None,
) -> _HeldOut:
    """Carve the held-out eval (stratified by a label when the answers have one) and write it with its task."""
    seed = int(params.get("seed", 0))
    items = [item for r in rows if (item := _exchange(r))]
    size = eval_size or min(200, max(MIN_EVAL, len(items) // 10))
    if len(items) < size + MIN_EVAL:
        tools = sum(bool(r.get("tools") or any(m.get("tool_calls") for m in r.get("messages") or [])) for r in rows)
        raise UserError(
            f"--data: {len(items)} rows are plain conversations (user and assistant turns in turn, text only), too few "
            f"to hold out {size} for the eval and train on the rest"
            + (f" ({tools} rows have tools or tool calls, which are not held out)" if tools else "")
            + "; add data or lower --eval-size"
        )
    key = pick_label([item.answer for item in items], label)
    if key is None and label is None and short_labels([item.answer for item in items]):
        key = ANSWER
    chosen = carve(items, size, seed, key)
    task = _slug(task or task_name(data[0]))
    answers = [items[i].answer for i in chosen]
    function, metrics, metric = scorer(answers)
    eval_file = f"{params['paths']['evals']}/data/{task}.jsonl"
    held = [items[i] for i in chosen]
    system, earlier = _write_items(root / eval_file, task, held, key)
    plan.written.append(eval_file)
    stop = end_of_turn(tokenizer)
    until = [s for s in (stop, "\n" if all("\n" not in a for a in answers) else "") if s]
    task_file = root / params["paths"]["evals"] / "tasks" / f"{task}.yaml"
    write_text(
        task_file, task_yaml(task, eval_file, function, metrics, until, ", ".join(data), system=system, earlier=earlier)
    )
    plan.written.append(str(task_file.relative_to(root)))
    how = (
        "stratified by the answer (short labels)" if key == ANSWER else f"stratified by {key!r}" if key else "uniformly"
    )
    multi = sum(bool(item.history) for item in held)
    asked = [*(["its system turn"] if system else []), *([f"its earlier turns ({multi} items)"] if multi else [])]
    plan.lines.append(
        f"eval: held out {size} of {len(items)} conversations ({how}, seed {seed}) as {eval_file}"
        f"{', each asked with ' + ' and '.join(asked) if asked else ''}; task "
        f"{task} scored by {', '.join(metrics)}. They stay in your file: dedup drops them from training (eval_leak)"
    )
    return _HeldOut(task, size, answers, metric)


def _write_items(path: Path, task: str, held: list[_Item], key: str | None) -> tuple[bool, int]:
    """The eval items, asked as their rows were: with the row's system turn and earlier exchanges where any item has
    them. Returns (whether any has a system turn, the most earlier exchanges any has)."""
    system = any(item.system for item in held)
    earlier = max(len(item.history) for item in held)
    write_jsonl(
        path,
        [
            {
                "id": f"{task}-{n:04d}",
                "prompt": item.prompt,
                "answer": item.answer,
                **({"system": item.system} if system else {}),
                **({"history": item.history} if earlier else {}),
                **({"label": _json_object(item.answer)[key]} if key and key != ANSWER else {}),
            }
            for n, item in enumerate(held, 1)
        ],
    )
    return system, earlier


def _sources(
    data: list[str], general: list[str] | None, preferences: list[str] | None, root: Path, plan: Plan
) -> dict[str, dict[str, Any]]:
    """data.sources: the domain files, the general ones (the embedded set unless named), the preference files."""
    sources: dict[str, dict[str, Any]] = {}
    named: dict[Path, str] = {}  # each file once, by where it is
    roles = [(p, "domain") for p in data] + [(p, "general") for p in general or [EMBEDDED_GENERAL]]
    for path, role in roles + [(p, "preference") for p in preferences or []]:
        where = Path(path).resolve()
        if (twice := named.get(where)) is not None:
            plan.lines.append(f"{path}: named twice; read once, as the {sources[twice]['role']} source {twice}")
            continue
        name = named[where] = source_name(path, sources)
        sources[name] = {"path": _relative(path, root), "role": role}
    if not general:
        plan.lines.append(
            f"mix: your rows are mixed with the embedded general set ({EMBEDDED_GENERAL}, 20%); "
            "pass --general for your own"
        )
    return sources


def _preference_method(preferences: list[str], plan: Plan) -> tuple[str | None, list[dict[str, Any]]]:
    """(the method after SFT for the preference files, their conversations as validate measures them: each answer
    after its prompt). DPO for pairs, KTO when any file holds labelled answers (prompt, completion, label), which
    only KTO reads (it also reads pairs, each as two labelled answers)."""
    if not preferences:
        return None, []
    from tunegate.formats import PAIR, load_source

    formats, answered = {}, []
    for path in _each_once(preferences):
        rows, _, formats[path] = load_source(_slug(Path(path).stem), path)
        for row in rows:
            answers = [row["chosen"], row["rejected"]] if row["kind"] == PAIR else [row["completion"]]
            answered += [{"messages": row["prompt"] + answer, "tools": row.get("tools")} for answer in answers]
    labelled = [path for path, fmt in formats.items() if fmt == "unpaired"]
    if not labelled:
        return "dpo", answered
    plan.lines.append(
        f"train: sft then kto: {', '.join(labelled)} holds labelled answers, which KTO reads (DPO needs pairs)"
    )
    return "kto", answered


def _write_params(  # noqa: PLR0913 - what params.yaml is sized from, each named where it is used
    root: Path,
    params: dict[str, Any],
    plan: Plan,
    model: str,
    revision: str,
    sources: dict[str, dict[str, Any]],
    tokenizer,
    rows: list[dict[str, Any]],
    held: _HeldOut,
    general_checks: list[tuple[str, str]],
    preferences: str | None,
) -> None:
    """params.yaml for this model and data: lengths measured under the chat template, a real model's settings."""
    import yaml

    longest, said = _measure(tokenizer, rows)
    plan.lines += [f"template: {line}" for line in said]
    max_tokens = max(256, _round_up(int(longest * 1.1) + 1))
    answer_tokens = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for a in held.answers)
    params["base"].update(model=model, revision=revision)
    params["data"] = {"sources": sources}
    params["validate"]["max_tokens"] = max_tokens
    _train_params(params["train"], model, max_tokens, preferences, held)
    params["eval"].update(
        tasks=[held.task, *(t for t, _ in general_checks)],
        max_gen_toks=_round_up(answer_tokens + 8, 16),
        batch_size=8,
    )
    _baselines(root, params, plan, held)
    params["register"]["model_name"] = _slug(f"{Path(model).name}-{held.task}").replace("_", "-")
    # merged weights are checked on the eval's device; GGUF is checked in llama.cpp on the CPU, which for a model
    # of billions of parameters takes hours: opted into (docs/export.md), or exported later with `tunegate export`
    params["export"] = {**params.get("export", {}), "formats": ["merged"]}
    write_text(
        root / PARAMS,
        "# tunegate pipeline parameters, written by `tunegate init` (see README: Using your own model and data).\n"
        + yaml.safe_dump(params, sort_keys=False, allow_unicode=True),
    )
    plan.written.append(str(PARAMS))
    plan.lines.append(
        f"lengths: longest row {longest} tokens under {model}'s chat template"
        f"{' (preference rows included)' if preferences else ''} -> validate.max_tokens and "
        f"train.args.max_length {max_tokens}; eval.max_gen_toks {params['eval']['max_gen_toks']}"
    )


def _train_params(train: dict[str, Any], model: str, max_tokens: int, preferences: str | None, held: _HeldOut) -> None:
    """train: a real model's settings (SFT, or SFT then the preference method), lengths from the data."""
    train.update(method=f"sft+{preferences}" if preferences else "sft", packing="auto")  # auto: where exact and it pays
    train["lora"] = {**train.get("lora", {}), "r": 16, "alpha": 32, "dropout": 0.05}
    after_sft = {"learning_rate": 5.0e-6, "beta": 0.1, "num_train_epochs": 1}  # the sources' preference settings
    train["dpo_args"] = after_sft if preferences == "dpo" else {}
    train["kto_args"] = after_sft if preferences == "kto" else {}
    # ready for `-S train.method=sft+grpo`: rewarded by the held-out task's own scorer
    train["grpo_args"] = {}
    train["grpo"] = {"rewards": [{"scorer": f"{held.task}/{held.metric}"}]}
    train["args"] = {
        "learning_rate": 2.0e-4,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.03,  # a share of the steps (transformers >= 5)
        "num_train_epochs": 2,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 4,
        "max_length": max_tokens,
        "logging_steps": 10,
        "save_steps": 200,
        "eval_steps": 200,
        "per_device_eval_batch_size": 8,
        **({"gradient_checkpointing": True} if _parameters(model) > BIG_MODEL else {}),
    }


def _tokenizer(model: str, revision: str, params: dict[str, Any]):
    """The base's tokenizer (local folder or the Hugging Face cache), with the default chat template
    where it has none; one line when it cannot be had."""
    from tunegate.models import load_tokenizer

    trust = bool(params.get("base", {}).get("trust_remote_code"))
    path = Path(model)
    if path.is_dir():
        try:
            return load_tokenizer({"path": str(path)}, trust)
        except UserError as err:  # the same line, naming the option the user gave rather than base.model
            raise UserError(str(err).replace("check base.model", "check --model")) from None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=trust)
    except Exception as err:  # noqa: BLE001 - offline, unknown id, gated repo: all end the same way
        raise UserError(
            f"--model {model}: not a local folder, and its tokenizer cannot be loaded from the Hugging Face hub or "
            f"cache ({type(err).__name__}); download it first (huggingface-cli download {model}) or pass a folder"
        ) from None
    from tunegate.models import DEFAULT_CHAT_TEMPLATE

    if not tok.chat_template:
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def _parameters(model: str) -> int:
    """Parameter count from config.json, as the memory preflight reads it (0 when there is none to read)."""
    from tunegate.preflight import Shape

    config = Path(model) / "config.json"
    try:
        return Shape.from_config(json.loads(config.read_text())).params if config.exists() else 0
    except (OSError, json.JSONDecodeError, UserError):
        return 0


def _baselines(root: Path, params: dict[str, Any], plan: Plan, held: _HeldOut) -> None:
    """The baselines on the target task, and their starting prompt written from the held-out answers."""
    params["baselines"] = {"tasks": [held.task], "prompt": True, "few_shot": 5, "retrieval": 5}
    prompt_file = params.get("paths", {}).get("prompt", "evals/prompt.md")
    write_text(root / prompt_file, starting_prompt(held.answers, held.metric) + "\n")
    plan.written.append(prompt_file)
    plan.lines.append(
        f"baselines: the base with {prompt_file} (edit it: it is the prompt fine-tuning must beat), with 5 drawn "
        "and with 5 retrieved training rows, on the target task"
    )


def summary(plan: Plan) -> str:
    return "\n".join([*plan.lines, "wrote: " + ", ".join(plan.written), "next: tunegate check && dvc repro"])
