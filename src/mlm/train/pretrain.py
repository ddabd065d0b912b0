"""`mlm pretrain`: setup → fit, as plain functions that tests call directly.

One optimizer step = `accum` micro-batches of `micro_batch` sequences on each of `world_size` ranks:
    global_batch = micro_batch × accum × world_size
Masking happens on the device; the loss is only read back to the host at logging steps. The loop talks to
the parallelism engine (ddp, fsdp, deepspeed) through one interface (train/engines/base.py) and never
asks which one it has.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import math
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn

from mlm import dist
from mlm.atomic import open_append
from mlm.config import PretrainConfig, save_config
from mlm.data.loader import BatchLoader
from mlm.data.masking import MaskingSpec, mask_tokens, masked_count
from mlm.data.mixture import MixedWindows, MixtureSampler, batch_shares
from mlm.data.prepare import TOKENIZER_SUBDIR, read_manifest
from mlm.data.stream import Sampler, TokenStream, Windows
from mlm.errors import UserError
from mlm.model.build import check_tokenizer_layout, count_parameters, describe, install_training_attention, set_sdpa_backend
from mlm.model.start import initial_model, resolve_init_from
from mlm.tokenizer import load_tokenizer, tokenizer_fingerprint
from mlm.train.checkpoint import checkpoint_dirs, load_training_state, remove_partial_checkpoints, save_checkpoint
from mlm.train.autobatch import auto_micro_batch
from mlm.train.kernels import kernels_line, model_attention_kernels
from mlm.train.engines import Engine, build_engine, check_deepspeed
from mlm.train.metrics import MetricsLogger, StepTally
from mlm.train.run_lock import lock_run_dir
from mlm.config import parse_budget
from mlm.train.budget import BudgetPlan, budget_report, fit_to_budget, fit_token_budget, recorded_budget_fit
from mlm.train.metrics import plot_loss_curve, read_metrics
from mlm.train.run_folder import (
    CONFIG_FILE,
    RunFinished,
    check_foreign_checkpoint,
    check_not_finished,
    checkpoint_step,
    check_run_dir,
    checkpoint_to_resume,
    end_of_run_line,
    recorded_train,
    remove_new_run_dir,
    truncate_metrics,
)
from mlm.train.optim import learning_rate

MANY_EPOCHS = 50  # warn above this many passes over the data: likely a corpus far too small for the recipe
LONG_RUN = datetime.timedelta(days=2)  # warn when the measured speed puts the end further away than this


@dataclass
class Setup:
    """Everything `fit` needs, built once by `setup`."""

    cfg: PretrainConfig
    run_dir: Path
    info: dist.DistInfo
    device: torch.device
    precision: str
    """What the model computes in: "bf16" or "fp32"."""
    tokenizer: object
    hf_model: nn.Module
    engine: Engine
    """Model + optimizer wrapped by the chosen engine: the step, evaluation and checkpoints go through it."""
    run_lock: FileLock | None
    """The run folder's lock, held by the main rank for the whole run."""
    train: Windows | MixedWindows
    validation: Windows | MixedWindows | None
    """A mixture's (data.sources) holds only the sources that have validation sequences."""
    sampler: Sampler
    batches: BatchLoader
    """This rank's token batch of each step, on the device, read ahead in a background thread."""
    masking: MaskingSpec
    accum: int
    start_step: int
    compiled: bool
    tally: dict = dataclasses.field(default_factory=dict)
    """The checkpoint's StepTally.state(): losses and bad steps since the last logged step before start_step."""
    budget: BudgetPlan | None = None
    """What a time budget fixed the steps from, when this process fixed them (for the end-of-run line)."""


def resolve_device(name: str, info: dist.DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"system.device={name} but no CUDA GPU is available")
        return torch.device("cuda", info.local_rank) if name == "cuda" else torch.device(name)
    return torch.device("cpu")


def wants_bf16(cfg: PretrainConfig, device: torch.device) -> bool:
    return cfg.system.precision == "bf16" or (cfg.system.precision == "auto" and device.type == "cuda")


