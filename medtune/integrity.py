"""Whether the files in a checkout are the ones dvc.lock records, by hashing the files themselves: DVC's own
`dvc status` trusts the hashes it cached by file size and time, so a file edited in place (or a tampered object
pulled from a remote) can pass it. A folder output is checked through its `.dir` manifest from the DVC cache,
whose own hash dvc.lock records, so a tampered manifest is caught too."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from medtune.hashing import file_digest


def recorded(repo: Path) -> dict[str, str]:
    """path -> md5 (`....dir` for a folder) of every dependency and output that dvc.lock records."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text()) or {}
    out = {}
    for stage in (lock.get("stages") or {}).values():
        for entry in [*(stage.get("deps") or []), *(stage.get("outs") or [])]:
            if entry.get("md5"):
                out[entry["path"]] = entry["md5"]
    return out


def artifacts(repo: Path) -> dict[str, str]:
    """path -> artifact name, from dvc.yaml's `artifacts:` (so that a problem names the artifact too)."""
    pipeline = yaml.safe_load((repo / "dvc.yaml").read_text()) or {}
    return {str(a.get("path")): name for name, a in (pipeline.get("artifacts") or {}).items()}


def manifest(repo: Path, dir_md5: str) -> tuple[list[dict] | None, str | None]:
    """The entries of a folder's `.dir` manifest in the DVC cache, checked against its hash; (None, why) if absent
    or altered."""
    name = dir_md5.removesuffix(".dir")
    path = repo / ".dvc" / "cache" / "files" / "md5" / name[:2] / f"{name[2:]}.dir"
    if not path.exists():
        return None, "not in the DVC cache (run `dvc pull`)"
    data = path.read_bytes()
    if hashlib.md5(data).hexdigest() != name:
        return None, f"its manifest in the DVC cache ({path.relative_to(repo)}) does not match dvc.lock"
    return json.loads(data), None


def tree_md5(entries: list[dict]) -> str:
    """A folder's hash as DVC computes it: the md5 of its manifest, the files' md5s sorted by path, as JSON."""
    return hashlib.md5(json.dumps(sorted(entries, key=lambda e: e["relpath"]), sort_keys=True).encode()).hexdigest()


def lock_problems(repo: Path) -> list[str]:
    """One line per file that is missing, extra or different from what dvc.lock records (hashing every file)."""
    if not (repo / "dvc.lock").exists():
        return ["dvc.lock: not found (no run to check: commit one, or clone a repository that has one)"]
    named = artifacts(repo)
    problems = []
    for rel, md5 in sorted(recorded(repo).items()):
        what = f"{rel} (artifact {named[rel]})" if rel in named else rel
        path = repo / rel
        if not md5.endswith(".dir"):
            if not path.is_file():
                problems.append(f"{what}: missing (run `dvc pull`)")
            elif (got := file_digest(path, "md5")) != md5:
                problems.append(f"{what}: md5 {got} differs from dvc.lock's {md5}")
            continue
        if not path.is_dir():
            problems.append(f"{what}: missing (run `dvc pull`)")
            continue
        files = sorted(f.relative_to(path).as_posix() for f in path.rglob("*") if f.is_file())
        ours = [{"md5": file_digest(path / name, "md5"), "relpath": name} for name in files]
        if tree_md5(ours) == md5.removesuffix(".dir"):
            continue
        entries, why = manifest(repo, md5)  # name the files, where the (checked) manifest is at hand
        if entries is None:
            problems.append(f"{what}: its files differ from dvc.lock's {md5}")
            continue
        expected, got = {e["relpath"]: e["md5"] for e in entries}, {e["relpath"]: e["md5"] for e in ours}
        suffix = f" (artifact {named[rel]})" if rel in named else ""
        for name in sorted(set(expected) | set(got)):
            if name not in got:
                problems.append(f"{rel}/{name}{suffix}: missing")
            elif name not in expected:
                problems.append(f"{rel}/{name}{suffix}: not recorded in dvc.lock (a file added after the run)")
            elif got[name] != expected[name]:
                problems.append(f"{rel}/{name}{suffix}: md5 {got[name]} differs from dvc.lock's (through {md5})")
    return problems
