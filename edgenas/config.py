"""One strict way into configuration: YAML + `--set a.b=v`, validated against a typed schema.

Unknown keys and wrong types are one-line errors that name the dotted key; a missing file is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """Bad configuration: the message is one line, fit to print as is."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DatasetConfig(Section):
    name: Literal["cifar10", "cifar100", "imagenette", "folder", "synthetic"] = "cifar10"
    root: str | None = None  # None: ~/.cache/edgenas/data/<name>
    download: bool = True  # torchvision datasets only; fails with a clear message offline
    train_split: str = "train"  # folder datasets: sub-folder names
    test_split: str | None = None  # folder datasets: None picks 'test', else 'val'
    image_size: int | None = None  # resize folder images to a square; imagenette defaults to 160
    val_size: int = Field(5000, ge=1)
    train_subset: int | None = Field(None, ge=1)
    split_seed: int = 0
    cache_dir: str | None = None  # None: $EDGENAS_CACHE or ~/.cache/edgenas
    # synthetic only
    num_classes: int = Field(10, ge=2)
    in_shape: tuple[int, int, int] = (3, 32, 32)
    synthetic_size: int = Field(2000, ge=2)

    @field_validator("root", "cache_dir")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        """Relative to where the command runs (the sandbox worker runs elsewhere)."""
        return str(Path(value).expanduser().absolute()) if value else value


class AugmentConfig(Section):
    crop_padding: int = Field(4, ge=0)
    flip: bool = True


class TrainConfig(Section):
    """Defaults are the paper's one-epoch proxy protocol."""

    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.01, gt=0)
    momentum: float = Field(0.9, ge=0)
    weight_decay: float = Field(5e-4, ge=0)
    nesterov: bool = False
    schedule: Literal["constant", "cosine", "onecycle"] = "constant"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    amp: bool = False  # bf16 autocast, CUDA only
    channels_last: bool = True  # faster convolutions on CPU and GPU; falls back when a model needs NCHW
    seed: int = 0
    eval_batch_size: int = Field(500, ge=1)
    augment: AugmentConfig = AugmentConfig()


class BudgetConfig(Section):
    max_params: int | None = Field(None, ge=1)
    max_macs: int | None = Field(None, ge=1)
    max_memory_mb: float | None = Field(None, gt=0)
    max_target_latency_ms: float | None = Field(None, gt=0)  # p50 on the target (needs a `target` section)


class EvalConfig(Section):
    timeout_s: float = Field(900.0, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1)  # torch intra-op threads in the candidate; None: all cores
    memory_limit_mb: int = Field(8192, ge=256)  # hard cap of the candidate process (CPU RAM or GPU memory)
    output_limit_bytes: int = Field(1 << 20, ge=1024)
    disk_limit_mb: int = Field(256, ge=1)  # the candidate's writable space (a tmpfs: counts against RAM)
    max_files: int = Field(2048, ge=16)  # files and folders it may create there
    latency_runs: int = Field(30, ge=1)
    latency_threads: int = Field(1, ge=1)  # one thread: closer to an edge core, and robust to a busy machine
    allow_unconfined: bool = False  # UNSAFE: run generated code even where the OS gives no namespaces


class LLMConfig(Section):
    """One LLM role. Paper defaults: temperature 0.7, top-p 0.9, up to 2,048 new tokens."""

    backend: Literal["transformers", "openai", "mutate"] = "transformers"
    model: str | None = "Qwen/Qwen2.5-7B-Instruct"  # hub id or local path; the served name for openai
    base_url: str | None = None  # openai: e.g. http://localhost:8000/v1 (vLLM), http://localhost:11434/v1 (Ollama)
    api_key_env: str | None = None  # name of the environment variable holding the key (never the key itself)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    max_tokens: int = Field(2048, ge=1)
    timeout_s: float = Field(300.0, gt=0)
    retries: int = Field(4, ge=0)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # transformers
    device_map: str = "auto"  # transformers
    load_in_4bit: bool = False  # transformers on CUDA, needs bitsandbytes


class LLMRoles(Section):
    generator: LLMConfig = LLMConfig()
    improver: LLMConfig = LLMConfig()
    cache: bool = True  # replies cached by (model, messages, sampling, seed): a re-run reproduces without the LLM
    cache_dir: str | None = None  # None: the dataset cache root

    @model_validator(mode="before")
    @classmethod
    def _improver_defaults_to_generator(cls, data):
        if isinstance(data, dict) and isinstance(data.get("generator", {}), dict):
            improver = data.get("improver") or {}
            if isinstance(improver, dict):
                data = {**data, "improver": {**data.get("generator", {}), **improver}}
        return data


