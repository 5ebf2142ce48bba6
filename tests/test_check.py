"""`medtune check`, the CI gate on pulled artifacts: run the pipeline in one clone, `dvc push` to a
local remote, `git clone` + `dvc pull` into a second clone, and check there without retraining. Then tamper
with a pulled file, with a metric, and raise a threshold: each fails with a message naming what failed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from click.testing import CliRunner

from medtune.tools import check
from tests.conftest import REPO
from tests.helpers import dvc

# the tiny model's 4 test answers are near-random: thresholds that its run meets, so the test is about the gate
TINY_CHECK = ["--min-delta", "-1", "--allow-ci-with-zero", "--min-test-questions", "1", "--max-runaway-rate", "1",
              "--max-empty-rate", "0"]


def git(repo: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def run_check(repo: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medtune.tools.check", *options], cwd=repo, capture_output=True, text=True)


def test_check_on_a_pulled_clone_passes_then_names_what_was_tampered(repo_copy, tmp_path):
    remote = tmp_path / "remote"
    # the project's remote config, pointed at a temp folder the documented way (config.local is not committed)
    (repo_copy / ".dvc" / "config").write_text((REPO / ".dvc" / "config").read_text())
    dvc(repo_copy, "remote", "modify", "--local", "local", "url", str(remote))
    dvc(repo_copy, "repro")
    git(repo_copy, "add", "-A")
    git(repo_copy, "commit", "-qm", "run")
    assert "pushed" in dvc(repo_copy, "push")

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(repo_copy), str(clone))
    assert not (clone / "models" / "adapter").exists()  # git holds only the pointers (dvc.lock)
    dvc(clone, "remote", "modify", "--local", "local", "url", str(remote))
    dvc(clone, "pull")
    ok = run_check(clone, *TINY_CHECK)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("check passed: every file matches dvc.lock; delta_rougeL")
    assert "adapter answered 2 test question(s)" in ok.stdout

    # one byte changed in place, the file's time put back: `dvc status` trusts its cached hash, the check hashes
    weights = clone / "models" / "adapter" / "adapter_model.safetensors"
    original, stat = weights.read_bytes(), weights.stat()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert "up to date" in dvc(clone, "status").lower() or "Data and pipelines are up to date" in dvc(clone, "status")
    bad = run_check(clone, *TINY_CHECK)
    assert bad.returncode == 1
    last = bad.stderr.strip().splitlines()[-1]
    assert last.count("models/adapter/adapter_model.safetensors") == 1 and "differs from dvc.lock's" in last
    assert "Q " not in bad.stderr  # hashes first: the tampered adapter was never loaded
    weights.write_bytes(original)

    details = clone / "eval" / "tuned" / "metrics.json"
    metrics = json.loads(details.read_text())
    details.write_text(json.dumps(metrics | {"delta_rougeL": metrics["delta_rougeL"] + 0.5}))
    bad = run_check(clone, *TINY_CHECK)
    last = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 1 and "eval/tuned/metrics.json: md5" in last and "disagrees with delta_rougeL" in last
    assert "models/adapter" not in last  # restored: only what was tampered is named
    git(clone, "checkout", "--", "eval/tuned/metrics.json")

    bad = run_check(clone, "--min-delta", "0.9", "--min-test-questions", "30", "--allow-ci-with-zero",
                    "--max-runaway-rate", "1", "--max-empty-rate", "0")
    assert bad.returncode == 1 and "dvc.lock" not in bad.stderr
    assert "eval/tuned/metrics.json: delta_rougeL" in bad.stderr and "is below --min-delta +0.9000" in bad.stderr
    assert "eval/tuned/metrics.json: n 4 test questions is below --min-test-questions 30" in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("Error: check failed (2): ")  # all at once, one line

    # a tampered object in the remote, pulled into a fresh clone: DVC does not verify what it pulls, the check does
    lock = yaml.safe_load((repo_copy / "dvc.lock").read_text())
    adapter_dir = next(o["md5"] for o in lock["stages"]["train"]["outs"] if o["path"] == "models/adapter")
    manifest = json.loads((remote / "files" / "md5" / adapter_dir[:2] / adapter_dir[2:]).read_text())
    obj = next(e["md5"] for e in manifest if e["relpath"] == "adapter_model.safetensors")
    path = remote / "files" / "md5" / obj[:2] / obj[2:]
    data = bytearray(path.read_bytes())
    data[-100:-60] = bytes(40)  # same size: the last tensor's bytes zeroed
    path.write_bytes(bytes(data))
    fresh = tmp_path / "fresh"
    git(tmp_path, "clone", "-q", str(repo_copy), str(fresh))
    dvc(fresh, "remote", "modify", "--local", "local", "url", str(remote))
    dvc(fresh, "pull")
    bad = run_check(fresh, *TINY_CHECK)
    assert bad.returncode == 1 and "models/adapter/adapter_model.safetensors" in bad.stderr.strip().splitlines()[-1]


def test_check_rejects_bad_options_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(check.main, ["--max-runaway-rate", "1.5"])
    assert result.exit_code == 2 and "Invalid value for '--max-runaway-rate': 1.5 is not in the range 0<=x<=1" in result.output
    result = CliRunner().invoke(check.main, ["--min-dleta", "0.1"])
    assert result.exit_code == 2 and "No such option '--min-dleta'" in result.output and "'--min-delta'" in result.output


def test_check_names_missing_artifacts_when_nothing_was_pulled(repo_copy):
    """A clone of a run without `dvc pull`: every missing output is named, nothing is loaded or trained."""
    bad = run_check(repo_copy, *TINY_CHECK)  # no run at all yet
    assert bad.returncode == 1 and "dvc.lock: not found" in bad.stderr.strip().splitlines()[-1]
    dvc(repo_copy, "repro")
    git(repo_copy, "add", "-A")
    git(repo_copy, "commit", "-qm", "run")
    clone = repo_copy.parent / "unpulled"
    git(repo_copy.parent, "clone", "-q", str(repo_copy), str(clone))
    bad = run_check(clone, *TINY_CHECK)
    assert bad.returncode == 1
    last = bad.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: check failed")
    for name in ("models/adapter (artifact adapter): missing (run `dvc pull`)", "data/formatted: missing (run `dvc pull`)"):
        assert name in last
    assert "Q " not in bad.stderr
