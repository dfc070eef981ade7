"""Typed configuration: one pydantic model per section of params.yaml.

`load_config()` reads params.yaml once and fails with one line naming the offending key
(`params.yaml: train.lora.r: Input should be greater than 0`) instead of a traceback deep in a stage.
Every model forbids unknown keys, so a typo is an error, not a silently ignored setting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from tunegate.errors import UserError, yaml_error
from tunegate.methods import METHODS

DEFAULT_PARAMS = "params.yaml"
DEMO_BASE = "demo"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Paths(_Section):
    """Every file and folder the pipeline reads or writes, named once (dvc.yaml interpolates these)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    raw: str = "data/raw"
    pretrain: str = "data/pretrain/general.jsonl"
    evals: str = "evals"
    base: str = "models/base"
    validated: str = "data/validated"
    data_docs: str = "reports/data_docs"
    dedup: str = "data/dedup"
    mix: str = "data/mix"
    train: str = "models/candidate"
    export: str = "models/export"
    checkpoints: str = "checkpoints"
    eval_base: str = "reports/eval_base"
    eval_candidate: str = "reports/eval_candidate"
    eval_export: str = "reports/eval_export"
    eval_baselines: str = "reports/eval_baselines"
    prompt: str = "evals/prompt.md"
    gate: str = "reports/gate"
    register_: str = Field("reports/register.json", alias="register")
    metrics: str = "metrics"
    plots: str = "plots"


