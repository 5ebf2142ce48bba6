"""DVC experiments through dvc.api: the runs `dvc exp show` lists, a run's files (metrics, per-question
predictions, model folders) read from its commit and the DVC cache without checking anything out."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from medtune.console import MedtuneError
from medtune.models import cache_dir
from medtune.params import flat

UNFINISHED = ("Queued", "Running", "Failed")  # dvc exp show's states of runs without results


def from_revision(path: Path, rev: str, repo_dir: Path = Path(".")) -> tuple[Path, dict, str]:
    """A local copy of DVC-tracked `path` as of experiment or git revision `rev`, with that revision's
    params.yaml and commit sha. Files come from the DVC cache through dvc.api; copies are kept under
    $MEDTUNE_CACHE/revs/<sha>/ and reused."""
    import yaml
    from dvc.api import DVCFileSystem
    from dvc.repo import Repo
    from dvc.repo.experiments.utils import resolve_name

    try:
        repo = Repo(str(repo_dir))
    except Exception as e:
        raise MedtuneError(f"--exp {rev}: {repo_dir.resolve()} is not a DVC repository ({type(e).__name__})") from None
    try:
        ref = resolve_name(repo.scm, [rev]).get(rev)
        sha = repo.scm.get_ref(str(ref)) if ref else repo.scm.resolve_rev(rev)
    except Exception as e:
        raise MedtuneError(f"--exp {rev}: not an experiment (see `dvc exp show`) or a git revision ({type(e).__name__}: {e})") from None
    fs = DVCFileSystem(str(repo_dir), rev=sha)
    key = path.as_posix().strip("/")
    if not fs.isdir(key):
        raise MedtuneError(f"--exp {rev} ({sha[:7]}): no folder {key} in that revision")
    params = yaml.safe_load(fs.read_text("params.yaml"))
    dest = cache_dir() / "revs" / sha / key
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
        try:
            fs.get(key, str(tmp / "d"), recursive=True)
            os.replace(tmp / "d", dest)
        except FileNotFoundError as e:
            raise MedtuneError(f"--exp {rev} ({sha[:7]}): {key} is not in the DVC cache ({e}); `dvc pull` it first") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest, params, sha


def exp_rows(repo: Path) -> list[dict]:
    """`dvc exp show`'s rows for the commit checked out and its experiments (dvc.api.exp_show)."""
    import dvc.api

    try:
        return dvc.api.exp_show(repo=str(repo), force=True)
    except Exception as e:  # not a DVC repository, no git commit yet
        raise MedtuneError(f"{repo.resolve()}: cannot list experiments ({type(e).__name__}: {e})") from None


def stage_sections(repo: Path) -> set[str]:
    """The params.yaml sections some stage of dvc.yaml depends on: only these make runs differ."""
    import yaml

    pipeline = repo / "dvc.yaml"
    try:
        stages = (yaml.safe_load(pipeline.read_text(encoding="utf-8")) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError) as e:
        raise MedtuneError(f"{pipeline}: cannot read the stages ({e})") from None
    out = set()
    for stage in stages.values():
        for item in stage.get("params") or []:
            keys = [item] if isinstance(item, str) else [k for v in item.values() for k in v or []]
            out |= {k.split(".")[0] for k in keys}
    return out


class Run:
    """One finished run (a commit or an experiment): its name, commit, stage params (dotted keys) and files."""

    def __init__(self, repo: Path, name: str, rev: str, sections: set[str]):
        from dvc.api import DVCFileSystem

        self.name, self.rev = name, rev
        self.fs = DVCFileSystem(str(repo), rev=None if rev == "workspace" else rev)
        params = self.json_or_yaml("params.yaml")
        self.params = {k: json.dumps(v) if isinstance(v, list) else v
                       for k, v in flat({s: v for s, v in params.items() if s in sections}).items()}

    def text(self, path: str) -> str:
        try:
            return self.fs.read_text(path, encoding="utf-8")
        except FileNotFoundError:
            raise MedtuneError(f"run {self.name} ({self.rev[:7]}): no {path}") from None

    def json_or_yaml(self, path: str):
        import yaml

        try:
            return yaml.safe_load(self.text(path)) if path.endswith((".yaml", ".yml")) else json.loads(self.text(path))
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise MedtuneError(f"{path} of run {self.name} ({self.rev[:7]}): malformed ({' '.join(str(e).split())})") from None

    def has(self, path: str) -> bool:
        return self.fs.exists(path)


def finished_runs(repo: Path, needs: list[str]) -> tuple[list[Run], dict[str, int]]:
    """The runs of `dvc exp show` that finished and have every file in `needs`, and the others counted by
    reason. The workspace is left out when it has the same params as the commit it sits on."""
    sections = stage_sections(repo)
    runs, skipped = [], {}
    for row in exp_rows(repo):
        state, rev = row.get("State"), row.get("rev")
        if state in UNFINISHED or not rev:
            skipped[str(state).lower()] = skipped.get(str(state).lower(), 0) + 1
            continue
        name = "workspace" if rev == "workspace" else row.get("Experiment") or rev[:7]
        run = Run(repo, name, rev, sections)
        if missing := [p for p in needs if not run.has(p)]:
            skipped[f"no {missing[0]}"] = skipped.get(f"no {missing[0]}", 0) + 1
            continue
        runs.append(run)
    workspace = [r for r in runs if r.rev == "workspace"]
    if workspace and any(r.rev != "workspace" and r.params == workspace[0].params
                         and r.text(needs[0]) == workspace[0].text(needs[0]) for r in runs):
        runs.remove(workspace[0])
    return runs, skipped
