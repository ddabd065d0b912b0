"""The score curve: average GLUE score against pretraining step (left), each task's column (right)."""

from __future__ import annotations

import io
from pathlib import Path

from mlm.atomic import write_file

from mlm.eval.tasks import REFERENCE_ROWS, TABLE_COLUMNS


def plot_curve(rows: list[dict], path: str | Path, title: str = "GLUE score over pretraining") -> Path:
    """Draw rows (dicts with "Step", "Avg" and column headers, scores in percent) to a PNG: the average over the
    GLUE columns present (left; no such panel when there is none, as for a task of your own alone) and each
    column (right).

    Published reference averages, over the same columns, are drawn as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    rows = sorted((r for r in rows if r.get("Step") is not None), key=lambda r: r["Step"])
    steps = [r["Step"] for r in rows]
    present = [c.header for c in TABLE_COLUMNS if any(r.get(c.header) is not None for r in rows)]

    # The average panel only where there is a GLUE column to average (a task of your own alone has none).
    if present:
        fig, (ax_avg, ax_tasks) = plt.subplots(1, 2, figsize=(13, 4.8))
        avg = [r.get("Avg") for r in rows]
        ax_avg.plot(steps, avg, marker="o", color="black", label="this run")
        for (name, ref), style in zip(REFERENCE_ROWS.items(), ("--", ":")):
            ax_avg.axhline(sum(ref[h] for h in present) / len(present), linestyle=style, color="gray", label=name)
        ax_avg.set(xlabel="pretraining step", ylabel=f"average score over {len(present)} GLUE columns", title=title)
        ax_avg.grid(alpha=0.3)
        ax_avg.legend(fontsize=8)
    else:
        fig, ax_tasks = plt.subplots(1, 1, figsize=(7, 4.8))

    for header in present + [h for h in _extra_headers(rows) if h not in present]:
        points = [(r["Step"], r[header]) for r in rows if r.get(header) is not None]
        ax_tasks.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=header)
    ax_tasks.set(xlabel="pretraining step", ylabel="score", title="per task" if present else title)
    ax_tasks.grid(alpha=0.3)
    ax_tasks.legend(fontsize=7, ncol=2)
    fig.tight_layout()

    path, png = Path(path), io.BytesIO()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    write_file(path, png.getvalue())  # never a half-written PNG under the real name, nor one written through a link
    return path


def _extra_headers(rows: list[dict]) -> list[str]:
    """Score columns beyond the reference's nine and the average (CoLA, tasks of your own)."""
    fixed = {"Model", "Step", "Avg"} | {c.header for c in TABLE_COLUMNS}
    return sorted({k for r in rows for k, v in r.items() if k not in fixed and isinstance(v, (int, float))})
