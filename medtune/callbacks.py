"""What every training run reports and guards through trl's Trainer: progress lines with an ETA where no terminal
shows a bar, the validation loss before training at step 0 of the curve, a stop on a loss that is no longer a
number, and the training time kept in each checkpoint."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from medtune.checkpoints import ELAPSED
from medtune.console import MedtuneError

log = logging.getLogger("medtune.train")


def guards(before_s: float) -> list:
    """The callbacks every run gets: stop on a loss or gradient norm that is no longer a number (no adapter of NaN
    weights is saved), and keep the training time in each checkpoint so that a resumed run reports its whole time."""
    import math

    from transformers import TrainerCallback

    class FiniteLoss(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss", "grad_norm", "eval_loss"):
                value = (logs or {}).get(key)
                if isinstance(value, (int, float)) and not math.isfinite(value) and state.global_step == 0:
                    raise MedtuneError(f"train: the {key.replace('_', ' ')} is {value} before any training step: the "
                                       "base model's weights or the data give a non-finite loss; no adapter was saved")
                if isinstance(value, (int, float)) and not math.isfinite(value):
                    raise MedtuneError(f"train: the {key.replace('_', ' ')} became {value} at step {state.global_step} "
                                       f"(train.learning_rate={args.learning_rate:g}); training stopped and no adapter "
                                       "was saved: lower train.learning_rate or check the data")

    class Elapsed(TrainerCallback):
        def __init__(self):
            self.started = time.perf_counter()

        def on_save(self, args, state, control, **kwargs):
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                (ckpt / ELAPSED).write_text(json.dumps({"train_s": before_s + time.perf_counter() - self.started}))

    return [FiniteLoss(), Elapsed()]


def Progress():
    """A training progress line with an ETA on stderr every ~30 s (and after the first step), where no terminal shows
    trl's bar: under `dvc repro` in a log or CI."""
    from transformers import TrainerCallback

    class Callback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.t0, self.step0, self.last = time.perf_counter(), state.global_step, 0.0
            log.info("training: %d steps of %d rows", state.max_steps, args.per_device_train_batch_size)

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            done = state.global_step - self.step0
            if done == 1 or now - self.last >= 30 or state.global_step == state.max_steps:
                self.last = now
                per_step = (now - self.t0) / done
                left = per_step * (state.max_steps - state.global_step)
                loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), None)
                log.info("train: step %d/%d (%d%%)%s, %.2f s/step, about %dm%02ds left", state.global_step, state.max_steps,
                         100 * state.global_step // max(state.max_steps, 1), f", loss {loss:.3f}" if loss is not None else "",
                         per_step, left // 60, left % 60)

    return Callback()


def StartOfCurve(metrics: dict):
    """A callback that puts the evaluation made before training at step 0 of the run's history (the Trainer starts
    the history afresh when training begins), so that the curves, and the checkpoints' copies, begin there."""
    from transformers import TrainerCallback

    class Callback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.global_step == 0:
                state.log_history.insert(0, {**metrics, "step": 0})

    return Callback()
