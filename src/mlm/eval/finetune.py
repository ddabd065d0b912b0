"""Fine-tune one Hugging Face checkpoint on one task and score it: tokenize → build → train → predict → metrics.

A short explicit loop (torch AdamW + linear warm-up/decay), no `Trainer`. Speed comes
from tokenizing once per task (callers reuse an `Encoded` split across seeds),
dynamic padding, length-grouped batches, and bf16 autocast on GPU.
"""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mlm.config import is_device_name
from mlm.errors import UserError
from mlm.eval.metrics import compute_metrics
from mlm.eval.tasks import TaskSpec
from mlm.model.build import weight_decay_groups
from mlm.model.families import positions_of
from mlm.model.loading import from_pretrained


@dataclass
class FinetuneConfig:
    """Fine-tuning settings. Defaults follow the reference (run_glue: lr 2e-5, 3 epochs, max length 512)."""

    # -- recipe: these change results, and results are reused only when they match --
    lr: float = 2e-5
    """Peak learning rate of AdamW."""
    epochs: int = 3
    """Passes over the training set."""
    batch_size: int = 32
    """Training examples per optimizer step."""
    max_length: int = 512
    """Longest tokenized input (pairs are truncated longest-first); 128 is much faster and close in score."""
    warmup_ratio: float = 0.06
    """Fraction of the steps with the learning rate rising linearly from 0, then decaying linearly to 0."""
    weight_decay: float = 0.01
    """AdamW weight decay, not applied to biases and LayerNorm weights."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Clip the gradient norm to this (0 = no clipping)."""
    max_train_samples: int | None = None
    """Fine-tune on a fixed random subset of this many training examples (None = all); for quick runs."""
    max_eval_samples: int | None = None
    """Score on a fixed random subset of this many evaluation examples (None = all); for quick runs."""
    group_by_length: bool = True
    """Batch examples of similar length together (far less padding); batches are still in random order."""

    # -- implementation: where and how fast, not what is computed --
    eval_batch_size: int = 128
    """Examples per forward pass when predicting."""
    device: str = "auto"
    """"auto" (CUDA when available, else CPU), "cpu", "cuda", "cuda:1", ..."""
    dtype: str = "auto"
    """Autocast dtype: "auto" (bf16 on a GPU that supports it, else fp32), "bf16" or "fp32"; weights stay fp32."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0) or self.epochs < 1 or self.batch_size < 1 or self.eval_batch_size < 1:
            raise UserError(f"lr must be a number > 0, epochs and batch sizes >= 1 (got lr {self.lr}, epochs "
                            f"{self.epochs}, batch_size {self.batch_size}, eval_batch_size {self.eval_batch_size})")
        for name in ("weight_decay", "adam_eps", "max_grad_norm"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise UserError(f"{name} must be a number >= 0, got {getattr(self, name)}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise UserError(f"adam_betas must be two numbers in [0, 1), got {list(self.adam_betas)}")
        if self.max_length < 8:
            raise UserError(f"max_length {self.max_length} is too short (>= 8)")
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise UserError(f"dtype must be auto, bf16 or fp32, got {self.dtype!r}")
        if not is_device_name(self.device):
            raise UserError(f"device: unknown device {self.device!r} (use auto, cpu, cuda or cuda:N)")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"device {self.device} but no CUDA GPU is available (use cpu)")
        for name in ("max_train_samples", "max_eval_samples"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"{name} must be >= 1")
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]  # JSON/TOML give lists

    def recipe(self) -> dict:
        """The settings that change results (saved with results; results are reused only when they match)."""
        skip = ("eval_batch_size", "device", "dtype")
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k not in skip}


# The reference's fine-tuning: run_glue.py under Trainer with its defaults (linear decay, no warm-up, no
# weight decay, AdamW 0.9/0.999/1e-8, clipping at 1.0, no length grouping), lr 2e-5, 3 epochs, batch 32
# (4 per GPU × 8), max length 512, seed 42, the model after the last epoch.
REFERENCE_PROTOCOL = FinetuneConfig(
    lr=2e-5, epochs=3, batch_size=32, max_length=512, warmup_ratio=0.0, weight_decay=0.0,
    adam_betas=(0.9, 0.999), adam_eps=1e-8, max_grad_norm=1.0, group_by_length=False,
)
# name: (settings, seeds). "fast": warm-up 6%, weight decay 0.01, batches of similar lengths (far less
# padding), the median seed of 3. "reference": exactly the reference's settings, one seed, so that its
# rows sit next to the published ones.
PROTOCOLS: dict[str, tuple[FinetuneConfig, list[int]]] = {
    "fast": (FinetuneConfig(), [0, 1, 2]),
    "reference": (REFERENCE_PROTOCOL, [42]),
}


def protocol_name(recipe: dict, seeds: list[int]) -> str:
    """Which protocol made results of this recipe and these seeds: a protocol's name, or "custom"."""
    for name, (cfg, protocol_seeds) in PROTOCOLS.items():
        if recipe == cfg.recipe() and list(seeds) == protocol_seeds:
            return name
    return "custom"


