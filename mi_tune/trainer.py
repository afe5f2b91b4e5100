"""RecoverabilityTrainer: a transformers.Trainer with small overrides.

- ``RecoverabilityModel`` bundles the PEFT model and the head; its forward is the objective.
- ``compute_loss`` records recoverability accuracy per mode; ``log`` averages it and adds the paper's Fano estimate
  (``mi_fano_uniform_bits``, not a bound).
- ``create_optimizer`` gives the head its own learning rate.
- ``_save`` / ``_load_from_checkpoint`` / ``_load_best_model`` write and read the standard PEFT
  adapter files plus ``head/`` (safetensors only), never the frozen base weights.
- ``_save_checkpoint`` marks a checkpoint complete only after every file is written, and rotates
  old checkpoints only after that, so a kill during a save never leaves a half checkpoint that
  resume would pick up.
- ``write_marker`` is a test hook (inert unless ``MI_TUNE_TEST_MARKERS`` is set): it lets a test that kills the
  run from outside wait for known points (start-up, inside a checkpoint save, after a save) instead of guessing.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from .embedding import hidden_states
from .errors import UserError, log
from .head import HEAD_DIR, RecoverabilityHead, corpus_token_ids
from .losses import bag_of_tokens, next_token_loss, recoverability_loss
from .metrics import fano_uniform_estimate_bits, recoverability_accuracy
from .modeling import check_layer, default_pooling
from .pooling import pool
from .runs import COMPLETE_MARKER, atomic_write, checkpoints, newest_complete_checkpoint

MARKERS_ENV = "MI_TUNE_TEST_MARKERS"  # test hook: a folder; write_marker() records points the run reached there
PAUSE_IN_SAVE_ENV = "MI_TUNE_TEST_PAUSE_IN_SAVE"  # test hook: a step; its checkpoint save stops half-written (needs MARKERS_ENV)
PAUSE_IN_SAVE_MAX_S = 60.0


def write_marker(name: str) -> None:
    """Test hook: record that this run reached the point ``name``. Not for normal use.

    With the environment variable ``MI_TUNE_TEST_MARKERS`` set to a folder, appends this process's pid as a
    line to ``<folder>/<name>`` (creating the folder and the file) and flushes it, so a test watching that
    folder from outside (e.g. to kill -9 the run at a known point) sees it at once. Without the variable it
    does nothing. Points mi_tune marks:

    - ``tracking-run-created``: train.py, right after ``tracking_run.json`` is written (tracking on), before the
      run's params are logged;
    - ``startup``: train.py, right after the model is loaded (before data, trainer and resume);
    - ``save-begin-<step>``: the start of checkpoint-<step>'s save, before anything of it is written;
    - ``save-paused-<step>``: only with ``MI_TUNE_TEST_PAUSE_IN_SAVE=<step>``: the save stops half-written
      (the folder holds the weights but not the optimizer, trainer state or completion marker) for up to
      60 s, so a kill is sure to land inside the save window;
    - ``save-done-<step>``: after checkpoint-<step>'s completion marker is written and old checkpoints rotated.
    """
    folder = os.environ.get(MARKERS_ENV)
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "a") as f:
        f.write(f"{os.getpid()}\n")
        f.flush()


def _pause_in_save(step: int) -> None:
    """Test hook (see write_marker): block inside checkpoint-<step>'s save when MI_TUNE_TEST_PAUSE_IN_SAVE=<step>."""
    if not os.environ.get(MARKERS_ENV) or os.environ.get(PAUSE_IN_SAVE_ENV, "").strip() != str(step):
        return
    write_marker(f"save-paused-{step}")
    deadline = time.monotonic() + PAUSE_IN_SAVE_MAX_S
    while time.monotonic() < deadline:  # the test kills the process here; without a kill the save goes on
        time.sleep(0.05)


class NonFiniteLossError(UserError):
    pass


class CheckpointSaveError(UserError):
    pass