class SearchConfig(Section):
    iterations: int = Field(2000, ge=0)
    history_size: int = Field(5, ge=0)  # K most recent (problem, modification, outcome) triples; 0 disables
    use_improver: bool = True  # ablation: False = the generator alone
    use_reference: bool = True  # ablation: False = the generator never sees the best program
    max_wall_s: float | None = Field(None, gt=0)
    target_accuracy: float | None = Field(None, gt=0, le=1)
    patience: int | None = Field(None, ge=1)  # stop after N iterations without a new best
    max_llm_errors: int | None = Field(5, ge=1)  # stop (exit 3) after N iterations in a row end in an LLM error
    # A one-epoch accuracy moves by points between seeds: a candidate that beats the best by less than this margin
    # (a fraction; None: never) is trained again with confirm_runs other seeds, and becomes the best only if the
    # mean of its runs still beats it. benchmarks/proxy_noise.py measures the spread.
    confirm_margin: float | None = Field(0.02, ge=0, le=1)
    confirm_runs: int = Field(1, ge=1)
    # Throughput: `chains` independent lineages (own best, memory window and LLM context) side by side, measured by
    # `workers` evaluation slots (each its own warm sandbox). While one chain's candidate trains, others are writing
    # theirs: LLM requests of different chains are in flight at once. 1 and 1 is the paper's serial loop.
    chains: int = Field(1, ge=1)
    workers: int = Field(1, ge=1)
    # What each change is applied to: `best`, the chain's most accurate program (the paper), or `front`, a program
    # drawn from the non-dominated set of accuracy against params, MACs, memory and latency within the budgets, so
    # the small end of the front, what edge devices run, is improved too.
    parent: Literal["best", "front"] = "best"
    # A chain whose last `adopt_after` attempts brought no new best takes the run's best (another chain's, when it is
    # more accurate than its own) as its own best and goes on from there; recorded. None: chains stay apart.
    adopt_after: int | None = Field(None, ge=1)
    executor: Literal["local", "ray"] = "local"  # ray: the workers are Ray actors over a cluster (see `ray`)
    report_every: int | None = Field(10, ge=1)  # rewrite RUN_DIR/report.html every N iterations (None: only at the end)
    seed: int = 0

    @model_validator(mode="after")
    def _adoption_needs_best_parents(self):
        if self.adopt_after is not None and self.parent == "front":
            raise ValueError("search.adopt_after takes over another chain's best as the parent, so it needs "
                             "search.parent best")
        return self


class RayConfig(Section):
    """search.executor ray. Needs `pip install -e ".[ray]"`."""

    address: str | None = None  # a running cluster ("auto", "HOST:PORT", "ray://..."); None starts one on this machine
    cpus_per_worker: float = Field(1.0, ge=0)
    gpus_per_worker: float | None = Field(None, ge=0)  # None: 1 when eval.device is cuda, else 0 (set it with auto)


class TargetConfig(Section):
    """Latency where the model will run. With `url`, each valid candidate's graph (INT8 when asked, calibrated on a
    few validation images) goes to a device agent (python -m exporters.agent) while the next candidate trains;
    without it, onnxruntime measures it on this machine, in the evaluation worker, after validation."""

    url: str | list[str] | None = None  # one agent, or several identical devices sharing the work
    token_file: str | None = None  # the agent's shared token, one line (required with url)
    threads: int = Field(1, ge=1)
    batch: int = Field(1, ge=1)
    precision: Literal["fp32", "int8"] = "fp32"
    runs: int = Field(50, ge=1)
    warmup: int = Field(10, ge=0)
    timeout_s: float = Field(120.0, gt=0)  # one measurement, upload included; a slower agent counts as down
    retry_s: float = Field(30.0, gt=0)  # how long a graph waits before an agent that failed is asked again
    calibration_images: int = Field(32, ge=1)  # int8 only

    @field_validator("token_file")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        """Relative to where the search starts; a resume may run elsewhere."""
        return str(Path(value).expanduser().absolute()) if value else value

    @property
    def urls(self) -> list[str]:
        return [] if self.url is None else [self.url] if isinstance(self.url, str) else list(self.url)

    @model_validator(mode="after")
    def _agents_need_a_token(self):
        for url in self.urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"target.url must start with http:// or https://, got {url!r}")
            if "@" in url.split("/")[2]:
                raise ValueError("target.url must not hold credentials (user:password@): the agent's token goes in "
                                 "target.token_file")
        if self.url is not None and not self.urls:
            raise ValueError("target.url is an empty list; leave it out to measure on this machine")
        if self.urls and not self.token_file:
            raise ValueError("target.url needs target.token_file, the file holding the agent's token")
        return self


class Config(Section):
    dataset: DatasetConfig = DatasetConfig()
    train: TrainConfig = TrainConfig()
    budget: BudgetConfig = BudgetConfig()
    eval: EvalConfig = EvalConfig()
    llm: LLMRoles = LLMRoles()
    search: SearchConfig = SearchConfig()
    ray: RayConfig = RayConfig()
    target: TargetConfig | None = None  # None: no target latency (only the host's batch-1 latency_ms)

    @model_validator(mode="after")
    def _target_budget_needs_a_target(self):
        if self.budget.max_target_latency_ms is not None and self.target is None:
            raise ValueError("budget.max_target_latency_ms needs a `target` section (at least target.precision)")
        return self


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"unknown config key '{key}'"
    if first["type"] == "value_error":  # a rule across keys: its message names them, the input is a whole section
        message = first["msg"].removeprefix("Value error, ")
        return f"config key '{key}': {message}" if key else f"config: {message}"
    return f"config key '{key}': {first['msg']} (got {first.get('input')!r})"


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=v` -> (['a', 'b'], v), the value read as YAML so numbers, bools and null get their types."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config key '{part}' is not a section (in --set {text})")
            node = child
        node[path[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = (), schema=Config):
    """Read YAML (or start empty), apply `--set` overrides, validate. Raises ConfigError."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    apply_overrides(data, list(overrides))
    return validate(data, schema)


def validate(data: dict, schema=Config):
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e)) from None


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