def lr_multiplier(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to the peak over `warmup` steps, then linear decay to 0 at `total` (Trainer's "linear")."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


# ---- loading ----------------------------------------------------------------------------------


@contextmanager
def _hf_quiet():
    """Silence transformers' notices (e.g. "classifier newly initialized", expected here) and bars for one call."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # "Loading weights" bars, once per seed
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _check_model_path(model_path: str) -> None:
    # A local-looking path that does not exist would otherwise become a confusing hub request.
    looks_local = os.sep in model_path or model_path.startswith(".") or Path(model_path).exists()
    if looks_local and not Path(model_path).is_dir():
        raise UserError(f"missing checkpoint directory {model_path}")


def load_config(model_path: str, task: TaskSpec):
    """The checkpoint's config, with the task's number of labels."""
    from transformers import AutoConfig

    _check_model_path(model_path)
    try:
        config = from_pretrained(AutoConfig, model_path, "a model config", num_labels=task.num_labels)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a model config from {model_path}: {str(e).splitlines()[0]}") from None
    if task.label_names:
        config.id2label = dict(enumerate(task.label_names))
        config.label2id = {name: i for i, name in enumerate(task.label_names)}
    config.problem_type = "regression" if task.is_regression else "single_label_classification"
    return config


def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer

    _check_model_path(model_path)
    try:
        tokenizer = from_pretrained(AutoTokenizer, model_path, "a tokenizer")
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a tokenizer from {model_path}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        raise UserError(f"the tokenizer of {model_path} has no padding token")
    return tokenizer


def build_model(model_path: str, config, random_init: bool = False) -> torch.nn.Module:
    """The checkpoint's encoder with a fresh classification head (or all fresh weights if random_init), in fp32."""
    from transformers import AutoModelForSequenceClassification

    with _hf_quiet():
        if random_init:
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            # ignore_mismatched_sizes: a checkpoint already fine-tuned with another label count still loads.
            model = from_pretrained(AutoModelForSequenceClassification, model_path, "a sequence classifier",
                                    config=config, ignore_mismatched_sizes=True)
    return model.float()  # fp32 master weights even if the checkpoint was saved in bf16


def usable_max_length(config, tokenizer, max_length: int) -> int:
    """max_length, capped by what the model's position table holds."""
    limit = positions_of(config) if hasattr(config, "max_position_embeddings") else max_length
    if 0 < getattr(tokenizer, "model_max_length", 0) < 1_000_000:
        limit = min(limit, tokenizer.model_max_length)
    return min(max_length, limit)


# ---- tokenizing (once per task; reused across seeds) -----------------------------------------


@dataclass
class Encoded:
    """A tokenized split: one int32 array per example (no padding yet), and the labels."""

    input_ids: list[np.ndarray]
    token_type_ids: list[np.ndarray] | None
    labels: np.ndarray
    pad_id: int

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))


def subsample(examples: list[dict], n: int | None, seed: int = 0) -> list[dict]:
    """A fixed random subset of n examples, in file order (all of them if n is None or larger)."""
    if n is None or n >= len(examples):
        return examples
    keep = np.sort(np.random.default_rng(seed).choice(len(examples), size=n, replace=False))
    return [examples[i] for i in keep]


