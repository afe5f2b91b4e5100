"""DDP on CPU: `accelerate launch --multi_gpu --num_processes 2` (on a machine without GPUs this starts 2 torchrun
processes; use_cpu makes them use gloo) on the tiny recipe; ranks agree, one adapter written."""

import json
import os
import shutil

import pytest

from .conftest import ROOT, TINY, TINY_CORPUS


def test_two_cpu_processes_agree_and_write_one_adapter(tmp_path):
    import subprocess
    import sys

    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    assert accelerate
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(ROOT / "tests" / "scripts" / "ddp_rank_report.py"), str(tmp_path),
           str(ROOT / "recipes" / "tiny.yaml"), f"output_root={tmp_path / 'adapters'}", f"model.source={TINY}",
           f"data.source={TINY_CORPUS}", "check.train_sentences=60", "check.eval_sentences=20"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["global_step"] == r1["global_step"] == 12
    assert r0["sum"] == pytest.approx(r1["sum"], rel=1e-6) and r0["abs_sum"] == pytest.approx(r1["abs_sum"], rel=1e-6)
    runs = [p for p in (tmp_path / "adapters").iterdir() if p.is_dir()]
    assert [p.name for p in runs] == ["tiny"]
    assert (runs[0] / "adapter_model.safetensors").exists() and (runs[0] / "metrics.json").exists()
    assert proc.stdout.count("recoverability of the embedding") == 1  # the check ran once, on rank 0
