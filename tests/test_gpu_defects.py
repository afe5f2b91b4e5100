"""Defects of the GPU path that a CPU can show (issue 16): bf16 autocast on a GPU, the 4-bit model on the local
rank's GPU, the `activation_checkpointing` name, the head and loss in float32 under autocast, and metrics kept on
the device until log time."""

import warnings

import pytest
import torch
from transformers import TrainingArguments  # before any test fakes CUDA: its import probes the GPU (bitsandbytes)

from .conftest import ROOT, TINY


def _recipe(*overrides):
    from mi_tune.config import load_recipe

    return load_recipe(ROOT / "recipes" / "tiny.yaml", list(overrides))


def _tiny(**lora):
    from mi_tune.config import LoraSettings, ModelConfig
    from mi_tune.modeling import add_adapters, load_model

    loaded = load_model(ModelConfig(source=str(TINY)))
    return loaded, lambda **kw: add_adapters(loaded, LoraSettings(r=4, alpha=8, dropout=0.0, **lora), **kw)


def _batch(tok, texts=("the cat sat on the mat", "a dog ran far away today", "birds sing")):
    from mi_tune.embedding import pad_batch

    return pad_batch([tok(t)["input_ids"] for t in texts], tok.pad_token_id)


# ---- 1: bf16 autocast on a GPU with bf16 weights ----

def test_training_arguments_turn_bf16_on_for_bf16_weights_on_a_gpu(monkeypatch, tmp_path):
    import transformers

    from mi_tune.arguments import training_arguments

    recipe, seen = _recipe(), {}
    monkeypatch.setattr(transformers, "TrainingArguments", lambda **kw: seen.update(kw) or kw)  # no GPU to build real ones on
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    training_arguments(recipe, torch.bfloat16, tmp_path)
    assert seen["bf16"] is True and seen["use_cpu"] is False and seen["fp16"] is False


def test_training_values_bf16_only_for_bf16_weights_on_a_gpu():
    from mi_tune.arguments import training_values

    recipe = _recipe()
    assert training_values(recipe, torch.bfloat16, cuda=True)["bf16"] is True
    assert training_values(recipe, torch.bfloat16, cuda=False)["bf16"] is False  # CPU: no autocast
    assert training_values(recipe, torch.float32, cuda=True)["bf16"] is False
    assert training_values(_recipe("training.bf16=false"), torch.bfloat16, cuda=True)["bf16"] is False  # the recipe wins


# ---- 2: the 4-bit model of rank r on GPU r ----

@pytest.mark.parametrize("rank", [0, 1, 3])
def test_quantized_model_of_rank_r_is_placed_on_gpu_r(monkeypatch, rank):
    from transformers import AutoModelForCausalLM

    from mi_tune import modeling
    from mi_tune.config import ModelConfig

    model = AutoModelForCausalLM.from_pretrained(TINY)  # loaded before CUDA is faked
    seen = {}

    def from_pretrained(path, **kwargs):
        seen.update(kwargs)
        return model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setattr(modeling, "quantization_config", lambda cfg, dtype: "4-bit config")  # no bitsandbytes GPU kernels here
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    loaded = modeling.load_model(ModelConfig(source=str(TINY), dtype="float32", quantization="4bit"))
    assert seen["quantization_config"] == "4-bit config"
    assert seen["device_map"] == {"": rank}
    assert loaded.device == torch.device("cuda", rank)  # base features and the head go there too


def test_local_device_more_ranks_than_gpus_is_a_user_error(monkeypatch):
    from mi_tune.errors import UserError
    from mi_tune.modeling import local_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(UserError, match="LOCAL_RANK"):
        local_device()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one visible GPU per process (CUDA_VISIBLE_DEVICES per rank)
    assert local_device() == torch.device("cuda", 0)
    monkeypatch.delenv("LOCAL_RANK")
    assert local_device() == torch.device("cuda", 0)


# ---- 3: activation_checkpointing, TrainingArguments' newer name ----

@pytest.mark.parametrize("name", ["activation_checkpointing", "gradient_checkpointing"])
def test_checkpointing_names_are_taken_from_the_trainer_and_given_to_the_base_model(name):
    from mi_tune.arguments import checkpointing, training_values

    recipe = _recipe(f"training.{name}=true")
    values = training_values(recipe, torch.float32, cuda=False)
    assert not {k for k in values if "checkpointing" in k}  # the Trainer must not call it on RecoverabilityModel
    assert checkpointing(recipe.training) is True
    assert checkpointing(_recipe().training) is False
    assert checkpointing({"gradient_checkpointing": True, "activation_checkpointing": False}) is False  # the new name wins


