"""`mlm bench`: how fast the training path runs, measured on real optimizer steps.

The steps are the ones `mlm pretrain` takes (train/pretrain.py's `train_step`: the sampler, the batch read
ahead, masking on the device, forward, backward, accumulation, clipping, the optimizer step), on prepared
shards or on synthetic tokens (--synthetic: no data folder, no tokenizer file). Warm-up steps (compilation,
allocator growth) come first and are not timed. With --baseline the same process then times the reference's
path on the same batches and masks: Hugging Face's masked LM with eager attention and the prediction head on
every position, torch's AdamW, micro-batch 16.

Model FLOPs per trained token (the head counted on the masked positions only, for both paths, so the MFU
ratio is the tokens/s ratio):
    6·N + Σ_layers 12·d·keys + 6·m·(d·V + d²)
N the encoder layers' parameters (embeddings and head excluded; a GLU's two halves included), d width, keys
the keys a query attends in that layer (s, the sequence length, for global attention; about 2w + 1 for a
local window of ± w), V vocabulary, m the fraction of positions the head predicts
(mlm.model.families.flops_per_token). MFU divides the achieved FLOP/s by the card's dense bf16 peak.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mlm import dist
from mlm.config import PretrainConfig
from mlm.data.loader import BatchLoader
from mlm.data.masking import IGNORE_INDEX, masked_count
from mlm.data.prepare import TOKENIZER_SUBDIR, read_manifest
from mlm.data.stream import Sampler, SyntheticWindows
from mlm.errors import UserError
from mlm.model.build import (
    build_model,
    check_tokenizer_layout,
    describe,
    install_training_attention,
    model_config,
    set_sdpa_backend,
    weight_decay_groups,
)
from mlm.model.families import FAMILIES, flops_per_token
from mlm.tokenizer import load_tokenizer
from mlm.train.engines import build_engine
from mlm.train.kernels import kernels_line, sdpa_kernels_taken, versions
from mlm.train.optim import learning_rate
from mlm.train.pretrain import (
    Setup,
    load_data,
    make_sampler,
    masked_batch,
    masking_spec,
    resolve_device,
    resolve_micro_batch,
    train_step,
    wants_bf16,
    wants_compile,
)

# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, by a part of torch.cuda.get_device_name(); the
# longest matching part wins ("H100 PCIe" before "H100", "A100" before "A10", "L40S" before "L4").
PEAK_BF16_TFLOPS = {
    "H100": 989.4,  # SXM ("NVIDIA H100 80GB HBM3")
    "H100 PCIe": 756.5,
    "H100 NVL": 835.5,
    "H200": 989.4,
    "H200 NVL": 835.5,
    "GH200": 989.4,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.1,
    "L40": 181.0,
    "L4": 121.0,
    "RTX A6000": 154.8,
    "RTX A5000": 111.1,
    "RTX 6000 Ada": 364.2,
    "RTX 4090": 165.2,
}
BASELINE_MICRO_BATCH = 16  # the reference: 16 sequences per GPU per forward
SYNTHETIC_WINDOWS = 1 << 24  # enough distinct windows that no bench revisits one


# The published tokenizers' sizes and special ids, by family (its row's reference_vocabulary), for synthetic
# tokens: no tokenizer file is needed.
REFERENCE_VOCABULARIES = {name: family.reference_vocabulary for name, family in FAMILIES.items()}


@dataclass
class Timing:
    """One path's measurement."""

    tokens_per_s: float
    step_time_s: float
    mfu: float | None
    peak_memory: int
    """Bytes: the most the GPU's caching allocator held during the timed steps (for the HF path, the mlm
    path's model and optimizer state, still held, included), or on a CPU the process's peak resident memory so
    far."""


