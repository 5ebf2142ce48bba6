"""Loss curves from a training run's whole history (its log, restored from the checkpoint when a run resumed):
dvclive's TSVs, which `dvc plots` draws, and a PNG of the train and validation loss."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("medtune.train")
CURVES = {"loss": "train/loss", "grad_norm": "train/grad_norm", "learning_rate": "train/learning_rate",
          "eval_loss": "eval/loss"}  # log_history key -> dvclive metric (plots/metrics/<name>.tsv)


def write_curves(history: list[dict], curves_dir: Path) -> None:
    """One dvclive row per logged step, at that step: the curves of a resumed run are whole and numbered as
    the uninterrupted run's would be. Skipped with a warning where dvclive is not installed."""
    try:
        from dvclive import Live
    except ImportError:
        log.warning("dvclive is not installed: no DVC plots, only %s/loss.png and log_history.json", curves_dir)
        return
    with Live(dir=str(curves_dir), dvcyaml=False, save_dvc_exp=False, report=None) as live:
        for h in sorted(history, key=lambda h: h.get("step", 0)):
            values = {name: h[key] for key, name in CURVES.items() if isinstance(h.get(key), (int, float))}
            if values:
                live.step = h["step"]
                for name, value in values.items():
                    live.log_metric(name, value)


def plot_loss(history: list[dict], png: Path, title: str | None = None) -> None:
    """Train and validation loss against the step; the validation loss from step 0 (before training)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("loss", "train"), ("eval_loss", "validation")):
        pts = sorted((h["step"], h[key]) for h in history if key in h)
        if pts:
            ax.plot(*zip(*pts), marker="o" if key == "eval_loss" else ".", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss on answer tokens")
    ax.set_title(title or f"{os.environ.get('DVC_EXP_NAME', 'workspace')}: train and validation loss", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