def wants_compile(cfg: PretrainConfig, device: torch.device) -> bool:
    return cfg.system.compile == "on" or (cfg.system.compile == "auto" and device.type == "cuda")


def masking_spec(cfg: PretrainConfig, tokenizer) -> MaskingSpec:
    return MaskingSpec(
        rate=cfg.data.mask_rate,
        mask_token_id=tokenizer.mask_token_id,
        vocab_size=len(tokenizer),
        special_ids=tuple(sorted(set(tokenizer.all_special_ids))),
        per_token=cfg.data.per_token_masking,
    )


def resolve_micro_batch(cfg: PretrainConfig, hf_model: nn.Module, per_rank: int, device: torch.device,
                        bf16: bool, log=print, info: dist.DistInfo = dist.DistInfo()) -> PretrainConfig:
    """cfg with system.micro_batch="auto" replaced by the micro-batch chosen for this model and device (the
    same on every rank of `info`)."""
    if cfg.system.micro_batch != "auto":
        return cfg
    k = cfg.data.seq_len if cfg.data.per_token_masking else masked_count(cfg.data.seq_len, cfg.data.mask_rate)
    micro = auto_micro_batch(hf_model, per_rank, cfg.data.seq_len, k, device, torch.bfloat16 if bf16 else None, log, info)
    return dataclasses.replace(cfg, system=dataclasses.replace(cfg.system, micro_batch=micro))


def load_data(cfg: PretrainConfig, manifest: dict, tokenizer) -> tuple[Windows | MixedWindows, Windows | MixedWindows | None]:
    """The training and validation windows of data.data_dir (whose manifest is given), or of every folder of
    data.sources (the first's manifest given): a MixedWindows then, named by folder name."""
    if not cfg.data.sources:
        return _load_folder(cfg, cfg.data.data_dir, manifest, tokenizer)
    folders = cfg.data.folders
    manifests = [manifest] + [read_manifest(folder) for folder in folders[1:]]
    first = manifests[0]["tokenizer"]
    for folder, other in zip(folders[1:], manifests[1:]):
        if other["tokenizer"]["fingerprint"] != first["fingerprint"]:  # their token ids mean other words
            raise UserError(
                f"data.sources: {folder} was prepared with tokenizer {other['tokenizer']['name']!r} (fingerprint "
                f"{other['tokenizer']['fingerprint']}), but {folders[0]} with {first['name']!r} (fingerprint "
                f"{first['fingerprint']}): prepare every source with the same tokenizer"
            )
    loaded = [_load_folder(cfg, folder, m, tokenizer) for folder, m in zip(folders, manifests)]
    names = [Path(folder).name for folder in folders]
    train = MixedWindows(names, [windows for windows, _ in loaded])
    evaluated = [i for i, (_, validation) in enumerate(loaded) if validation is not None]
    if cfg.eval.every and len(evaluated) > cfg.eval.sequences:
        raise UserError(f"eval.sequences={cfg.eval.sequences} is fewer than the {len(evaluated)} folders of "
                        "data.sources with validation data: each folder's validation loss needs a sequence")
    validation = MixedWindows([names[i] for i in evaluated], [loaded[i][1] for i in evaluated]) if evaluated else None
    return train, validation


def _load_folder(cfg: PretrainConfig, folder: str, manifest: dict, tokenizer) -> tuple[Windows, Windows | None]:
    """One prepared folder's training and validation windows (None: no validation sequence)."""
    if manifest["tokenizer"]["fingerprint"] != tokenizer_fingerprint(tokenizer):
        raise UserError(
            f"{folder} was prepared with tokenizer {manifest['tokenizer']['name']!r}, "
            f"not the configured {cfg.data.tokenizer!r}: prepare the data again or configure that tokenizer"
        )
    seq_len = cfg.data.seq_len
    windows = {
        split: Windows(TokenStream(folder, split, manifest), seq_len, tokenizer.cls_token_id, tokenizer.sep_token_id)
        for split in ("train", "validation")
    }
    train = windows["train"]
    if train.count == 0:
        raise UserError(
            f"the corpus is too small: {len(train.stream)} training tokens, fewer than one sequence "
            f"of {seq_len} ({seq_len - 2} tokens + 2 special)" + (f" in {folder}" if cfg.data.sources else "")
        )
    validation = windows["validation"] if windows["validation"].count > 0 else None
    return train, validation


