"""The recipe's `training:` block -> transformers.TrainingArguments, with mi_tune's defaults and the fields it manages.

Pure where it can be (``training_values``), so the GPU-only choices (bf16 autocast, pinned memory, checkpointing
applied to the base model rather than through the Trainer) are testable on a CPU.
"""

from __future__ import annotations

from pathlib import Path

from .config import Recipe
from .errors import UserError

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
