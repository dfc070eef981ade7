"""Checks that params.yaml, the gate policy, the eval tasks and dvc.yaml agree, before any compute.

Each part can be valid on its own and the whole still wrong: a gate check on a task that `eval.tasks`
never runs fails every gate with "no paired samples" after the training was paid for; a data file DVC
does not track changes without `dvc repro` noticing. `tunegate check` reports all of them; the stages
check their own part when they start (validate: the data is tracked; the eval stages: gate and tasks
agree), so a mistake costs one line, not a run.

`problems()` are errors; `warnings()` are settings that are legal but usually a mistake.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunegate.config import Config
from tunegate.errors import UserError
from tunegate.paths import DVC_YAML, Layout

# The stage whose dependencies must cover every data source.
VALIDATE = "validate"


@dataclass(frozen=True)
class TaskInfo:
    """What a local lm-eval task YAML says about itself: its metrics and its data file."""

    metrics: frozenset[str]
    data: Path | None


def _yaml(path: Path) -> dict[str, Any]:
    from tunegate.errors import UserError
    from tunegate.evaluation import task_yaml

    try:
        return task_yaml(path)
    except UserError:
        return {}  # tunegate.evaluation.local_tasks names unreadable task files in one line


def merged_task(path: Path, doc: dict[str, Any]) -> dict[str, Any]:
    """A task YAML with the files it `include:`s under it (lm-eval's inheritance)."""
    merged: dict[str, Any] = {}
    seen = set()
    chain = [doc]
    while isinstance(chain[-1].get("include"), str) and chain[-1]["include"] not in seen:
        seen.add(chain[-1]["include"])
        chain.append(_yaml(path.parent / chain[-1]["include"]))
    for part in reversed(chain):
        merged.update(part)
    return merged


def local_task_info(tasks_dir: Path, root: Path) -> dict[str, TaskInfo]:
    """{task name: TaskInfo} for the YAML files in tasks_dir (following `include:`)."""
    out = {}
    for path in sorted(Path(tasks_dir).glob("*.yaml")):
        doc = _yaml(path)
        if not isinstance(doc.get("task"), str):
            continue
        merged = merged_task(path, doc)
        metrics = frozenset(
            m["metric"] for m in merged.get("metric_list") or [] if isinstance(m, dict) and "metric" in m
        )
        files = (merged.get("dataset_kwargs") or {}).get("data_files") or {}
        split = merged.get("test_split") or "test"
        data = files.get(split) if isinstance(files, dict) else None
        out[doc["task"]] = TaskInfo(metrics, root / data if isinstance(data, str) else None)
    return out


def _items(path: Path | None) -> int | None:
    if path is None or not path.is_file():
        return None
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def gate_problems(cfg: Config, root: Path | str = ".") -> list[str]:
    """The gate policy against the eval tasks: every check's task runs and reports its metric, and has
    at least `min_items` items."""
    from tunegate.gate import load_policy

    root = Path(root)
    layout = Layout.of(cfg.paths, root)
    policy_path = root / cfg.gate.policy
    policy = load_policy(policy_path)
    local = local_task_info(layout.eval_tasks, root)
    out = []
    for i, check in enumerate(policy.checks):
        where = f"{cfg.gate.policy}: checks[{i}] ({check.task}/{check.metric})"
        if check.task not in cfg.eval.tasks:
            out.append(
                f"{where}: task {check.task!r} is not in eval.tasks {list(cfg.eval.tasks)}, so the gate would "
                "have no samples for it; add it to eval.tasks or remove the check"
            )
            continue
        info = local.get(check.task)
        if info is None:
            continue  # a built-in lm-eval task: its metrics are lm-eval's (acc, acc_norm, exact_match, ...)
        if info.metrics and check.metric not in info.metrics:
            out.append(f"{where}: task {check.task} reports {', '.join(sorted(info.metrics))}, not {check.metric!r}")
        n = _items(info.data)
        if n is not None and n < policy.min_items and cfg.eval.limit is None:
            out.append(
                f"{where}: {info.data} has {n} items, fewer than the policy's min_items {policy.min_items}; "
                "the check would always fail (add items or lower min_items)"
            )
    return out


def gate_warnings(cfg: Config, root: Path | str = ".") -> list[str]:
    """Margins finer than one item of their task: the check then turns on a single answer."""
    from tunegate.gate import load_policy

    root = Path(root)
    policy = load_policy(root / cfg.gate.policy)
    local = local_task_info(Layout.of(cfg.paths, root).eval_tasks, root)
    out = []
    for check in policy.checks:
        n = _items(local[check.task].data) if check.task in local else None
        step = 1 / n if n else None
        bound = check.margin if check.role == "general" else check.min_gain
        if step and 0 < bound < step:
            kind = "margin" if check.role == "general" else "min_gain"
            out.append(
                f"{cfg.gate.policy}: {check.task}/{check.metric} {kind} {bound} is finer than one item of {n} "
                f"({step:.3f}): one answer decides it"
            )
    return out


def validate_deps(cfg: Config, root: Path | str = ".") -> list[str]:
    """The validate stage's dependencies as dvc.yaml writes them, with ${...} filled from params.yaml."""
    import yaml

    root = Path(root)
    try:
        stages = yaml.safe_load((root / DVC_YAML).read_text(encoding="utf-8"))["stages"]
        deps = stages[VALIDATE].get("deps") or []
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return []
    paths = cfg.paths.model_dump(by_alias=True)

    def fill(dep: str) -> str:
        for key, value in paths.items():
            dep = dep.replace(f"${{paths.{key}}}", str(value))
        return dep

    return [fill(d) for d in deps if isinstance(d, str)]


def data_problems(cfg: Config, root: Path | str = ".") -> list[str]:
    """Every local data source is a dependency of validate in dvc.yaml (or inside one), so DVC re-runs
    validate and everything after it when the file changes."""
    from tunegate.formats import source_kind
    from tunegate.readers import dependency

    root = Path(root)
    deps = [Path(d) for d in validate_deps(cfg, root)]
    if not deps:
        return []
    out = []
    for name, source in cfg.data.sources.items():
        path = Path(source.path)
        try:
            if source_kind(root / path if not path.is_absolute() else path) == "hub":
                continue
            path = Path(dependency(source.path))
        except Exception:  # a missing file is validate's own one-line error
            continue
        rel = path if not path.is_absolute() else _relative(path, root)
        if rel is None or not any(rel == d or d in rel.parents for d in deps):
            out.append(
                f"data.sources.{name}: {source.path} is not a dependency of the validate stage in {DVC_YAML}, so "
                f"`dvc repro` would not notice it change; add it under stages.validate.deps (tunegate init does)"
            )
    return out


def _relative(path: Path, root: Path) -> Path | None:
    try:
        return path.resolve().relative_to(root.resolve())
    except ValueError:
        return path  # outside the project: dvc.yaml must name it by this absolute path


def length_warnings(cfg: Config) -> list[str]:
    max_length = cfg.train.args.get("max_length")
    if isinstance(max_length, int) and max_length < cfg.validate_.max_tokens and not cfg.train.truncate:
        return [
            f"train.args.max_length {max_length} < validate.max_tokens {cfg.validate_.max_tokens}: rows validate "
            "accepts may be longer than training reads; the train stage counts them and stops unless "
            "train.truncate: true"
        ]
    return []


def export_problems(cfg: Config) -> list[str]:
    """GGUF and Ollama export need llama.cpp (binding and converter): said before training, not after it."""
    import importlib.util

    from tunegate.llamacpp import converter_dir

    if not {"gguf", "ollama"} & set(cfg.export.formats):
        return []
    if importlib.util.find_spec("llama_cpp") is None:
        return ["export.formats gguf/ollama: llama-cpp-python is not installed (`make setup-export`)"]
    try:
        converter_dir()
    except UserError as err:
        return [f"export.formats gguf/ollama: {err}"]
    return []


def baseline_problems(cfg: Config, root: Path | str = ".") -> list[str]:
    """The baselines run on tasks the candidate is scored on too (the gate pairs them), with their instructions."""
    settings = cfg.baselines
    if not settings.names():
        return []
    out = [
        f"baselines.tasks: {task!r} is not in eval.tasks {list(cfg.eval.tasks)}; the gate pairs a baseline with "
        "the candidate on the same items, so add it to eval.tasks or remove it"
        for task in settings.tasks
        if task not in cfg.eval.tasks
    ]
    prompt = Layout.of(cfg.paths, Path(root)).prompt
    if settings.prompt and not prompt.is_file():
        out.append(
            f"{cfg.paths.prompt}: missing; write the instructions a user would give the base model instead of "
            "training (the prompt baseline), or set baselines.prompt: false"
        )
    return out


def baseline_warnings(cfg: Config, root: Path | str = ".") -> list[str]:
    """A baseline task no target check reads: it costs eval time and decides nothing."""
    from tunegate.gate import load_policy

    if not cfg.baselines.names():
        return []
    targets = {c.task for c in load_policy(Path(root) / cfg.gate.policy).checks if c.role == "target"}
    return [
        f"baselines.tasks: {task} is not a target check in {cfg.gate.policy}; its baselines decide nothing"
        for task in cfg.baselines.tasks
        if task in cfg.eval.tasks and task not in targets
    ]


def _builtin_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


# A YAML line naming a task, group or tag (`task: x`, `"task": "x"`), and a key followed by a list of names.
_NAME = rb"['\"]?([\w.-]+)['\"]?"
_NAME_LINE = rb"^['\"]?(task|group|tag)['\"]?:[ \t]*" + _NAME + rb"[ \t]*$"
_NAME_LIST = rb"^['\"]?(?:task|group|tag)['\"]?:[ \t]*\n((?:[ \t]+-[ \t]*" + _NAME + rb"[ \t]*\n)+)"


@functools.cache
def _builtin_index() -> tuple[dict[str, Path], frozenset[str]]:
    """({task name: its YAML}, every task, group and tag name) over lm-eval's built-in task files, from their
    `task:`, `group:` and `tag:` lines (one pass over the files, about a second, once per process): a task whose
    file is not named after it, and the names `unknown_tasks` knows without lm-eval's own index."""
    import re

    line, listed, item = re.compile(_NAME_LINE, re.M), re.compile(_NAME_LIST, re.M), re.compile(rb"-[ \t]*" + _NAME)
    index: dict[str, Path] = {}
    names: set[str] = set()
    for path in sorted(_builtin_tasks_dir().rglob("*yaml")):  # and the `_template_yaml` files tasks include
        text = path.read_bytes()
        for key, name in line.findall(text):
            names.add(name.decode())
            if key == b"task":
                index.setdefault(name.decode(), path)
        for block, _ in listed.findall(text):
            names.update(n.decode() for n in item.findall(block))
    return index, frozenset(names)


def unknown_tasks(tasks: list[str], tasks_dir: Path, local: Container[str]) -> list[str]:
    """The names in `tasks` that are neither local nor built into lm-eval. Names the quick index (`_builtin_index`)
    does not know are asked of lm-eval's own index (about 10 s), so a valid name is never refused."""
    quick = [t for t in tasks if t not in local and t not in _builtin_index()[1]]
    return [t for t in quick if t not in _lm_eval_tasks(str(tasks_dir.resolve()))] if quick else []


@functools.cache
def _lm_eval_tasks(tasks_dir: str) -> frozenset[str]:
    """Every name lm-eval's own index knows, the project's task folder included (about 10 s, once per process)."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager(include_path=tasks_dir if Path(tasks_dir).is_dir() else None).all_tasks)


def unknown_tasks_line(unknown: list[str], tasks_dir: Path) -> str:
    return f"eval.tasks: unknown task(s) {', '.join(unknown)} (not built into lm-eval and not in {tasks_dir})"


def builtin_dataset(task: str) -> tuple[str, str | None] | None:
    """(dataset_path, dataset_name) of one of lm-eval's built-in tasks, read from its YAML without lm-eval's own
    indexing (its file is found by name, else through `_builtin_index`); None for a group or a task whose data is
    not a hub dataset."""
    named = sorted(_builtin_tasks_dir().rglob(f"{task}.yaml"))
    index = _builtin_index()[0]
    candidates = named or ([index[task]] if task in index else [])
    for path in candidates:
        doc = _yaml(path)
        if doc.get("task") != task:
            continue
        merged = merged_task(path, doc)
        if isinstance(merged.get("dataset_path"), str) and "/" in merged["dataset_path"]:
            name = merged.get("dataset_name")
            return merged["dataset_path"], name if isinstance(name, str) else None
    return None


def dataset_cached(path: str) -> bool:
    """Whether a hub dataset is in this machine's Hugging Face caches (the hub's, or the datasets library's)."""
    import os

    from huggingface_hub import constants

    hub = Path(constants.HF_HUB_CACHE) / f"datasets--{path.replace('/', '--')}"
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
    return hub.is_dir() or (datasets_cache / path.replace("/", "___")).is_dir()


def hub_reachable(timeout: float = 2.0) -> bool:
    """False when HF_HUB_OFFLINE / HF_DATASETS_OFFLINE say so, or the hub does not answer within `timeout`."""
    import os
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(flag, "0") not in ("", "0") for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError:
        return False
    return True


def task_data_problems(cfg: Config, root: Path | str = ".") -> tuple[list[str], list[str]]:
    """(problems, warnings) of the eval tasks and their data: a name lm-eval does not know; a local task's data file
    that is missing; a built-in task whose dataset is not in the cache while the hub cannot be reached (eval_base
    would fail, after minutes of retries), or, with the hub reachable, a dataset the first eval will download."""
    root = Path(root)
    layout = Layout.of(cfg.paths, root)
    local = local_task_info(layout.eval_tasks, root)
    unknown = unknown_tasks(cfg.eval.tasks, layout.eval_tasks, local)
    problems = [unknown_tasks_line(unknown, layout.eval_tasks)] if unknown else []
    warned: list[str] = []
    for task in [t for t in cfg.eval.tasks if t not in unknown]:
        if task in local:
            data = local[task].data
            if data is not None and not data.is_file():
                problems.append(f"eval.tasks: {task} reads {data}, which does not exist (dataset_kwargs.data_files)")
            continue
        found = builtin_dataset(task)
        if found is None or dataset_cached(found[0]):
            continue
        where = f"{found[0]}{f' ({found[1]})' if found[1] else ''}"
        fill = f"lm_eval --model hf --model_args pretrained={cfg.base.model} --tasks {task} --limit 1"
        if not hub_reachable():
            problems.append(
                f"eval.tasks: {task} needs the dataset {where}, which is not in the Hugging Face cache, and the hub "
                f"cannot be reached: eval_base would fail; fill the cache once with network access ({fill}), or "
                "use a local task (evals/tasks)"
            )
        else:
            warned.append(f"eval.tasks: {task} downloads {where} at the first eval (not in the cache yet)")
    return problems, warned


def problems(cfg: Config, root: Path | str = ".") -> list[str]:
    return (
        gate_problems(cfg, root)
        + data_problems(cfg, root)
        + export_problems(cfg)
        + baseline_problems(cfg, root)
        + task_data_problems(cfg, root)[0]
    )


def runtime_warnings(cfg: Config) -> list[str]:
    """vLLM asked for (eval.backend, GRPO's use_vllm) where it cannot run: a warning, not a problem (the pipeline
    may run on another machine than `tunegate check`); the stage itself stops in the same line."""
    from tunegate.errors import UserError
    from tunegate.models import require_vllm

    asked = ["eval.backend"] if cfg.eval.backend == "vllm" else []
    asked += ["train.grpo_args.use_vllm"] if cfg.train.grpo_args.get("use_vllm") else []
    out = []
    for setting in asked:
        try:
            require_vllm(setting)
        except UserError as err:
            out.append(f"{err} (the stage stops here unless the pipeline runs on a machine that has them)")
    return out + _kernel_warnings(cfg)


def _kernel_warnings(cfg: Config) -> list[str]:
    """FlashAttention or Liger named in train where they cannot run: the train stage's refusal, as a warning."""
    train = cfg.train
    if train.attn_implementation != "flash_attention_2" and train.kernels != "liger":
        return []
    import torch

    from tunegate.training import attention_plan, kernels_plan

    out = []
    for check in (
        lambda cuda: attention_plan(train.attn_implementation, cuda, sixteen_bit=True),
        lambda cuda: kernels_plan(train.kernels, cuda, model_type=_model_type(cfg)),
    ):
        try:
            check(torch.cuda.is_available())
        except UserError as err:
            out.append(f"{err} (the train stage stops here unless the pipeline runs on a machine that has them)")
    return out


def _model_type(cfg: Config) -> str:
    """base.model's architecture name from a local config.json; where there is none here, llama (what Liger
    covers first), so that only a missing device or package is warned of."""
    config = Path(cfg.base.model) / "config.json"
    try:
        return str(json.loads(config.read_text(encoding="utf-8")).get("model_type") or "llama")
    except (OSError, ValueError):
        return "llama"


def template_warnings(cfg: Config, root: Path | str = ".") -> list[str]:
    """What the base's chat template will do to the data, said before any run: a template that refuses a system turn
    (Gemma's) gets each row's folded into its first user turn, by validate and in every eval. Read from the tokenizer
    files of base.model's folder (or of the base built from it); a hub base's are not fetched here."""
    found = _base_template(cfg, Path(root))
    if found is None:
        return []
    template, special = found
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        compiled = _compile_jinja_template(template)
    except Exception:  # noqa: BLE001 - a template transformers cannot compile is reported by init and the stages
        return []
    from tunegate.chat import system_refusal

    why = system_refusal(lambda messages: compiled.render(messages=messages, add_generation_prompt=False, **special))
    if not why:
        return []
    return [
        f"base.model {cfg.base.model}: its chat template refuses a system turn ({why}): validate folds each row's "
        "system turn into its first user turn, and every eval asks the same way "
        "(docs/data.md#chat-templates-that-refuse-a-role-order)"
    ]


def _base_template(cfg: Config, root: Path) -> tuple[str, dict[str, str]] | None:
    """(chat template, special tokens) from the folder of base.model, or of the base built from it; None when there is
    none here (the demo before it is built, a hub id, a base without a template: init says it uses the default)."""
    from tunegate.training import local_base_dir

    layout = Layout.of(cfg.paths, root)
    try:
        built = json.loads(layout.base_manifest.read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError, AttributeError):
        built = None
    folder = local_base_dir(cfg.base.model, layout.base, built, root)
    if folder is None:
        return None
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    from tunegate.models import saved_chat_template

    try:
        template = saved_chat_template(folder, config)
    except (OSError, UnicodeDecodeError):
        return None
    if isinstance(template, list):  # named templates: the default one is what a chat is rendered with
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str) or not template:
        return None
    special = {
        key: value if isinstance(value, str) else value.get("content", "")
        for key in ("bos_token", "eos_token", "unk_token", "pad_token")
        if isinstance(value := config.get(key), str | dict)
    }
    return template, special


def warnings(cfg: Config, root: Path | str = ".") -> list[str]:
    return (
        gate_warnings(cfg, root)
        + length_warnings(cfg)
        + baseline_warnings(cfg, root)
        + task_data_problems(cfg, root)[1]
        + runtime_warnings(cfg)
        + template_warnings(cfg, root)
    )