def make_sampler(cfg: PretrainConfig, train: Windows | MixedWindows) -> Sampler:
    """Which windows each step trains on: one folder's shuffled epochs, or each source's exact share."""
    if isinstance(train, MixedWindows):
        weights = [cfg.data.sources[folder] for folder in cfg.data.folders]
        return MixtureSampler(train.names, [part.count for part in train.parts], weights, cfg.train.global_batch,
                              cfg.train.seed)
    return Sampler(train.count, cfg.train.global_batch, cfg.train.seed)


def setup(cfg: PretrainConfig, resume: str | None = None, log=print) -> Setup:
    """Validate everything that can be wrong before any output is written, then build the run."""
    wants_cuda = cfg.system.device.startswith("cuda") or (cfg.system.device == "auto" and torch.cuda.is_available())
    strategy = "ddp" if cfg.system.strategy == "auto" else cfg.system.strategy
    if strategy == "deepspeed":
        check_deepspeed()
    # fsdp and deepspeed need a process group even on one process; ddp on one process needs none.
    info = dist.init("cuda" if wants_cuda else "cpu", cfg.system.dist_timeout_s, need_group=strategy != "ddp")
    device = resolve_device(cfg.system.device, info)
    if cfg.system.threads:
        torch.set_num_threads(cfg.system.threads)
    set_sdpa_backend(cfg.system.sdpa_backend, device)
    if cfg.run.wandb and importlib.util.find_spec("wandb") is None:
        raise UserError("run.wandb is on but the wandb package is not installed (pip install wandb)")
    run_dir = Path(cfg.run.out_dir)
    cfg = resolve_init_from(cfg, log if info.is_main else lambda _: None)  # its shape, before the run folder is compared
    cfg = recorded_budget_fit(cfg, run_dir)
    new_budget = bool(cfg.train.budget) and cfg.train.budget != recorded_train(run_dir).get("budget")
    if new_budget:  # tokens fix the steps by arithmetic, before anything is written
        cfg = fit_token_budget(cfg, log if info.is_main else lambda _: None)
    if strategy == "deepspeed":  # the whole file now, not after the model is built and DeepSpeed's ops compiled
        from mlm.train.deepspeed_config import check_deepspeed_config

        check_deepspeed_config(cfg.system.deepspeed_config, cfg, device.type)
    # The main rank reads the checkpoints (every file's checksum); the other ranks take its answer.
    checkpoint = dist.broadcast_from_main(checkpoint_to_resume(run_dir, resume, log) if info.is_main else None, info)
    if isinstance(checkpoint, UserError):
        raise checkpoint
    check_run_dir(run_dir, cfg, checkpoint)
    if checkpoint is not None:
        check_foreign_checkpoint(checkpoint, run_dir, cfg)
        check_not_finished(run_dir, checkpoint, checkpoint_step(checkpoint), cfg)  # before building anything

    manifest = read_manifest(cfg.data.folders[0])  # first: the default tokenizer lives in the data folder
    tokenizer = load_tokenizer(cfg.data.tokenizer or Path(cfg.data.folders[0]) / TOKENIZER_SUBDIR)
    check_tokenizer_layout(cfg.model.family, tokenizer)
    train, validation = load_data(cfg, manifest, tokenizer)

    per_rank, remainder = divmod(cfg.train.global_batch, info.world_size)
    if remainder or (cfg.system.micro_batch != "auto" and per_rank % cfg.system.micro_batch):
        raise UserError(
            f"train.global_batch={cfg.train.global_batch} is not a multiple of "
            f"system.micro_batch={cfg.system.micro_batch} × {info.world_size} rank(s)"
        )
    bf16 = wants_bf16(cfg, device)

    hf_model = initial_model(cfg, tokenizer, checkpoint, log if info.is_main else lambda _: None)
    hf_model.to(device).train()
    install_training_attention(hf_model, cfg.system.fused_qkv)
    cfg = resolve_micro_batch(cfg, hf_model, per_rank, device, bf16, log if info.is_main else lambda _: None, info)
    if info.is_main:  # before the engine wraps (shards) the model: the probe is one plain forward
        log(kernels_line(model_attention_kernels(hf_model, cfg.data.seq_len, device, torch.bfloat16 if bf16 else None),
                         "training attention, uncompiled"))
    accum = per_rank // cfg.system.micro_batch
    ds_config = None
    if strategy == "deepspeed":
        from mlm.train.deepspeed_config import resolve_deepspeed_config

        ds_config = resolve_deepspeed_config(cfg.system.deepspeed_config, cfg, accum, device.type)
        bf16 = bool(ds_config["bf16"]["enabled"])  # DeepSpeed casts the model itself: the file decides
        from mlm.train.engines.deepspeed_engine import op_build_notice

        notice = op_build_notice(device) if info.is_main else None
        if notice:  # said before minutes of compiling, not after
            log(notice)
    compiled = wants_compile(cfg, device)
    autocast_dtype = torch.bfloat16 if bf16 and strategy != "deepspeed" else None
    engine = build_engine(strategy, cfg, hf_model, device, info, compiled, autocast_dtype, ds_config)
    start_step, tally = load_training_state(checkpoint, engine, info, device) if checkpoint is not None else (0, {})
    if checkpoint is not None:
        check_not_finished(run_dir, checkpoint, start_step, cfg)
    sampler = make_sampler(cfg, train)
    # Damaged data (token ids beyond the vocabulary) fails here, before the run folder changes; a shard damaged
    # further on fails at its step with the same one-line error.
    train.batch(sampler.rank_batch_ids(start_step, info.rank, info.world_size))

    run_lock = None
    created = info.is_main and not run_dir.exists()  # a run that fails in setup removes the folder it made
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        run_lock = lock_run_dir(run_dir)  # before anything in the folder changes

    masking = masking_spec(cfg, tokenizer)
    s = Setup(
        cfg=cfg,
        run_dir=run_dir,
        info=info,
        device=device,
        precision="bf16" if bf16 else "fp32",
        tokenizer=tokenizer,
        hf_model=hf_model,
        engine=engine,
        run_lock=run_lock,
        train=train,
        validation=validation,
        sampler=sampler,
        batches=BatchLoader(train, sampler, info.rank, info.world_size, device, cfg.system.prefetch),
        masking=masking,
        accum=accum,
        start_step=start_step,
        compiled=compiled,
        tally=tally,
    )
    try:
        if start_step == 0 and new_budget and parse_budget(cfg.train.budget)[0] is not None:  # a time budget
            s.budget = fit_to_budget(s, log if info.is_main else lambda _: None, train_step, evaluate)
        if info.is_main:
            save_config(s.cfg, run_dir / CONFIG_FILE)
            truncate_metrics(run_dir, start_step)
            remove_partial_checkpoints(run_dir)
            _print_arithmetic(s, checkpoint, log)
        dist.barrier(info)
    except BaseException:
        if run_lock is not None:
            run_lock.release()
            if created:
                remove_new_run_dir(run_dir)
        raise
    return s


