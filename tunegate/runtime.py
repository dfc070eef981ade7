"""Process set-up shared by stage mains and the CLI: quiet telemetry, logging, seeding, one-line errors."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import random
import sys
from collections.abc import Callable, Iterator

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


def configure(level: int = logging.INFO) -> None:
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Chatty third-party loggers would drown the stage's own progress lines.
    for name in ("httpx", "urllib3", "filelock", "great_expectations", "lm_eval", "alembic", "mlflow"):
        logging.getLogger(name).setLevel(logging.WARNING)


def seed_everything(seed: int) -> None:
    """Seed every RNG a stage touches and make torch kernels deterministic on CPU."""
    random.seed(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    import numpy as np
    import torch

    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


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
    configure()
    try:
        body()
    except UserError as err:
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
