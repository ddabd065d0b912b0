"""Check a user's DeepSpeed JSON against the mlm config and fill its "auto" values.

mlm's config is the single source of truth for the recipe (batch, precision, clipping, optimizer, schedule):
a DeepSpeed file may restate those settings, but it may not quietly change them, so every "auto" is filled
from our config and every explicit value that disagrees is refused by name. The training loop keeps its own
AdamW (no weight decay on biases and LayerNorm weights) and its own schedule (`optim.learning_rate`, applied
by setting the optimizer's lr every step), so matching `optimizer` and `scheduler` sections are dropped rather
than handed to DeepSpeed, which would otherwise build a second optimizer or step a second, lagging schedule.
A WarmupDecayLR with explicit values describes the linear schedule decaying to 0; under any other schedule
(train.schedule cosine or wsd, or train.min_lr above 0) only its "auto" form, which leaves the rate to mlm,
is accepted.

The file is also read the way DeepSpeed reads it, before the model is built (`check_deepspeed_config`): a
top-level key DeepSpeed does not know, which it would ignore in silence ("gradient_clippin" leaves clipping
at 1.0), is refused naming the closest known one, and every section goes through DeepSpeed's own config
models (an unknown key inside zero_optimization, a wrong type), so no mistake waits for deepspeed.initialize.
deepspeed is an optional extra, imported only for that; without it that part is skipped (and training with
it refused).
"""

from __future__ import annotations

import copy
import difflib
import functools
import importlib.util
import json
import math
import typing
from collections.abc import KeysView
from pathlib import Path
from typing import Any

from mlm.config import PretrainConfig
from mlm.errors import UserError, first_line

AUTO = "auto"
# DeepSpeed prints its own progress line every `steps_per_print` steps; mlm does its own logging.
QUIET_STEPS_PER_PRINT = 10**12
STAGE_HINT = (
    "set zero_optimization.stage to 1 or 2; for ZeRO-3-like sharding use system.strategy=fsdp "
    "with system.fsdp_reshard_after_forward=true"
)
SCHEDULER_PARAMS = ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "total_num_steps", "warmup_type")
OPTIMIZER_PARAMS = ("lr", "betas", "eps", "weight_decay", "adam_w_mode", "torch_adam")


def _show(value: Any) -> str:
    """A file value as it is written in JSON (true, 16, "log"); strings of ours are shown bare by the caller."""
    return json.dumps(value)


def _same(value: Any, ours: Any) -> bool:
    """Numbers (and lists of numbers) equal up to float rounding; bools are not numbers here."""
    if isinstance(ours, (list, tuple)):
        return (
            isinstance(value, list)
            and len(value) == len(ours)
            and all(_same(v, o) for v, o in zip(value, ours))
        )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isclose(value, ours, rel_tol=1e-9, abs_tol=1e-12)


class _Resolver:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, message: str) -> UserError:
        return UserError(f"{self.path}: {message}")

    def section(self, ds: dict, dotted: str, key: str, create: bool = False) -> dict | None:
        """The sub-object ds[key] (made empty if `create` and absent); anything but an object is refused."""
        if key not in ds:
            if not create:
                return None
            ds[key] = {}
        if not isinstance(ds[key], dict):
            raise self.fail(f"{dotted} must be an object, got {_show(ds[key])}")
        return ds[key]

    def match(self, node: dict, key: str, dotted: str, ours: Any, source: str, fill: bool = True) -> None:
        """Absent or "auto" → ours (when `fill`); an explicit value must equal ours, which comes from `source`."""
        value = node.get(key, AUTO)
        if value == AUTO:
            if fill:
                node[key] = list(ours) if isinstance(ours, (list, tuple)) else ours
        elif not _same(value, ours):
            raise self.fail(f"{dotted}={_show(value)} contradicts {source}={_show(ours)}")

    def unknown(self, node: dict, allowed: tuple[str, ...], prefix: str) -> None:
        for key in node:
            if key not in allowed:
                raise self.fail(f"{prefix}{key} is not supported by mlm (allowed: {', '.join(allowed)})")

    def typed_section(self, ds: dict, key: str, allowed_params: tuple[str, ...]) -> tuple[dict, dict] | None:
        """A {"type": …, "params": {…}} section (scheduler, optimizer) and its params, unknown keys refused;
        None when the file has no such section."""
        section = self.section(ds, key, key)
        if section is None:
            return None
        self.unknown(section, ("type", "params"), f"{key}.")
        params = self.section(section, f"{key}.params", "params", create=True)
        self.unknown(params, allowed_params, f"{key}.params.")
        return section, params