def _print_arithmetic(s: Setup, checkpoint: Path | None, log) -> None:
    cfg = s.cfg
    tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
    epochs = cfg.train.steps * cfg.train.global_batch / s.train.count
    mixture = isinstance(s.sampler, MixtureSampler)
    log(
        f"model: {describe(s.hf_model.config)}, {count_parameters(s.hf_model) / 1e6:.2f}M parameters, on {s.device} ({s.precision}{', compiled' if s.compiled else ''}), "
        f"engine {s.engine.name}"
    )
    log(
        f"batch: micro_batch {cfg.system.micro_batch} × accumulation {s.accum} × ranks {s.info.world_size} "
        f"= global batch {cfg.train.global_batch} sequences of {cfg.data.seq_len} = {tokens_per_step:,} tokens/step"
    )
    resuming = f"; resuming from {checkpoint} at step {s.start_step}" if checkpoint else ""
    steps_text = f"{cfg.train.steps:,} step{'s' if cfg.train.steps != 1 else ''}"
    if not mixture:
        log(
            f"data: {s.train.count:,} training sequences ({len(s.train.stream):,} tokens); "
            f"{steps_text} = {epochs:.2f} epochs" + resuming
        )
    else:
        sampler = s.sampler
        log(f"data: {len(sampler.names)} sources; every step's {cfg.train.global_batch:,} sequences: "
            + ", ".join(f"{share:,} from {name} (weight {weight:g})"
                        for name, share, weight in zip(sampler.names, sampler.shares, sampler.weights)) + resuming)
        for folder, name, part, passes in zip(cfg.data.folders, sampler.names, s.train.parts,
                                              sampler.epochs(cfg.train.steps).values()):
            log(f"  {name} ({folder}): {part.count:,} training sequences ({len(part.stream):,} tokens); "
                f"{steps_text} = {passes:.2f} epochs")
    evaluated = set(s.validation.names) if isinstance(s.validation, MixedWindows) else set()
    for folder in cfg.data.folders:
        if cfg.eval.every and (s.validation is None or (mixture and Path(folder).name not in evaluated)):
            key = f"val_loss/{Path(folder).name}" if mixture else "validation loss"
            log(
                f"warning: {folder} has no validation sequence of {cfg.data.seq_len} tokens, so no {key} "
                "will be reported: prepare it again with a larger --val-fraction"
            )
    passes = s.sampler.epochs(cfg.train.steps) if mixture else {None: epochs}
    for name, times in passes.items():
        if times > MANY_EPOCHS:
            sequences = s.sampler.shares[s.sampler.names.index(name)] if mixture else cfg.train.global_batch
            log(
                f"warning: {cfg.train.steps:,} steps of {sequences:,} sequences see the training data"
                + (f" of {name}" if mixture else "")
                + f" {times:,.1f} times (the reference recipe: about 40); a larger corpus"
                + (", a lower weight" if mixture else "") + " or fewer train.steps"
            )


