"""Where training metrics go: metrics.jsonl always, TensorBoard always, Weights & Biases on request."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from mlm.atomic import open_append, write_file


class MetricsLogger:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard / W&B."""

    def __init__(self, run_dir: Path, use_wandb: bool, wandb_project: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl = open_append(run_dir / "metrics.jsonl")
        self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
        self.wandb = None
        if use_wandb:
            import wandb  # its presence is checked before the run starts
            self.wandb = wandb.init(project=wandb_project, dir=str(run_dir), config=config, name=run_dir.name)

    def log(self, step: int, **scalars: float) -> None:
        self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self.jsonl.flush()
        for key, value in scalars.items():
            self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        self.jsonl.close()
        self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


class StepTally:
    """The loop's running figures since the last logged step, kept on the device so that a training step costs
    no host synchronisation.

    A step is bad when its loss or gradient norm is NaN or infinite. Its loss stays out of the logged mean,
    and the engine skips its update when the norm is not finite. `bad_in_row` (with `longest_bad_run`, its
    maximum since the last `check`) tells a run of bad steps, which means divergence, from a lone one.
    `state()` goes into each checkpoint, so a resumed run logs what an unbroken one logs."""

    def __init__(self, device: torch.device, state: dict | None = None):
        state = state or {}

        def number(key: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(state.get(key, 0), dtype=dtype, device=device)

        self.loss_sum = number("loss_sum", torch.float32)
        self.losses = number("losses", torch.long)
        """How many finite losses `loss_sum` adds up."""
        self.bad_steps = number("bad_steps", torch.long)
        self.bad_in_row = number("bad_in_row", torch.long)
        self.longest_bad_run = self.bad_in_row.clone()

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        bad = ~torch.isfinite(loss) | ~torch.isfinite(grad_norm.to(loss.device))
        self.loss_sum += torch.where(bad, 0.0, loss.float())
        self.losses += ~bad
        self.bad_steps += bad
        self.bad_in_row = torch.where(bad, self.bad_in_row + 1, 0)
        self.longest_bad_run = torch.maximum(self.longest_bad_run, self.bad_in_row)

    def check(self) -> int:
        """The longest run of bad steps in a row since the last check (one host sync)."""
        longest = int(self.longest_bad_run.item())
        self.longest_bad_run = self.bad_in_row.clone()
        return longest

    def take_window(self) -> tuple[float | None, int]:
        """The mean of the finite losses since the last call (None if there were none) and the number of bad
        steps among them, then a new window (one host sync)."""
        loss_sum, losses, bad_steps = torch.stack([self.loss_sum, self.losses.float(), self.bad_steps.float()]).tolist()
        for value in (self.loss_sum, self.losses, self.bad_steps):
            value.zero_()
        return (loss_sum / losses if losses else None), int(bad_steps)

    def state(self) -> dict:
        """Plain numbers for a checkpoint (one host sync)."""
        loss_sum, losses, bad_steps, bad_in_row = torch.stack(
            [self.loss_sum.double(), self.losses.double(), self.bad_steps.double(), self.bad_in_row.double()]).tolist()
        return {"loss_sum": loss_sum, "losses": int(losses), "bad_steps": int(bad_steps), "bad_in_row": int(bad_in_row)}


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def loss_curves(metrics: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """The curves of the loss plot, by label: training (`loss`), validation (`val_loss`) and one per
    `val_loss/<name>` found in the records (a validation source of its own), each as (step, loss) points."""
    keys = ["loss"] + sorted({key for m in metrics for key in m if key == "val_loss" or key.startswith("val_loss/")})
    labels = {"loss": "training", "val_loss": "validation"}
    curves = {labels.get(key, f"validation ({key.split('/', 1)[-1]})"):
              [(m["step"], m[key]) for m in metrics if m.get(key) is not None] for key in keys}
    return {label: points for label, points in curves.items() if points}


def plot_loss_curve(metrics: list[dict], path: str | Path) -> Path:
    """PNG of the `loss_curves` (training and validation MLM loss) against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for label, points in loss_curves(metrics).items():
        # Training is a line of many points; few (a short run) need markers to be seen at all.
        style = ({"linewidth": 1.2, "marker": "." if len(points) < 30 else None} if label == "training"
                 else {"marker": "o", "markersize": 3})
        ax.plot(*zip(*points), label=label, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("MLM loss (cross-entropy, nats)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a checkpoint may come before any logged loss
        ax.legend()
    fig.tight_layout()
    path, png = Path(path), io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    write_file(path, png.getvalue())
    return path
