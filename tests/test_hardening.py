"""Hardening: bad data, NaN/Inf losses, a full disk during a save, unsafe files, secrets."""

import errno
import json
import os
from pathlib import Path

import pytest
import torch

from mi_tune.config import DataConfig
from mi_tune.data import load_corpus
from mi_tune.errors import UserError
from mi_tune.train import main as train_main

from .conftest import ROOT, run_cli

TINY_RECIPE = str(ROOT / "recipes" / "tiny.yaml")


# ---- bad data ------------------------------------------------------------------------------

def test_empty_lines_and_short_examples_are_skipped_and_counted(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("one two three four five six\n\n   \nshort one\nseven eight nine ten eleven twelve\n")
    c = load_corpus(DataConfig(source=str(f), unit="line", min_words=5, eval_fraction=0.5, split_by="unit"))
    assert len(c.train) + len(c.eval) == 2
    assert c.stats["train_skipped_empty"] == 2 and c.stats["train_skipped_short"] == 1


def test_empty_file_is_a_clear_error(tmp_path):
    f = tmp_path / "empty.jsonl"
    f.write_text("")
    with pytest.raises(UserError, match="non-empty"):
        load_corpus(DataConfig(source=str(f)))


def test_missing_text_column_names_the_columns(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"sentence": "a b c d e f"}\n' * 4)
    with pytest.raises(UserError) as exc:
        load_corpus(DataConfig(source=str(f), text_field="text"))
    assert "data.text_field" in str(exc.value) and "sentence" in str(exc.value)


def test_invalid_utf8(tmp_path):
    single = tmp_path / "bad.txt"
    single.write_bytes(b"valid words here and more words\n\xff\xfe broken \xc3\x28 bytes\n")
    with pytest.raises(UserError, match="UTF-8"):
        load_corpus(DataConfig(source=str(single), unit="line", min_words=1))
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha beta gamma delta epsilon zeta\n\neta theta iota kappa lambda mu\n")
    (folder / "b.txt").write_bytes(b"\xff\xfe not utf8 at all \xc3\x28\n")
    c = load_corpus(DataConfig(source=str(folder), unit="paragraph", min_words=3, eval_fraction=0.5, split_by="unit"))
    assert c.stats["skipped_invalid_utf8_files"] == 1 and len(c.train) + len(c.eval) == 2


def test_everything_filtered_out(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("a b\nc d\n")
    with pytest.raises(UserError, match="no training text left"):
        load_corpus(DataConfig(source=str(f), unit="line", min_words=5, split_by="unit"))


def test_long_sentences_are_truncated_and_counted(tmp_path):
    from transformers import AutoTokenizer

    from mi_tune.data import tokenize_corpus

    tok = AutoTokenizer.from_pretrained(ROOT / "tests" / "assets" / "tiny-llama")
    stats = {}
    ds = tokenize_corpus(tok, ["word " * 100, "short text"], max_length=16, stats=stats, prefix="train")
    assert stats["train_truncated"] == 1 and max(len(s) for s in ds.seqs) == 16


def test_cli_bad_data_exit_2(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"body": "a b c d e f g"}\n' * 10)
    proc = run_cli("mi_tune.train", TINY_RECIPE, f"data.source={f}", f"output_root={tmp_path}")
    assert proc.returncode == 2 and "data.text_field" in proc.stderr and "Traceback" not in proc.stderr


# ---- numerics -----------------------------------------------------------------------------

def _poison(monkeypatch, at_calls):
    from mi_tune import trainer as tr

    real = tr.RecoverabilityModel.forward
    calls = {"n": 0}

    def forward(self, *a, **k):
        out = real(self, *a, **k)
        if self.training:
            calls["n"] += 1
            if calls["n"] in at_calls:
                out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(tr.RecoverabilityModel, "forward", forward)


def test_nan_loss_stops_naming_step_and_checkpoint(tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, {6})
    with pytest.raises(SystemExit) as exc:
        train_main([TINY_RECIPE, f"output_root={tmp_path}", "check.enabled=false"])
    assert exc.value.code == 2
    msg = capsys.readouterr().err
    assert "training step 6" in msg and "checkpoint-4" in msg and "on_nonfinite_loss: skip" in msg


def test_nan_loss_skip_counts_and_finishes(tmp_path, monkeypatch):
    _poison(monkeypatch, {3, 7})
    train_main([TINY_RECIPE, f"output_root={tmp_path}", "check.enabled=false", "objective.on_nonfinite_loss=skip"])
    m = json.loads((tmp_path / "tiny" / "metrics.json").read_text())
    assert m["train"]["skipped_nonfinite_batches"] == 2
    from safetensors.torch import load_file

    w = load_file(str(tmp_path / "tiny" / "adapter_model.safetensors"))
    assert all(torch.isfinite(v).all() for v in w.values())


# ---- a full disk during a save -------------------------------------------------------------

def test_disk_full_during_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    import safetensors.torch as st

    real = st.save_file
    calls = {"n": 0}

    def save_file(tensors, filename, *a, **k):
        if "checkpoint-8" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(st, "save_file", save_file)
    with pytest.raises(SystemExit) as exc:
        train_main([TINY_RECIPE, f"output_root={tmp_path}", "check.enabled=false"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "No space left" in err and "checkpoint-4" in err
    ck = tmp_path / "tiny" / "checkpoints"
    assert (ck / "checkpoint-4" / "checkpoint_complete.json").exists()
    assert not (ck / "checkpoint-8" / "checkpoint_complete.json").exists()
    monkeypatch.setattr(st, "save_file", real)
    # re-running resumes from checkpoint-4 and finishes
    train_main([TINY_RECIPE, f"output_root={tmp_path}", "check.enabled=false"])
    assert (tmp_path / "tiny" / "metrics.json").exists()


# ---- unsafe files --------------------------------------------------------------------------

def test_head_loading_is_safetensors_only(tmp_path):
    from mi_tune.head import RecoverabilityHead

    (tmp_path / "config.json").write_text("{}")
    torch.save({"decoder.weight": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="safetensors"):
        RecoverabilityHead.from_pretrained(tmp_path)


def test_pickle_adapter_refused_without_flag(tmp_path):
    from mi_tune.loading import check_safe_files

    torch.save({}, tmp_path / "adapter_model.bin")
    with pytest.raises(UserError, match="pickle"):
        check_safe_files(tmp_path)
    check_safe_files(tmp_path, allow_pickle=True)  # explicit opt-in


# ---- secrets -------------------------------------------------------------------------------

SECRETS = {"HF_TOKEN": "hf_SECRETxyz0123456789", "MLFLOW_TRACKING_PASSWORD": "pw-SECRET-4242",
           "MLFLOW_TRACKING_TOKEN": "tok-SECRET-9999"}


def test_secrets_never_written(tmp_path):
    env = dict(SECRETS)
    proc = run_cli("mi_tune.train", TINY_RECIPE, f"output_root={tmp_path / 'adapters'}", "tracking.enabled=true",
                   f"model.source={ROOT / 'tests' / 'assets' / 'tiny-llama'}", f"data.source={ROOT / 'tests' / 'assets' / 'tiny_corpus.jsonl'}",
                   f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlruns.db'}", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    blobs = [proc.stdout.encode(), proc.stderr.encode()]
    for p in tmp_path.rglob("*"):
        if p.is_file():
            blobs.append(p.read_bytes())
    scanned = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert {"mlruns.db", "adapters/tiny/recipe.yaml", "adapters/tiny/metrics.json", "adapters/tiny/run_info.json",
            "adapters/tiny/adapter_model.safetensors", "adapters/tiny/checkpoints/checkpoint-12/trainer_state.json"} <= scanned
    for value in SECRETS.values():
        assert not any(value.encode() in b for b in blobs), f"secret {value[:6]}... leaked"
    # the run was really tracked: read it back
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and runs[0].data.params["model.source"].endswith("tiny-llama")
