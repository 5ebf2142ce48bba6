"""Files: JSON lines and JSON in, atomic files and folders out.

An output is written beside its final path and renamed into place, so a reader (or DVC) never sees half a
file, and an interrupted stage leaves the previous output, not a broken one.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medtune.console import MedtuneError


def parse_jsonl(lines: Iterator[str], source: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line stops with its file and line number."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise MedtuneError(f"{source}:{n}: malformed JSON at column {e.colno} ({e.msg})") from None
        if not isinstance(row, dict):
            raise MedtuneError(f"{source}:{n}: expected a JSON object, got {type(row).__name__}")
        yield n, row


def read_jsonl(path: Path) -> list[dict]:
    """Every object of a JSON-lines file."""
    return [row for _, row in numbered_jsonl(path)]


def numbered_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each line of a JSON-lines file, for callers that check rows and name the line."""
    if not path.exists():
        raise MedtuneError(f"{path}: file not found")
    try:
        with path.open(encoding="utf-8") as f:
            return list(parse_jsonl(f, str(path)))
    except UnicodeDecodeError as e:
        raise MedtuneError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MedtuneError(f"{path}: file not found (run the stage that writes it first)") from None
    except json.JSONDecodeError as e:
        raise MedtuneError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None


def jsonl_text(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)


def json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def umask() -> int:
    """The process's umask (read by setting it, then set back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_leftovers(path: Path) -> None:
    """Temp files and folders an interrupted write of `path` left beside it (killed before it could clean up)."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    shutil.rmtree(path.parent / f".{path.name}.old", ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temp file in the same folder and rename, so readers never see half a file. The file gets the
    permissions the umask gives a new file (mkstemp's are owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~umask())
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and (not e.filename or e.filename == tmp):  # name the output, not the temp file
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


def write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json_text(obj))


def permit(folder: Path) -> None:
    """Give everything in `folder` the permissions the umask gives new files and folders: some writers (temp
    files, safetensors) make theirs owner-only, which another user or a serving container could not read."""
    mask = umask()
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


@contextlib.contextmanager
def atomic_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a temp folder beside `out_dir`; on success it replaces `out_dir`, on failure it is removed.

    An interrupted stage leaves the previous output (or none), never a half-written one that DVC would cache; what
    a killed one left behind is removed by the next. Errors name the output, not the temp folder.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out_dir)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        try:
            yield tmp
        except OSError as e:
            if e.filename and str(e.filename).startswith(str(tmp)):
                raise OSError(e.errno, e.strerror, str(out_dir / Path(e.filename).relative_to(tmp))) from None
            raise
        permit(tmp)
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
