"""Run lm-eval on a model (base, or base + adapter) and keep what the gate needs: scores and per-sample outcomes.

The model is loaded once and every task is evaluated in one `simple_evaluate` call, batched. Prompts
go through the model's chat template (`apply_chat_template=True`), the same rendering the trainer
used. Only deterministic content is written (no timestamps, no host info), so DVC sees identical
outputs for identical inputs.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunegate.config import Eval
from tunegate.errors import UserError, yaml_error
from tunegate.io import atomic_path, write_json, write_jsonl
from tunegate.paths import RESULTS, SAMPLES, jsonl_of

log = logging.getLogger(__name__)

NON_METRIC_KEYS = {
    "doc_id",
    "doc",
    "target",
    "arguments",
    "resps",
    "filtered_resps",
    "filter",
    "metrics",
    "doc_hash",
    "prompt_hash",
    "target_hash",
}


def read_samples(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Per-sample outcomes by task from a folder of `<task>.jsonl` files (an eval output's `samples/`,
    or the copy logged with a registered version)."""
    from tunegate.io import read_jsonl

    return {p.stem: read_jsonl(p) for p in sorted(Path(folder).glob("*.jsonl"))}


def load_samples(eval_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Per-sample outcomes of an eval stage's output folder."""
    return read_samples(Path(eval_dir) / SAMPLES)


PROMPT_CHARS = 2000  # the tail of each item's prompt kept in the samples (where the question is)
TEXT_CHARS = 300  # references and outputs kept in the samples


def _per_sample(sample: dict[str, Any], metrics: list[str]) -> dict[str, Any]:
    """One item's outcome: its metrics, the prompt as the model saw it (rendered, tail), the reference and the
    output (for multiple choice: the choice texts of the target and of the highest log-likelihood)."""
    row: dict[str, Any] = {"doc_id": sample["doc_id"]}
    for m in metrics:
        value = sample.get(m)
        if isinstance(value, (int, float, bool)):
            row[m] = float(value)
    args = [a for a in sample.get("arguments") or [] if isinstance(a, (list, tuple)) and a]
    if args and isinstance(args[0][0], str):
        row["prompt"] = args[0][0][-PROMPT_CHARS:]
    resp = sample.get("filtered_resps")
    target = sample.get("target")
    choices = [a[1] for a in args if len(a) > 1 and isinstance(a[1], str)]
    if resp and isinstance(resp[0], str):
        row["output"] = resp[0][:TEXT_CHARS]
    elif choices and len(choices) == len(resp or []) and all(isinstance(r, (list, tuple)) and r for r in resp):
        row["output"] = choices[max(range(len(resp)), key=lambda i: resp[i][0])][:TEXT_CHARS]
    if isinstance(target, int) and not isinstance(target, bool) and 0 <= target < len(choices):
        target = choices[target]
    if target is not None:
        row["target"] = str(target)[:TEXT_CHARS]
    return row


def merged_in_memory(manifest: dict[str, Any], adapter: Path, trust_remote_code: bool = False):
    """Base + adapter with the adapter folded into the weights, in memory (nothing is written).

    Scores are those of base + adapter to float rounding (the e2e tests compare them), and every
    forward pass costs what the base's does: PEFT's unmerged layers add two small matmuls and a
    Python call per adapted linear layer, about 20% of the demo's eval time. The base is loaded
    unquantised, so a QLoRA adapter is scored on de-quantised weights, as `train.merge` writes it.
    """
    from tunegate.models import load_with_adapter

    return load_with_adapter(manifest, adapter, trust_remote_code, merge=True).eval()


def _tokenizer(path: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def base_tokenizer(pretrained: str, manifest: dict[str, Any], trust_remote_code: bool) -> Any:
    """The base's tokenizer as training saw it (with the default chat template if it has none)."""
    from tunegate.models import load_tokenizer

    return load_tokenizer({**manifest, "path": pretrained}, trust_remote_code)


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 (byte {err.start}); save the task file as UTF-8") from None
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror or type(err).__name__})") from None


class FunctionTag(str):
    """`!function module.name` in a task YAML: the dotted name, relative to the YAML's folder."""


