"""Upload the adapter or the merged model, with its model card, to a Hugging Face hub model repo
(huggingface_hub's `upload_folder`; the token comes from `hf auth login` or $HF_TOKEN).
`--dry-run` uploads nothing and lists exactly the files that would go: path, bytes and sha256.

    medtune push --model models/merged --repo-id me/medtune-gemma-270m --dry-run
    medtune push --adapter models/adapter --repo-id me/medtune-gemma-270m-lora \
        --eval-base eval/base/metrics.json --eval-tuned eval/tuned/metrics.json --data-card data/source/DATA_CARD.md

The merged folder goes as the merge stage wrote it (its README.md is the card). The adapter goes with a
card built now (medtune/cards.py) in place of peft's placeholder README.md. Reads params `format`, `card`
(for the adapter's card).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import click

from medtune import params
from medtune.cards import CardInputs, check_card_inputs, write_model_card
from medtune.console import MedtuneError, cli_errors, setup_logging
from medtune.hashing import file_digest

log = logging.getLogger("medtune.push")


def stage_upload(src: Path, kind: str, card: CardInputs | None, dest: Path) -> list[dict]:
    """Copy what would be uploaded into `dest` and return one row per file (path, bytes, sha256)."""
    if not (src / "run_config.json").exists():
        raise MedtuneError(f"{src}: no run_config.json (a folder written by the train or merge stage is expected)")
    if kind == "adapter":
        if not (src / "adapter_model.safetensors").exists():
            raise MedtuneError(f"{src}: no adapter_model.safetensors (run the train stage)")
        shutil.copytree(src, dest, ignore=shutil.ignore_patterns("README.md"))
        write_model_card(dest, "adapter", card)
    else:
        if not list(src.glob("*.safetensors")):
            raise MedtuneError(f"{src}: no *.safetensors weights (run the merge stage)")
        if not (src / "README.md").exists():
            raise MedtuneError(f"{src}: no README.md model card (rerun the merge stage, which writes it)")
        shutil.copytree(src, dest)
    rows = []
    for f in sorted(p for p in dest.rglob("*") if p.is_file()):
        rows.append({"path": f.relative_to(dest).as_posix(), "bytes": f.stat().st_size, "sha256": file_digest(f)})
    return rows


def upload(folder: Path, repo_id: str, private: bool, message: str) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model", commit_message=message)
    except Exception as e:  # offline, no token, no permission: one line, not a traceback
        raise MedtuneError(f"upload to {repo_id} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return str(getattr(info, "commit_url", info))


@click.command()
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), help="a merged model folder")
@click.option("--adapter", type=click.Path(exists=True, file_okay=False, path_type=Path), help="a LoRA adapter folder")
@click.option("--repo-id", required=True, help="hub model repo, owner/name (created if missing)")
@click.option("--private", is_flag=True, help="create the repo as private")
@click.option("--dry-run", is_flag=True, help="upload nothing; list the files that would be uploaded")
@click.option("--eval-base", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="adapter card: base metrics")
@click.option("--eval-tuned", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="adapter card: tuned metrics")
@click.option("--data-card", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="adapter card: data card")
def main(model_dir: Path | None, adapter: Path | None, repo_id: str, private: bool, dry_run: bool,
         eval_base: Path | None, eval_tuned: Path | None, data_card: Path | None) -> None:
    """Upload the adapter or merged model to the hub (or list what would go, with --dry-run)."""
    setup_logging()
    if (model_dir is None) == (adapter is None):
        raise click.UsageError("give exactly one of --model (merged folder) or --adapter (adapter folder)")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise click.BadParameter(f"{repo_id!r}: expected owner/name", param_hint="--repo-id")
    kind, src = ("adapter", adapter) if adapter else ("merged", model_dir)
    with cli_errors(kept=False):
        card = None
        if kind == "adapter":
            missing = [o for o, v in (("--eval-base", eval_base), ("--eval-tuned", eval_tuned), ("--data-card", data_card)) if v is None]
            if missing:
                raise click.UsageError(f"--adapter needs {', '.join(missing)} for its model card")
            fmt, cp = params.load("format", "card")
            card = CardInputs(cp, fmt, eval_base, eval_tuned, data_card)
            check_card_inputs(card)
        with tempfile.TemporaryDirectory(prefix="medtune-push-") as tmp:
            rows = stage_upload(src, kind, card, Path(tmp) / "upload")
            total = sum(r["bytes"] for r in rows)
            head = "would upload" if dry_run else "uploading"
            click.echo(f"{head} {len(rows)} files ({total:,} bytes) from {src} ({kind}) to hub model repo {repo_id}"
                       f" ({'private' if private else 'public'}):")
            for r in rows:
                click.echo(f"  {r['path']}\t{r['bytes']:,}\t{r['sha256']}")
            if not dry_run:
                url = upload(Path(tmp) / "upload", repo_id, private, f"medtune: {kind} from {src}")
                click.echo(f"uploaded: {url}")


if __name__ == "__main__":
    main()
