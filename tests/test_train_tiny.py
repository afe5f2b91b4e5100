"""End-to-end mechanics on the tiny random Llama: files, frozen base, adapters off the final block,
parameters that change, overwrite protection, and exact resume after kill -9."""

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mi_tune.train import main as train_main

from .conftest import ROOT, TINY, kill_at_marker, run_cli

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
    check = metrics["heldout_check"]
    setup = {k: check["setup"][k] for k in ("decoder", "train_sentences", "layer", "pooling", "sets")}
    assert setup == {"decoder": "ridge", "train_sentences": 200, "layer": 3, "pooling": "last", "sets": ["heldout"]}
    held = check["heldout"]
    assert held["sentences"] == 50  # check.eval_sentences
    acc = {m: held[m]["recoverability_acc"] for m in ("base", "enhanced")}
    assert held["delta_acc"]["estimate"] == pytest.approx(acc["enhanced"] - acc["base"], abs=1e-6)  # paired: mean of differences


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
    adapter = load_file(str(tiny_run / "adapter_model.safetensors"))
    lora_b = [k for k in adapter if "lora_B" in k]
    assert lora_b and all(adapter[k].abs().sum() > 0 for k in lora_b)  # every lora_B starts at zero: each one trained
    # the run folder holds the state after the last step (= checkpoint-12), and steps 9..12 still changed every
    # trained tensor, adapter and head (the head's warm start is non-zero, so only a change shows it trained)
    ck = tiny_run / "checkpoints"
    last, earlier = (load_file(str(ck / c / "adapter_model.safetensors")) for c in ("checkpoint-12", "checkpoint-8"))
    assert adapter.keys() == last.keys() == earlier.keys()
    assert all(torch.equal(adapter[k], last[k]) for k in adapter)
    assert [k for k in adapter if torch.equal(adapter[k], earlier[k])] == []
    head = load_file(str(tiny_run / "head" / "model.safetensors"))["decoder.weight"]
    assert torch.equal(head, load_file(str(ck / "checkpoint-12" / "head" / "model.safetensors"))["decoder.weight"])
    assert not torch.equal(head, load_file(str(ck / "checkpoint-8" / "head" / "model.safetensors"))["decoder.weight"])
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
    base = [json.loads((r / "metrics.json").read_text())["heldout_check"]["heldout"]["base"] for r in (first, second)]
    # the same frozen base features, whether computed or read back: the same scores (the bootstrap intervals
    # around them are drawn with the run's seed, which differs)
    point = [{k: v["estimate"] if isinstance(v, dict) else v for k, v in b.items()} for b in base]
    assert point[0] == point[1] and "recoverability_acc" in point[0]


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
    return sorted(int(p.name.split("-")[1]) for p in ckpts.glob("checkpoint-*") if (p / "checkpoint_complete.json").exists())


def _incomplete(ckpts: Path) -> list[str]:
    if not ckpts.exists():
        return []
    return sorted(p.name for p in ckpts.glob("checkpoint-*") if p.is_dir() and not (p / "checkpoint_complete.json").exists())


# Kill points, in order: (name, pause in the next checkpoint save?, the marker the run writes at that point
# (mi_tune.trainer.write_marker; {step} = that next save), what must hold once the run is dead). Each launch
# gets its own marker folder.
def _kill_points(run: Path):
    ckpts = run / "checkpoints"
    half_saved = {}

    def startup(markers, log, step):  # after the model loaded, before the first save of the run: nothing to resume from yet
        assert _complete_steps(ckpts) == [] and not list(markers.glob("save-begin-*")), sorted(os.listdir(markers))

    def after_10(markers, log, step):
        assert 10 in _complete_steps(ckpts) and "resuming from" not in log  # the first run started from scratch

    def in_save(markers, log, step):  # checkpoint-<step> half-written: weights in, no optimizer/state, no completion marker
        half = ckpts / f"checkpoint-{step}"
        assert _incomplete(ckpts) == [half.name] and max(_complete_steps(ckpts)) == step - 5
        assert (half / "adapter_model.safetensors").exists() and (markers / f"save-begin-{step}").exists()
        assert not (half / "trainer_state.json").exists() and not (markers / f"save-done-{step}").exists()
        assert log.split("resuming from", 1)[1].splitlines()[0].endswith(f"checkpoint-{step - 5}")
        half_saved["step"] = step

    def second_epoch(markers, log, step):  # the half save was thrown away, the run went on from the one before it
        line = next(x for x in log.splitlines() if "ignoring incomplete checkpoint" in x)
        assert f"checkpoint-{half_saved['step']} " in line
        assert log.split("resuming from", 1)[1].splitlines()[0].endswith(f"checkpoint-{half_saved['step'] - 5}")
        state = json.loads((ckpts / "checkpoint-35" / "trainer_state.json").read_text())
        assert 1.0 < state["epoch"] < 2.0, state["epoch"]

    def at_end(markers, log, step):
        assert max(_complete_steps(ckpts)) == 60 and not (run / "metrics.json").exists()

    return [("during start-up", False, "startup", startup),
            ("after checkpoint-10", False, "save-done-10", after_10),
            ("during a checkpoint save", True, "save-paused-{step}", in_save),
            ("second epoch", False, "save-done-35", second_epoch),
            ("after the last checkpoint", False, "save-done-60", at_end)]


def test_kill_9_at_five_points_then_rerun_resumes_to_the_same_result(tmp_path):
    args = [str(ROOT / "recipes" / "tiny.yaml"), "training.max_steps=60", "training.save_steps=5", "training.eval_steps=30",
            "check.enabled=false", "training.save_total_limit=3"]
    ref = run_cli("mi_tune.train", *args, f"output_root={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr[-2000:]
    run = tmp_path / "cut" / "tiny"
    cmd = [sys.executable, "-m", "mi_tune.train", *args, f"output_root={tmp_path / 'cut'}"]
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("MI_TUNE_TEST_")}
    points = _kill_points(run)
    killed = []
    for i, (name, pause, marker, check) in enumerate(points):
        markers, log_path = tmp_path / f"markers-{i}", tmp_path / f"launch-{i}.log"
        step = max(_complete_steps(run / "checkpoints"), default=0) + 5  # the next save of this launch (save_steps=5)
        marker = marker.format(step=step)
        env = {**base_env, "MI_TUNE_TEST_MARKERS": str(markers)}
        if pause:  # that save stops half-written until killed: the kill lands inside the save for sure
            env["MI_TUNE_TEST_PAUSE_IN_SAVE"] = str(step)
        proc = kill_at_marker(cmd, ROOT, env, markers, marker, log_path, f"kill point {name!r}")
        # killed by our SIGKILL (not finished, not failed); the run is dead, so what it left on disk is what resume sees
        assert proc.returncode == -signal.SIGKILL, (name, proc.returncode, log_path.read_text()[-3000:])
        check(markers, log_path.read_text(), step)
        killed.append(name)
    assert killed == [p[0] for p in points]
    again = run_cli("mi_tune.train", *args, f"output_root={tmp_path / 'cut'}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "checkpoint-60" in again.stderr.split("resuming from", 1)[1].splitlines()[0]
    a = load_file(str(tmp_path / "ref" / "tiny" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
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
    from mi_tune.runs import recipe_diff as _recipe_diff

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