class DemoBase(_Section):
    """Shape and pretraining budget of the embedded demo base model (used when base.model is 'demo')."""

    vocab_size: int = Field(1024, ge=300)
    hidden_size: int = Field(128, ge=16)
    layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    intermediate_size: int = Field(384, ge=16)
    max_position: int = Field(128, ge=32)
    steps: int = Field(1200, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> DemoBase:
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by heads ({self.heads})")
        return self


class Base(_Section):
    model: str = Field(DEMO_BASE, description="'demo', a Hugging Face hub id, or a local model folder")
    revision: str = Field("main", description="hub branch, tag or commit; resolved to a commit sha")
    trust_remote_code: bool = False
    demo: DemoBase = DemoBase()

    @property
    def is_demo(self) -> bool:
        return self.model == DEMO_BASE


class Source(_Section):
    path: str
    role: Literal["domain", "general", "preference"]
    weight: float = Field(1.0, gt=0, description="share among sources of the same role when mixing")
    format: Literal[
        "auto",
        "messages",
        "prompt_completion",
        "alpaca",
        "preference",
        "unpaired",
        "sharegpt",
        "openai_preference",
        "gemini",
    ] = "auto"
    split: str | None = Field(None, description="a saved DatasetDict's split (default: train)")


class Data(_Section):
    sources: dict[str, Source]

    @field_validator("sources")
    @classmethod
    def _one_domain(cls, sources: dict[str, Source]) -> dict[str, Source]:
        if not any(s.role == "domain" for s in sources.values()):
            raise ValueError("at least one source must have role 'domain'")
        return sources


class Validate(_Section):
    min_tokens: int = Field(2, ge=0, description="fewest tokens (base tokenizer) in a row")
    max_tokens: int = Field(256, ge=1, description="most tokens (base tokenizer) in a row, template included")
    max_invalid_share: float = Field(0.1, ge=0, le=1, description="fail the stage above this share of bad rows")
    pii: Literal["report", "mask", "quarantine"] = "mask"
    # Checked by GX on Arrow strings, where a pattern without look-around, back-references or \s runs
    # on RE2 (about 10x faster than Python's re, which any other pattern falls back to; so does one
    # with \b or \d on text that is not all ASCII). Secrets are here too: a model trained on a key can
    # repeat it. Each name is its own reason (`pii_<name>`) and mask (`[<NAME>]`).
    pii_patterns: dict[str, str] = {
        "email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}",
        "phone": r"(?:\+|\b)\d[\d ()-]{8,}\d\b",
        "api_key": r"\b(?:sk|hf|gh[pousr]|github_pat|glpat|xox[abposr])[-_][A-Za-z0-9_-]{16,}\b",
        "aws_access_key": r"\b(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|AROA|APKA|ASCA)[A-Z0-9]{16}\b",
        # an AWS secret is 40 base64 characters, told apart from other text only by its label
        "aws_secret_key": r"(?i:aws_?secret_?(?:access_?)?key|secret_?access_?key)"
        r"[\"']?[ \t]*[:=][ \t]*[\"']?[A-Za-z0-9/+]{40}",
        "gcp_api_key": r"\bAIza[0-9A-Za-z_-]{35}",
        # PEM / OpenSSH / PGP private keys (a GCP service-account key's `private_key` is one), to the END
        # line, or to the end of the base64 body when the block was cut off
        "private_key": r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
        r"(?:(?s:.)*?-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|[A-Za-z0-9+/=\\ \t\r\n]*)",
        # Azure storage / Service Bus connection strings and SAS signatures
        "azure_key": r"(?i:AccountKey|SharedAccessKey)[ \t]*=[ \t]*[A-Za-z0-9+/]{30,}={0,2}"
        r"|[?&]sig=[A-Za-z0-9%+/]{30,}",
        "bearer_token": r"(?i:bearer)[ \t]+[A-Za-z0-9._~+/-]{20,}=*",
        "jwt": r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",
        # scheme://user:password@ (postgres, mongodb+srv, redis, https with a token, ...)
        "url_credentials": r"\b[A-Za-z][A-Za-z0-9+.-]{1,20}://[^ \t\r\n:/@]+:[^ \t\r\n/@]+@",
        # Password=... in connection strings and env files, "password": "..." in JSON; not `password: click`
        "password_assignment": r"(?i:password|passwd|pwd)[\"']?[ \t]*(?:=|:[ \t]*[\"'])[ \t]*[^ \t\r\n;'\",]{3,}",
    }
    invisible: Literal["report", "strip", "quarantine"] = Field(
        "strip",
        description="characters that do not show: bidi overrides, zero-width and control characters "
        "(report: count; strip: remove them, keep the row; quarantine: remove the row)",
    )


class Dedup(_Section):
    num_perm: int = Field(128, ge=16, description="MinHash permutations")
    bands: int = Field(32, ge=1, description="LSH bands (num_perm / bands rows per band)")
    ngram: int = Field(3, ge=1, description="word n-gram size for near-duplicate shingles")
    threshold: float = Field(0.7, gt=0, le=1, description="verified Jaccard at or above which rows are near duplicates")
    contamination_ngram: int = Field(
        13, ge=3, description="shared word n-gram that marks an eval leak; shorter eval texts must appear whole"
    )
    contradictions: Literal["keep_majority", "keep_first", "drop_all"] = "keep_majority"
    engine: Literal["local", "ray"] = Field(
        "local", description="near duplicates on this machine, or sharded on Ray Data (same result)"
    )
    ray_address: str | None = Field(None, description="Ray cluster to join (e.g. auto); unset starts a local Ray")
    warn_share: float = Field(0.5, gt=0, le=1, description="warn on the console when dedup drops more of a source")

    @model_validator(mode="after")
    def _bands_divide_perm(self) -> Dedup:
        if self.num_perm % self.bands:
            raise ValueError(f"num_perm ({self.num_perm}) must be divisible by bands ({self.bands})")
        return self


class Mix(_Section):
    general_ratio: float = Field(0.2, ge=0, lt=1, description="share of general rows in the training set")
    by: Literal["examples", "tokens"] = "tokens"
    max_rows: int | None = Field(None, ge=1, description="cap on training rows (None: all domain rows)")


class Lora(_Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    use_rslora: bool = False


class RewardSpec(_Section):
    """One reward GRPO trains toward (tunegate.rewards): exactly one of scorer, format, function."""

    scorer: str | None = Field(
        None, description="<task>/<metric>: the task's own scorer (its process_results in evals/tasks), the gate's"
    )
    format: Literal["json"] | None = Field(
        None, description="json: 1 when the answer parses as a JSON object with every key of the reference"
    )
    function: str | None = Field(
        None, description="module:function importable from the project root: f(prompt, completion, reference) -> float"
    )
    weight: float = Field(1.0, description="its weight in the sum GRPO maximises")

    @model_validator(mode="after")
    def _exactly_one(self) -> RewardSpec:
        named = [k for k in ("scorer", "format", "function") if getattr(self, k) is not None]
        if len(named) != 1:
            raise ValueError(f"a reward names exactly one of scorer, format, function (got {named or 'none'})")
        if self.scorer is not None and self.scorer.count("/") != 1:
            raise ValueError(f"scorer {self.scorer!r}: expected <task>/<metric>, e.g. support_gen/json_fields")
        if self.function is not None and ":" not in self.function:
            raise ValueError(f"function {self.function!r}: expected module:function, e.g. my_rewards:refund_policy")
        return self


class Grpo(_Section):
    rewards: list[RewardSpec] = Field([], description="what GRPO maximises: their weighted sum per completion")


class Launch(_Section):
    """Multi-process training: the train stage re-runs itself under `accelerate launch`."""

    processes: int = Field(2, ge=1, description="processes (one per GPU; on a CPU-only machine, gloo over CPU)")
    config: str = Field("infra/accelerate/multi_gpu.yaml", description="accelerate config file (DDP, FSDP, ZeRO-3)")


class Train(_Section):
    method: Literal["sft", "dpo", "orpo", "kto", "grpo", "sft+dpo", "sft+kto", "sft+grpo"] = Field(
        "sft",
        description="the training method (tunegate.methods); sft+dpo, sft+kto: SFT on the mixed set, then DPO or KTO "
        "from that adapter with it as the reference",
    )
    adapter: Literal["lora", "qlora", "dora", "full"] = "lora"
    min_rows: int | None = Field(
        None, ge=1, description="fewer training rows (or pairs) stop the stage before any step; null: the method's own"
    )
    lora: Lora = Lora()
    # Passed through to TRL's SFTConfig / DPOConfig unchanged; TRL validates the names and values.
    args: dict[str, Any] = {}
    dpo_args: dict[str, Any] = Field(
        {},
        description="dpo and sft+dpo: overrides of `args` for DPO training "
        "(beta, loss_type, learning_rate, max_steps, ...)",
    )
    orpo_args: dict[str, Any] = Field(
        {}, description="orpo: overrides of `args` for ORPO training (beta: the odds-ratio weight, learning_rate, ...)"
    )
    kto_args: dict[str, Any] = Field(
        {},
        description="kto and sft+kto: overrides of `args` for KTO training "
        "(beta, desirable_weight, undesirable_weight, loss_type, learning_rate, ...)",
    )
    grpo_args: dict[str, Any] = Field(
        {},
        description="grpo and sft+grpo: overrides of `args` for GRPO training "
        "(num_generations, max_completion_length, beta, loss_type, temperature, learning_rate, use_vllm, ...)",
    )
    grpo: Grpo = Field(Grpo(), validate_default=True, description="grpo and sft+grpo: the rewards")
    merge: bool = Field(False, description="also write a merged full model (safetensors)")
    truncate: bool = Field(
        False,
        description="train rows longer than train.args.max_length cut to it; False: the stage counts them and stops",
    )
    deterministic: bool | None = Field(
        None,
        description="deterministic kernels (bit-identical reruns, slower on CUDA); None: on for CPU, off for CUDA",
    )
    launch: Launch | None = Field(None, description="run under `accelerate launch` with several processes")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto",
        description="the attention kernels the model trains with; auto: FlashAttention 2 on CUDA with flash-attn and "
        "16-bit training, else transformers' choice (sdpa); recorded with the version",
    )
    kernels: Literal["auto", "liger", "none"] = Field(
        "auto",
        description="Liger's fused RMSNorm, RoPE and SwiGLU kernels; auto: on where they run (CUDA, liger-kernel "
        "installed) and cover the architecture; recorded with the version",
    )
    packing: Literal["auto"] | bool = Field(
        False,
        description="SFT rows packed (TRL's best-fit decreasing): padding-free with flash attention, as batch rows "
        "with block-diagonal masks otherwise; auto: on where the loaded model keeps packed rows apart (checked on it "
        "at the start), off where it does not",
    )
    probe_max_rise: float | None = Field(
        None,
        gt=0,
        description="stop early when the forgetting probe's loss rises this share above its lowest value "
        "(0.25 = 25%); None: never",
    )

    # A setting the chosen method would ignore is reported, not skipped silently.
    @field_validator("dpo_args", "orpo_args", "kto_args", "grpo_args")
    @classmethod
    def _method_args_need_their_method(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        method = METHODS.get(info.data.get("method"))
        if value and method is not None and info.field_name not in method.args_fields:
            users = " or ".join(name for name, m in METHODS.items() if info.field_name in m.args_fields)
            raise ValueError(f"only used when train.method is {users} (remove it, or move these keys to train.args)")
        return value

    @field_validator("grpo")
    @classmethod
    def _grpo_needs_rewards(cls, value: Grpo, info: ValidationInfo) -> Grpo:
        method = METHODS.get(info.data.get("method"))
        if method is not None and method.last.rewarded and not value.rewards:
            raise ValueError(
                f"train.method {method.name} needs at least one reward in train.grpo.rewards, e.g. "
                "[{scorer: support_gen/json_fields}, {format: json}]"
            )
        return value  # rewards kept for another method are fine: `-S train.method=sft+grpo` finds them ready

    @field_validator("probe_max_rise")
    @classmethod
    def _probe_needs_sft(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and info.data.get("method") in METHODS and not METHODS[info.data["method"]].runs_probe:
            raise ValueError(
                "the forgetting probe runs during SFT only (train.method sft or a chain that starts with it); "
                "set it to null"
            )
        return value


class Eval(_Section):
    tasks: list[str] = Field(min_length=1)
    limit: int | None = Field(None, ge=1, description="items per task (None: all); for quick looks, not for gates")
    batch_size: int = Field(32, ge=1)
    max_gen_toks: int = Field(48, ge=1)
    merge_adapter: bool = Field(
        True, description="score base + adapter with the adapter merged in memory (faster); false: lm-eval's peft="
    )
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="lm-eval's model: hf (transformers, any device) or vllm (CUDA, vLLM installed)"
    )
    data_parallel: int | None = Field(
        None, ge=1, description="vllm: model copies, one per GPU, each scoring a share of the items; null: every GPU"
    )


class Export(_Section):
    """What the `export` stage writes (tunegate.export) and the export check scores."""

    formats: list[Literal["merged", "gguf", "ollama", "vllm"]] = Field(
        ["merged"],
        description="merged safetensors, GGUF files, an Ollama Modelfile, vLLM's adapter layout",
    )
    gguf: list[str] = Field(["f16", "q8_0"], min_length=1, description="GGUF types: f16, bf16, q8_0, q4_k_m, ...")
    check: bool = Field(True, description="score every exported artifact and gate it against the candidate")

    @field_validator("gguf")
    @classmethod
    def _known_types(cls, value: list[str]) -> list[str]:
        from tunegate.llamacpp import GGUF_TYPES

        unknown = [t for t in value if t not in GGUF_TYPES]
        if unknown:
            raise ValueError(f"unknown GGUF type(s) {', '.join(unknown)}; one of {', '.join(GGUF_TYPES)}")
        return list(dict.fromkeys(value))


class Baselines(_Section):
    """The base model given the cheaper alternatives to fine-tuning, scored on the target tasks (tunegate.baselines).

    Each is one lm-eval run of the base: `prompt` (the instructions in paths.prompt as a system turn), `few_shot`
    (k training rows drawn once, seeded), `retrieval` (per eval item, the k training rows most similar to its
    prompt: BM25, or by an embedding model's cosine similarity when `embedder` names one). The examples come from the
    deduplicated domain rows, never from the eval sets.
    """

    tasks: list[str] = Field([], description="the target tasks to run the baselines on; [] turns them off")
    prompt: bool = Field(True, description="run the prompt baseline, and start every baseline with the prompt")
    few_shot: int = Field(5, ge=0, description="examples drawn from the training rows; 0: no few-shot baseline")
    retrieval: int = Field(5, ge=0, description="most similar training rows per item; 0: no retrieval baseline")
    embedder: str | None = Field(
        None,
        description="a text embedding model (local folder or hub id; safetensors) ranking the retrieval baseline's "
        "rows by cosine similarity of mean-pooled hidden states; null: BM25",
    )

    def names(self) -> list[str]:
        """The baselines this section runs, by the name the gate's lines use."""
        if not self.tasks:
            return []
        named = [
            ("prompt", self.prompt),
            (f"few_shot-{self.few_shot}", self.few_shot),
            (f"retrieval-{self.retrieval}", self.retrieval),
        ]
        return [name for name, on in named if on]


class Gate(_Section):
    policy: str = "evals/gates.yaml"
    bootstrap: int = Field(2000, ge=100, description="paired bootstrap resamples")


class Register(_Section):
    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_root: str = "mlartifacts"
    experiment: str = "tunegate"
    model_name: str = "tunegate-demo"
    alias: str = "champion"


class Config(_Section):
    seed: int = 1234
    paths: Paths = Paths()
    base: Base = Base()
    data: Data
    validate_: Validate = Field(Validate(), alias="validate")
    dedup: Dedup = Dedup()
    mix: Mix = Mix()
    train: Train = Train()
    eval: Eval
    export: Export = Export()
    baselines: Baselines = Baselines()
    gate: Gate = Gate()
    register_: Register = Field(Register(), alias="register")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: {key}: {first['msg']}{more}"


def parse_config(raw: dict[str, Any], source: str = DEFAULT_PARAMS) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise UserError(_format_error(source, err)) from None


def params_path(path: str | os.PathLike[str] | None = None) -> Path:
    """Which params.yaml: the argument, else $TUNEGATE_PARAMS, else ./params.yaml."""
    return Path(path or os.environ.get("TUNEGATE_PARAMS", DEFAULT_PARAMS))


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load and validate params.yaml (path from the argument, $TUNEGATE_PARAMS, or ./params.yaml)."""
    path = params_path(path)
    if not path.exists():
        raise UserError(f"{path}: not found (run from the project root or set TUNEGATE_PARAMS)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise yaml_error(path, err) from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 (byte {err.start}); save it as UTF-8") from None
    except OSError as err:  # a folder, no permission
        raise UserError(f"{path}: cannot be read ({err.strerror or type(err).__name__})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level")
    return parse_config(raw, str(path))


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """{'train': {'lora': {'r': 16}}} -> {'train.lora.r': 16}; lists become JSON-ish strings."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(by_alias=True)
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
        if not obj and prefix:
            out[prefix[:-1]] = "{}"
        return out
    out[prefix[:-1]] = obj if isinstance(obj, (int, float, str, bool)) or obj is None else str(obj)
    return out
