"""GGUF models load from a standard folder converted once (mi_tune.gguf_cache). The real SmolLM2 read from that folder
is the model read from the GGUF itself, bit for bit (weights, hidden states, tokenizer ids, config); warm loads never
parse the GGUF; the recorded identity stays the GGUF; a failed conversion leaves nothing that is used."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mi_tune import gguf_cache
from mi_tune.config import LoraSettings, ModelConfig
from mi_tune.sources import ModelLocation

from .conftest import SMOLLM2

TEXTS = [
    "The capital of France is Paris.",
    "  leading spaces, trailing spaces   ",
    "Tabs\tand\nnewlines\n\nand  double  spaces",
    "Ünïcödé, accents: café, naïve, Straße; CJK: 東京は日本の首都です。; emoji: 🙂🚀",
    "def f(x):\n    return x ** 2  # code with symbols {}[]()<>!=",
    "Numbers 3.14159, 1,000,000 and 2024-11-30T19:04:00Z",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",  # special tokens written in the text
    "<|endoftext|><repo_name>mi_tune<file_sep>",
    "a",
    "",
    "supercalifragilisticexpialidocious antidisestablishmentarianism " * 3,
]


@pytest.fixture(scope="module")
def direct():
    """SmolLM2 read from the GGUF file itself (MI_TUNE_GGUF_CACHE=0), as every load did before the cache."""
    from mi_tune.modeling import load_model

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MI_TUNE_GGUF_CACHE", "0")
        return load_model(ModelConfig(source=SMOLLM2))


@pytest.mark.slow
def test_the_converted_smollm2_is_the_gguf_bit_for_bit(smollm2, direct):
    from mi_tune.eval.cache import model_identity
    from mi_tune.modeling import load_config

    cached, gguf = smollm2.model, direct.model
    assert gguf_cache.hf_folder(smollm2.location, weights=True) is not None  # the fixture's model came from the folder
    assert getattr(gguf.config, "quantization_config", None) is not None and not hasattr(cached.config, "quantization_config")
    assert (smollm2.kind, smollm2.num_blocks, smollm2.dtype) == (direct.kind, direct.num_blocks, direct.dtype) == ("decoder", 30, torch.float32)
    a, b = cached.state_dict(), gguf.state_dict()
    assert list(a) == list(b)
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    assert cached.lm_head.weight.data_ptr() == cached.model.embed_tokens.weight.data_ptr()  # still tied
    assert cached.config.to_dict() == {k: v for k, v in gguf.config.to_dict().items() if k != "quantization_config"}
    assert cached.generation_config.to_dict() == gguf.generation_config.to_dict()
    # What outputs record stays the GGUF: peft's base_model_name_or_path, the location, the feature-cache key.
    assert cached.__dict__["name_or_path"] == gguf.__dict__["name_or_path"] == smollm2.location.path
    assert smollm2.location == direct.location and smollm2.location.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert model_identity(smollm2.location) == model_identity(direct.location)
    assert model_identity(smollm2.location)["files"][0][0] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    config, _ = load_config(ModelConfig(source=SMOLLM2))  # what --dry-run and describe_model read: the model's, before loading
    set_at_load = ("quantization_config", "dtype", "use_cache")
    assert {k: v for k, v in config.to_dict().items() if k not in set_at_load} == {k: v for k, v in gguf.config.to_dict().items() if k not in set_at_load}

    batch = smollm2.tokenizer(TEXTS[:6], padding=True, return_tensors="pt")
    with torch.no_grad():
        ha = cached(**batch, output_hidden_states=True).hidden_states
        hb = gguf(**batch, output_hidden_states=True).hidden_states
    assert len(ha) == len(hb) == 31
    assert all(torch.equal(x, y) for x, y in zip(ha, hb))


@pytest.mark.slow
def test_the_converted_tokenizer_gives_the_same_ids(smollm2, direct):
    cached, gguf = smollm2.tokenizer, direct.tokenizer
    assert type(cached) is type(gguf) and len(cached) == len(gguf) == 49152
    assert cached.get_vocab() == gguf.get_vocab()
    for attr in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id", "all_special_ids", "padding_side",
                 "truncation_side", "model_max_length", "name_or_path"):
        assert getattr(cached, attr) == getattr(gguf, attr), attr
    assert (cached.pad_token_id, cached.padding_side) == (2, "right")
    for special in (True, False):
        assert cached(TEXTS, add_special_tokens=special)["input_ids"] == gguf(TEXTS, add_special_tokens=special)["input_ids"]
    a, b = cached(TEXTS, padding=True, return_tensors="pt"), gguf(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    assert cached("<|im_start|>user")["input_ids"][0] == 1  # special tokens in the text stay single ids
    ids = a["input_ids"].tolist()
    assert cached.batch_decode(ids) == gguf.batch_decode(ids)


@pytest.mark.slow
def test_warm_loads_never_parse_the_gguf(smollm2, monkeypatch):
    import gguf
    import transformers.integrations.gguf as hf_gguf
    import transformers.integrations.gguf.reader as hf_reader

    from mi_tune.loading import describe_model
    from mi_tune.modeling import adapter_plan, load_model

    def parse(*args, **kwargs):
        raise AssertionError("the GGUF file was parsed although its converted folder exists")

    monkeypatch.setattr(gguf.GGUFReader, "__init__", parse)
    monkeypatch.setattr(hf_reader, "read_gguf_metadata", parse)
    monkeypatch.setattr(hf_gguf, "read_gguf_metadata", parse)
    info = describe_model(SMOLLM2)  # the probe's and --dry-run's description
    assert (info.kind, info.num_blocks, info.hidden_size, info.vocab_size) == ("decoder", 30, 576, 49152)
    assert info.location.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf" and info.tokenizer.pad_token_id == 2
    plan = adapter_plan(ModelConfig(source=SMOLLM2), LoraSettings())
    assert (plan["num_blocks"], plan["final_block_has_adapters"], plan["blocks_with_adapters"]) == (30, False, list(range(29)))
    again = load_model(ModelConfig(source=SMOLLM2))
    assert torch.equal(again.model.model.layers[5].mlp.down_proj.weight, smollm2.model.model.layers[5].mlp.down_proj.weight)


# ---- mechanics, on small files ----


def _gguf_loc(path: Path) -> ModelLocation:
    return ModelLocation(str(path.parent), path.name, None, True, str(path))


def test_the_key_follows_the_file_identity(tmp_path, monkeypatch):
    monkeypatch.setenv("MI_TUNE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(60))
    folder, identity = gguf_cache.folder_for(f)
    assert folder == gguf_cache.folder_for(f)[0]  # same file: same folder, found from a stat (no hashing)
    assert folder.parent == tmp_path / "cache" / "gguf-hf" and folder.name.startswith("m-")
    assert identity["file"] == str(f.resolve()) and identity["size"] == 64 and identity["transformers"]
    os.utime(f, ns=(identity["mtime_ns"] + 10**9, identity["mtime_ns"] + 10**9))
    assert gguf_cache.folder_for(f)[0] != folder  # rewritten in place: a new conversion
    copy = tmp_path / "other" / "m.gguf"
    copy.parent.mkdir()
    copy.write_bytes(f.read_bytes())
    assert gguf_cache.folder_for(copy)[0] != gguf_cache.folder_for(f)[0]


def test_what_loads_directly(tmp_path, monkeypatch):
    monkeypatch.setenv("MI_TUNE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"not really")
    assert gguf_cache.hf_folder(ModelLocation(str(tmp_path), None, None, True, str(tmp_path))) is None  # a plain folder
    assert gguf_cache.hf_folder(ModelLocation("org/repo", "m.gguf", None, False, "org/repo")) is None  # a GGUF on the Hub
    monkeypatch.setenv("MI_TUNE_GGUF_CACHE", "0")
    assert gguf_cache.hf_folder(_gguf_loc(f)) is None
    assert not (tmp_path / "cache").exists()


def test_a_failed_conversion_leaves_nothing_that_is_used(tmp_path, monkeypatch):
    import transformers
    from transformers import LlamaConfig

    monkeypatch.setenv("MI_TUNE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(100))
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: LlamaConfig(num_hidden_layers=2))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stopped half-way: config.json written, the tokenizer not

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        gguf_cache.hf_folder(_gguf_loc(f))
    assert list((tmp_path / "cache" / "gguf-hf").iterdir()) == []  # no folder, no temp folder
    folder = gguf_cache.folder_for(f)[0]
    folder.mkdir()  # as if another process had just finished the conversion: used as it is, never converted again
    monkeypatch.setattr(gguf_cache, "_convert_header", lambda *a: pytest.fail("converted again"))
    assert gguf_cache.hf_folder(_gguf_loc(f)) == folder


def test_a_cache_that_cannot_be_written_loads_the_gguf_directly(tmp_path, monkeypatch, capsys):
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("MI_TUNE_CACHE", str(tmp_path / "not-a-folder"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(100))
    assert gguf_cache.hf_folder(_gguf_loc(f)) is None
    assert "reading the GGUF directly" in capsys.readouterr().err


def test_leftovers_of_killed_conversions_are_removed(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    target, folder = tmp_path / "model.safetensors", tmp_path / "m-key"
    dead, live = (target.with_name(gguf_cache._partial_prefix(target) + pid) for pid in (gone, str(os.getpid())))
    other_machine = tmp_path / f"model.safetensors.partial-elsewhere-{gone}"
    for p in (dead, live, other_machine):
        p.write_bytes(b"half")
    folder.with_name(gguf_cache._partial_prefix(folder) + gone).mkdir()
    gguf_cache._clear_stale(target)
    gguf_cache._clear_stale(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other_machine.name])
