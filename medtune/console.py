"""What a user sees while a command runs: one-line errors, logs on stderr, progress bars with an ETA.

Every stage, command and tool sets up its output here, so they all fail and report the same way.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import click

log = logging.getLogger("medtune")
T = TypeVar("T")


class MedtuneError(Exception):
    """An expected failure: bad params, bad input, missing model. Shown as one line, no traceback."""


def setup_logging() -> None:
    # peft (PeftModel.__init__) and trl (models/utils.py) read transformers 5's deprecated alias
    # `is_gradient_checkpointing`; nothing of ours does, and the warning would open every stage's log
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    logging.basicConfig(
        level=os.environ.get("MEDTUNE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def on_terminal() -> bool:
    return sys.stderr.isatty()


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """A progress bar with an ETA on stderr: redrawn in place on a terminal, a plain line every ~10% (and at
    least every 30 s) in a log or CI, where a redrawn bar would be thousands of lines."""
    from tqdm.auto import tqdm

    if total is None:
        total = len(items) if hasattr(items, "__len__") else None
    if on_terminal():
        yield from tqdm(items, desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True)
        return
    bar = tqdm(items, desc=desc, total=total, unit=unit, file=sys.stderr, mininterval=30, maxinterval=30,
               miniters=max(1, (total or 10) // 10), ncols=100, ascii=True)
    yield from bar


def log_params(stage: str, *sections: tuple[str, Any]) -> None:
    """The resolved params as a short block, one line per section: `key=value` pairs, nested ones dotted."""
    from medtune.params import flat

    for name, obj in sections:
        pairs = " ".join(f"{k}={v}" for k, v in flat(obj.model_dump()).items())
        log.info("%s params %s: %s", stage, name, pairs)


@contextlib.contextmanager
def cli_errors(kept: bool = True, persist: bool = False) -> Iterator[None]:
    """Turn expected failures into a one-line click error (exit 1) instead of a traceback. `kept`: the command
    writes outputs atomically, so a failed write leaves the previous ones (the stages; not the commands).
    `persist`: dvc.yaml marks the stage's outputs persist, so DVC does not remove them before running it either."""
    try:
        yield
    except MedtuneError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # disk full, permission denied: name the file
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        full = " (is the disk full?)" if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else ""
        raise click.ClickException(f"{where}{e.strerror or e}{full}{outputs_note(kept, persist)}") from None


def outputs_note(kept: bool, persist: bool) -> str:
    """What is true of the previous outputs after a failure: under `dvc repro` (DVC_STAGE set), DVC removed the
    outputs of a stage without `persist` before running it; they come back from its cache."""
    stage = os.environ.get("DVC_STAGE")
    if not kept:
        return ""
    if stage and not persist:
        return f"; DVC removed this stage's previous outputs before running it: `dvc checkout {stage}` restores them"
    return "; the previous outputs were kept"