def batch_accuracy(acc: torch.Tensor) -> torch.Tensor:
    """Mean of per-sentence accuracies (B,) over the sentences with a bag (NaN = empty bag); 0 if none has one.
    A 0-d tensor on acc's device, computed without a host sync."""
    valid = ~torch.isnan(acc)  # (B,)
    return torch.where(valid, acc, 0.0).sum() / valid.sum().clamp(min=1)


def step_mean(values: list) -> float:
    """Mean of the values recorded once per step (0-d tensors, or floats): one copy to the host for all of them."""
    if isinstance(values[0], torch.Tensor):
        values = torch.stack(values).tolist()
    return sum(values) / len(values)


def resolve_objective(recipe, loaded) -> tuple[int, str]:
    """The recipe's ``objective.layer`` (normalised, checked against the model) and pooling (``auto``: the model kind's
    default); an LM weight on an encoder is refused."""
    obj = recipe.objective
    layer = check_layer(obj.layer, loaded.num_hidden_states, recipe.model.source)
    if obj.lm_weight > 0 and loaded.kind != "decoder":
        raise UserError(f"objective.lm_weight: got {obj.lm_weight} for an encoder ({recipe.model.source}); allowed: 0 "
                        f"for encoders (no next-token head). Fix: set objective.lm_weight: 0.")
    return layer, default_pooling(loaded.kind) if obj.pooling == "auto" else obj.pooling


