"""Typed pretraining configuration: dataclasses, TOML loading, dotted command-line overrides, validation.

Recipe settings (model, data, train) decide the result; implementation settings (system) decide speed and
memory, so a run may resume with different ones (another micro-batch, more GPUs). Every sequence gets the
same data and masks whatever the system settings; with dropout 0 the losses are the same too (within float
tolerance), with dropout on the dropout draws differ.
Defaults are the reference recipe: RoBERTa-medium, 30k steps of 8,192 × 512 tokens, peak LR 1e-3.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import json
import math
import re
import shlex
import sys
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from mlm.atomic import write_file
from mlm.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
SDPA_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
SCHEDULES = ("linear", "cosine", "wsd")
DECAY_SHAPES = ("linear", "1-sqrt")


@dataclass
class ModelConfig:
    family: str = "roberta"
    """Model family: roberta (byte-level BPE, <s> … </s>), bert (WordPiece, [CLS] … [SEP]) or modernbert (RoPE,
    GeGLU, pre-norm, local/global attention; byte-level BPE, [CLS] … [SEP])."""
    size: str = ""
    """Preset; empty: the family's default (roberta and bert medium, modernbert base). roberta and bert: tiny L2/H128, mini L4/H256, small L4/H512, medium L8/H512, base L12/H768, large
    L24/H1024 (FFN 4H, heads H/64). modernbert: tiny L4/H128, 17m L7/H256, 32m L10/H384, 68m L19/H512, base
    L22/H768, large L28/H1024, 1b L28/H1792 (GLU FFN, heads of 64). Not used with init_from: the model brings its shape."""
    layers: int = 0
    """Encoder layers; 0 keeps the preset's."""
    hidden: int = 0
    """Width of the hidden states; 0 keeps the preset's."""
    heads: int = 0
    """Attention heads (must divide the width); 0 keeps the preset's."""
    intermediate: int = 0
    """Feed-forward width (modernbert: of each GLU half); 0 keeps the preset's."""
    dropout: float = 0.1
    """Dropout on hidden states and attention probabilities (modernbert: on embeddings, attention and MLP)."""
    max_positions: int = 512
    """The longest sequence the model can ever take (data.seq_len may be shorter). modernbert's positions are
    rotary: a later phase (init_from) may raise them, e.g. 1,024 → 8,192."""
    rope_theta: float = 0.0
    """modernbert: RoPE θ of the global-attention layers (local layers keep 10,000); 0 keeps 160,000, or the
    init_from model's. A context-extension phase raises it with max_positions."""
    init_from: str = ""
    """Start from these weights: a checkpoint folder or a hub name (roberta-base, answerdotai/ModernBERT-base)
    of a family mlm trains. Its shape, positions and vocabulary come with it; model.family and model.size are
    not used; dropout is set anew."""

    def __post_init__(self) -> None:
        from mlm.model.families import FAMILIES

        if self.family not in FAMILIES:
            raise UserError(f"model.family: unknown family {self.family!r} (choose {', '.join(FAMILIES)})")
        sizes = FAMILIES[self.family].sizes
        if not self.init_from:  # an init_from model brings its shape: an empty size stays empty
            self.size = self.size or FAMILIES[self.family].default_size
        if self.size and self.size not in sizes:
            raise UserError(f"model.size: unknown {self.family} size {self.size!r} (choose {', '.join(sizes)})")
        for name in ("layers", "hidden", "heads", "intermediate"):
            value = getattr(self, name)
            if not 0 <= value <= 1_000_000:
                raise UserError(f"model.{name} must be positive (0 keeps the preset's), got {value}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.rope_theta) and 0 <= self.rope_theta <= FLOAT32_MAX):
            raise UserError(f"model.rope_theta must be a positive number (0 keeps the default), got {self.rope_theta}")
        if self.rope_theta and not FAMILIES[self.family].rotary and not self.init_from:
            raise UserError(f"model.rope_theta is for rotary positions; model.family={self.family} has a position "
                            "table")
        if self.max_positions < 8:
            raise UserError(f"model.max_positions must be at least 8, got {self.max_positions}")


@dataclass
class DataConfig:
    data_dir: str = "data"
    """Folder written by `mlm prepare` (manifest.json + token shards); with data.sources, leave it out (empty
    unsets a recipe's)."""
    sources: dict[str, float] = field(default_factory=dict)
    """Train on several folders written by `mlm prepare` instead of data_dir, each with a weight: a [data.sources]
    table of folder = weight, or --data.sources='{"data/wiki" = 1, "data/books" = 3}'. Every step's global batch
    takes from each folder its exact share of the weights (largest remainder of weight / total × train.global_batch,
    the same every step), in its own seeded order and epochs; every folder must be prepared with the same
    tokenizer. Validation splits eval.sequences equally between the folders: val_loss/<folder name> is each
    folder's loss, and val_loss the mean over all the sequences evaluated (not weighted by data.sources)."""
    tokenizer: str = ""
    """Tokenizer directory or hub name; empty = the copy `mlm prepare` saved in data_dir/tokenizer (with
    data.sources, in the first of the folders sorted by path)."""
    seq_len: int = 512
    """Tokens per training sequence, special tokens included."""
    mask_rate: float = 0.15
    """Fraction of non-special tokens the model must predict."""
    per_token_masking: bool = False
    """Bernoulli(mask_rate) per token instead of a fixed count per sequence."""

    def __post_init__(self) -> None:
        if self.sources and not self.data_dir.strip():  # --data.data_dir= unsets a recipe's folder
            self.data_dir = DataConfig.data_dir
        if not self.data_dir.strip():
            raise UserError("data.data_dir is empty: name the folder `mlm prepare` wrote")
        if self.sources:
            self._check_sources()
        if self.seq_len < 8:
            raise UserError(f"data.seq_len must be at least 8, got {self.seq_len}")
        if not 0.0 < self.mask_rate < 1.0:
            raise UserError(f"data.mask_rate must be in (0, 1), got {self.mask_rate}")

    def _check_sources(self) -> None:
        if self.data_dir != DataConfig.data_dir:  # the default: the one spelling of "not set" a dataclass has
            raise UserError(f"data.data_dir={self.data_dir} and data.sources are both set: list every folder in "
                            "data.sources and leave data.data_dir out (over a recipe that sets it: --data.data_dir=)")
        names: dict[str, str] = {}
        for folder, weight in self.sources.items():
            name = Path(folder).name
            if not folder.strip() or name in ("", ".."):
                raise UserError(f"data.sources: {folder!r} names no folder of its own: give its path (e.g. data/wiki)")
            if not (math.isfinite(weight) and weight > 0):
                raise UserError(f"data.sources: the weight of {folder} must be a positive finite number, got {weight}")
            if name in names:  # val_loss/<name> would hold two folders' losses
                raise UserError(f"data.sources: {names[name]} and {folder} are both named {name!r}, and each "
                                f"folder's validation loss is logged as val_loss/<folder name>: rename one")
            names[name] = folder

    @property
    def folders(self) -> list[str]:
        """The prepared folders trained on: data.sources' sorted by path (so that the order of the table never
        changes which windows a step takes), or data.data_dir alone."""
        return sorted(self.sources) if self.sources else [self.data_dir]


@dataclass
class TrainConfig:
    steps: int = 30_000
    """Optimizer steps."""
    global_batch: int = 8192
    """Sequences per optimizer step, over all ranks and accumulation steps."""
    lr: float = 1e-3
    """Peak learning rate."""
    warmup_steps: int = 1800
    """Linear warm-up from 0 to lr over these first steps, under every schedule."""
    schedule: str = "linear"
    """After the warm-up: linear (decay to min_lr at `steps`, the reference), cosine (half a cosine to min_lr
    at `steps`) or wsd (warm-up, stable at lr, then decay to min_lr over the last decay_steps steps; such a
    run can grow or branch a decay until its decay begins)."""
    decay_steps: int = 0
    """wsd only: the last steps of the run, over which the rate decays from lr to min_lr."""
    decay_shape: str = "linear"
    """wsd only: the decay's shape, linear or 1-sqrt (lr × (1 − sqrt(fraction of the decay done)), ModernBERT's)."""
    min_lr: float = 0.0
    """The learning rate every schedule decays to at `steps`; 0 ends at 0, as the reference."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """AdamW betas."""
    eps: float = 1e-6
    """AdamW epsilon."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and LayerNorm weights)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables."""
    seed: int = 0
    """Seeds initialisation, data order and masking."""
    max_bad_steps: int = 3
    """A step whose gradient norm is NaN or infinite is skipped: its update is not applied (weights and AdamW
    state stay as they were). Such a step, or one whose loss is NaN or infinite, is a bad step: its loss stays
    out of the logged mean, and after more than this many bad steps in a row training stops with an error,
    writing no checkpoint from them; 0 stops at the first. Under deepspeed the skip needs bf16 with
    bf16.check_grad_overflow (on unless the JSON turns it off); without it, training stops at the first."""
    budget: str = ""
    """Fit the run into a budget instead of running train.steps: wall time ("90s", "8min", "2h") or tokens
    ("5e9 tokens"). A time budget is measured on the first steps (then set back, so they cost time, not
    results) and counts training and evaluation, not the setup before or checkpoint writing. train.steps
    becomes what fits and train.warmup_steps keeps its share of the run; both are recorded in the run's
    config.json, and a resumed run keeps them."""

    def __post_init__(self) -> None:
        parse_budget(self.budget)  # refuse a bad budget now
        for name in ("steps", "global_batch"):
            if getattr(self, name) < 1:
                raise UserError(f"train.{name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "eps", "weight_decay", "grad_clip", "min_lr"):  # nan compares false to everything: say so
            value = getattr(self, name)
            if not math.isfinite(value):
                raise UserError(f"train.{name} must be a finite number, got {value}")
            if abs(value) > FLOAT32_MAX:  # torch keeps these in float32
                raise UserError(f"train.{name} must be at most {FLOAT32_MAX:.3g} (a float32), got {value:g}")
        if self.lr <= 0:
            raise UserError(f"train.lr must be positive, got {self.lr}")
        self._check_schedule()
        if self.max_bad_steps < 0:
            raise UserError(f"train.max_bad_steps must be >= 0, got {self.max_bad_steps}")
        if self.seed < 0:
            raise UserError(f"train.seed must be >= 0, got {self.seed}")
        if self.seed >= 2**32:  # seed × 1,000,003 + step seeds torch's generators, which take 64 bits
            raise UserError(f"train.seed must be below 2^32 = {2**32}, got {self.seed}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise UserError(f"train.warmup_steps must be in [0, train.steps], got {self.warmup_steps}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise UserError(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        for name in ("weight_decay", "grad_clip"):
            if getattr(self, name) < 0:
                raise UserError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.eps <= 0:
            raise UserError(f"train.eps must be positive, got {self.eps}")

    def _check_schedule(self) -> None:
        if self.schedule not in SCHEDULES:
            raise UserError(f"train.schedule: unknown schedule {self.schedule!r} (choose {', '.join(SCHEDULES)})")
        if self.decay_shape not in DECAY_SHAPES:
            raise UserError(f"train.decay_shape: unknown shape {self.decay_shape!r} (choose {', '.join(DECAY_SHAPES)})")
        if not 0 <= self.min_lr <= self.lr:
            raise UserError(f"train.min_lr must be in [0, train.lr={self.lr:g}], got {self.min_lr:g}")
        if self.decay_steps < 0:
            raise UserError(f"train.decay_steps must be >= 0, got {self.decay_steps}")
        if self.schedule != "wsd":  # set but unused would be a silent surprise
            for name, unset in (("decay_steps", 0), ("decay_shape", "linear")):
                if getattr(self, name) != unset:
                    raise UserError(f"train.{name} applies to train.schedule=wsd only (this run's is {self.schedule}): "
                                    f"add --train.schedule=wsd or leave train.{name} out")
            return
        if self.decay_steps < 1:
            raise UserError("train.schedule=wsd needs train.decay_steps: the last steps, over which the rate decays "
                            "to train.min_lr (commonly a tenth to a fifth of train.steps)")
        if self.warmup_steps + self.decay_steps > self.steps:
            raise UserError(f"train.warmup_steps + train.decay_steps = {self.warmup_steps} + {self.decay_steps} is "
                            f"more than train.steps={self.steps}: the decay would begin before the warm-up ends")


def is_device_name(name: str) -> bool:
    """auto, cpu, cuda or cuda:N: a device a setting may name."""
    return re.fullmatch(r"auto|cpu|cuda(:\d+)?", name) is not None


BUDGET_UNITS = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
MAX_BUDGET = {"seconds": 10 * 365 * 86400, "tokens": 1e16}
"""Beyond any real run (ten years, 10^16 tokens): a larger budget is a typo, and would overflow the step count."""
FLOAT32_MAX = 3.4028234663852886e38


def parse_budget(text: str) -> tuple[float | None, float | None]:
    """train.budget → (seconds, tokens), one of them None; ("", "") is no budget: (None, None)."""
    text = text.strip()
    if not text:
        return None, None
    match = re.fullmatch(r"([0-9.eE+]+)\s*(s|sec|min|m|h|tokens?)", text)
    try:
        amount = float(match.group(1)) if match else math.nan
    except ValueError:
        amount = math.nan
    if not math.isfinite(amount) or amount <= 0:
        raise UserError(f'train.budget: cannot read {text!r}: write a time ("90s", "8min", "2h") or tokens ("5e9 tokens")')
    unit = match.group(2)
    seconds, tokens = (None, amount) if unit.startswith("token") else (amount * BUDGET_UNITS[unit], None)
    for kind, value in (("seconds", seconds), ("tokens", tokens)):
        if value is not None and value > MAX_BUDGET[kind]:
            raise UserError(f"train.budget: {text!r} is more than {MAX_BUDGET[kind]:.3g} {kind}, beyond any real run")
    return seconds, tokens


MAX_THREADS = 1024


@dataclass
class SystemConfig:
    micro_batch: int | str = 32
    """Sequences per forward pass on one device; accumulation makes up the rest of the global batch.
    "auto": on a GPU the largest divisor of the per-rank batch (at most 256) whose forward and backward fit
    in memory beside the optimizer state, found by trying them before training; on a CPU the largest
    divisor up to 32."""
    prefetch: bool = True
    """Read and pin the next step's batch in a background thread while the current step computes."""
    fused_optimizer: bool = True
    """On a GPU, AdamW's fused kernel (one launch for every parameter); false: its foreach implementation,
    which costs one host synchronisation per step to skip a step with a NaN or infinite gradient norm."""
    fused_qkv: bool = True
    """Compute each attention layer's query, key and value in one matmul instead of three (the weights and
    checkpoints stay Hugging Face's); false: HF's own attention forward."""
    compile_mode: str = "default"
    """torch.compile mode when compiling: default, reduce-overhead (CUDA graphs) or
    max-autotune-no-cudagraphs (slow to compile)."""
    sdpa_backend: str = "auto"
    """Attention kernel of scaled_dot_product_attention: auto (PyTorch picks), flash, efficient, cudnn or math."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda, or cuda:N."""
    precision: str = "auto"
    """auto (bf16 autocast on GPU, fp32 on CPU), bf16 or fp32."""
    compile: str = "auto"
    """torch.compile the model: auto (on GPU only), on, off."""
    threads: int = 0
    """CPU threads for PyTorch; 0 keeps its default."""
    strategy: str = "auto"
    """Parallelism engine: auto (ddp with several ranks, one plain process otherwise), ddp, fsdp (FSDP2) or
    deepspeed (needs system.deepspeed_config). Changes speed and memory; with dropout 0 the same losses
    within float tolerance."""
    fsdp_reshard_after_forward: bool = False
    """fsdp: free each layer's gathered weights after its forward (ZeRO-3-like, less memory, one more
    all-gather in the backward) instead of keeping them until the backward (ZeRO-2-like)."""
    deepspeed_config: str = ""
    """deepspeed: path of a DeepSpeed JSON (e.g. configs/deepspeed/zero2.json); its "auto" values are filled
    from this config, and a value that contradicts it is refused."""
    dist_timeout_s: int = 1800
    """Seconds a collective may wait for the other ranks before the job fails (e.g. a rank that died)."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise UserError(f"system.strategy: unknown engine {self.strategy!r} (choose {', '.join(STRATEGIES)})")
        if self.strategy == "deepspeed" and not self.deepspeed_config:
            raise UserError("system.strategy=deepspeed needs system.deepspeed_config (e.g. configs/deepspeed/zero2.json)")
        if self.deepspeed_config and self.strategy != "deepspeed":
            raise UserError(f"system.deepspeed_config is set but system.strategy={self.strategy}: add --system.strategy=deepspeed")
        if self.dist_timeout_s < 1:
            raise UserError(f"system.dist_timeout_s must be positive, got {self.dist_timeout_s}")
        if isinstance(self.micro_batch, str):
            if self.micro_batch != "auto":
                raise UserError(f"system.micro_batch must be a positive number or \"auto\", got {self.micro_batch!r}")
        elif self.micro_batch < 1:
            raise UserError(f"system.micro_batch must be positive, got {self.micro_batch}")
        if self.compile_mode not in COMPILE_MODES:
            raise UserError(f"system.compile_mode: unknown mode {self.compile_mode!r} (choose {', '.join(COMPILE_MODES)})")
        if self.sdpa_backend not in SDPA_BACKENDS:
            raise UserError(f"system.sdpa_backend: unknown backend {self.sdpa_backend!r} (choose {', '.join(SDPA_BACKENDS)})")
        if self.threads < 0:
            raise UserError(f"system.threads must be >= 0 (0 keeps PyTorch's default), got {self.threads}")
        if self.threads > MAX_THREADS:  # thousands of threads exhaust the memory map and crash the process
            raise UserError(f"system.threads must be at most {MAX_THREADS}, got {self.threads}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise UserError(f"system.precision: unknown value {self.precision!r} (choose auto, bf16, fp32)")
        if self.compile not in ("auto", "on", "off"):
            raise UserError(f"system.compile: unknown value {self.compile!r} (choose auto, on, off)")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise UserError(f"system.device: unknown device {self.device!r}")


@dataclass
class RunConfig:
    out_dir: str = "runs/mlm"
    """Run directory: checkpoints, metrics.jsonl, TensorBoard events, config.json."""
    log_every: int = 10
    """Steps between logged training metrics."""
    checkpoint_every: int = 1000
    """Steps between checkpoints (the last step is always saved)."""
    keep_checkpoints: int = 0
    """Keep only the newest N checkpoints; 0 keeps all."""
    progress: bool = True
    """A progress bar on a terminal; when false, or when the output is not a terminal (a log file under
    SLURM or nohup), one plain line every log_every steps (step, loss, lr, tokens/s, ETA) instead."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the wandb package)."""
    wandb_project: str = "mlm"
    """Weights & Biases project name."""

    def __post_init__(self) -> None:
        if not self.out_dir.strip():
            raise UserError("run.out_dir is empty: name the run's folder, e.g. --run.out_dir=runs/my-run")
        for name in ("log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise UserError(f"run.{name} must be positive, got {getattr(self, name)}")
        if self.keep_checkpoints < 0:
            raise UserError(f"run.keep_checkpoints must be >= 0, got {self.keep_checkpoints}")


@dataclass
class EvalConfig:
    every: int = 500
    """Steps between validation MLM losses; 0 disables."""
    sequences: int = 512
    """Validation sequences per evaluation (fewer if the split is smaller)."""
    glue_every: int = 0
    """Run `mlm glue` on every N-th checkpoint, in a separate process, one job at a time (checkpoints that
    come while a job runs go together into the next); 0 disables."""
    glue_tasks: str = "all"
    """GLUE tasks for glue_every (comma-separated names or all)."""
    glue_dir: str = ""
    """Local GLUE directory for glue_every; empty = download through `datasets`."""
    glue_args: str = ""
    """More `mlm glue` flags for glue_every, e.g. "--max-length 128 --seeds 1"."""
    glue_device: str = "auto"
    """Device of the glue_every jobs: auto (the first GPU, the one rank 0 trains on, else the CPU), cpu,
    cuda or cuda:N (e.g. a GPU that training leaves free)."""

    def __post_init__(self) -> None:
        from mlm.eval.tasks import parse_tasks

        for name in ("every", "glue_every"):
            if getattr(self, name) < 0:
                raise UserError(f"eval.{name} must be >= 0 (0 disables), got {getattr(self, name)}")
        if self.sequences < 1:
            raise UserError(f"eval.sequences must be positive, got {self.sequences}")
        try:  # checked now, not in a GLUE job's log after the first checkpoint
            parse_tasks(self.glue_tasks)
        except UserError as e:
            raise UserError(f"eval.glue_tasks: {e}") from None
        if not is_device_name(self.glue_device):
            raise UserError(f"eval.glue_device: unknown device {self.glue_device!r} (auto, cpu, cuda or cuda:N)")
        try:  # checked now, not at the first checkpoint hours later
            shlex.split(self.glue_args)
        except ValueError as e:
            raise UserError(f"eval.glue_args cannot be parsed as command-line flags ({e}): {self.glue_args!r}") from None


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        # An init_from model brings its positions: checked against them when it is loaded.
        if self.data.seq_len > self.model.max_positions and not self.model.init_from:
            raise UserError(
                f"data.seq_len={self.data.seq_len} exceeds model.max_positions={self.model.max_positions}"
            )

    def recipe(self) -> dict:
        """The settings that decide the result; a resumed run must match these exactly."""
        d = dataclasses.asdict(self)
        # Whether a run stops on bad steps, never what it computes: a stopped run may resume with another limit.
        del d["train"]["max_bad_steps"]
        return {k: d[k] for k in ("model", "data", "train")}


def _coerce(value, hint, key: str):
    """Check (and where lossless, convert) a value read from TOML or the command line to the field's type."""
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin in (typing.Union, types.UnionType):  # e.g. int | str: the first type that takes the value
        for arm in typing.get_args(hint):
            try:
                return _coerce(value, arm, key)
            except UserError:
                pass
        raise UserError(f"{key}: expected {' or '.join(a.__name__ for a in typing.get_args(hint))}, got {value!r}")
    elif origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, list):
            return [_coerce(v, item, key) for v in value]
    elif origin is dict:  # a TOML table, e.g. data.sources: {"data/wiki" = 1, "data/books" = 3}
        key_type, value_type = typing.get_args(hint)
        if isinstance(value, dict):
            return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key} {k!r}") for k, v in value.items()}
        raise UserError(f"{key}: expected a table of {key_type.__name__} = {value_type.__name__} "
                        f"(e.g. {{\"data/wiki\" = 1, \"data/books\" = 3}}), got {value!r}")
    type_name = getattr(hint, "__name__", str(hint))
    raise UserError(f"{key}: expected {type_name}, got {value!r}")


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise UserError(f"unknown config key {dotted!r}{_suggestion(key, names, prefix)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise UserError(f"{dotted} must be a section, got {value!r}")
            kwargs[key] = _build(hint, value, f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, hint, dotted)
    return cls(**kwargs)


def _suggestion(key: str, names: set[str], prefix: str) -> str:
    """ " (did you mean train.lr?)" for a typo, else the valid keys of that section."""
    close = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {prefix}{close[0]}?)"
    return f" (valid: {', '.join(prefix + n for n in sorted(names))}; see mlm pretrain --help)"


def field_docs(cls) -> dict[str, str]:
    """The docstring under each field of a config dataclass (Python keeps none at run time: read the source)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for field_node, doc_node in zip(body, body[1:]):
        if (
            isinstance(field_node, ast.AnnAssign)
            and isinstance(doc_node, ast.Expr)
            and isinstance(doc_node.value, ast.Constant)
            and isinstance(doc_node.value.value, str)
        ):
            docs[field_node.target.id] = " ".join(doc_node.value.value.split())
    return docs


def settings_help() -> str:
    """Every setting as `--section.key=default  meaning`, for `mlm pretrain --help`."""
    lines = ["settings (override any as --section.key=value; TOML syntax for the value):"]
    defaults = PretrainConfig()
    for section in dataclasses.fields(PretrainConfig):
        section_cls = typing.get_type_hints(PretrainConfig)[section.name]
        docs = field_docs(section_cls)
        lines.append("")
        for f in dataclasses.fields(section_cls):
            value = getattr(getattr(defaults, section.name), f.name)
            shown = json.dumps(value) if not isinstance(value, bool) else str(value).lower()
            lines.append(f"  --{section.name}.{f.name}={shown}")
            lines.append(f"      {docs.get(f.name, '')}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], object]:
    """`--train.lr=5e-4` → (["train", "lr"], 0.0005). The value is read as TOML, else taken as a string."""
    body = text[2:] if text.startswith("--") else text
    key, sep, raw = body.partition("=")
    if not sep or not key:
        raise UserError(f"bad override {text!r}: use --section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PretrainConfig:
    """Defaults, then the TOML file's values, then the overrides; unknown keys and bad values fail by name."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise UserError(f"config file {path} is a folder: give a .toml file (e.g. configs/roberta-medium.toml)")
        if not path.is_file():
            raise UserError(f"config file {path} does not exist")
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(f"config file {path} is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at "
                            f"{e.start}): save it as UTF-8") from None
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"config file {path} is not valid TOML: {e}") from None
        for section, value in values.items():
            if isinstance(value, list) and all(isinstance(item, dict) for item in value):
                raise UserError(f"config file {path}: [[{section}]] is an array of tables: write [{section}]")
    for text in overrides or []:
        keys, value = parse_override(text)
        node = values
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise UserError(f"bad override {text!r}: {k} is not a section")
        node[keys[-1]] = value
    return _build(PretrainConfig, values, "")


def save_config(cfg: PretrainConfig, path: str | Path) -> None:
    write_file(path, json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
