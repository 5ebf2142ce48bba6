"""Training that survives an interruption: checkpoints kept only for a run with the same params and data, resumed
from the last complete one, and the figures of a resumed run reported for the whole run (its loss, its time)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path


def fingerprint(*objs, data_file: Path) -> str:
    h = hashlib.sha256(json.dumps([o.model_dump() for o in objs], sort_keys=True).encode())
    h.update(data_file.read_bytes())
    return h.hexdigest()


def last_checkpoint(ckpt_dir: Path, fp: str) -> None:
    """Keep ckpt_dir if it holds checkpoints of an interrupted run with the same params and data (training
    resumes from the last one); otherwise clear it for a fresh start. A finished run removes its checkpoints."""
    stamp = ckpt_dir / "fingerprint.txt"
    if stamp.exists() and stamp.read_text() == fp and any(ckpt_dir.glob("checkpoint-*")):
        return
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    ckpt_dir.mkdir(parents=True)
    stamp.write_text(fp)


def complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """The last checkpoint that was fully written. A kill during a save leaves a checkpoint folder without
    trainer_state.json, which the Trainer writes last; resuming from it would fail."""
    done = [c for c in ckpt_dir.glob("checkpoint-*") if (c / "trainer_state.json").exists()]
    return max(done, key=lambda c: int(c.name.split("-")[1]), default=None)


ELAPSED = "medtune_elapsed.json"  # training seconds up to a checkpoint, kept in it


def before_resume(resume: Path | None) -> float:
    """Training seconds spent before the checkpoint a run resumes from (0 for a fresh run)."""
    if resume is None or not (resume / ELAPSED).exists():
        return 0.0
    return float(json.loads((resume / ELAPSED).read_text())["train_s"])


def whole_run_loss(history: list[dict], last_loss: float, resumed_at: int, steps: int) -> float:
    """The mean training loss over every step of the run, also when it resumed: the logged windows before the
    resume step (each window's mean times its length) and the resumed part's own mean (`last_loss`, over
    steps - resumed_at steps)."""
    if resumed_at <= 0 or steps <= resumed_at:
        return last_loss
    total, prev = 0.0, 0
    for step, loss in sorted((h["step"], h["loss"]) for h in history if "loss" in h and h["step"] <= resumed_at):
        total, prev = total + loss * (step - prev), step
    if 0 < prev < resumed_at:  # steps after the last log before the checkpoint: at the mean of the logged ones
        total += total / prev * (resumed_at - prev)
    return (total + last_loss * (steps - resumed_at)) / steps
