"""Models described without weights: --dry-run prints the adapter plan from config.json alone; loading.describe_model
gives sizes (and the probe's cache key) from the config; a model folder rewritten in place gets a new cache key."""

import shutil

import yaml

from .conftest import ROOT, TINY, TINY_CORPUS, run_cli


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


def test_describe_model_reads_sizes_without_weights(tmp_path):
    from transformers import MistralConfig

    from mi_tune.loading import describe_model

    MistralConfig().save_pretrained(tmp_path)  # config only: loading any weights would fail
    info = describe_model(str(tmp_path))
    assert (info.model_type, info.kind, info.num_blocks, info.num_hidden_states) == ("mistral", "decoder", 32, 33)
    assert (info.hidden_size, info.vocab_size, info.location.is_local) == (4096, 32000, True)


def test_describe_model_finds_the_base_of_an_adapter_run(tmp_path):
    from mi_tune.config import ModelConfig
    from mi_tune.loading import describe_model, model_config_for

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump({"model": {"source": str(TINY), "dtype": "float32", "a_future_field": 1}}))
    info = describe_model(adapter=str(run))
    assert info.config.source == str(TINY) and info.config.dtype == "float32"  # the run's model block (unknown fields dropped)
    assert info.num_blocks == 3 and info.tokenizer.pad_token_id is not None
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert model_config_for("org/name", recipe, run) == ModelConfig(source="org/name", dtype="float32")  # a source keeps the run's settings
    given = ModelConfig(source="org/name")
    assert model_config_for(given, recipe, run) is given  # a ModelConfig is used as given


def test_a_model_folder_rewritten_in_place_gets_a_new_feature_cache_key(tmp_path):
    from safetensors.torch import load_file, save_file

    from mi_tune.eval.probe import ModelHandle, TextSet
    from mi_tune.eval.suites import ProbeModel

    folder = tmp_path / "model"
    shutil.copytree(TINY, folder)
    texts = TINY_CORPUS.read_text().splitlines()[:5]
    ts = TextSet("t", "train", str(TINY_CORPUS), texts, {"text_field": "text"})
    key = lambda: ModelHandle(ProbeModel(source=str(folder))).cache_key(False, ts, 16)  # noqa: E731
    before = key()
    assert before == key()  # same folder, same texts, same settings: a hit
    weights = load_file(folder / "model.safetensors")
    save_file({k: v + 1 for k, v in weights.items()}, folder / "model.safetensors")  # new weights, same file name
    assert key() != before
    assert key()["files"][0][0] == "model.safetensors"
