"""`system.micro_batch = "auto"`: the largest micro-batch that fits, found by trying it.

On a GPU each candidate (the divisors of the per-rank batch, largest first, at most MAX_AUTO) runs one
forward and backward of the uncompiled model on random tokens; the first that neither runs out of memory
nor leaves too little room for the optimizer state (AdamW's two fp32 moments, created at the first step)
wins. The uncompiled model needs more activation memory than the compiled one, so what fits here fits
compiled. On a CPU memory is not what limits the batch: the largest divisor up to CPU_AUTO.

Each rank probes its own device, and ranks can disagree (another job on one card, a card with less memory);
every rank then takes the smallest micro-batch found, so that all ranks run the same accumulation count (with
different counts, FSDP's per-micro-batch collectives hang and DeepSpeed's configs differ).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from mlm import dist
from mlm.errors import UserError
from mlm.model.build import MaskedLMLoss

MAX_AUTO = 256
CPU_AUTO = 32
HEADROOM = 0.9  # use at most this fraction of the card's memory, for the allocator's fragmentation


def divisors_descending(n: int, limit: int) -> list[int]:
    return [d for d in range(min(n, limit), 0, -1) if n % d == 0]


def auto_micro_batch(hf_model: nn.Module, per_rank: int, seq_len: int, masked_per_seq: int, device: torch.device,
                     autocast_dtype: torch.dtype | None, log=print, info: dist.DistInfo = dist.DistInfo()) -> int:
    """The micro-batch for system.micro_batch="auto" (hf_model on `device`, in training mode), the same on
    every rank of `info`: the smallest of the ranks' largest fitting ones. The loss head runs on
    masked_per_seq positions of each sequence, as in training."""
    if device.type == "cuda":
        found = largest_fitting_micro_batch(hf_model, per_rank, seq_len, masked_per_seq, device, autocast_dtype)
    else:
        found = divisors_descending(per_rank, CPU_AUTO)[0]
    # Every rank reaches this collective, one that found nothing (0) included, so none is left waiting.
    agreed = agreed_micro_batch(found, info)
    if agreed == 0:
        raise UserError(f"system.micro_batch=auto: not even one sequence of {seq_len} tokens fits on "
                        f"{device if found == 0 else 'one of the ranks'}")
    limit = MAX_AUTO if device.type == "cuda" else CPU_AUTO
    how = "that fits" if device.type == "cuda" else "on a CPU"
    log(f"system.micro_batch=auto: {agreed} (the largest divisor of {per_rank} up to {limit} {how}"
        + (f"; the smallest over {info.world_size} ranks, this rank found {found})" if info.distributed else ")"))
    return agreed


def agreed_micro_batch(found: int, info: dist.DistInfo) -> int:
    """The smallest of the micro-batches the ranks found (0 if a rank found none), on every rank."""
    return int(-dist.max_across_ranks([-float(found)], info)[0])


def largest_fitting_micro_batch(hf_model: nn.Module, per_rank: int, seq_len: int, masked_per_seq: int,
                                device: torch.device, autocast_dtype: torch.dtype | None) -> int:
    """The largest divisor of per_rank up to MAX_AUTO whose forward and backward fit on the GPU with room
    for the optimizer state, or 0 if none does."""
    loss_model = MaskedLMLoss(hf_model)
    vocab = hf_model.config.vocab_size
    optimizer_bytes = 2 * 4 * sum(p.numel() for p in hf_model.parameters())  # AdamW: exp_avg, exp_avg_sq in fp32
    budget = HEADROOM * torch.cuda.get_device_properties(device).total_memory
    autocast = torch.autocast("cuda", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[device]):  # the probes' random draws leave training's streams alone
        for micro in divisors_descending(per_rank, MAX_AUTO):
            fits = False
            try:
                torch.cuda.reset_peak_memory_stats(device)
                ids = torch.randint(5, vocab, (micro, seq_len), device=device)
                positions = torch.rand(micro, seq_len, device=device).topk(masked_per_seq, dim=1).indices  # (B, K)
                with autocast:
                    loss = loss_model(ids, positions, ids.gather(1, positions))
                loss.backward()
                torch.cuda.synchronize(device)
                fits = torch.cuda.max_memory_allocated(device) + optimizer_bytes <= budget
            except torch.OutOfMemoryError:
                pass
            finally:
                loss = None
                hf_model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
            if fits:
                return micro
    return 0
