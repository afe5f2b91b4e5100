"""The run folder: its file names, and its lifecycle (create, resume, move aside) beside its checkpoints.

A run folder holds ``recipe.yaml`` (the resolved recipe, written first), ``checkpoints/checkpoint-N/`` (each
complete only once ``checkpoint_complete.json`` is in it), then at the end the PEFT adapter files, ``head/``,
``run_info.json``, ``metrics.json`` and ``README.md``. Nothing a user produced is overwritten silently: a
finished run, a foreign folder or an unfinished run of another recipe stops the launch (exit 2), and
``overwrite=true`` moves the old folder aside instead of deleting it.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import yaml

from .config import Recipe, dump_recipe, flatten
from .errors import UserError, log

RECIPE_FILE, INFO_FILE, METRICS_FILE, README_FILE = "recipe.yaml", "run_info.json", "metrics.json", "README.md"
TRACKING_FILE, UNSENT_FILE = "tracking_run.json", "tracking_unsent.jsonl"
CHECKPOINTS_DIR = "checkpoints"
COMPLETE_MARKER = "checkpoint_complete.json"  # written last into a checkpoint: only then does it count


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader (or a kill) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[-1])


def checkpoints(output_dir: str | Path, complete: bool = True) -> list[Path]:
    """The ``checkpoint-N`` folders (complete ones, or with ``complete=False`` the ones a kill cut short), by step."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and (p / COMPLETE_MARKER).exists() == complete]
    return sorted(found, key=_step)


def newest_complete_checkpoint(output_dir: str | Path) -> Path | None:
    found = checkpoints(output_dir)
    return found[-1] if found else None


def recipe_diff(recipe: Recipe, saved_path: Path) -> list[str]:
    """Dotted keys where ``recipe`` differs from the recipe saved in a run folder (tracking and overwrite ignored)."""
    old = flatten(yaml.safe_load(saved_path.read_text()) or {})
    new = flatten(recipe.to_dict())
    # a setting added to mi_tune after the run was saved is absent from its recipe.yaml: it had the default then
    defaults = {k: v for k, v in flatten(Recipe().to_dict()).items() if not k.startswith("training.")}
    return sorted(k for k in set(old) | set(new)
                  if k != "overwrite" and not k.startswith("tracking.") and old.get(k, defaults.get(k)) != new.get(k))


def prepare_run_dir(recipe: Recipe) -> bool:
    """Create the run folder, or decide to resume. Never overwrites a user's run silently.

    Returns True when the folder holds an unfinished run of the same recipe (resume).
    """
    run_dir = recipe.run_dir
    if not run_dir.exists():
        run_dir.mkdir(parents=True)
        return False
    saved = run_dir / RECIPE_FILE
    finished = (run_dir / METRICS_FILE).exists()
    if recipe.overwrite and (finished or not saved.exists() or recipe_diff(recipe, saved)):
        moved = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(moved)
        log(f"overwrite=true: the previous run folder was moved to {moved} (delete it yourself when sure)")
        run_dir.mkdir(parents=True)
        return False
    if finished:
        raise UserError(f"run_name: {recipe.run_name!r} already holds a finished run in {run_dir}. Allowed: a new run name, or "
                        f"overwrite=true (the old folder is moved aside, not deleted). Fix: python -m mi_tune.train RECIPE "
                        f"run_name={recipe.run_name}-2")
    if not saved.exists():
        if any(run_dir.iterdir()):
            raise UserError(f"run_name: {run_dir} exists and is not an mi_tune run folder (no {RECIPE_FILE}). Allowed: an empty or "
                            f"new folder. Fix: choose another run_name or output_root, or overwrite=true to move it aside.")
        return False
    diff = recipe_diff(recipe, saved)
    if diff:
        raise UserError(f"run_name: {run_dir} holds an unfinished run of a different recipe (differs in: {', '.join(diff[:8])}). "
                        f"Allowed: resume with the same recipe, or start a new run. Fix: use another run_name, or "
                        f"overwrite=true to move the unfinished run aside.")
    return True


def open_run_dir(recipe: Recipe, state) -> tuple[bool, Path | None]:
    """Prepare the run folder on the main process (the other ranks wait, then read what it wrote).

    Writes the resolved recipe, removes checkpoints a kill cut short (newer than the resume point), and returns
    ``(resuming, newest complete checkpoint or None)``. ``state`` is an ``accelerate.PartialState``.
    """
    ckpt_dir = recipe.run_dir / CHECKPOINTS_DIR
    resuming = False
    with state.main_process_first():
        if state.is_main_process:
            resuming = prepare_run_dir(recipe)
            atomic_write(recipe.run_dir / RECIPE_FILE, dump_recipe(recipe))
            resume_point = newest_complete_checkpoint(ckpt_dir) if resuming else None
            for stale in checkpoints(ckpt_dir, complete=False):
                if resume_point is None or _step(stale) > _step(resume_point):
                    log(f"ignoring incomplete checkpoint {stale} (interrupted during its save); removing it")
                    shutil.rmtree(stale)
    return resuming, newest_complete_checkpoint(ckpt_dir)