def encode(task: TaskSpec, examples: list[dict], tokenizer, max_length: int, token_types: bool) -> Encoded:
    """Tokenize a split (pairs truncated longest-first), in chunks so big tasks show no memory spike."""
    missing = [f for f in (*task.text_fields, "label") if f not in examples[0]] if examples else []
    if missing:
        raise UserError(f"task {task.name}: examples lack field(s) {missing}")
    input_ids: list[np.ndarray] = []
    type_ids: list[np.ndarray] = []
    chunk = 4096
    for start in range(0, len(examples), chunk):
        part = examples[start : start + chunk]
        texts = [[ex[f] for ex in part] for f in task.text_fields]
        enc = tokenizer(
            *texts, truncation=True, max_length=max_length,
            return_token_type_ids=token_types, return_attention_mask=False,
        )
        input_ids.extend(np.asarray(x, dtype=np.int32) for x in enc["input_ids"])
        if token_types:
            type_ids.extend(np.asarray(x, dtype=np.int8) for x in enc["token_type_ids"])
    dtype = np.float32 if task.is_regression else np.int64
    labels = np.asarray([ex["label"] for ex in examples], dtype=dtype)
    return Encoded(input_ids, type_ids if token_types else None, labels, int(tokenizer.pad_token_id))


def uses_token_types(config) -> bool:
    """BERT has two segment embeddings; RoBERTa has one, so it gets no token_type_ids."""
    return getattr(config, "type_vocab_size", 0) > 1


# ---- batches ----------------------------------------------------------------------------------


