"""End-to-end mechanics on the tiny random Llama: files, frozen base, adapters off the final block,
parameters that change, overwrite protection, and exact resume after kill -9."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mi_tune.train import main as train_main

from .conftest import ROOT, TINY, run_cli

RUN_FILES = {"adapter_config.json", "adapter_model.safetensors", "head/config.json", "head/model.safetensors",
             "recipe.yaml", "run_info.json", "metrics.json", "README.md"}


def _train(tmp_path, *overrides, name="tiny"):
    train_main([str(ROOT / "recipes" / "tiny.yaml"), f"output_root={tmp_path}", f"run_name={name}", *overrides])
    return tmp_path / name


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("runs"))


def test_run_folder_file_set(tiny_run):
    files = {str(p.relative_to(tiny_run)) for p in tiny_run.rglob("*") if p.is_file() and "checkpoints" not in p.parts}
    assert files == RUN_FILES
    ckpts = sorted(p.name for p in (tiny_run / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-12", "checkpoint-8"]  # save_total_limit=2 of steps 4, 8, 12
    assert all((tiny_run / "checkpoints" / c / "checkpoint_complete.json").exists() for c in ckpts)
    head_cfg = json.loads((tiny_run / "head" / "config.json").read_text())
    assert head_cfg["layer"] == 3 and head_cfg["pooling"] == "last" and head_cfg["base_model"] == "tests/assets/tiny-llama"
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert {"train", "eval", "heldout_check"} <= set(metrics)
    assert 0.0 <= metrics["heldout_check"]["enhanced"]["recoverability_acc"] <= 1.0


def test_plain_peft_loads_adapter_and_no_final_block_weights(tiny_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(TINY)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = PeftModel.from_pretrained(base, str(tiny_run))
    keys = list(load_file(str(tiny_run / "adapter_model.safetensors")))
    assert keys and all("lora_" in k for k in keys)
    assert not any(".layers.2." in k for k in keys)  # final block (index 2 of 3) has no adapter
    assert any(".layers.0." in k for k in keys) and any(".layers.1." in k for k in keys)
    cfg = json.loads((tiny_run / "adapter_config.json").read_text())
    assert cfg["layers_to_transform"] == [0, 1] and cfg["peft_type"] == "LORA"
    # loading with the adapter leaves the base weights as they were
    merged_base = model.get_base_model()
    for name, p in merged_base.named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            torch.testing.assert_close(p.detach(), before[key])


def test_adapter_and_head_changed_base_fixed(tiny_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(TINY)
    ref = AutoModelForCausalLM.from_pretrained(TINY)
    m = PeftModel.from_pretrained(base, str(tiny_run))
    lora_b = [v for k, v in load_file(str(tiny_run / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert any(v.abs().sum() > 0 for v in lora_b)  # lora_B starts at zero: non-zero means it trained
    head = load_file(str(tiny_run / "head" / "model.safetensors"))
    assert head["decoder.weight"].abs().sum() > 0  # the head starts at W = 0
    ids = torch.tensor([[1, 50, 60, 70]])
    with torch.no_grad():
        out_adapter = m(input_ids=ids).logits
        with m.disable_adapter():
            out_base = m(input_ids=ids).logits
        out_ref = ref(input_ids=ids).logits
    torch.testing.assert_close(out_base, out_ref)  # base untouched
    assert (out_adapter - out_ref).abs().max() > 1e-6  # the adapter does something


def test_second_run_of_a_recipe_reuses_the_base_features(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("MI_TUNE_CACHE", str(tmp_path / "cache"))
    first = _train(tmp_path, "training.max_steps=2", name="a")
    assert "from the feature cache" not in capfd.readouterr().err
    second = _train(tmp_path, "training.max_steps=2", "seed=3", name="b")
    assert "from the feature cache" in capfd.readouterr().err
    base = [json.loads((r / "metrics.json").read_text())["heldout_check"]["base"] for r in (first, second)]
    assert base[0] == base[1]  # the same frozen base features, whether computed or read back


def test_existing_finished_run_is_not_overwritten(tiny_run):
    proc = run_cli("mi_tune.train", str(ROOT / "recipes" / "tiny.yaml"), f"output_root={tiny_run.parent}", f"run_name={tiny_run.name}")
    assert proc.returncode == 2 and "already holds a finished run" in proc.stderr and "Traceback" not in proc.stderr
    assert (tiny_run / "adapter_model.safetensors").exists()


def test_overwrite_moves_old_run_aside(tmp_path):
    run = _train(tmp_path, "training.max_steps=2", "check.enabled=false")
    old = (run / "adapter_model.safetensors").read_bytes()
    _train(tmp_path, "training.max_steps=2", "check.enabled=false", "overwrite=true")
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("tiny.replaced-")]
    assert len(moved) == 1 and (moved[0] / "adapter_model.safetensors").read_bytes() == old


def _complete_steps(ckpts: Path) -> list[int]:
    if not ckpts.exists():
        return []
    return [int(p.name.split("-")[1]) for p in ckpts.glob("checkpoint-*") if (p / "checkpoint_complete.json").exists()]


def _partial_save(ckpts: Path) -> bool:
    return ckpts.exists() and any(not (p / "checkpoint_complete.json").exists() for p in ckpts.glob("checkpoint-*"))


def test_kill_9_at_five_points_then_rerun_resumes_to_the_same_result(tmp_path):
    args = [str(ROOT / "recipes" / "tiny.yaml"), "training.max_steps=60", "training.save_steps=5", "training.eval_steps=30",
            "check.enabled=false", "training.save_total_limit=3"]
    ref = run_cli("mi_tune.train", *args, f"output_root={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr[-2000:]
    run = tmp_path / "cut" / "tiny"
    ckpts = run / "checkpoints"
    # kill points: mid-training; during start-up (before any step); during a checkpoint save (a folder
    # without its completion marker); in the second epoch; at the end (after the last checkpoint)
    points = [
        ("after checkpoint-10", lambda: any(s >= 10 for s in _complete_steps(ckpts))),
        ("during start-up", lambda: (run / "run_info.json").exists() or True),
        ("during a checkpoint save", lambda: _partial_save(ckpts) and max(_complete_steps(ckpts) or [0]) >= 15),
        ("second epoch", lambda: any(s >= 35 for s in _complete_steps(ckpts))),
        ("after the last checkpoint", lambda: any(s >= 60 for s in _complete_steps(ckpts))),
    ]
    cmd = [sys.executable, "-m", "mi_tune.train", *args, f"output_root={tmp_path / 'cut'}"]
    killed = []
    for name, when in points:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if when():
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait()
        if proc.returncode == -signal.SIGKILL:
            killed.append(name)
        assert not (run / "metrics.json").exists() or name == points[-1][0]
    assert len(killed) >= 4, killed  # the save-window kill can be missed if the save is faster than the poll
    again = run_cli("mi_tune.train", *args, f"output_root={tmp_path / 'cut'}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stderr
    a = load_file(str(tmp_path / "ref" / "tiny" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    ha = load_file(str(tmp_path / "ref" / "tiny" / "head" / "model.safetensors"))
    hb = load_file(str(run / "head" / "model.safetensors"))
    torch.testing.assert_close(ha["decoder.weight"], hb["decoder.weight"], rtol=1e-4, atol=1e-5)
    ma = json.loads((tmp_path / "ref" / "tiny" / "metrics.json").read_text())["eval"]
    mb = json.loads((run / "metrics.json").read_text())["eval"]
    assert ma["eval_loss"] == pytest.approx(mb["eval_loss"], rel=1e-4)
    assert ma["eval_recoverability_acc"] == pytest.approx(mb["eval_recoverability_acc"], rel=1e-4)


def test_recipe_saved_before_a_setting_existed_still_resumes(tmp_path):
    """A run folder written before a recipe field was added (here lora.fused_mlp) has no such key in its
    recipe.yaml; resuming it with the same recipe must not count the new field as a change."""
    import yaml

    from mi_tune.config import load_recipe
    from mi_tune.train import _recipe_diff

    recipe = load_recipe(str(ROOT / "recipes" / "tiny.yaml"), [])
    saved = recipe.to_dict()
    del saved["lora"]["fused_mlp"]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(saved))
    assert _recipe_diff(recipe, path) == []
    saved["lora"]["r"] = recipe.lora.r + 1  # a real change is still caught
    saved["lora"]["fused_mlp"] = False  # and so is a saved value that differs from the new one
    path.write_text(yaml.safe_dump(saved))
    assert _recipe_diff(recipe, path) == ["lora.fused_mlp", "lora.r"]