class RecoverabilityModel(nn.Module):
    """PEFT model + linear head; forward computes the recoverability (and optional LM) loss."""

    def __init__(self, peft_model, head: RecoverabilityHead, exclude_ids: list[int], recoverability_weight: float = 1.0,
                 lm_weight: float = 0.0, positive_weight: float = 1.0):
        super().__init__()
        self.peft = peft_model
        self.head = head
        self.register_buffer("exclude_ids", torch.tensor(sorted(set(exclude_ids)), dtype=torch.long), persistent=False)
        self.recoverability_weight = recoverability_weight
        self.lm_weight = lm_weight
        self.positive_weight = positive_weight

    @classmethod
    def from_recipe(cls, recipe, loaded, peft_model, train_seqs, layer: int, pooling: str) -> "RecoverabilityModel":
        """The recipe's objective on an adapted model: the head reads ``layer`` with ``pooling`` (``resolve_objective``),
        over the full vocabulary or the training text's tokens (``head.columns``); special and pad tokens are never targets."""
        obj = recipe.objective
        tok = loaded.tokenizer
        exclude = set(tok.all_special_ids) | {tok.pad_token_id}
        active = corpus_token_ids(train_seqs, exclude) if recipe.head.columns == "corpus" else None
        head = RecoverabilityHead.from_model(loaded, layer, pooling, recipe.head.init, active_ids=active)
        model = cls(peft_model, head, list(exclude), obj.recoverability_weight, obj.lm_weight, obj.positive_weight)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        cols = (f"{len(active):,} tokens of the training text + 1 shared column, of |V| = {head.config.vocab_size:,}"
                if active is not None else f"|V| = {head.config.vocab_size:,} columns")
        log(f"objective: layer {layer} of {loaded.num_hidden_states - 1} ({pooling} pooling), head on {head.config.hidden_size} dims "
            f"x {cols}; {n_train:,} trainable parameters; adapters on blocks 0..{loaded.num_blocks - 2}, final block "
            f"{loaded.num_blocks - 1} frozen")
        return model

    @property
    def exclude(self) -> set[int]:
        return set(self.exclude_ids.tolist())

    def run_info(self, loaded) -> dict:
        """What the run resolved (written to run_info.json and logged as ``resolved.*`` params)."""
        return {"layer": self.head.config.layer, "pooling": self.head.config.pooling, "kind": loaded.kind,
                "num_blocks": loaded.num_blocks, "dtype": str(loaded.dtype).replace("torch.", ""),
                "trainable_parameters": sum(p.numel() for p in self.parameters() if p.requires_grad),
                "head_columns": self.head.decoder.out_features}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_) -> dict:
        cfg = self.head.config
        if self.lm_weight > 0:
            # The control needs next-token logits: run the full causal LM once.
            out = self.peft(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
            hs, lm = out.hidden_states, next_token_loss(out.logits, input_ids, attention_mask)
        else:
            hs, lm = hidden_states(self.peft, input_ids, attention_mask), None  # backbone only: no (B, T, V) logits
        emb = pool(hs[cfg.layer], attention_mask, cfg.pooling)  # (B, D)
        if self.recoverability_weight == 0:
            emb = emb.detach()  # LM-only control: the head still learns (for reporting) but sends no gradient back
        with torch.autocast(emb.device.type, enabled=False):  # head and loss in float32 on purpose, also under bf16 autocast
            logits = self.head(emb.float())  # (B, V) float32
            targets = bag_of_tokens(input_ids, attention_mask, cfg.vocab_size, self.exclude_ids)  # (B, V)
            rec = recoverability_loss(logits, targets, self.positive_weight)
        loss = (self.recoverability_weight or 1.0) * rec
        if lm is not None:
            loss = loss + self.lm_weight * lm
        return {"loss": loss, "rec_loss": rec.detach(), "lm_loss": None if lm is None else lm.detach(),
                "logits": logits.detach(), "targets": targets}


class RecoverabilityTrainer(Trainer):
    def __init__(self, *args, head_learning_rate: float = 1e-3, head_weight_decay: float = 0.0,
                 on_nonfinite_loss: str = "stop", **kwargs):
        super().__init__(*args, **kwargs)
        self.head_learning_rate = head_learning_rate
        self.head_weight_decay = head_weight_decay
        self.on_nonfinite_loss = on_nonfinite_loss
        self.skipped_nonfinite = 0
        self._checkpoint_step: int | None = None  # set while _save_checkpoint runs (test hook: the pause in the save)
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    # ---- objective and metrics ----
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        mode = "train" if model.training else "eval"
        if mode == "train" and not torch.isfinite(out["loss"]):
            out["loss"] = self._nonfinite(out["loss"], model)
        with torch.no_grad():
            values = {"recoverability_acc": batch_accuracy(recoverability_accuracy(out["logits"], out["targets"])),
                      "rec_loss": out["rec_loss"]}
            if out["lm_loss"] is not None:
                values["lm_loss"] = out["lm_loss"]
            for name, value in values.items():  # kept on the device: read once per logging interval (log), not per step
                self._metrics[mode][name].append(self.accelerator.gather_for_metrics(value.reshape(1)).float().mean())
        return (out["loss"], out) if return_outputs else out["loss"]

    def _nonfinite(self, loss: torch.Tensor, model) -> torch.Tensor:
        """A NaN/Inf training loss: stop with the step and the last good checkpoint, or skip the batch."""
        step = self.state.global_step + 1
        if self.on_nonfinite_loss == "skip":
            self.skipped_nonfinite += 1
            self._metrics["train"]["skipped_nonfinite_batches"].append(float(self.skipped_nonfinite))
            # a zero loss still attached to every trainable parameter: the step applies no update from this batch
            return sum((p * 0.0).sum() for p in model.parameters() if p.requires_grad)
        last = newest_complete_checkpoint(self.args.output_dir)
        raise NonFiniteLossError(
            f"loss is {loss.item()} at training step {step}. The last good checkpoint is {last or 'none (no checkpoint saved yet)'}. "
            f"Allowed: finite losses. Fix: lower training.learning_rate or head.learning_rate, check the data, or set "
            f"objective.on_nonfinite_loss: skip to skip such batches (they are counted); re-running the same command resumes "
            f"from the last good checkpoint."
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Our batches carry no labels: the bag is built from input_ids inside the loss.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict, start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        vocab = self.model.head.config.vocab_size
        metrics = {k: step_mean(v) for k, v in self._metrics[mode].items() if v}
        if "recoverability_acc" in metrics:
            # the paper's estimate (uniform tokens, one guess): not a bound, named so; the check reports the bounds
            metrics["mi_fano_uniform_bits"] = fano_uniform_estimate_bits(metrics["recoverability_acc"], vocab)
        prefix = "eval_" if mode == "eval" else ""
        logs.update({prefix + k: v for k, v in metrics.items()})  # same dict evaluate() returns: best-model picks it up
        self._metrics[mode].clear()
        super().log(logs, start_time)

    # ---- data order: length-grouped batches that resume exactly ----
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and self.args.world_size == 1:
            # transformers' LengthGroupedSampler draws from the global RNG at iteration time, so a
            # resumed run sees a different order; ours derives the order from (seed, epoch) alone.
            lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
            return SeededLengthGroupedSampler(lengths, self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                              self.args.data_seed if self.args.data_seed is not None else self.args.seed)
        return super()._get_train_sampler(train_dataset)

    # ---- optimizer: the head gets its own learning rate ----
    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        body = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad and not n.startswith("head.")]
        groups = [
            {"params": [p for n, p in body if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in body if n not in decay], "weight_decay": 0.0},
            {"params": [p for n, p in opt_model.named_parameters() if n.startswith("head.") and p.requires_grad],
             "lr": self.head_learning_rate, "weight_decay": self.head_weight_decay},
        ]
        groups = [g for g in groups if g["params"]]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # ---- files: adapter (standard PEFT) + head, never the frozen base ----
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        model.peft.save_pretrained(output_dir, safe_serialization=True)
        model.head.save(Path(output_dir) / HEAD_DIR)
        if getattr(self, "_checkpoint_step", None) is not None:
            _pause_in_save(self._checkpoint_step)  # test hook; inert unless MI_TUNE_TEST_PAUSE_IN_SAVE names this step

    def _load_weights(self, folder: str) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        model = self.accelerator.unwrap_model(self.model)
        adapter = Path(folder) / "adapter_model.safetensors"
        result = set_peft_model_state_dict(model.peft, load_file(str(adapter), device=str(model.head.decoder.weight.device)))
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"checkpoint {folder} has unexpected adapter keys: {result.unexpected_keys[:3]}")
        head = RecoverabilityHead.from_pretrained(Path(folder) / HEAD_DIR, device=model.head.decoder.weight.device)
        model.head.load_full_weights(head.decoder.weight, head.decoder.bias)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        self._load_weights(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        self._load_weights(self.state.best_model_checkpoint)

    # ---- checkpoints: complete marker written last; rotation only after it ----
    def _save_checkpoint(self, model, trial) -> None:
        step = self.state.global_step
        write_marker(f"save-begin-{step}")  # test hook (no-op unless MI_TUNE_TEST_MARKERS is set)
        limit = self.args.save_total_limit
        self.args.save_total_limit = None
        self._checkpoint_step = step
        try:
            super()._save_checkpoint(model, trial)
        except OSError as exc:
            last = newest_complete_checkpoint(self.args.output_dir)
            raise CheckpointSaveError(
                f"saving checkpoint-{self.state.global_step} failed ({exc.strerror or exc}). The previous complete checkpoint "
                f"{last or '(none)'} is intact; the half-written one will be ignored. Fix: free disk space in "
                f"{self.args.output_dir} (or move output_root), then re-run the same command to resume."
            ) from None
        finally:
            self.args.save_total_limit = limit
            self._checkpoint_step = None
        if not self.args.should_save:
            return
        folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
        atomic_write(folder / COMPLETE_MARKER, f'{{"global_step": {self.state.global_step}}}\n')  # only now does it count
        if limit:
            complete = checkpoints(self.args.output_dir)
            keep = {str(p) for p in complete[-limit:]}
            if self.state.best_model_checkpoint:
                keep.add(str(Path(self.state.best_model_checkpoint)))
            for p in complete:
                if str(p) not in keep:
                    shutil.rmtree(p, ignore_errors=True)
        write_marker(f"save-done-{step}")  # test hook


class SeededLengthGroupedSampler(torch.utils.data.Sampler):
    """Random mega-batches sorted by length (as transformers does), with the order a function of (seed, epoch)."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        from transformers.trainer_pt_utils import get_length_grouped_indices

        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=g))


class TrackingCallback(TrainerCallback):
    """Sends every Trainer log to the tracker (MLflow or no-op), from the main process only."""

    def __init__(self, tracker):
        self.tracker = tracker

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self.tracker.log_metrics({k: v for k, v in logs.items() if k != "total_flos"}, step=state.global_step)