def peak_tflops_of(device: torch.device) -> float | None:
    """The card's dense bf16 peak from PEAK_BF16_TFLOPS, or None (a CPU, an unknown card)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    matches = [key for key in PEAK_BF16_TFLOPS if key in name]
    return PEAK_BF16_TFLOPS[max(matches, key=len)] if matches else None


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def time_steps(run_step, device: torch.device, warmup: int, steps: int, tokens_per_step: int,
               flops_per_step: float, peak_tflops: float | None) -> Timing:
    """Run `warmup` untimed steps, then time `steps` steps (queued without host synchronisation, as in
    training; one synchronisation at each end)."""
    for step in range(warmup):
        run_step(step)
    _synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for step in range(warmup, warmup + steps):
        run_step(step)
    _synchronize(device)
    step_time = (time.perf_counter() - start) / steps
    mfu = flops_per_step / step_time / (peak_tflops * 1e12) if peak_tflops else None
    return Timing(tokens_per_step / step_time, step_time, mfu, _peak_memory(device))


def reference_step(s: Setup, model: nn.Module, optimizer: torch.optim.Optimizer, micro_batch: int):
    """The reference's training step on the batch and masks `train_step` gets: labels at every position
    (IGNORE_INDEX where nothing is predicted), so Hugging Face's head and loss run over all of them."""
    cfg = s.cfg
    autocast = torch.autocast(s.device.type, dtype=torch.bfloat16) if s.precision == "bf16" else contextlib.nullcontext()
    accum = cfg.train.global_batch // micro_batch

    def run_step(step: int) -> None:
        masked, positions, labels = masked_batch(s, step)  # (N, T), (N, K), (N, K)
        full_labels = torch.full_like(masked, IGNORE_INDEX).scatter(1, positions, labels)  # (N, T)
        for input_ids, micro_labels in zip(masked.split(micro_batch), full_labels.split(micro_batch)):
            with autocast:
                loss = model(input_ids=input_ids, labels=micro_labels).loss / accum
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, cfg.train)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return run_step


def reference_model(s: Setup) -> tuple[nn.Module, torch.optim.Optimizer]:
    """Hugging Face's masked LM with eager attention, holding the bench model's weights as they are now, and
    torch's default (foreach) AdamW with the recipe's settings."""
    from transformers import AutoModelForMaskedLM

    model = AutoModelForMaskedLM.from_config(s.hf_model.config, attn_implementation="eager")
    model.load_state_dict(s.hf_model.state_dict())
    model.to(s.device).train()
    t = s.cfg.train
    optimizer = torch.optim.AdamW(weight_decay_groups(model, t.weight_decay), lr=t.lr, betas=tuple(t.betas), eps=t.eps)
    return model, optimizer


