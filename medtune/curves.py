"""Loss curves: dvclive's TSVs (DVC plots) while training runs, and a PNG of the train and validation loss."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("medtune.train")


def curve_loggers(curves_dir: Path) -> list:
    """dvclive's callback (loss curves as DVC plots); none where dvclive is not installed (a bare GPU box):
    loss.png and log_history.json are written either way."""
    try:
        from dvclive import Live
    except ImportError:
        log.warning("dvclive is not installed: no DVC plots, only %s/loss.png and log_history.json", curves_dir)
        return []
    from transformers.integrations import DVCLiveCallback

    return [DVCLiveCallback(live=Live(dir=str(curves_dir), dvcyaml=False, save_dvc_exp=False, report=None))]


def plot_loss(history: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("loss", "train"), ("eval_loss", "val")):
        pts = [(h["step"], h[key]) for h in history if key in h]
        if pts:
            ax.plot(*zip(*pts), marker="o" if label == "val" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (answer tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