def task_yaml(path: Path) -> dict[str, Any]:
    """One lm-eval task YAML as a mapping (lm-eval's own tags read as nothing, except `!function utils.score`,
    read as the FunctionTag "utils.score", never imported here; a SafeLoader: no arbitrary objects). A file
    lm-eval could not read (not UTF-8, not YAML, not a mapping) ends in one line naming it. The one reader of
    task files: the eval stages, the consistency checks and the rewards (tunegate.rewards)."""
    import yaml

    class Loader(yaml.SafeLoader):
        """Accepts lm-eval's own tags without resolving them."""

    def tag(loader, suffix: str, node):
        if suffix == "function" and isinstance(node, yaml.ScalarNode):
            return FunctionTag(loader.construct_scalar(node))
        return None

    Loader.add_multi_constructor("!", tag)
    try:
        doc = yaml.load(_text(path), Loader=Loader)
    except yaml.YAMLError as err:
        raise yaml_error(path, err) from None
    if doc is not None and not isinstance(doc, dict):
        raise UserError(f"{path}: expected a mapping of lm-eval task settings, got a {type(doc).__name__}")
    return doc or {}


def local_tasks(tasks_dir: Path) -> set[str]:
    """The task names the YAML files in tasks_dir define; an unreadable file ends in one line naming it,
    where lm-eval would skip it and the task would then be reported unknown."""
    names = set()
    for path in sorted(tasks_dir.glob("*.yaml")):
        if path.is_file() and isinstance((doc := task_yaml(path)).get("task"), str):
            names.add(doc["task"])
    return names


