"""Where training metrics go: metrics.jsonl always, TensorBoard always, Weights & Biases on request."""

from __future__ import annotations

import json
from pathlib import Path



class MetricsLogger:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard / W&B."""

    def __init__(self, run_dir: Path, use_wandb: bool, wandb_project: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl = open(run_dir / "metrics.jsonl", "a")
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


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_loss_curve(metrics: list[dict], path: str | Path) -> Path:
    """PNG of training and validation MLM loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    val = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if train:
        ax.plot(*zip(*train), label="training", linewidth=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("MLM loss (cross-entropy, nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