class _Reads(dict):
    """A dict that notes the keys DeepSpeed asks it for, in order (how its config code looks a key up: [k], .get(k),
    `k in d`, `k in d.keys()`)."""

    def __init__(self, data: dict, asked: list) -> None:
        super().__init__(data)
        self.asked = asked

    def __getitem__(self, key):
        self.asked.append(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.asked.append(key)
        return super().get(key, default)

    def __contains__(self, key) -> bool:
        self.asked.append(key)
        return super().__contains__(key)

    def keys(self):
        return _ReadKeys(self)


class _ReadKeys(KeysView):
    """`k in d.keys()` noted as `k in d` is."""

    def __contains__(self, key) -> bool:
        return key in self._mapping


def _read_by_deepspeed(ds: dict, asked: list) -> object:
    """DeepSpeed's own reading of a config file (`DeepSpeedConfig._initialize_params`: every section through its
    config models; no batch arithmetic, no process group): the parsed config. The top-level keys it asked for go
    to `asked`, in order, also when it raises (what DeepSpeed raises)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    parsed = DeepSpeedConfig.__new__(DeepSpeedConfig)  # no __init__: its batch arithmetic wants the rank count
    parsed._initialize_params(_Reads(copy.deepcopy(ds), asked))
    return parsed


@functools.lru_cache(maxsize=1)
def deepspeed_keys() -> frozenset[str]:
    """The top-level keys the installed DeepSpeed reads: those its config code asks a file for."""
    asked: list = []
    _read_by_deepspeed({"": None}, asked)  # one entry: some sections are looked for only in a non-empty file
    return frozenset(key for key in asked if isinstance(key, str) and key)


def _closest(key: str, known) -> str:
    match = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def _model_fields(title: str, loc: tuple) -> set[str]:
    """The settings (names and aliases) of DeepSpeed's config model class `title`, at the nested place `loc`."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    model = next((cls for cls in subclasses(DeepSpeedConfigModel) if cls.__name__ == title), None)
    for part in loc:
        if model is None or part not in model.model_fields:
            return set()
        annotation = model.model_fields[part].annotation
        nested = [t for t in (annotation, *typing.get_args(annotation))
                  if isinstance(t, type) and issubclass(t, DeepSpeedConfigModel)]
        model = nested[0] if nested else None
    if model is None:
        return set()
    return set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}


def _deepspeed_reads(r: "_Resolver", ds: dict) -> None:
    """Refuse what DeepSpeed would ignore (an unknown top-level key) or refuse only in deepspeed.initialize, after
    the model is built, each in one line naming the key; and ZeRO-Offload, which needs DeepSpeed's own optimizer."""
    if importlib.util.find_spec("deepspeed") is None:
        return
    import deepspeed.runtime.config as ds_config
    from pydantic import ValidationError

    try:
        getattr(ds_config, "_reject_removed_config_keys", lambda _: None)(ds)  # elasticity, sparse_attention, …
    except ds_config.DeepSpeedConfigError as e:
        raise r.fail(f"DeepSpeed refuses it: {first_line(e)}") from None
    known = deepspeed_keys()
    for key in ds:
        if key not in known:
            raise r.fail(f"{key} is not a DeepSpeed setting{_closest(key, known)}")
    asked: list = []
    try:
        parsed = _read_by_deepspeed(ds, asked)
    except Exception as e:  # a section's config model (pydantic), DeepSpeedConfigError, AssertionError, TypeError…
        section = next((key for key in reversed(asked) if key in ds), None)  # the one DeepSpeed was reading
        if isinstance(e, ValidationError):
            error = e.errors()[0]
            dotted = ".".join(str(part) for part in ([section] if section else []) + list(error["loc"]))
            if error["type"] == "extra_forbidden":
                fields = _model_fields(e.title, tuple(error["loc"][:-1]))
                raise r.fail(f"{dotted} is not a DeepSpeed setting{_closest(str(error['loc'][-1]), fields)}") from None
            raise r.fail(f"{dotted}: {error['msg']} (got {_show(error.get('input'))})") from None
        if section is not None and isinstance(e, TypeError) and "must be a mapping" in str(e):
            raise r.fail(f"{section} must be an object, got {_show(ds[section])}") from None
        raise r.fail(f"DeepSpeed refuses it{f' ({section})' if section else ''}: {first_line(e)}") from None
    zero = parsed.zero_config
    if zero.offload_optimizer is not None and str(zero.offload_optimizer.device) != "none":
        raise r.fail(
            f"zero_optimization.offload_optimizer (device {zero.offload_optimizer.device}) is not supported: DeepSpeed "
            "offloads only its own CPU optimizer, and mlm steps its own AdamW; remove it (for less memory: a smaller "
            "system.micro_batch, more ranks, or system.strategy=fsdp)"
        )
    if zero.offload_param is not None and str(zero.offload_param.device) != "none":
        raise r.fail("zero_optimization.offload_param is not supported: it needs ZeRO stage 3, which mlm does not "
                     "use; remove it")