def evaluate(
    cfg: Eval,
    manifest: dict[str, Any],
    tasks_dir: Path,
    out_dir: Path,
    seed: int,
    adapter: Path | None = None,
    full_model: Path | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Evaluate and write out_dir/results.json and out_dir/samples/<task>.jsonl. Returns the scores."""
    started = time.perf_counter()  # the model's load counts, as it always has
    tasks = task_set(cfg, tasks_dir)
    lm = lm_model(cfg, manifest, adapter, full_model, trust_remote_code)
    label = "candidate" if adapter or full_model else "base"
    return evaluate_lm(cfg, lm, tasks, manifest, out_dir, seed, label, {"adapter": bool(adapter)}, started)


def evaluate_lm(  # noqa: PLR0913 - one eval's inputs, each distinct; called from two places
    cfg: Eval,
    lm: Any,
    tasks: TaskSet,
    manifest: dict[str, Any],
    out_dir: Path,
    seed: int,
    label: str,
    extra: dict[str, Any],
    started: float,
) -> dict[str, Any]:
    """Run the tasks on a loaded lm-eval model and write out_dir (results.json with `extra`, samples/)."""
    results = _run_tasks(cfg, lm, tasks, seed, manifest)
    seconds = time.perf_counter() - started
    scores, samples = _outcomes(cfg, results)
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        write_json(tmp / RESULTS, {"model": manifest["model"], **extra, "limit": cfg.limit, "scores": scores})
        for task, rows in samples.items():
            write_jsonl(tmp / SAMPLES / jsonl_of(task), rows)
    log.info("eval %s: %s in %.0fs", label, scores, seconds)
    return {"scores": scores, "seconds": round(seconds, 1)}


@dataclass(frozen=True)
class TaskSet:
    """lm-eval's task manager for eval.tasks, the task names defined locally, and their folder."""

    manager: Any
    local: set[str]
    folder: Path


def task_set(cfg: Eval, tasks_dir: Path) -> TaskSet:
    """The tasks to run; an unknown task ends in one line before any model loads."""
    from lm_eval.tasks import TaskManager

    local = local_tasks(tasks_dir)
    # Indexing lm-eval's thousands of built-in tasks costs ~10 s; skip it when every task is local.
    manager = TaskManager(include_path=str(tasks_dir.resolve()), include_defaults=not set(cfg.tasks) <= local)
    unknown = [t for t in cfg.tasks if t not in manager.all_tasks]
    if unknown:
        from tunegate.consistency import unknown_tasks_line

        raise UserError(unknown_tasks_line(unknown, tasks_dir))
    return TaskSet(manager, local, tasks_dir)


class SystemFolded:
    """What every lm-eval model here adds to lm-eval's chat path: where the chat template refuses a system turn (a
    task's `description`, a baseline's instructions), it is folded into the first user turn
    (`tunegate.chat.fold_system`), as validate folds the training rows'. lm-eval's own path would drop it."""

    _no_system: bool | None = None  # asked of the template once

    def apply_chat_template(self, chat_history, add_generation_prompt=True):  # noqa: FBT002 - lm-eval's signature
        return super().apply_chat_template(self.folded(chat_history), add_generation_prompt)

    def folded(self, chat_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The chat as the template takes it: a leading system turn folded in where the template refuses one."""
        from tunegate.chat import fold_system, system_refusal

        if self._no_system is None:
            self._no_system = system_refusal(self.template_renderer()) is not None
        return fold_system(chat_history) if self._no_system else chat_history

    def template_renderer(self):
        """The template as training renders it (the tokenizer's, compiled once), for the probe."""
        from tunegate.chat import Renderer

        return Renderer(self.tokenizer)


def _with(mixin: type | None, cls: type) -> type:
    """lm-eval's model class with the system fold and, for a baseline, its prompting before it."""
    bases = (mixin, SystemFolded, cls) if mixin else (SystemFolded, cls)
    return type(f"{mixin.__name__ if mixin else ''}{cls.__name__}", bases, {})


def lm_model(  # noqa: PLR0913 - what is scored, and what a baseline mixes in
    cfg: Eval,
    manifest: dict[str, Any],
    adapter: Path | None,
    full_model: Path | None,
    trust_remote_code: bool,
    mixin: type | None = None,
):
    """lm-eval's model of eval.backend: the base, the fully fine-tuned model, or base + adapter (with hf: merged in
    memory by default, through lm-eval's `peft=` otherwise; with vllm: merged, see `vllm_model`). `mixin` extends
    lm-eval's class (the baselines' prompting)."""
    if cfg.backend == "vllm":
        return vllm_model(cfg, manifest, adapter, full_model, trust_remote_code, mixin)
    import torch
    from lm_eval.models.huggingface import HFLM

    cls = _with(mixin, HFLM)

    pretrained = str(full_model) if full_model else manifest["path"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if adapter and cfg.merge_adapter:
        return cls(
            pretrained=merged_in_memory(manifest, adapter, trust_remote_code).to(device),
            tokenizer=_tokenizer(adapter, trust_remote_code),
            batch_size=cfg.batch_size,
            max_length=None,
            trust_remote_code=trust_remote_code,
        )
    return cls(
        pretrained=pretrained,
        tokenizer=str(adapter) if adapter else base_tokenizer(pretrained, manifest, trust_remote_code),
        peft=str(adapter) if adapter else None,
        batch_size=cfg.batch_size,
        max_length=None,
        device=device,
        trust_remote_code=trust_remote_code,
    )


def vllm_model(  # noqa: PLR0913 - lm_model's inputs
    cfg: Eval,
    manifest: dict[str, Any],
    adapter: Path | None,
    full_model: Path | None,
    trust_remote_code: bool,
    mixin: type | None = None,
):
    """lm-eval's vLLM model (`eval.backend: vllm`), as many copies as eval.data_parallel says (default: one per GPU),
    greedy as with hf, so the per-sample outcomes the gate pairs are recorded the same way. An adapter is merged into
    a scratch folder first (vLLM's LoRA support covers neither DoRA nor every module an adapter may target; the
    merged weights answer as base + adapter, as with hf). Refused in one line where vLLM cannot run."""
    import tempfile

    import torch

    from tunegate.models import require_vllm

    require_vllm("eval.backend")
    from lm_eval.models.vllm_causallms import VLLM

    scratch = tempfile.TemporaryDirectory(prefix="tunegate-vllm-")
    folder = Path(scratch.name)
    if adapter:
        pretrained = tokenizer = folder
        merged_in_memory(manifest, adapter, trust_remote_code).save_pretrained(pretrained, safe_serialization=True)
        _tokenizer(adapter, trust_remote_code).save_pretrained(pretrained)
    elif full_model:
        pretrained = tokenizer = full_model
    else:  # the base, with its tokenizer as training saw it (a default chat template if it has none)
        pretrained, tokenizer = Path(manifest["path"]), folder
        base_tokenizer(str(pretrained), manifest, trust_remote_code).save_pretrained(tokenizer)
    cls = _with(mixin, VLLM)
    lm = cls(
        pretrained=str(pretrained),
        tokenizer=str(tokenizer),
        dtype="auto",
        batch_size="auto",
        max_gen_toks=cfg.max_gen_toks,
        data_parallel_size=cfg.data_parallel or max(1, torch.cuda.device_count()),
        trust_remote_code=trust_remote_code,
    )
    lm.scratch = scratch  # the merged weights live as long as the model that reads them
    return lm


def _compile_templates_once() -> None:
    """lm-eval compiles a task's Jinja templates (doc_to_text, doc_to_target, ...) again for every document it
    renders (`lm_eval.utils.apply_template` calls `env.from_string`): 3,510 compilations, 2.0 s of the 15 s an eval
    stage takes on the demo. Compiled once per template text instead; a compiled template renders each document
    the same, so no output changes (tests/test_evaluation.py)."""
    from lm_eval import utils

    if not hasattr(utils.env.from_string, "cache_info"):
        utils.env.from_string = functools.lru_cache(maxsize=1024)(utils.env.from_string)


def _run_tasks(cfg: Eval, lm, tasks: TaskSet, seed: int, manifest: dict[str, Any]):
    """lm-eval's results with per-sample logs, seeded; data that cannot be loaded, or a task setting lm-eval does
    not know, ends in one line naming what to change."""
    from lm_eval import simple_evaluate

    _compile_templates_once()
    try:
        return simple_evaluate(
            model=lm,
            tasks=list(cfg.tasks),
            task_manager=tasks.manager,
            limit=cfg.limit,
            log_samples=True,
            apply_chat_template=True,
            bootstrap_iters=0,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
            gen_kwargs=f"max_gen_toks={cfg.max_gen_toks}" if cfg.max_gen_toks else None,
        )
    except (ConnectionError, OSError) as err:
        hub_tasks = ",".join(t for t in cfg.tasks if t not in tasks.local)
        raise UserError(
            f"eval.tasks: a task's data could not be loaded ({' '.join(str(err).split())[:300]}); check "
            f"dataset_kwargs.data_files in {tasks.folder}; built-in tasks need their dataset in the local HF cache "
            "when offline: fill it once with network access (lm_eval --model hf --model_args "
            f"pretrained={manifest['model']} --tasks {hub_tasks} --limit 1)"
        ) from None
    except TypeError as err:  # lm-eval's TaskConfig refuses a key it does not know
        key = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if key is None:
            raise
        files = [p.name for p in sorted(tasks.folder.glob("*.yaml")) if p.is_file() and f"{key[1]}:" in _text(p)]
        raise UserError(
            f"{tasks.folder / files[0] if files else tasks.folder}: {key[1]!r} is not an lm-eval task setting "
            "(a typo? see lm-eval's task guide)"
        ) from None


def _outcomes(cfg: Eval, results: dict[str, Any]) -> tuple[dict[str, dict[str, float]], dict[str, list[dict]]]:
    """(scores per task and metric with the item count, per-sample outcomes by doc_id) from lm-eval's results."""
    scores: dict[str, dict[str, float]] = {}
    samples: dict[str, list[dict[str, Any]]] = {}
    for task in cfg.tasks:
        raw = results["results"][task]
        metrics = sorted({k.split(",")[0] for k in raw if "," in k and not k.split(",")[0].endswith("_stderr")})
        scores[task] = {m: round(float(raw[f"{m},none"]), 6) for m in metrics if f"{m},none" in raw}
        samples[task] = sorted((_per_sample(s, metrics) for s in results["samples"][task]), key=lambda r: r["doc_id"])
        scores[task]["n"] = len(samples[task])
    return scores, samples


def run_stage(side: str) -> None:
    """The eval_base / eval_candidate stage body: evaluate one side and write its output and metrics.

    The candidate is what `train` recorded it trained (train_config.json): an adapter applied to
    the base, or, for `adapter: full`, the fine-tuned model itself.
    """
    from tunegate.config import load_config
    from tunegate.consistency import gate_problems
    from tunegate.io import read_json
    from tunegate.models import load_manifest
    from tunegate.paths import Layout
    from tunegate.runtime import record_timing, seed_everything

    cfg = load_config()
    layout = Layout.of(cfg.paths)
    if found := gate_problems(cfg):  # a gate that could never decide: said before any model loads
        raise UserError("; ".join(found))
    seed_everything(cfg.seed)
    adapter = full_model = None
    if side == "candidate":
        from tunegate.adapters import ADAPTERS

        if not layout.train_record.exists():
            raise UserError(f"{layout.train_record}: missing; run the train stage first (dvc repro train)")
        trained = read_json(layout.train_record)
        if ADAPTERS[trained["adapter"]].peft:
            adapter = layout.adapter
        else:
            full_model = layout.adapter
    result = evaluate(
        cfg.eval,
        load_manifest(layout.base),
        layout.eval_tasks,
        layout.eval(side),
        cfg.seed,
        adapter=adapter,
        full_model=full_model,
        trust_remote_code=cfg.base.trust_remote_code,
    )
    write_json(layout.metrics(f"eval_{side}"), result["scores"])
    record_timing(f"eval_{side}", result["seconds"])