def train_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, group_by_length: bool) -> list[np.ndarray]:
    """One epoch of index batches. Grouped: shuffle, sort within windows of 50 batches by length,
    cut into batches, shuffle the batches: little padding, yet random order (as HF's length grouping)."""
    order = rng.permutation(len(lengths))
    if group_by_length:
        window = batch_size * 50
        order = np.concatenate(
            [w[np.argsort(-lengths[w], kind="stable")] for w in np.split(order, range(window, len(order), window))]
        )
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def collate(data: Encoded, idx: np.ndarray, device: torch.device, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Pad a batch to its own longest example (rounded up to `multiple`, 8 on GPU for tensor cores)."""
    width = max(len(data.input_ids[i]) for i in idx)
    width = -(-width // multiple) * multiple
    ids = np.full((len(idx), width), data.pad_id, dtype=np.int64)  # (B, T)
    mask = np.zeros((len(idx), width), dtype=np.int64)  # (B, T)
    types = np.zeros((len(idx), width), dtype=np.int64) if data.token_type_ids is not None else None
    for row, i in enumerate(idx):
        n = len(data.input_ids[i])
        ids[row, :n] = data.input_ids[i]
        mask[row, :n] = 1
        if types is not None:
            types[row, :n] = data.token_type_ids[i]  # type: ignore[index]
    batch = {"input_ids": ids, "attention_mask": mask}
    if types is not None:
        batch["token_type_ids"] = types
    return {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in batch.items()}


# ---- train and predict ------------------------------------------------------------------------


def resolve_device(cfg: FinetuneConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def autocast_dtype(cfg: FinetuneConfig, device: torch.device) -> torch.dtype | None:
    """bf16 on a capable GPU (when "auto"), else None (plain fp32)."""
    if cfg.dtype == "bf16" or (cfg.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def _loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    if regression:
        return F.mse_loss(logits.squeeze(-1), labels)
    return F.cross_entropy(logits, labels)


def train_model(
    model: torch.nn.Module, data: Encoded, regression: bool, cfg: FinetuneConfig, seed: int,
    device: torch.device, progress: bool = True, desc: str = "fine-tune",
) -> float:
    """Fine-tune in place; returns the mean training loss of the last epoch."""
    rng = np.random.default_rng(seed)
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = round(total * cfg.warmup_ratio)
    optimizer = torch.optim.AdamW(
        weight_decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=cfg.adam_betas, eps=cfg.adam_eps,
        fused=device.type == "cuda",  # one kernel for all parameters on GPU
    )
    # Linear warm-up to the peak, then linear decay to 0 at the last step.
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, warmup, total))
    amp = autocast_dtype(cfg, device)
    multiple = 8 if device.type == "cuda" else 1
    lengths = data.lengths
    labels_all = torch.from_numpy(data.labels)

    model.to(device).train()
    # A bar on a terminal; in a log file carriage returns would flood it: a plain line per epoch instead.
    show_bar = progress and sys.stderr.isatty()
    bar = tqdm(total=total, desc=desc, disable=not show_bar, leave=False, dynamic_ncols=True)
    epoch_loss, started = 0.0, time.time()
    for epoch in range(cfg.epochs):
        losses = []
        for idx in train_batches(lengths, cfg.batch_size, rng, cfg.group_by_length):
            batch = collate(data, idx, device, multiple)
            labels = labels_all[idx].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(**batch).logits  # (B, num_labels)
            loss = _loss(logits.float(), labels, regression)
            loss.backward()
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
            bar.update(1)
        epoch_loss = torch.stack(losses).mean().item()  # one sync per epoch, not per step
        bar.set_postfix(loss=f"{epoch_loss:.4f}")
        if progress and not show_bar:
            print(f"{desc}: epoch {epoch + 1}/{cfg.epochs} | loss {epoch_loss:.4f} | {time.time() - started:.0f}s",
                  flush=True)
    bar.close()
    return epoch_loss


@torch.no_grad()
def predict(model: torch.nn.Module, data: Encoded, regression: bool, cfg: FinetuneConfig, device: torch.device) -> np.ndarray:
    """Class ids (or scores for regression) for every example, in the split's order."""
    model.to(device).eval()
    amp = autocast_dtype(cfg, device)
    multiple = 8 if device.type == "cuda" else 1
    order = np.argsort(data.lengths, kind="stable")  # similar lengths together: least padding
    out = np.empty(len(data), dtype=np.float32 if regression else np.int64)
    for start in range(0, len(order), cfg.eval_batch_size):
        idx = order[start : start + cfg.eval_batch_size]
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(**collate(data, idx, device, multiple)).logits.float()  # (B, num_labels)
        out[idx] = (logits.squeeze(-1) if regression else logits.argmax(-1)).cpu().numpy()
    return out


def finetune_encoded(
    model_path: str, task: TaskSpec, config, train: Encoded, evals: dict[str, Encoded], cfg: FinetuneConfig,
    seed: int = 0, random_init: bool = False, progress: bool = True,
) -> dict[str, dict[str, float]]:
    """One seed on already tokenized splits: {eval split: {metric: value}}. `config` from `load_config`."""
    device = resolve_device(cfg)
    if device.type == "cpu":
        # Denormal floats (below ~1e-38) appear as small models converge and make CPU math up to 50x
        # slower; flushing them to zero changes nothing measurable. Process-wide, and left on.
        torch.set_flush_denormal(True)
    torch.manual_seed(seed)  # the new head's initialisation and dropout depend on it
    model = build_model(model_path, config, random_init)
    train_model(model, train, task.is_regression, cfg, seed, device, progress, desc=f"{task.name} seed {seed}")
    scores = {}
    for split, data in evals.items():
        preds = predict(model, data, task.is_regression, cfg, device)
        scores[split] = compute_metrics(task.metrics, preds, data.labels)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return scores


def finetune_and_evaluate(
    model_path: str,
    task: TaskSpec,
    train: list[dict],
    eval: list[dict],  # noqa: A002  (the natural name; shadows the builtin only here)
    cfg: FinetuneConfig | None = None,
    seed: int = 0,
    random_init: bool = False,
    progress: bool = True,
) -> dict[str, float]:
    """Fine-tune a checkpoint on in-memory examples and score it: {metric: value} on `eval`.

    Examples are dicts with the task's text fields and "label". random_init=True trains the same
    architecture from fresh random weights (a baseline for what pretraining brings)."""
    cfg = cfg or FinetuneConfig()
    if not train or not eval:
        raise UserError("finetune_and_evaluate needs training and evaluation examples")
    tokenizer = load_tokenizer(model_path)
    config = load_config(model_path, task)
    max_length = usable_max_length(config, tokenizer, cfg.max_length)
    token_types = uses_token_types(config)
    train_enc = encode(task, subsample(train, cfg.max_train_samples), tokenizer, max_length, token_types)
    eval_enc = encode(task, subsample(eval, cfg.max_eval_samples), tokenizer, max_length, token_types)
    return finetune_encoded(model_path, task, config, train_enc, {"eval": eval_enc}, cfg, seed, random_init, progress)["eval"]