def test_add_adapters_checkpointing_uses_the_current_transformers_call():
    loaded, add = _tiny()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = add(gradient_checkpointing=True)
    assert peft_model.get_base_model().is_activation_checkpointing
    assert not [w for w in caught if "`gradient_checkpointing_enable` is deprecated" in str(w.message)]  # (peft's own calls aside)


def test_tiny_recipe_trains_with_activation_checkpointing(tmp_path):
    from mi_tune.train import main as train_main

    trainer = train_main([str(ROOT / "recipes" / "tiny.yaml"), f"output_root={tmp_path}", "run_name=ac", "training.max_steps=2",
                          "training.activation_checkpointing=true", "training.eval_strategy=no", "training.save_strategy=no",
                          "check.enabled=false", "head.init=prior"])
    assert trainer.state.global_step == 2
    assert trainer.model.peft.get_base_model().is_activation_checkpointing
    assert not trainer.args.activation_checkpointing  # applied to the base model, not by the Trainer


# ---- 4: head and loss in float32 under autocast ----

def test_head_is_float32_under_bf16_autocast():
    from mi_tune.head import HeadConfig, RecoverabilityHead

    cfg = HeadConfig("x", 1, "last", 64, 500, 3, init="prior")
    g = torch.Generator().manual_seed(0)
    for head in (RecoverabilityHead(cfg), RecoverabilityHead(cfg, active_ids=range(0, 500, 3))):
        head.load_full_weights(torch.randn(500, 64, generator=g), torch.randn(500, generator=g) - 10)
        emb = torch.randn(4, 64, generator=g).to(torch.bfloat16)  # what a bf16 backbone hands over
        ref = head(emb)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = head(emb)
        assert ref.dtype == out.dtype == torch.float32
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)


def test_recoverability_model_logits_and_loss_float32_under_bf16_autocast():
    from mi_tune.head import RecoverabilityHead
    from mi_tune.trainer import RecoverabilityModel

    loaded, add = _tiny()
    peft_model = add()
    head = RecoverabilityHead.from_model(loaded, 3, "last")
    tok = loaded.tokenizer
    model = RecoverabilityModel(peft_model, head, list(set(tok.all_special_ids) | {tok.pad_token_id}))
    ids, mask = _batch(tok)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, attention_mask=mask)
    assert out["logits"].dtype == out["loss"].dtype == out["rec_loss"].dtype == torch.float32


# ---- 6: no per-step host syncs in metrics; the head's gradient scale lives on the head ----

def test_trainer_metrics_stay_tensors_until_log_and_log_their_mean(tmp_path):
    from mi_tune.head import RecoverabilityHead
    from mi_tune.metrics import recoverability_accuracy
    from mi_tune.trainer import RecoverabilityModel, RecoverabilityTrainer

    loaded, add = _tiny()
    head = RecoverabilityHead.from_model(loaded, 3, "last")
    tok = loaded.tokenizer
    model = RecoverabilityModel(add(), head, list(set(tok.all_special_ids) | {tok.pad_token_id}), lm_weight=0.5)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none", remove_unused_columns=False, label_names=[])
    trainer = RecoverabilityTrainer(model=model, args=args)
    model.train()
    batches = [_batch(tok), _batch(tok, ("one two three four", "five six")), _batch(tok, ("seven eight nine",))]
    steps = []
    with torch.no_grad():
        for ids, mask in batches:
            trainer.compute_loss(model, {"input_ids": ids, "attention_mask": mask})
            out = model(input_ids=ids, attention_mask=mask)  # dropout 0: the same values compute_loss saw
            acc = recoverability_accuracy(out["logits"], out["targets"])
            steps.append({"rec_loss": out["rec_loss"].item(), "lm_loss": out["lm_loss"].item(),
                          "recoverability_acc": acc[~torch.isnan(acc)].mean().item()})
    recorded = trainer._metrics["train"]
    assert set(recorded) == {"rec_loss", "lm_loss", "recoverability_acc"}
    assert all(isinstance(v, torch.Tensor) for vs in recorded.values() for v in vs)  # no .item() per step
    logs = {"loss": 1.0}
    trainer.log(logs)
    for name in ("rec_loss", "lm_loss", "recoverability_acc"):
        assert logs[name] == pytest.approx(sum(s[name] for s in steps) / len(steps), rel=1e-6)
        assert isinstance(logs[name], float)
    assert not trainer._metrics["train"]


