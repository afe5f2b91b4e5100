"""python -m mi_tune.train RECIPE [key=value ...] [--dry-run]

Trains LoRA/QLoRA adapters on blocks 0..L-2 (the final block stays frozen) plus a linear
bag-of-tokens head, to maximise how much of its input the pooled sentence embedding keeps.
Re-running the same command after an interruption resumes from the newest complete checkpoint.
Reads top to bottom: recipe -> run folder -> tracking -> model -> data -> trainer -> save ->
held-out check -> log.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .config import Recipe, dump_recipe, flatten, load_recipe
from .errors import UserError, cli_main, log

# TrainingArguments defaults of ours; any of them can be set in the recipe's `training:` block.
TRAINING_DEFAULTS = dict(
    per_device_train_batch_size=8,
    per_device_eval_batch_size=16,
    learning_rate=2e-4,
    lr_scheduler_type="cosine",
    warmup_steps=10,
    logging_steps=10,
    eval_strategy="steps",
    eval_steps=50,
    save_strategy="steps",
    save_steps=50,
    save_total_limit=2,
    train_sampling_strategy="group_by_length",  # fewer pad tokens per batch
    dataloader_num_workers=0,
    max_grad_norm=1.0,
)
RECIPE_FILE, INFO_FILE, METRICS_FILE, TRACKING_FILE = "recipe.yaml", "run_info.json", "metrics.json", "tracking_run.json"


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
    if recipe.overwrite and (finished or not saved.exists() or _recipe_diff(recipe, saved)):
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
    diff = _recipe_diff(recipe, saved)
    if diff:
        raise UserError(f"run_name: {run_dir} holds an unfinished run of a different recipe (differs in: {', '.join(diff[:8])}). "
                        f"Allowed: resume with the same recipe, or start a new run. Fix: use another run_name, or "
                        f"overwrite=true to move the unfinished run aside.")
    return True


def _recipe_diff(recipe: Recipe, saved_path: Path) -> list[str]:
    import yaml

    old = flatten(yaml.safe_load(saved_path.read_text()) or {})
    new = flatten(recipe.to_dict())
    # a setting added to mi_tune after the run was saved is absent from its recipe.yaml: it had the default then
    defaults = {k: v for k, v in flatten(Recipe().to_dict()).items() if not k.startswith("training.")}
    ignore = {"overwrite"}
    return sorted(k for k in set(old) | set(new)
                  if k not in ignore and not k.startswith("tracking.") and old.get(k, defaults.get(k)) != new.get(k))


CHECKPOINTING_KEYS = ("activation_checkpointing", "gradient_checkpointing")  # TrainingArguments' name and its deprecated alias


def checkpointing(training: dict) -> bool:
    """Whether the recipe's `training:` block asks for activation checkpointing (either name; the new one wins, as in
    transformers). mi_tune applies it to the base model (modeling.add_adapters), never through the Trainer."""
    for key in CHECKPOINTING_KEYS:
        if training.get(key) is not None:
            return bool(training[key])
    return False


def training_values(recipe: Recipe, dtype, cuda: bool) -> dict:
    """The TrainingArguments values for this recipe, compute dtype and machine (pure: testable without a GPU)."""
    import torch

    values = {**TRAINING_DEFAULTS, "seed": recipe.seed, "dataloader_pin_memory": cuda,
              "use_cpu": not cuda,  # also what makes torchrun/accelerate on CPU use DDP (gloo)
              "bf16": dtype == torch.bfloat16 and cuda,  # bf16 autocast for bf16 weights
              "fp16": False, **recipe.training}
    for key in CHECKPOINTING_KEYS:  # applied to the base model in modeling.add_adapters; RecoverabilityModel has no such method
        values.pop(key, None)
        values.pop(f"{key}_kwargs", None)
    if values.get("eval_strategy") == "no" and values.get("load_best_model_at_end"):
        values["load_best_model_at_end"] = False
    if values.get("load_best_model_at_end"):
        values.setdefault("metric_for_best_model", "eval_recoverability_acc")
        values.setdefault("greater_is_better", True)
    return values


def training_arguments(recipe: Recipe, dtype, output_dir: Path):
    import torch
    from transformers import TrainingArguments

    values = training_values(recipe, dtype, torch.cuda.is_available())
    try:
        return TrainingArguments(output_dir=str(output_dir), report_to="none", remove_unused_columns=False,
                                 prediction_loss_only=True, label_names=[], **values)
    except (ValueError, TypeError) as exc:
        raise UserError(f"training: transformers.TrainingArguments rejected the recipe's values: {str(exc).strip().splitlines()[0]} "
                        f"Fix the named field in the `training:` block.") from None


def dry_run(recipe: Recipe) -> None:
    from .modeling import adapter_plan

    print("# resolved recipe")
    print(dump_recipe(recipe))
    plan = adapter_plan(recipe.model, recipe.lora)
    n, final = plan["num_blocks"], plan["final_block"]
    print(f"# model: {recipe.model.source} ({plan['model_type']}, {plan['kind']}), {n} blocks")
    print(f"# blocks with adapters: {len(plan['blocks_with_adapters'])} of {n} "
          f"({plan['blocks_with_adapters'][0]}..{plan['blocks_with_adapters'][-1]})")
    print(f"# final block {final}: {'HAS adapters' if plan['final_block_has_adapters'] else 'no adapters (frozen)'}")
    print(f"# {len(plan['modules'])} modules receive adapters:")
    for name in plan["modules"]:
        print(f"  {name}")


def corpus_token_ids(seqs, exclude: set) -> list[int]:
    """Sorted ids of the tokens that occur in the (truncated) training sequences, special tokens excluded."""
    import numpy as np

    present = np.unique(np.fromiter((t for s in seqs for t in s), dtype=np.int64))
    return [int(t) for t in present if int(t) not in exclude]


@cli_main
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mi_tune.train", description=__doc__.split("\n\n")[1])
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/smollm2-135m-cpu.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. training.max_steps=20 (win over the file)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and the adapter plan; load no weights")
    a = p.parse_args(argv)

    # ---- recipe ----
    recipe = load_recipe(a.recipe, a.overrides)
    if a.dry_run:
        dry_run(recipe)
        return

    import torch
    from transformers import set_seed

    from . import __version__
    from .check import base_features, check_pools, flat_metrics, heldout_check, ood_sets, print_check, run_readme
    from .data import PadCollator, load_corpus, tokenize_corpus
    from .head import RecoverabilityHead
    from .modeling import add_adapters, check_layer, default_pooling, load_model
    from .tracking import NullTracker, ensure_params, git_commit, start_tracking
    from .trainer import (RecoverabilityModel, RecoverabilityTrainer, TrackingCallback, incomplete_checkpoints, newest_complete_checkpoint,
                          write_marker)

    # ---- run folder (TrainingArguments validated first: a bad value fails before anything is written) ----
    from .modeling import resolve_dtype

    run_dir, ckpt_dir = recipe.run_dir, recipe.run_dir / "checkpoints"
    args = training_arguments(recipe, resolve_dtype(recipe.model)[0], ckpt_dir)
    ood = ood_sets(recipe) if recipe.check.enabled else []  # out-of-domain check sets: a missing or empty one fails here
    from accelerate import PartialState

    state = PartialState()  # one process, or one per rank under accelerate launch / torchrun
    main_proc = state.is_main_process
    resuming = False
    with state.main_process_first():  # rank 0 decides and writes; the others then read what it wrote
        if main_proc:
            resuming = prepare_run_dir(recipe)
            atomic_write(run_dir / RECIPE_FILE, dump_recipe(recipe))
            resume_point = newest_complete_checkpoint(ckpt_dir) if resuming else None
            for stale in incomplete_checkpoints(ckpt_dir):
                if resume_point is None or int(stale.name.split("-")[-1]) > int(resume_point.name.split("-")[-1]):
                    log(f"ignoring incomplete checkpoint {stale} (interrupted during its save); removing it")
                    shutil.rmtree(stale)
    resume = newest_complete_checkpoint(ckpt_dir)

    # ---- tracking (before the model, so an unreachable server fails fast) ----
    prev = json.loads((run_dir / TRACKING_FILE).read_text()) if resuming and (run_dir / TRACKING_FILE).exists() else {}
    tags = {"mi_tune.base_model": recipe.model.source, "mi_tune.method": "lora-recoverability" if recipe.objective.recoverability_weight > 0 else "lora-lm-control",
            "mi_tune.version": __version__, "mi_tune.git_commit": git_commit(), "mi_tune.run_dir": str(run_dir.resolve())}
    tracker = start_tracking(recipe.tracking, recipe.run_name, run_dir, tags, prev.get("run_id")) if main_proc else NullTracker()
    if tracker.run_id:
        atomic_write(run_dir / TRACKING_FILE, json.dumps({"run_id": tracker.run_id, "tracking_uri": tracker.uri}))
        write_marker("tracking-run-created")  # test hook: the run exists, its params are not logged yet
    status = "FAILED"
    try:
        # ---- model ----
        set_seed(recipe.seed)
        gc = checkpointing(recipe.training)
        loaded = load_model(recipe.model, for_training=True)
        write_marker("startup")  # test hook (MI_TUNE_TEST_MARKERS): mi_tune and the model are loaded, no step taken
        layer = check_layer(recipe.objective.layer, loaded.num_hidden_states, recipe.model.source)
        pooling = default_pooling(loaded.kind) if recipe.objective.pooling == "auto" else recipe.objective.pooling
        if recipe.objective.lm_weight > 0 and loaded.kind != "decoder":
            raise UserError(f"objective.lm_weight: got {recipe.objective.lm_weight} for an encoder ({recipe.model.source}); allowed: 0 "
                            f"for encoders (no next-token head). Fix: set objective.lm_weight: 0.")
        peft_model = add_adapters(loaded, recipe.lora, gradient_checkpointing=gc)
        tok = loaded.tokenizer
        exclude = set(tok.all_special_ids) | {tok.pad_token_id}

        # ---- data ----
        corpus = load_corpus(recipe.data)
        train_ds = tokenize_corpus(tok, corpus.train, recipe.data.max_length, corpus.stats, "train")
        eval_cap = recipe.data.max_eval_samples or len(corpus.eval)
        eval_ds = tokenize_corpus(tok, corpus.eval[:eval_cap], recipe.data.max_length, corpus.stats, "eval")

        # ---- head and objective ----
        active = corpus_token_ids(train_ds.seqs, exclude) if recipe.head.columns == "corpus" else None
        head = RecoverabilityHead.from_model(loaded, layer, pooling, recipe.head.init, active_ids=active)
        model = RecoverabilityModel(peft_model, head, list(exclude), recipe.objective.recoverability_weight,
                                    recipe.objective.lm_weight, recipe.objective.positive_weight)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        cols = (f"{len(active):,} tokens of the training text + 1 shared column, of |V| = {head.config.vocab_size:,}" if active is not None
                else f"|V| = {head.config.vocab_size:,} columns")
        log(f"objective: layer {layer} of {loaded.num_hidden_states - 1} ({pooling} pooling), head on {head.config.hidden_size} dims x {cols}; "
            f"{n_train:,} trainable parameters; adapters on blocks 0..{loaded.num_blocks - 2}, final block {loaded.num_blocks - 1} frozen")

        # ---- base features, once: the head's warm start and the base row of the final check ----
        base = None
        need_warm = recipe.head.init == "fit" and resume is None
        if need_warm or (recipe.check.enabled and main_proc):
            n = max(recipe.check.train_sentences if recipe.check.enabled else 0, recipe.head.warm_start_sentences if need_warm else 0)
            base = base_features(peft_model, tok, corpus, recipe, head.config, exclude, n, ood, location=loaded.location)
        if need_warm:
            from .decoders import fit_bce

            seqs, X, Y = base["train"]
            k = recipe.head.warm_start_sentences
            head.load_decoder(fit_bce(X[:, :k], Y[:k], epochs=recipe.head.warm_start_epochs, lr=1e-2, seed=recipe.seed))
            log(f"head: warm start from a BCE decoder fitted on frozen base features of {min(k, X.shape[1])} training sentences")

        # ---- trainer ----
        trainer = RecoverabilityTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                        data_collator=PadCollator(tok.pad_token_id), callbacks=[TrackingCallback(tracker)],
                                        head_learning_rate=recipe.head.learning_rate, head_weight_decay=recipe.head.weight_decay,
                                        on_nonfinite_loss=recipe.objective.on_nonfinite_loss)
        info = {"layer": layer, "pooling": pooling, "kind": loaded.kind, "num_blocks": loaded.num_blocks,
                "dtype": str(loaded.dtype).replace("torch.", ""), "trainable_parameters": n_train,
                "head_columns": head.decoder.out_features,
                "data": corpus.stats, "resumed_from": str(resume) if resume else None}
        if main_proc:
            atomic_write(run_dir / INFO_FILE, json.dumps(info, indent=2))
        # also on resume: a launch cut before this line left its run without params (tracking.ensure_params decides)
        ensure_params(tracker, {**flatten(recipe.to_dict()), **{f"resolved.{k}": v for k, v in info.items() if k != "data"}})
        tracker.log_artifact(run_dir / RECIPE_FILE)
        if resume:
            log(f"resuming from {resume}")
        train_out = trainer.train(resume_from_checkpoint=str(resume) if resume else None)

        # ---- save ----
        trainer.save_model(str(run_dir))  # adapter_config.json, adapter_model.safetensors, head/
        final = {"train": {**train_out.metrics, "skipped_nonfinite_batches": trainer.skipped_nonfinite}}
        if args.eval_strategy != "no":
            final["eval"] = trainer.evaluate()

        if not main_proc:  # the other ranks are done; rank 0 checks, writes and logs
            status = "FINISHED"
            return trainer

        # ---- held-out check: base vs enhanced, fresh decoders on frozen features ----
        if recipe.check.enabled:
            pools, docs = check_pools(tok, corpus, train_ds.seqs, ood, recipe.data.max_length)
            final["heldout_check"] = heldout_check(peft_model, tok, base, recipe, head.config, exclude, pools, train_ds.seqs, docs)
            print_check(final["heldout_check"])
            tracker.log_metrics(flat_metrics(final["heldout_check"]), step=trainer.state.global_step)
        atomic_write(run_dir / METRICS_FILE, json.dumps(final, indent=2, default=float))
        atomic_write(run_dir / "README.md", run_readme(recipe, info, final))

        # ---- log (and share) ----
        from .tracking import log_run_outputs

        log_run_outputs(tracker, run_dir, recipe)
        if recipe.hub.push:
            from .hub import push_run

            push_run(run_dir, recipe.hub.repo_id, private=recipe.hub.private)
        status = "FINISHED"
        print(f"\nrun folder: {run_dir}  (load with PeftModel.from_pretrained(base, {str(run_dir)!r}))")
        return trainer
    finally:
        tracker.end(status)


if __name__ == "__main__":
    main(sys.argv[1:])
