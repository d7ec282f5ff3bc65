"""Loss curves as PNG files (matplotlib, headless): one run's training and validation loss, or a sweep's trials."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

Series = Tuple[str, Sequence[Tuple[float, float]], str]  # (label, [(step, value)], line style)


def loss_curves(
    series: List[Series],
    path: Path,
    title: str,
    ylabel: str = "loss",
    marks: Optional[List[Tuple[float, float, str]]] = None,
    below: Optional[List[Series]] = None,
    below_label: str = "",
) -> bool:
    """Draw every non-empty series into `path` (and the `below` series in a second panel under it); False (and no
    file) when there is nothing to draw."""
    series = [s for s in series if s[1]]
    below = [s for s in below or [] if s[1]]
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2 if below else 1, 1, figsize=(8, 8 if below else 5), sharex=True, squeeze=False)
    try:
        panels = [(axes[0][0], series, ylabel, marks)] + ([(axes[1][0], below, below_label, None)] if below else [])
        for ax, lines, label_y, stars in panels:
            for label, points, style in lines:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, label=label[:70], marker="o" if len(points) < 30 and style != "-" else None)
            for x, y, text in stars or []:
                ax.plot([x], [y], "k*", markersize=12)
                ax.annotate(text, (x, y), textcoords="offset points", xytext=(6, 8), fontsize=8)
            ax.set_ylabel(label_y)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[-1][0].set_xlabel("step")
        axes[0][0].set_title(title)
        fig.tight_layout()
        tmp = path.with_name(path.name + ".tmp.png")
        fig.savefig(tmp, dpi=110)
        tmp.replace(path)
    finally:
        plt.close(fig)
    return True


# the second panel: a preference objective's accuracy and margin, an online objective's rewards
BELOW = {
    "preference": (("rewards/accuracies", "preference accuracy"), ("rewards/margins", "reward margin")),
    "reward": (("reward", "mean reward"), ("reward_std", "reward std over the batch")),
}


def run_loss_plot(run_dir: Path, metrics: List[dict], best: Optional[Tuple[int, float]] = None) -> bool:
    """loss.png in a run folder: training loss per logging step, validation loss per evaluation, the best marked."""
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    val = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    marks = [(best[0], best[1], f"best: step {best[0]}")] if best else None
    below = []  # training and validation
    panel = "reward" if any("reward" in m for m in metrics) else "preference"
    for key, label in BELOW[panel]:
        below.append((f"{label} (training)", [(m["step"], m[key]) for m in metrics if key in m and "loss" in m], "-"))
        below.append(
            (f"{label} (validation)", [(m["step"], m["eval_" + key]) for m in metrics if "eval_" + key in m], "--")
        )
    return loss_curves(
        [("training loss", train, "-"), ("validation loss", val, "--")],
        Path(run_dir) / "loss.png",
        Path(run_dir).name,
        marks=marks,
        below=below,
        below_label=panel,
    )