def test_accuracy_mean_skips_empty_bags_and_is_zero_when_all_are():
    from mi_tune.trainer import batch_accuracy

    acc = torch.tensor([0.5, float("nan"), 0.25, 1.0])
    assert batch_accuracy(acc).item() == acc[~torch.isnan(acc)].mean().item()
    assert batch_accuracy(torch.full((3,), float("nan"))).item() == 0.0


def test_compact_head_gradient_scale_is_a_buffer_that_moves_with_the_head():
    from mi_tune.head import HeadConfig, RecoverabilityHead

    head = RecoverabilityHead(HeadConfig("x", 1, "last", 8, 100, 3), active_ids=[1, 5, 9])
    buffers = dict(head.named_buffers())
    assert "grad_scale" in buffers and "grad_scale" not in head.state_dict()  # no copy per backward; not saved
    assert buffers["grad_scale"][-1].item() == pytest.approx(1 / 97 ** 0.5) and (buffers["grad_scale"][:-1] == 1).all()
    head = head.double()
    head(torch.randn(2, 8, dtype=torch.float64)).sum().backward()
    assert head.grad_scale.dtype == torch.float64
    assert head.decoder.weight.grad[-1].abs().sum() > 0
    assert torch.allclose(head.decoder.bias.grad[-1], torch.tensor(2 * 97 / 97 ** 0.5, dtype=torch.float64))


# ---- 5: decoders fit on the features' device ----

def _features_and_bags(device: str):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2, 40, 8, generator=g)  # (L, N, D)
    Y = (torch.rand(40, 30, generator=g) < 0.2).float()  # (N, V) bags stay where the tokenizer made them: the CPU
    return X.to(device), Y


def test_fit_bce_runs_on_the_features_device(monkeypatch):
    """Features on a device (here "meta", which every CPU build has) -> every tensor of the fit is there; before the
    fix the weights were always made on the CPU."""
    from mi_tune import decoders

    X, Y = _features_and_bags("meta")
    seen = []
    real_loss = decoders.recoverability_loss

    def loss(logits, targets, *a):
        seen.append((logits.device.type, targets.device.type))
        return real_loss(logits, targets, *a)

    monkeypatch.setattr(decoders, "recoverability_loss", loss)
    dec = decoders.fit_bce(X, Y, epochs=2, batch_size=16)
    assert seen and set(seen) == {("meta", "meta")}
    assert {t.device.type for t in (dec.mean, dec.std, dec.W, dec.b, dec.active)} == {"meta"}  # handed back on the features' device


def test_fit_ridge_runs_on_the_features_device(monkeypatch):
    from mi_tune import decoders

    X, Y = _features_and_bags("meta")
    seen = []
    real_mm, real_eigh = torch.sparse.mm, torch.linalg.eigh

    def sparse_mm(a, b):  # no meta kernel for sparse products: record, and answer with the right shape
        seen.append(("sparse.mm", a.device.type, b.device.type))
        return torch.empty(a.shape[0], b.shape[1], device="meta") if b.is_meta else real_mm(a, b)

    def eigh(A):
        seen.append(("eigh", A.device.type))
        return real_eigh(A)

    monkeypatch.setattr(torch.sparse, "mm", sparse_mm)
    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    dec = decoders.fit_ridge(X, Y, 0.5)
    assert set(seen) == {("sparse.mm", "meta", "meta"), ("eigh", "meta")}
    assert {t.device.type for t in (dec.mean, dec.std, dec.W, dec.b, dec.lam, dec.active)} == {"meta"}


@pytest.mark.parametrize("fit", ["ridge", "bce"])
def test_decoders_fit_on_a_named_device_and_come_back_on_the_features_device(fit):
    """device= names where to fit; numpy features (what the probe embeds) come back on the CPU, unchanged by the detour."""
    from mi_tune.decoders import fit_bce, fit_ridge

    X, Y = _features_and_bags("cpu")
    run = (lambda x, **kw: fit_ridge(x, Y, 0.5, **kw)) if fit == "ridge" else (lambda x, **kw: fit_bce(x, Y, epochs=2, batch_size=16, **kw))
    ref, named = run(X.numpy()), run(X.numpy(), device="cpu")
    for name in ("mean", "std", "W", "b", "active"):
        assert getattr(named, name).device.type == "cpu"
        assert torch.equal(getattr(named, name), getattr(ref, name))