def _read(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"DeepSpeed config {path} does not exist")
    try:
        ds = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"DeepSpeed config {path} is not valid JSON: {e}") from None
    if not isinstance(ds, dict):
        raise UserError(f"DeepSpeed config {path} must hold a JSON object, got {type(ds).__name__}")
    return ds


def _precision(r: _Resolver, ds: dict, cfg: PretrainConfig, device_type: str) -> None:
    """bf16 or fp32 only; an explicit bf16.enabled must agree with system.precision unless that is auto."""
    if "bfloat16" in ds:
        raise r.fail('the "bfloat16" section is DeepSpeed\'s old name: rename it to "bf16"')
    fp16 = r.section(ds, "fp16", "fp16")
    if fp16 is not None:
        if fp16.get("enabled", False) is True:
            raise r.fail("fp16.enabled=true is not supported: mlm trains in bf16 or fp32 (use bf16.enabled)")
        if fp16.get("enabled") == AUTO:
            fp16["enabled"] = False
    precision = cfg.system.precision
    bf16 = r.section(ds, "bf16", "bf16", create=True)
    assert bf16 is not None
    enabled = bf16.get("enabled", AUTO)
    if enabled == AUTO:
        bf16["enabled"] = precision == "bf16" or (precision == "auto" and device_type == "cuda")
    elif not isinstance(enabled, bool):
        raise r.fail(f"bf16.enabled must be true, false or \"auto\", got {_show(enabled)}")
    elif (enabled and precision == "fp32") or (not enabled and precision == "bf16"):
        raise r.fail(f"bf16.enabled={_show(enabled)} contradicts system.precision={precision}")
    if bf16["enabled"]:
        # A step with NaN or infinite gradients is skipped rather than applied (the default from DeepSpeed
        # 0.19, off before): what train.max_bad_steps counts on.
        bf16.setdefault("check_grad_overflow", True)


def _zero_stage(r: _Resolver, ds: dict) -> None:
    zero = r.section(ds, "zero_optimization", "zero_optimization")
    if zero is None or "stage" not in zero:
        raise r.fail(f"zero_optimization.stage is missing: {STAGE_HINT}")
    stage = zero["stage"]
    if isinstance(stage, bool) or stage not in (1, 2):
        raise r.fail(f"zero_optimization.stage={_show(stage)} is not supported: {STAGE_HINT}")


def _scheduler(r: _Resolver, ds: dict, cfg: PretrainConfig) -> None:
    """A scheduler must describe our schedule; it is then dropped (we set the lr)."""
    found = r.typed_section(ds, "scheduler", SCHEDULER_PARAMS)
    if found is None:
        return
    sched, params = found
    if sched.get("type") != "WarmupDecayLR":
        raise r.fail(
            f"scheduler.type={_show(sched.get('type'))} is not supported: mlm applies its own schedule "
            '(train.schedule); use "WarmupDecayLR" with "auto" params, or remove the scheduler'
        )
    warmup_type = params.get("warmup_type")
    if warmup_type is None:
        raise r.fail(
            "scheduler.params.warmup_type is missing, so DeepSpeed would warm up logarithmically; "
            'mlm warms up linearly: set it to "linear"'
        )
    if warmup_type not in ("linear", AUTO):
        raise r.fail(f'scheduler.params.warmup_type={_show(warmup_type)} contradicts mlm\'s linear warm-up')
    t = cfg.train
    if t.schedule != "linear" or t.min_lr:  # WarmupDecayLR cannot describe it: "auto" only, the rate is ours
        ours = f"train.schedule={t.schedule}" + (f" with train.min_lr={t.min_lr:g}" if t.min_lr else "")
        for key in ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "total_num_steps"):
            if params.get(key, AUTO) != AUTO:
                raise r.fail(
                    f"scheduler.params.{key}={_show(params[key])}: an explicit WarmupDecayLR describes a linear "
                    f'decay to 0, not this run\'s {ours}: write "auto" (mlm sets the rate every step) or remove '
                    "the scheduler"
                )
        del ds["scheduler"]
        return
    r.match(params, "warmup_min_lr", "scheduler.params.warmup_min_lr", 0.0, "mlm's warm-up start lr", fill=False)
    r.match(params, "warmup_max_lr", "scheduler.params.warmup_max_lr", t.lr, "train.lr", fill=False)
    r.match(params, "warmup_num_steps", "scheduler.params.warmup_num_steps", t.warmup_steps, "train.warmup_steps",
            fill=False)
    r.match(params, "total_num_steps", "scheduler.params.total_num_steps", t.steps, "train.steps", fill=False)
    del ds["scheduler"]


