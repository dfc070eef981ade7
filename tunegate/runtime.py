"""Process set-up shared by stage mains and the CLI: quiet telemetry, logging, seeding, one-line errors.

The console shows what a user acts on: tunegate's own lines, progress bars, the gate and any error.
Everything else that libraries log or warn (Python warnings included) goes to `reports/logs/<stage>.log`
with the stage's own lines; `TUNEGATE_VERBOSE=1` puts all of it on the console as well.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import random
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from tunegate.errors import UserError

# Telemetry off unless the user set the variable themselves; nothing here needs the network.
TELEMETRY_OFF = {
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


VERBOSE = "TUNEGATE_VERBOSE"
OWN = ("tunegate", "stages", "demo", "flows", "benchmarks", "__main__")  # loggers whose lines the console shows
FILE_ONLY = {"console": False}  # `extra=` for an own line that belongs in the log file only
# Off unless verbose: datasets' per-step bars (tokenising, labelling, generating splits) are internal steps.
QUIET = {"HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# glibc's malloc hands freed memory at the top of its heap back to the OS at once, so a training or generation
# loop, which frees and allocates the same few MB of tensors at every step, faults every page of them in again:
# the train stage on CPU spent 40% of its time in the kernel doing that (docs/performance.md). Keeping up to
# this much freed memory for reuse removes it; a process holds at most this much more than it uses.
KEEP_FREED = 1 << 30
M_TOP_PAD = -2  # glibc malloc.h


def verbose(env: Mapping[str, str] | None = None) -> bool:
    """TUNEGATE_VERBOSE is on, in `env` (default: this process's environment)."""
    return (os.environ if env is None else env).get(VERBOSE, "").strip().lower() not in ("", "0", "false", "no", "off")


class _ConsoleFilter(logging.Filter):
    """tunegate's own lines and every error (all lines when verbose); never a line marked FILE_ONLY.
    Third-party info and warnings stay in the log file."""

    def __init__(self, everything: bool):
        super().__init__()
        self.everything = everything

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "console", True):
            return False
        return self.everything or record.levelno >= logging.ERROR or record.name.split(".")[0] in OWN


class _AfterImport:
    """A meta path finder that runs `then(module)` right after `name` is first imported (or now, if it is)."""

    def __init__(self, name: str, then: Callable[[object], None]):
        self.name, self.then = name, then

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            run, then = spec.loader.exec_module, self.then

            def exec_module(module) -> None:
                run(module)
                then(module)

            spec.loader.exec_module = exec_module
        return spec

    @classmethod
    def install(cls, name: str, then: Callable[[object], None]) -> None:
        if name in sys.modules:
            then(sys.modules[name])
        elif not any(isinstance(f, cls) and f.name == name for f in sys.meta_path):
            sys.meta_path.insert(0, cls(name, then))


def _transformers_to_root(module) -> None:
    # transformers gives its loggers their own stderr handler and stops propagation; its documented
    # switches hand the records to the root logger's handlers instead (console filter and log file).
    module.disable_default_handler()
    module.enable_propagation()


def keep_freed_memory() -> None:
    """Ask glibc's malloc to keep freed memory for reuse (KEEP_FREED). Not glibc, or the user set
    MALLOC_TOP_PAD_ themselves: nothing changes."""
    if not sys.platform.startswith("linux") or "MALLOC_TOP_PAD_" in os.environ:
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this interpreter runs on
    except (OSError, AttributeError):
        return
    mallopt(M_TOP_PAD, KEEP_FREED)


def env_defaults(env: Mapping[str, str]) -> dict[str, str]:
    """The variables a stage's set-up adds to `env` where the user has not set them: telemetry off, datasets'
    progress bars off unless verbose, MLflow's own log handler off (its lines reach the log file instead)."""
    added = {**TELEMETRY_OFF, **({} if verbose(env) else QUIET), "MLFLOW_CONFIGURE_LOGGING": "false"}
    return {key: value for key, value in added.items() if key not in env}


def configure_env() -> None:
    """Add env_defaults to this process's environment, before the libraries that read them are imported."""
    os.environ.update(env_defaults(os.environ))


def configure(level: int = logging.INFO, stage: str | None = None) -> Path | None:
    """Telemetry off, freed memory kept for reuse, and logging as the module docstring says. With `stage`, the
    log file is reports/logs/<stage>.log (returned), rewritten by every run."""
    from tunegate.paths import LOGS

    keep_freed_memory()
    configure_env()
    loud = verbose()
    _AfterImport.install("transformers.utils.logging", _transformers_to_root)
    root = logging.getLogger()
    root.setLevel(level)
    for handler in [h for h in root.handlers if getattr(h, "tunegate", False)]:  # configure() may run twice
        root.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    console.addFilter(_ConsoleFilter(everything=loud))
    handlers: list[logging.Handler] = [console]
    path = None
    if stage:
        path = LOGS / f"{stage}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        # processes launched by the stage itself (accelerate: RANK is set) add to the launcher's file
        mode = "a" if "RANK" in os.environ else "w"
        file = logging.FileHandler(path, mode=mode, encoding="utf-8")
        file.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%d %H:%M:%S"))
        handlers.append(file)
    for handler in handlers:
        handler.tunegate = True
        root.addHandler(handler)
    logging.captureWarnings(True)  # warnings.warn(...) becomes a `py.warnings` log record: file, not console
    # Chatty third-party loggers would drown even the log file (a line per HTTP request).
    for name in ("httpx", "urllib3", "filelock", "great_expectations", "lm_eval", "alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return path


def route_trainer_logs(trainer) -> None:
    """Keep the trainer's progress bar, showing the last logged loss (and GRPO's mean reward) beside it, but send
    the metric dicts it prints at every logging step (`{'loss': ...}`) to the log file: plots/train.csv and the
    MLflow run hold the same numbers. With TUNEGATE_VERBOSE=1 the trainer prints them as usual."""
    if verbose():
        return
    from transformers.trainer_callback import ProgressCallback

    log = logging.getLogger("tunegate.trainer")

    class LoggedProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero:
                return
            log.info("step %d: %s", state.global_step, logs, extra=FILE_ONLY)
            shown = {k: f"{v:.3f}" for k in ("loss", "reward") if isinstance(v := (logs or {}).get(k), int | float)}
            if shown and getattr(self, "training_bar", None) is not None:
                self.training_bar.set_postfix(shown, refresh=False)

    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LoggedProgress)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed every RNG a stage touches; with deterministic, ask torch for deterministic kernels (bit-identical
    reruns; on CUDA they rule out the fastest attention kernels, so training turns it off there by default)."""
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    import numpy as np
    import torch

    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many long-lived objects that form no cycles
    (parsed rows): otherwise every collection walks all of them again, and the cost grows with the data."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def stage_main(name: str, body: Callable[[], None]) -> None:
    """Run a stage body; a UserError ends the process with one line and exit code 2, not a traceback."""
    configure(stage=name)
    try:
        body()
    except UserError as err:
        logging.getLogger("tunegate").error("%s: %s", name, err, extra=FILE_ONLY)
        print(f"tunegate {name}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def record_timing(stage: str, seconds: float) -> None:
    """Wall time per stage, kept apart from DVC-tracked outputs so they stay byte-reproducible."""
    import json

    from tunegate.io import write_json
    from tunegate.paths import TIMINGS

    path = TIMINGS
    timings = json.loads(path.read_text()) if path.exists() else {}
    timings[stage] = round(seconds, 1)
    write_json(path, timings)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS's choice): for the team stack's servers and torch.distributed."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
