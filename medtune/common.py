"""Helpers shared by every stage: strict params, jsonl I/O, atomic outputs, seeding, logging.

Nothing here knows about models; see `medtune/modeling.py` for that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import errno
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Iterator, Literal, TypeVar

import click
import yaml

log = logging.getLogger("medtune")
T = TypeVar("T")
PARAMS_FILE = Path("params.yaml")


class MedtuneError(Exception):
    """An expected failure: bad params, bad input, missing model. Shown as one line, no traceback."""


# ---------------------------------------------------------------- params


@dataclasses.dataclass(frozen=True)
class BaseParams:
    seed: int


def _type_problem(value: Any, tp: Any) -> str | None:
    """Return why `value` is not a `tp`, or None. Covers the types params.yaml uses."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        problems = [_type_problem(value, a) for a in args]
        return None if any(p is None for p in problems) else f"expected {_type_name(tp)}, got {value!r}"
    if origin is Literal:
        return None if value in args else f"expected one of {', '.join(map(repr, args))}, got {value!r}"
    if origin is list:
        if not isinstance(value, list):
            return f"expected a list, got {value!r}"
        for i, v in enumerate(value):
            if (p := _type_problem(v, args[0])) is not None:
                return f"item {i}: {p}"
        return None
    if origin is dict:
        if not isinstance(value, dict):
            return f"expected a mapping, got {value!r}"
        for k, v in value.items():
            if (p := _type_problem(k, args[0]) or _type_problem(v, args[1])) is not None:
                return f"key {k!r}: {p}"
        return None
    if tp is type(None):
        return None if value is None else f"expected null, got {value!r}"
    if tp is float:  # YAML reads 1e-4 as a string; accept ints and numeric strings for floats
        if isinstance(value, bool):
            return f"expected a number, got {value!r}"
        if isinstance(value, (int, float)):
            return None
        if isinstance(value, str):
            try:
                float(value)
                return None
            except ValueError:
                pass
        return f"expected a number, got {value!r}"
    if tp is int and isinstance(value, bool):
        return f"expected an integer, got {value!r}"
    if isinstance(value, tp):
        return None
    return f"expected {_type_name(tp)}, got {value!r}"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any) -> Any:
    if tp is float or (typing.get_origin(tp) in (typing.Union, types.UnionType) and float in typing.get_args(tp)):
        if isinstance(value, (int, str)) and not isinstance(value, bool):
            return float(value)
    if typing.get_origin(tp) is list and isinstance(value, list):
        return tuple(value)  # frozen params: lists become tuples
    return value


def parse_section(raw: Any, section: str, cls: type[T]) -> tuple[T | None, list[str]]:
    """Build `cls` from one params.yaml section; return (params, problems). Unknown and missing keys are problems."""
    if not isinstance(raw, dict):
        return None, [f"{section}: expected a mapping of keys, got {raw!r}"]
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    problems = []
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean '{section}.{close[0]}'?)" if close else f" (known keys: {', '.join(fields)})"
            problems.append(f"{section}.{key}: unknown key{hint}")
    for name in fields:
        if name not in raw:
            problems.append(f"{section}.{name}: missing (every key must be set in params.yaml)")
        elif (p := _type_problem(raw[name], hints[name])) is not None:
            problems.append(f"{section}.{name}: {p}")
    if problems:
        return None, problems
    obj = cls(**{n: _coerce(raw[n], hints[n]) for n in fields})
    check = getattr(obj, "problems", None)
    extra = [f"{section}.{p}" for p in check()] if check else []
    return (None, extra) if extra else (obj, [])


def read_params_file(path: Path = PARAMS_FILE) -> dict:
    if not path.exists():
        raise MedtuneError(f"{path}: not found (run stages from the repository root)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise MedtuneError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise MedtuneError(f"{path}: expected a mapping of sections at the top level")
    return data


def load_params(*sections: tuple[str, type], path: Path = PARAMS_FILE) -> list:
    """Load and validate several sections at once; raise one error listing every problem."""
    data = read_params_file(path)
    out, problems = [], []
    for name, cls in sections:
        if name not in data:
            problems.append(f"{name}: missing section")
            out.append(None)
            continue
        obj, errs = parse_section(data[name], name, cls)
        out.append(obj)
        problems += errs
    if problems:
        raise MedtuneError(f"{path}: " + "; ".join(problems))
    return out


# ---------------------------------------------------------------- files


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSON-lines file; a bad line stops with its file and line number."""
    if not path.exists():
        raise MedtuneError(f"{path}: file not found")
    rows = []
    try:
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise MedtuneError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict):
                    raise MedtuneError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
                rows.append(row)
    except UnicodeDecodeError as e:
        raise MedtuneError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    return rows


def jsonl_text(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temp file in the same folder and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not e.filename:  # a failed write (disk full) does not say which file
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def atomic_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a temp folder beside `out_dir`; on success it replaces `out_dir`, on failure it is removed.

    An interrupted stage leaves the previous output (or none), never a half-written one that DVC would cache.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        yield tmp
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------- run-time


def set_seed(seed: int) -> int:
    """Seed python, numpy and torch (if loaded). Data code uses its own np.random.default_rng(seed)."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    if "torch" in sys.modules:
        from transformers import set_seed as hf_set_seed

        hf_set_seed(seed)
    return seed


def setup_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("MEDTUNE_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def log_params(stage: str, *objs: Any) -> None:
    for obj in objs:
        log.info("running %s with %s: %s", stage, type(obj).__name__, json.dumps(dataclasses.asdict(obj), default=str))


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Turn expected failures into a one-line click error (exit 1) instead of a traceback."""
    try:
        yield
    except MedtuneError as e:
        raise click.ClickException(str(e)) from None
    except OSError as e:  # disk full, permission denied: name the file
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        full = " (is the disk full?)" if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else ""
        raise click.ClickException(f"{where}{e.strerror or e}{full}; the previous outputs were kept") from None