def _optimizer(r: _Resolver, ds: dict, cfg: PretrainConfig) -> None:
    """An Adam/AdamW section must describe our AdamW; it is then dropped (we pass our own AdamW)."""
    found = r.typed_section(ds, "optimizer", OPTIMIZER_PARAMS)
    if found is None:
        return
    opt, params = found
    kind = opt.get("type")
    if not isinstance(kind, str) or kind.lower() not in ("adam", "adamw"):
        raise r.fail(
            f"optimizer.type={_show(kind)} is not supported: mlm trains with its own AdamW "
            "(remove the optimizer section)"
        )
    t = cfg.train
    for key, ours in (("lr", t.lr), ("betas", t.betas), ("eps", t.eps), ("weight_decay", t.weight_decay)):
        r.match(params, key, f"optimizer.params.{key}", ours, f"train.{key}", fill=False)
    if kind.lower() == "adam" and params.get("adam_w_mode", True) is False:
        raise r.fail(
            "optimizer.params.adam_w_mode=false means Adam with L2 regularisation, which contradicts "
            "mlm's AdamW (decoupled weight decay)"
        )
    del ds["optimizer"]


def _leftover_auto(r: _Resolver, node: Any, dotted: str) -> None:
    if node == AUTO:
        raise r.fail(f'{dotted} is "auto" and mlm has no value for it: set it explicitly')
    if isinstance(node, dict):
        for key, value in node.items():
            _leftover_auto(r, value, f"{dotted}.{key}" if dotted else key)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _leftover_auto(r, value, f"{dotted}[{i}]")


def _resolve_settings(path: Path, cfg: PretrainConfig, device_type: str) -> tuple[_Resolver, dict]:
    """Everything about the file that needs no micro-batch: DeepSpeed's reading, then ours."""
    ds = _read(path)
    r = _Resolver(path)
    _deepspeed_reads(r, ds)
    t = cfg.train
    r.match(ds, "train_batch_size", "train_batch_size", t.global_batch, "train.global_batch")
    r.match(ds, "gradient_clipping", "gradient_clipping", float(t.grad_clip), "train.grad_clip")
    _precision(r, ds, cfg, device_type)
    _zero_stage(r, ds)
    _scheduler(r, ds, cfg)
    _optimizer(r, ds, cfg)
    return r, ds


def check_deepspeed_config(path: str | Path, cfg: PretrainConfig, device_type: str) -> None:
    """Refuse, before the model is built, a file that `resolve_deepspeed_config` would refuse: all but the
    micro-batch and accumulation steps, which system.micro_batch=auto measures on the built model."""
    r, ds = _resolve_settings(Path(path), cfg, device_type)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        ds.pop(key, None)
    _leftover_auto(r, ds, "")


def resolve_deepspeed_config(path: str | Path, cfg: PretrainConfig, accum: int, device_type: str) -> dict:
    """The dict for `deepspeed.initialize(config=...)`: the file at `path` with every "auto" filled from `cfg`.

    `accum` is the gradient accumulation steps the trainer computed (global_batch / (micro_batch × world));
    `device_type` ("cuda" or "cpu") resolves system.precision=auto. Raises UserError, one line naming the file
    and the dotted key, for an unreadable file, a key DeepSpeed does not know or refuses, ZeRO-Offload, an explicit
    value that contradicts `cfg`, an "auto" mlm cannot fill, fp16, ZeRO stage 0 or 3, or an optimizer/scheduler
    that is not ours.
    """
    r, ds = _resolve_settings(Path(path), cfg, device_type)
    r.match(ds, "train_micro_batch_size_per_gpu", "train_micro_batch_size_per_gpu", cfg.system.micro_batch,
            "system.micro_batch")
    r.match(ds, "gradient_accumulation_steps", "gradient_accumulation_steps", accum,
            "train.global_batch/(system.micro_batch*world_size)")
    _leftover_auto(r, ds, "")
    ds.setdefault("steps_per_print", QUIET_STEPS_PER_PRINT)
    ds.setdefault("wall_clock_breakdown", False)
    return ds