def bench_setup(cfg: PretrainConfig, synthetic: bool, log=print) -> Setup:
    """The training path of `mlm pretrain` on one process, without a run folder."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("mlm bench measures one device: run it without torchrun")
    if cfg.system.strategy not in ("auto", "ddp"):
        raise UserError(f"mlm bench times the one-process path: system.strategy={cfg.system.strategy} needs a process group; use auto")
    info = dist.DistInfo()
    device = resolve_device(cfg.system.device, info)
    if cfg.system.threads:
        torch.set_num_threads(cfg.system.threads)
    set_sdpa_backend(cfg.system.sdpa_backend, device)
    if synthetic:
        tokenizer = REFERENCE_VOCABULARIES[cfg.model.family]
        train = SyntheticWindows(SYNTHETIC_WINDOWS, cfg.data.seq_len, len(tokenizer), tokenizer.cls_token_id,
                                 tokenizer.sep_token_id, tuple(tokenizer.all_special_ids))
    else:
        manifest = read_manifest(cfg.data.folders[0])
        tokenizer = load_tokenizer(cfg.data.tokenizer or Path(cfg.data.folders[0]) / TOKENIZER_SUBDIR)
        check_tokenizer_layout(cfg.model.family, tokenizer)
        train, _ = load_data(cfg, manifest, tokenizer)
    if cfg.train.global_batch % (1 if cfg.system.micro_batch == "auto" else cfg.system.micro_batch):
        raise UserError(f"train.global_batch={cfg.train.global_batch} is not a multiple of system.micro_batch={cfg.system.micro_batch}")
    bf16 = wants_bf16(cfg, device)
    hf_model = build_model(model_config(cfg.model, tokenizer), cfg.train.seed)
    hf_model.to(device).train()
    install_training_attention(hf_model, cfg.system.fused_qkv)
    cfg = resolve_micro_batch(cfg, hf_model, cfg.train.global_batch, device, bf16, log)
    compiled = wants_compile(cfg, device)
    engine = build_engine("ddp", cfg, hf_model, device, info, compiled, torch.bfloat16 if bf16 else None)
    sampler = make_sampler(cfg, train) if not synthetic else Sampler(train.count, cfg.train.global_batch, cfg.train.seed)
    return Setup(
        cfg=cfg, run_dir=Path(cfg.run.out_dir), info=info, device=device, precision="bf16" if bf16 else "fp32",
        tokenizer=tokenizer, hf_model=hf_model, engine=engine, run_lock=None, train=train, validation=None,
        sampler=sampler, batches=BatchLoader(train, sampler, 0, 1, device, cfg.system.prefetch),
        masking=masking_spec(cfg, tokenizer), accum=cfg.train.global_batch // cfg.system.micro_batch, start_step=0,
        compiled=compiled,
    )


def bench(cfg: PretrainConfig, steps: int = 5, warmup: int = 2, baseline: bool = False, synthetic: bool = False,
          peak_tflops: float | None = None, log=print) -> dict:
    """Time `steps` training steps after `warmup` ones (and, with baseline, the reference's path on the same
    batches); print a summary and return the figures."""
    if steps < 1 or warmup < 0:
        raise UserError(f"--steps must be positive and --warmup >= 0, got {steps} and {warmup}")
    if peak_tflops is not None and not peak_tflops > 0:
        raise UserError(f"--peak-tflops must be positive, got {peak_tflops}")
    if baseline and cfg.train.global_batch % BASELINE_MICRO_BATCH:
        raise UserError(f"--baseline runs micro-batches of {BASELINE_MICRO_BATCH}: train.global_batch="
                        f"{cfg.train.global_batch} is not a multiple of it")
    s = bench_setup(cfg, synthetic, log)
    cfg, device = s.cfg, s.device
    try:
        T = cfg.data.seq_len
        head_fraction = 1.0 if cfg.data.per_token_masking else masked_count(T, cfg.data.mask_rate) / T
        tokens_per_step = cfg.train.global_batch * T
        flops_per_step = flops_per_token(s.hf_model, T, head_fraction) * tokens_per_step
        peak = peak_tflops or peak_tflops_of(device)
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        log(
            f"bench: {describe(s.hf_model.config)}, seq {T}, dropout {cfg.model.dropout}, on {device_name} "
            f"({s.precision}{', compiled ' + cfg.system.compile_mode if s.compiled else ''}), "
            f"global batch {cfg.train.global_batch} = micro_batch {cfg.system.micro_batch} × accumulation {s.accum}; "
            f"{steps} timed steps after {warmup} warm-up; {'synthetic tokens' if synthetic else ', '.join(cfg.data.folders)}"
        )
        ours = time_steps(lambda step: train_step(s, step), device, warmup, steps, tokens_per_step, flops_per_step, peak)
        log(_line("mlm path", ours, cfg.system.micro_batch, device))
        # One more step, untimed and profiled: the SDPA kernel the (compiled) training step really runs.
        kernels = sdpa_kernels_taken(lambda: train_step(s, warmup + steps))
        log(kernels_line(kernels, "a training step" + (", compiled" if s.compiled else "")))
        theirs = None
        if baseline:
            model, optimizer = reference_model(s)
            run_reference = reference_step(s, model, optimizer, BASELINE_MICRO_BATCH)
            theirs = time_steps(run_reference, device, warmup, steps, tokens_per_step, flops_per_step, peak)
            log(_line("HF path", theirs, BASELINE_MICRO_BATCH, device) + " (eager attention, head on every position, "
                "foreach AdamW)")
            log(f"ratio: {ours.tokens_per_s / theirs.tokens_per_s:.2f}× the HF path's tokens/s")
        if peak is None:
            log("MFU: unknown peak for this device (give --peak-tflops)")
    finally:
        s.batches.close()
    return {
        "tokens_per_s": ours.tokens_per_s,
        "baseline_tokens_per_s": theirs.tokens_per_s if theirs else None,
        "ratio": ours.tokens_per_s / theirs.tokens_per_s if theirs else None,
        "mfu": ours.mfu,
        "baseline_mfu": theirs.mfu if theirs else None,
        "peak_memory": ours.peak_memory,
        "baseline_peak_memory": theirs.peak_memory if theirs else None,
        "step_time_s": ours.step_time_s,
        "baseline_step_time_s": theirs.step_time_s if theirs else None,
        "device": device_name,
        "peak_tflops": peak,
        "precision": s.precision,
        "compiled": s.compiled,
        "micro_batch": cfg.system.micro_batch,
        "global_batch": cfg.train.global_batch,
        "seq_len": T,
        "model": f"{cfg.model.family}-{cfg.model.size}" if cfg.model.size else describe(s.hf_model.config),
        "dropout": cfg.model.dropout,
        "flops_per_token": flops_per_step / tokens_per_step,
        "steps": steps,
        "warmup": warmup,
        "synthetic": synthetic,
        "sdpa_kernel": ", ".join(kernels) or None,
        **versions(),
    }


def _line(name: str, t: Timing, micro_batch: int, device: torch.device) -> str:
    mfu = f"MFU {100 * t.mfu:.1f}%" if t.mfu is not None else "MFU n/a"
    memory = "peak memory" if device.type == "cuda" else "process peak RSS"
    return (f"{name}: {t.tokens_per_s:,.0f} tokens/s | step {t.step_time_s:.3f} s | {memory} "
            f"{t.peak_memory / 2**30:.2f} GiB | {mfu} | micro_batch {micro_batch}")