def _masking_generator(device: torch.device, seed: int, step: int) -> torch.Generator:
    """Masks depend only on (seed, step): not on the micro-batch size, the number of ranks, or where a
    run was resumed, so a resumed run masks exactly as an unbroken one."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1_000_003 + step)
    return gen


def masked_batch(s: Setup, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This rank's slice of the global batch of `step`, masked on the device: (masked ids (N, T), positions
    (N, K), labels (N, K)) with N = accum × micro_batch."""
    batch = s.batches.get(step)  # (N, T); step + 1's is read meanwhile
    # Draw masks for the global batch and keep this rank's rows: every sequence is masked alike whatever
    # the micro-batch size or number of ranks.
    gen = _masking_generator(s.device, s.cfg.train.seed, step)
    return mask_tokens(batch, s.masking, gen, row_offset=s.info.rank * len(batch), total_rows=s.cfg.train.global_batch)


def train_step(s: Setup, step: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One optimizer step; returns (mean loss, grad norm) as device tensors (no host synchronisation), and the lr."""
    cfg = s.cfg
    masked, positions, labels = masked_batch(s, step)  # (N, T), (N, K), (N, K)
    micro_batches = list(zip(*(t.split(cfg.system.micro_batch) for t in (masked, positions, labels))))
    loss_sum = torch.zeros((), device=s.device)
    for micro, (input_ids, micro_positions, micro_labels) in enumerate(micro_batches):
        last = micro == len(micro_batches) - 1
        loss_sum += s.engine.forward_backward(input_ids, micro_positions, micro_labels, s.accum, last)
    lr = learning_rate(step, cfg.train)
    grad_norm = s.engine.step(lr, cfg.train.grad_clip)
    return dist.mean_across_ranks(loss_sum, s.info), grad_norm, lr


@torch.no_grad()
def evaluate(s: Setup) -> dict[str, float] | None:
    """Validation MLM losses with fixed masks: {"val_loss": …}, and with data.sources one "val_loss/<folder
    name>" per folder that has validation data; None when there is none.

    One folder: the mean loss of up to eval.sequences validation sequences spread over its split. data.sources:
    eval.sequences is split equally between the folders (the first ones get one more when it does not divide),
    each folder's loss is computed as one folder's would be on its share (its own fixed masks), and val_loss is
    the mean over all the sequences evaluated, so each folder counts by its sequences, not by its weight. Every
    rank evaluates the same sequences (a sharded model needs every rank in its forward)."""
    if s.validation is None:
        return None
    if isinstance(s.validation, MixedWindows):
        shares = batch_shares([1.0] * len(s.validation.parts), s.cfg.eval.sequences)
        parts = [(f"val_loss/{name}", part, min(share, part.count))
                 for name, part, share in zip(s.validation.names, s.validation.parts, shares)]
    else:
        parts = [(None, s.validation, min(s.cfg.eval.sequences, s.validation.count))]
    s.engine.train(False)
    sums = {key: _validation_loss_sum(s, windows, count) for key, windows, count in parts}
    s.engine.train(True)
    figures = {"val_loss": (sum(sums.values()) / sum(count for _, _, count in parts)).item()}
    for key, _, count in parts:
        if key is not None:
            figures[key] = (sums[key] / count).item()
    return figures


def _validation_loss_sum(s: Setup, windows: Windows, count: int) -> torch.Tensor:
    """The summed per-sequence MLM loss of `count` sequences spread evenly over `windows`, with fixed masks."""
    ids = torch.linspace(0, windows.count - 1, count).long().numpy()
    # Masks for the whole evaluation set at once, like training's global batch: the same masks whatever
    # system.micro_batch (which only chunks the forward passes below).
    input_ids = torch.from_numpy(windows.batch(ids)).to(s.device)  # (count, T)
    gen = _masking_generator(s.device, s.cfg.train.seed, step=-1)  # the same masks at every evaluation
    masked, positions, labels = mask_tokens(input_ids, s.masking, gen)
    total = torch.zeros((), device=s.device)
    for chunk in zip(*(t.split(s.cfg.system.micro_batch) for t in (masked, positions, labels))):
        total += s.engine.eval_loss(*chunk).float() * len(chunk[0])
    return total


def fit(s: Setup, log=print) -> dict:
    """Train from s.start_step to cfg.train.steps; returns the final train and validation losses.

    On SIGTERM, SIGUSR1, SIGHUP or SIGINT every rank finishes its step, they agree to stop (one all-reduce), write a
    checkpoint together and return with `stopped_by` set to the signal's name."""
    from tqdm.auto import tqdm

    cfg = s.cfg
    main = s.info.is_main
    logger = MetricsLogger(s.run_dir, cfg.run.wandb, cfg.run.wandb_project, dataclasses.asdict(cfg)) if main else None
    tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
    # A bar on a terminal; in a log file (SLURM, nohup) carriage returns would flood it: plain lines instead.
    show_bar = main and cfg.run.progress and sys.stdout.isatty()
    bar = tqdm(total=cfg.train.steps, initial=s.start_step, disable=not show_bar, unit="step", dynamic_ncols=True)
    say = bar.write if show_bar else (log if main else lambda _: None)
    # The logged loss is the mean since the last logged step; a resumed run starts with the checkpoint's part.
    tally = StepTally(s.device, s.tally)
    steps_in_window, window_start = 0, time.time()  # for the speed: this process's steps only
    last_loss = last_val = stopped_by = None
    windows_logged = 0
    glue_jobs = GlueQueue(cfg, s.run_dir)
    checkpoint = None
    # The time training uses (steps and evaluations), for the end-of-run line: checkpoint writing is apart.
    started, checkpoint_s, evaluations = time.perf_counter(), 0.0, 0

    def write_checkpoint(step: int) -> Path:
        nonlocal checkpoint_s
        begin = time.perf_counter()
        path = save_checkpoint(s.run_dir, step, s.engine, s.tokenizer, s.info, s.device, cfg.run.keep_checkpoints,
                               keep_also=glue_jobs.busy_steps(), tally=tally.state())
        if main:
            plot_loss_curve(read_metrics(s.run_dir), s.run_dir / "loss_curve.png")
        checkpoint_s += time.perf_counter() - begin
        return path

    if cfg.eval.every and s.start_step == 0 and s.validation is not None:
        figures = evaluate(s)  # the curve starts from the untrained model
        evaluations += 1
        if main:
            logger.log(0, **figures)
    with dist.stop_on_signals() as stop:
        for step in range(s.start_step, cfg.train.steps):
            loss, grad_norm, lr = train_step(s, step)
            tally.add(loss, grad_norm)
            steps_in_window += 1
            done = step + 1
            bar.update(1)
            if done % cfg.run.log_every == 0 or done == cfg.train.steps:
                _stop_if_diverged(s, tally, done, lr)
                window_loss, bad_steps = tally.take_window()  # with the check: the host syncs of the step loop
                last_loss = window_loss if window_loss is not None else last_loss
                seconds_per_step = (time.time() - window_start) / steps_in_window
                tokens_per_s = tokens_per_step / seconds_per_step
                if main:
                    figures = {"loss": window_loss} if window_loss is not None else {}
                    if bad_steps:
                        figures["bad_steps"] = bad_steps
                        say(f"warning: {bad_steps} of the steps up to step {done} had a NaN or infinite loss or "
                            "gradient norm: left out of the logged loss, their update skipped if the gradient was")
                    norm = grad_norm.item()
                    logger.log(done, **figures, lr=lr, **({"grad_norm": norm} if math.isfinite(norm) else {}),
                               tokens_per_s=tokens_per_s, **_peak_memory(s.device), **s.sampler.figures(done))
                    bar.set_postfix(loss=f"{window_loss:.3f}" if window_loss is not None else "-", lr=f"{lr:.2e}",
                                    tok_s=f"{tokens_per_s:,.0f}")
                    eta = datetime.timedelta(seconds=round((cfg.train.steps - done) * seconds_per_step))
                    windows_logged += 1
                    if windows_logged == 2 and eta > LONG_RUN:  # the first window includes compilation
                        say(f"warning: at the measured {tokens_per_s:,.0f} tokens/s this run ends in about {eta}; "
                            "more GPUs (mlm launch), a smaller model.size or fewer train.steps shorten it")
                    if not show_bar:
                        shown = f"{window_loss:.4f}" if window_loss is not None else "-"
                        say(f"step {done}/{cfg.train.steps} | loss {shown} | lr {lr:.2e} | "
                            f"{tokens_per_s:,.0f} tokens/s | ETA {eta}")
                steps_in_window = 0
                window_start = time.time()
                if main:
                    glue_jobs.start_if_idle()
            # Before a stop: a resumed run starts after this step and would never evaluate it.
            if cfg.eval.every and (done % cfg.eval.every == 0 or done == cfg.train.steps):
                _stop_if_diverged(s, tally, done, lr)  # never an evaluation of a diverged state
                figures = evaluate(s)
                last_val = figures["val_loss"] if figures is not None else None
                evaluations += 1
                if main and figures is not None:
                    logger.log(done, **figures)
                    say(f"step {done}: validation loss {last_val:.4f}")
            signum = stop.agreed(s.info)
            if signum is not None:
                stopped_by = signal.Signals(signum).name
                _stop_if_diverged(s, tally, done, lr)
                checkpoint = write_checkpoint(done)
                say(f"stopped by {stopped_by} after step {done}: checkpoint written to {checkpoint}; "
                    "continue with the same command and --resume")
                break
            if done % cfg.run.checkpoint_every == 0 or done == cfg.train.steps:
                _stop_if_diverged(s, tally, done, lr)  # never a checkpoint of a diverged state
                checkpoint = write_checkpoint(done)
                if main:
                    glue_jobs.add(done)
    bar.close()
    trained_s = time.perf_counter() - started - checkpoint_s
    if main:
        glue_jobs.finish()
    if logger is not None:
        logger.close()
    return {
        "train_loss": last_loss,
        "val_loss": last_val,
        "steps": cfg.train.steps,
        "parameters": count_parameters(s.hf_model),
        "stopped_by": stopped_by,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "trained_s": trained_s,
        "evaluations": evaluations if s.validation is not None else 0,
    }


def _stop_if_diverged(s: Setup, tally: StepTally, step: int, lr: float) -> None:
    """Stop, writing nothing more, once more than train.max_bad_steps steps in a row had a NaN or infinite
    loss or gradient norm; with an engine that cannot skip such a step, at the first. One host sync: called
    at logging, evaluation and checkpoint steps only."""
    allowed = s.cfg.train.max_bad_steps if s.engine.skips_non_finite_steps else 0
    longest = tally.check()
    if longest > allowed:
        good = checkpoint_dirs(s.run_dir)
        raise UserError(
            f"training diverged: {longest} step{'s' if longest > 1 else ''} in a row had a NaN or infinite loss or "
            f"gradient norm by step {step} (lr {lr:.2e}; {allowed} tolerated); no checkpoint was written from them. "
            "Lower train.lr or check the data, then " + (f"resume from {good[-1]}" if good else "start again")
        )


def _peak_memory(device: torch.device) -> dict:
    """Peak GPU memory so far, for the metrics (nothing on the CPU)."""
    if device.type != "cuda":
        return {}
    return {"peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30}


class GlueQueue:
    """eval.glue_every: score checkpoints on GLUE in a separate process while training goes on, one job at a
    time, so jobs never pile up and slow training; checkpoints that come while a job runs wait, and go
    together into the next job (`mlm glue --run RUN --steps a,b`). Those still waiting when training ends
    start then."""

    def __init__(self, cfg: PretrainConfig, run_dir: Path, launch=None):
        self.cfg, self.run_dir = cfg, run_dir
        self.launch = launch or self._launch
        self.pending: list[int] = []
        self.job = None
        self.job_steps: list[int] = []

    def add(self, step: int) -> None:
        """A new checkpoint at `step`: queue it if it is one of every eval.glue_every-th."""
        if self.cfg.eval.glue_every and (step // self.cfg.run.checkpoint_every) % self.cfg.eval.glue_every == 0:
            self.pending.append(step)
        self.start_if_idle()

    def start_if_idle(self) -> None:
        if self.pending and (self.job is None or self.job.poll() is not None):
            self._start()

    def finish(self) -> None:
        """Training is over: what still waits starts now, beside a job that may still run."""
        if self.pending:
            self._start()

    def busy_steps(self) -> set[int]:
        """Checkpoints a GLUE job waits for or reads now: run.keep_checkpoints must not delete them."""
        running = self.job is not None and self.job.poll() is None
        return set(self.pending) | (set(self.job_steps) if running else set())

    def _start(self) -> None:
        self.job, self.job_steps, self.pending = self.launch(self.pending), self.pending, []

    def _launch(self, steps: list[int]) -> subprocess.Popen:
        cfg = self.cfg
        out = self.run_dir / "glue"
        out.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "mlm", "glue", "--run", str(self.run_dir), "--steps", ",".join(map(str, steps))]
        command += ["--tasks", cfg.eval.glue_tasks, "--no-progress", "--device", cfg.eval.glue_device,
                    *shlex.split(cfg.eval.glue_args)]
        if cfg.eval.glue_dir:
            command += ["--glue-dir", cfg.eval.glue_dir]
        with open_append(out / "glue.log") as log_file:
            return subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)


def pretrain(cfg: PretrainConfig, resume: str | None = None, log=print) -> dict:
    """The whole `mlm pretrain` command; a finished run ends with a line saying how long it took, its final
    losses and where its final checkpoint is."""
    started = time.perf_counter()
    try:
        try:
            s = setup(cfg, resume, log)
        except RunFinished as finished:  # --resume on a finished run: say so, train nothing
            log(str(finished))
            return {"train_loss": None, "val_loss": None, "steps": finished.steps, "stopped_by": None,
                    "checkpoint": str(finished.checkpoint), "finished": True}
        try:
            summary = fit(s, log)
        finally:
            s.batches.close()
            if s.run_lock is not None:
                s.run_lock.release()
        if s.info.is_main and not summary["stopped_by"]:
            if s.budget is not None:
                log(budget_report(s.budget, summary["trained_s"], summary["steps"], summary["evaluations"]))
            log(end_of_run_line(summary, s.start_step, time.perf_counter() - started))
        return summary
    finally:
        dist.cleanup()
