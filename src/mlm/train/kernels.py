"""The versions that decide which kernels run, and the attention kernel actually taken.

PyTorch chooses scaled_dot_product_attention's kernel per call, from the arguments (dtype, head size, mask,
dropout), the card and the libraries it was built with: on sm90 with cuDNN ≥ 9.15 it tries cuDNN attention
first, and cuDNN 9.11–9.13 refuses dropout, so the same code takes another kernel on another image. The
kernel is therefore read from the operator that ran (the profiler's record of aten calls), not predicted.

`python -m mlm.train.kernels` prints this machine's environment as one JSON object (scripts/gpu_check.sh).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# The aten operators behind F.scaled_dot_product_attention, by the kernel they run.
SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash/cpu",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
}
NOT_SEEN = "none seen (no SDPA operator ran: math decomposed by the compiler, or a CUDA graph replayed)"


def versions() -> dict[str, str | None]:
    """torch, CUDA, cuDNN and transformers versions (None where there is none: a CPU build has no CUDA)."""
    import transformers

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        # cuDNN reports one integer, major·10000 + minor·100 + patch (9.15.0 → 91500) from 9.0 on
        "cudnn": f"{cudnn // 10000}.{cudnn % 10000 // 100}.{cudnn % 100}" if cudnn else None,
        "transformers": transformers.__version__,
    }


def sdpa_kernels_taken(run: Callable[[], object]) -> list[str]:
    """The SDPA kernels that ran during run(), in the order first seen ([] if no SDPA operator ran)."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU])  # aten calls are recorded on the host
    with _stderr_silenced():  # the profiler's library prints a line to stderr as it starts and as it stops
        prof.start()
    try:
        run()
    finally:
        with _stderr_silenced():
            prof.stop()
    taken: list[str] = []
    for event in prof.events():
        kernel = SDPA_OPS.get(event.name)
        if kernel is not None and kernel not in taken:
            taken.append(kernel)
    return taken


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 to /dev/null for the duration (what C++ code writes there included)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def model_attention_kernels(hf_model: nn.Module, seq_len: int, device: torch.device,
                            autocast_dtype: torch.dtype | None) -> list[str]:
    """The SDPA kernels one uncompiled training forward of hf_model takes on one sequence of seq_len tokens
    (the attention the training step runs, with its dtype, head size and dropout). Gradients are on, as in
    training (some kernels are chosen by it); the random streams are left as they were."""
    from mlm.model.build import MaskedLMLoss

    loss_model = MaskedLMLoss(hf_model)
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        ids = torch.randint(5, hf_model.config.vocab_size, (1, seq_len), device=device)
        positions = torch.arange(min(seq_len, 4), device=device).unsqueeze(0)  # (1, K): the head is not the point

        def forward() -> None:
            with autocast:
                loss_model(ids, positions, ids.gather(1, positions))

        return sdpa_kernels_taken(forward)


def kernels_line(taken: list[str], where: str) -> str:
    """One log line: the versions, and the SDPA kernel taken (`where` says what was observed)."""
    v = versions()
    return (f"versions: torch {v['torch']}, CUDA {v['cuda'] or 'none'}, cuDNN {v['cudnn'] or 'none'}, "
            f"transformers {v['transformers']} | SDPA kernel ({where}): {', '.join(taken) or NOT_SEEN}")


def available_sdpa_kernels(device: torch.device, dropout: float = 0.1) -> dict[str, str]:
    """Each SDPA kernel alone on the recipe's attention (RoBERTa-medium: 8 heads of 64, seq 512; bf16 on a
    GPU), forward and backward with dropout: "ok", or why it refused (its first line)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(2, 8, 512, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    result = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)):
        # A kernel that refuses says why in a warning ("… do not support non-zero dropout") before the
        # error ("No available kernel"): the warning is the reason worth reporting.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, k, v, dropout_p=dropout).sum().backward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                result[name] = "ok"
            except RuntimeError as error:
                reasons = [str(w.message).split(" (Triggered internally")[0] for w in caught] or [str(error)]
                lines = [line.strip() for reason in reasons for line in reason.splitlines() if line.strip()]
                result[name] = "refused: " + (" ".join(lines)[:300] if lines else type(error).__name__)
    return result


def environment() -> dict:
    """The environment row of scripts/gpu_check.sh: the device, its driver, the versions, and which SDPA
    kernels run the recipe's attention with dropout."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    row: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "driver": None}
    if device.type == "cuda" and shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
        row["driver"] = query.stdout.strip().splitlines()[0] if query.returncode == 0 and query.stdout.strip() else None
    row.update(versions())
    try:
        import deepspeed

        row["deepspeed"] = deepspeed.__version__
    except Exception:  # absent, or not importable on this machine: the row says so, the check goes on
        row["deepspeed"] = None
    row["sdpa_kernels_with_dropout"] = available_sdpa_kernels(device)
    return row


if __name__ == "__main__":
    print(json.dumps(environment()))
