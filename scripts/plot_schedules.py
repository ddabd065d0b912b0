"""Draw every learning-rate schedule mlm trains with, from the function the training loop calls
(mlm.train.optim.learning_rate), into docs/schedules.png (the README shows it).

    python scripts/plot_schedules.py [--out docs/schedules.png]

The runs drawn are the reference recipe's length: 30,000 steps, 1,800 of warm-up, peak 1e-3; the wsd ones
decay over their last 6,000 steps.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # a file, no display
import matplotlib.pyplot as plt  # noqa: E402

from mlm.config import TrainConfig  # noqa: E402
from mlm.train.optim import learning_rate  # noqa: E402

REFERENCE = {"steps": 30_000, "warmup_steps": 1_800, "lr": 1e-3}
WSD = {**REFERENCE, "schedule": "wsd", "decay_steps": 6_000}
STRIDE = 25  # steps between plotted points: smooth at this size, quick to draw


def curve(**train) -> tuple[list[int], list[float]]:
    """(steps, learning rates) of one run; step k is drawn at k + 1, the steps done after it."""
    cfg = TrainConfig(**train)
    steps = list(range(0, cfg.steps, STRIDE)) + [cfg.steps - 1]
    return [k + 1 for k in steps], [learning_rate(k, cfg) for k in steps]


def draw(ax, title: str, lines: list[tuple[str, dict, str]]) -> None:
    for label, train, style in lines:
        ax.plot(*curve(**train), style, label=label, linewidth=1.6)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("learning rate", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "schedules.png"))
    out = Path(parser.parse_args().out)

    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    floor = {"min_lr": 1e-4}
    draw(axes[0, 0], "linear (the reference)", [
        ("train.schedule=linear", {**REFERENCE}, "C0-"),
        ("… train.min_lr=1e-4", {**REFERENCE, **floor}, "C0--"),
    ])
    draw(axes[0, 1], "cosine", [
        ("train.schedule=cosine", {**REFERENCE, "schedule": "cosine"}, "C1-"),
        ("… train.min_lr=1e-4", {**REFERENCE, "schedule": "cosine", **floor}, "C1--"),
    ])
    draw(axes[0, 2], "wsd, train.decay_steps=6000", [
        ("train.decay_shape=linear", WSD, "C2-"),
        ("train.decay_shape=1-sqrt", {**WSD, "decay_shape": "1-sqrt"}, "C3-"),
        ("1-sqrt, train.min_lr=1e-4", {**WSD, "decay_shape": "1-sqrt", **floor}, "C3--"),
    ])
    draw(axes[1, 0], "wsd grown at step 20,000 (--resume --train.steps=45000)", [
        ("as planned: 30,000 steps", WSD, "C2--"),
        ("grown: 45,000 steps", {**WSD, "steps": 45_000}, "C2-"),
    ])
    draw(axes[1, 1], "decays branched from one stable run", [
        (f"branched at {start:,} (--train.steps={start + 6_000})", {**WSD, "steps": start + 6_000}, style)
        for start, style in ((10_000, "C4-"), (20_000, "C5-"), (30_000, "C6-"))
    ])
    draw(axes[1, 2], "a 3,000-step run: one warm-up, three schedules", [
        ("linear", {**REFERENCE, "steps": 3_000}, "C0-"),
        ("cosine", {**REFERENCE, "steps": 3_000, "schedule": "cosine"}, "C1-"),
        ("wsd", {**REFERENCE, "steps": 3_000, "schedule": "wsd", "decay_steps": 600}, "C2-"),
    ])
    fig.suptitle("mlm's learning-rate schedules (peak 1e-3, 1,800 warm-up steps)", fontsize=12)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
