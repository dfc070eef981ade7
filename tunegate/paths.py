"""Where every artefact lives: the one owner of file names inside the `paths:` folders.

params.yaml's `paths:` block names each stage's folder (dvc.yaml interpolates it); this module names
what is inside those folders, so a stage, a flow, the registry and the tests spell `adapter`,
`base.json` or `verdict.json` nowhere else. A stage writes into a temporary folder and renames it
into place (see `tunegate.io.atomic_path`), so the in-folder names are also exposed on their own.

    layout = Layout.of(cfg.paths)          # cfg = tunegate.config.load_config()
    layout.adapter                         # models/candidate/adapter
    layout.metrics("train")                # metrics/train.json
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from tunegate.config import Paths

# --- names inside a stage's folder ---------------------------------------------------------------
BASE_MANIFEST = "base.json"  # base/: identity of the base model (what every later stage loads)
# A local model repository (`base.model` a folder; `tunegate demo-base` publishes into one), laid out like the
# hub's cache: refs/<branch> holds a commit id, snapshots/<commit>/ that revision's files.
REPO_REFS = "refs"
REPO_SNAPSHOTS = "snapshots"
QUARANTINE = "quarantine.jsonl"  # validated/: rows that failed a check, with the reason
REPORT = "report.md"  # validated/, dedup/, gate/: the human-readable account
DROPPED = "dropped.jsonl"  # dedup/: rows removed, with the reason and what they duplicate
MIX_TRAIN = "train.jsonl"  # mix/: the training set (its sha256 is the dataset hash of provenance)
MIX_PREFERENCES = "preferences.jsonl"  # mix/: preference pairs for DPO
MIX_PROBE = "probe.jsonl"  # mix/: held-out general rows, the trainer's forgetting probe
MIX_MANIFEST = "manifest.json"  # mix/: per-source counts, tokens and sha256
ADAPTER = "adapter"  # train/: the trained adapter (or full weights) + tokenizer, safetensors only
MERGED = "merged"  # train/: with train.merge, the adapter folded into the base
TRAINING_ARGS = "training_args.json"  # train/: TRL's resolved config (the JSON copy, not the pickle)
TRAIN_RECORD = "train_config.json"  # train/: what was trained (method, adapter, base); later stages read it
EXPORT_MANIFEST = "export.json"  # export/: formats, artifacts, every file with its sha256
RESULTS = "results.json"  # eval_*/: scores per task
SAMPLES = "samples"  # eval_*/: per-sample outcomes, one <task>.jsonl each (what the gate pairs)
VERDICT = "verdict.json"  # gate/: every check with estimate and bounds
CHART = "chart.png"  # gate/: base vs candidate with intervals
COST_CHART = "cost.png"  # gate/: quality against prompt tokens per request, candidate and baselines
REPORT_HTML = "report.html"  # gate/: the report with its charts inline and every flipped item
FLIPPED = "flipped.json"  # gate/: per check, the items the candidate lost and won against its reference
COSTS = "costs.json"  # eval_baselines/: prompt tokens per request of each baseline and of the plain prompt

CHAIN_SFT_RESULT = "sft-result"  # checkpoints/train-<key>/: the SFT phase's adapter in a chain (sft+dpo, sft+kto)
CHAIN_SFT_CHECKPOINTS = "sft"  # checkpoints/train-<key>/: the SFT phase's checkpoints
# checkpoints/train-<key>/<method>/: a chain's second phase's checkpoints, in a folder named after its method (dpo, kto)
PHASE_DONE = "metrics.json"  # in a finished phase's result folder: written last, so it means "complete"


def jsonl_of(name: str) -> str:
    """The file of one source (validated/, dedup/) or one eval task (eval_*/samples/)."""
    return f"{name}.jsonl"


def partial_of(path: Path) -> Path:
    """Where an output folder is assembled before it is renamed into place (beside it, same filesystem)."""
    return path.parent / f".{path.name}.partial"


def run_checkpoints(key: str) -> str:
    """The checkpoint folder of one training run, keyed by everything that defines it."""
    return f"train-{key}"


# --- project-level files outside the `paths:` folders (untracked by DVC: they hold timings) ---
TIMINGS = Path("reports/timings.json")  # wall time per stage
THROUGHPUT = Path("reports/train_throughput.csv")  # tokens/s per logging interval
LOGS = Path("reports/logs")  # <stage>.log: everything a run logs, third-party warnings included
PARAMS = Path("params.yaml")
DVC_LOCK = Path("dvc.lock")
DVC_YAML = Path("dvc.yaml")


@dataclass(frozen=True)
class Layout:
    """Every artefact path of a project, from its `paths:` config, relative to `root`."""

    paths: Paths
    root: Path = Path()

    @classmethod
    def of(cls, paths: Paths, root: str | Path = ".") -> Layout:
        return cls(paths, Path(root))

    def _p(self, rel: str) -> Path:
        return self.root / rel

    @property
    def base(self) -> Path:
        return self._p(self.paths.base)

    @property
    def base_manifest(self) -> Path:
        return self.base / BASE_MANIFEST

    @property
    def validated(self) -> Path:
        return self._p(self.paths.validated)

    def validated_source(self, name: str) -> Path:
        return self.validated / jsonl_of(name)

    @property
    def dedup(self) -> Path:
        return self._p(self.paths.dedup)

    def dedup_source(self, name: str) -> Path:
        return self.dedup / jsonl_of(name)

    @property
    def mix(self) -> Path:
        return self._p(self.paths.mix)

    @property
    def mix_train(self) -> Path:
        return self.mix / MIX_TRAIN

    @property
    def mix_preferences(self) -> Path:
        return self.mix / MIX_PREFERENCES

    @property
    def mix_probe(self) -> Path:
        return self.mix / MIX_PROBE

    @property
    def mix_manifest(self) -> Path:
        return self.mix / MIX_MANIFEST

    @property
    def train(self) -> Path:
        return self._p(self.paths.train)

    @property
    def adapter(self) -> Path:
        return self.train / ADAPTER

    @property
    def train_record(self) -> Path:
        return self.train / TRAIN_RECORD

    @property
    def export(self) -> Path:
        return self._p(self.paths.export)

    @property
    def export_manifest(self) -> Path:
        return self.export / EXPORT_MANIFEST

    def eval_export(self, artifact: str | None = None) -> Path:
        folder = self._p(self.paths.eval_export)
        return folder / artifact if artifact else folder

    def eval_baselines(self, name: str | None = None) -> Path:
        folder = self._p(self.paths.eval_baselines)
        return folder / name if name else folder

    @property
    def prompt(self) -> Path:
        return self._p(self.paths.prompt)

    @property
    def checkpoints(self) -> Path:
        return self._p(self.paths.checkpoints)

    def eval(self, side: Literal["base", "candidate"]) -> Path:
        return self._p(self.paths.eval_base if side == "base" else self.paths.eval_candidate)

    @property
    def gate(self) -> Path:
        return self._p(self.paths.gate)

    @property
    def verdict(self) -> Path:
        return self.gate / VERDICT

    @property
    def register(self) -> Path:
        return self._p(self.paths.register_)

    def metrics(self, stage: str) -> Path:
        return self._p(self.paths.metrics) / f"{stage}.json"

    @property
    def train_plot(self) -> Path:
        return self._p(self.paths.plots) / "train.csv"

    @property
    def eval_data(self) -> Path:
        return self._p(self.paths.evals) / "data"

    @property
    def eval_tasks(self) -> Path:
        return self._p(self.paths.evals) / "tasks"

    @property
    def throughput(self) -> Path:
        return self.root / THROUGHPUT

    @property
    def timings(self) -> Path:
        return self.root / TIMINGS
