"""bench/train_throughput.py's random-architecture path (what the GPU row runs, at 7B) works end to end: a
MistralConfig-shaped model with random weights and a BPE tokenizer built locally, 4-bit QLoRA for both trainers."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_train_bench_random_mistral_4bit(tmp_path):
    pytest.importorskip("bitsandbytes")
    cmd = [sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--arch", "mistral-tiny", "--quantization", "4bit",
           "--unit", "document", "--seq-len", "128", "--gradient-checkpointing", "--rounds", "1", "--steps", "2",
           "--warmup", "1", "--tmp", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    speeds = re.search(r"tokens/s\s+mi_tune ([\d.]+)\s+trl ([\d.]+)\s+ratio ([\d.]+)x", out)
    assert speeds and float(speeds.group(1)) > 0 and float(speeds.group(2)) > 0, out
    assert "mistral-tiny (4bit)" in out and "documents" in out
    folder = tmp_path / "mistral-tiny-random"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["vocab_size"] == 32000 and config["num_hidden_layers"] == 4
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    assert 1000 < len(tok) <= 32000 and tok.bos_token_id == 1 and tok.eos_token_id == 2
    ids = tok(["The government said on Monday that the new rules would apply from next year."])["input_ids"][0]
    assert 8 < len(ids) < 40  # a trained BPE, not bytes
