"""--dry-run prints the adapter plan from config.json alone (no weights)."""

import pytest

from .conftest import ROOT, TINY, run_cli


def test_dry_run_mistral7b_from_local_config(tmp_path):
    from transformers import MistralConfig

    MistralConfig().save_pretrained(tmp_path)  # the Mistral-7B architecture: 32 blocks, hidden 4096
    assert not list(tmp_path.glob("*.safetensors"))
    proc = run_cli("mi_tune.train", str(ROOT / "recipes" / "mistral7b.yaml"), f"model.source={tmp_path}", "--dry-run", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "32 blocks" in out
    assert "blocks with adapters: 31 of 32 (0..30)" in out
    assert "final block 31: no adapters (frozen)" in out
    assert "quantization: 4bit" in out and "bnb_4bit_use_double_quant: true" in out
    modules = [l.strip() for l in out.splitlines() if l.startswith("  model.layers.")]
    assert len(modules) == 31 * 7  # q,k,v,o,gate,up,down in each of blocks 0..30
    assert not any(m.startswith("model.layers.31.") for m in modules)


def test_dry_run_tiny_lists_modules():
    proc = run_cli("mi_tune.train", str(ROOT / "recipes" / "tiny.yaml"), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "blocks with adapters: 2 of 3 (0..1)" in proc.stdout
    assert "model.layers.1.mlp.down_proj" in proc.stdout and "model.layers.2." not in proc.stdout
