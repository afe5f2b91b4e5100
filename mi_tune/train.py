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
import sys

from .config import Recipe, dump_recipe, flatten, load_recipe
from .errors import cli_main, log


def dry_run(recipe: Recipe) -> None:
    from .modeling import adapter_plan  # reads the config only: no weights

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


@cli_main
def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(prog="python -m mi_tune.train", description=__doc__.split("\n\n")[1])
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/smollm2-135m-cpu.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. training.max_steps=20 (win over the file)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and the adapter plan; load no weights")
    a = p.parse_args(argv)

    # ---- recipe ----
    recipe = load_recipe(a.recipe, a.overrides)
    if a.dry_run:
        return dry_run(recipe)
    # the training stack, once the recipe is valid (a typo or --help answers without importing torch)
    from accelerate import PartialState
    from transformers import set_seed

    from .arguments import checkpointing, training_arguments
    from .card import run_readme
    from .check import base_features, check_pools, flat_metrics, heldout_check, ood_sets, print_check
    from .data import PadCollator, load_corpus, tokenize_corpus
    from .hub import push_run
    from .mlflow_model import run_tags
    from .modeling import add_adapters, load_model, resolve_dtype
    from .runs import CHECKPOINTS_DIR, INFO_FILE, METRICS_FILE, README_FILE, RECIPE_FILE, TRACKING_FILE, atomic_write, open_run_dir
    from .tracking import NullTracker, ensure_params, log_run_outputs, start_tracking
    from .trainer import RecoverabilityModel, RecoverabilityTrainer, TrackingCallback, resolve_objective, write_marker

    # ---- run folder (TrainingArguments and check sets validated first: a bad value fails before anything is written) ----
    run_dir = recipe.run_dir
    args = training_arguments(recipe, resolve_dtype(recipe.model)[0], run_dir / CHECKPOINTS_DIR)
    ood = ood_sets(recipe) if recipe.check.enabled else []
    state = PartialState()  # one process, or one per rank under accelerate launch / torchrun
    main_proc = state.is_main_process
    resuming, resume = open_run_dir(recipe, state)

    # ---- tracking (before the model, so an unreachable server fails fast) ----
    prev = json.loads((run_dir / TRACKING_FILE).read_text()) if resuming and (run_dir / TRACKING_FILE).exists() else {}
    tracker = start_tracking(recipe.tracking, recipe.run_name, run_dir, run_tags(recipe), prev.get("run_id")) if main_proc else NullTracker()
    if tracker.run_id:
        atomic_write(run_dir / TRACKING_FILE, json.dumps({"run_id": tracker.run_id, "tracking_uri": tracker.uri}))
        write_marker("tracking-run-created")  # test hook: the run exists, its params are not logged yet
    status = "FAILED"
    try:
        # ---- model ----
        set_seed(recipe.seed)
        loaded = load_model(recipe.model, for_training=True)
        write_marker("startup")  # test hook (MI_TUNE_TEST_MARKERS): mi_tune and the model are loaded, no step taken
        layer, pooling = resolve_objective(recipe, loaded)  # a wrong layer index fails before any data is read
        peft_model = add_adapters(loaded, recipe.lora, gradient_checkpointing=checkpointing(recipe.training))
        tok = loaded.tokenizer

        # ---- data ----
        corpus = load_corpus(recipe.data)
        train_ds = tokenize_corpus(tok, corpus.train, recipe.data.max_length, corpus.stats, "train")
        eval_cap = recipe.data.max_eval_samples or len(corpus.eval)
        eval_ds = tokenize_corpus(tok, corpus.eval[:eval_cap], recipe.data.max_length, corpus.stats, "eval")

        # ---- head and objective ----
        model = RecoverabilityModel.from_recipe(recipe, loaded, peft_model, train_ds.seqs, layer, pooling)
        head, exclude = model.head, model.exclude

        # ---- base features, once: the head's warm start and the base row of the final check ----
        base = None
        need_warm = recipe.head.init == "fit" and resume is None
        if need_warm or (recipe.check.enabled and main_proc):
            n = max(recipe.check.train_sentences if recipe.check.enabled else 0, recipe.head.warm_start_sentences if need_warm else 0)
            base = base_features(peft_model, tok, corpus, recipe, head.config, exclude, n, ood, location=loaded.location)
        if need_warm:
            _, X, Y = base["train"]
            head.warm_start(X, Y, recipe.head.warm_start_sentences, recipe.head.warm_start_epochs, recipe.seed)
            log(f"head: warm start from a BCE decoder fitted on frozen base features of "
                f"{min(recipe.head.warm_start_sentences, X.shape[1])} training sentences")

        # ---- trainer ----
        trainer = RecoverabilityTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                                        data_collator=PadCollator(tok.pad_token_id), callbacks=[TrackingCallback(tracker)],
                                        head_learning_rate=recipe.head.learning_rate, head_weight_decay=recipe.head.weight_decay,
                                        on_nonfinite_loss=recipe.objective.on_nonfinite_loss)
        info = {**model.run_info(loaded), "data": corpus.stats, "resumed_from": str(resume) if resume else None}
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
        atomic_write(run_dir / README_FILE, run_readme(run_dir))

        # ---- log (and share) ----
        log_run_outputs(tracker, run_dir, recipe)
        if recipe.hub.push:
            push_run(run_dir, recipe.hub.repo_id, private=recipe.hub.private)
        status = "FINISHED"
        print(f"\nrun folder: {run_dir}  (load with PeftModel.from_pretrained(base, {str(run_dir)!r}))")
        return trainer
    finally:
        tracker.end(status)


if __name__ == "__main__":
    main(sys.argv[1:])
