"""Recipes: every shipped recipe validates; bad recipes give one clear message and exit code 2."""

from pathlib import Path

import pytest
import yaml

from mi_tune.config import load_recipe, parse_overrides, recipe_from_dict
from mi_tune.errors import UserError

from .conftest import ROOT, run_cli

RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"mistral7b.yaml", "llama2-7b.yaml", "opt-2.7b.yaml", "smollm2-135m-cpu.yaml", "tiny.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates_and_opens_with_a_comment(path):
    recipe = load_recipe(path)
    assert recipe.model.source and recipe.data.source
    text = path.read_text()
    assert text.startswith("#") and "python -m mi_tune.train" in text.split("\n\n")[0]


def test_all_problems_reported_at_once():
    data = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    data["lora"]["rr"] = 8  # misspelled key
    data["data"]["max_length"] = "long"  # wrong type
    data["training"]["learning_rat"] = 1e-3  # misspelled TrainingArguments field
    with pytest.raises(UserError) as exc:
        recipe_from_dict(data)
    msg = str(exc.value)
    assert "3 problem(s)" in msg
    assert "lora.rr" in msg and "did you mean `r`" in msg
    assert "data.max_length" in msg and "'long'" in msg and "an integer" in msg
    assert "training.learning_rat" in msg and "learning_rate" in msg


def test_overrides_win_and_parse_yaml_values():
    r = load_recipe(ROOT / "recipes" / "tiny.yaml", ["training.max_steps=3", "objective.layer=-2", "model.dtype=bfloat16"])
    assert r.training["max_steps"] == 3 and r.objective.layer == -2 and r.model.dtype == "bfloat16"
    assert parse_overrides(["a.b.c=[1, 2]", "x=null"]) == {"a": {"b": {"c": [1, 2]}}, "x": None}
    with pytest.raises(UserError):
        parse_overrides(["no_equals_sign"])


def test_literal_and_bool_types_are_strict():
    with pytest.raises(UserError, match="model.quantization"):
        recipe_from_dict({"model": {"source": "x", "quantization": "3bit"}, "data": {"source": "y"}})
    with pytest.raises(UserError, match="tracking.enabled"):
        recipe_from_dict({"model": {"source": "x"}, "data": {"source": "y"}, "tracking": {"enabled": "yes"}})
    with pytest.raises(UserError, match="training.output_dir"):
        recipe_from_dict({"model": {"source": "x"}, "data": {"source": "y"}, "training": {"output_dir": "/tmp"}})


def _cli_error(tmp_path, mutate, *extra):
    data = yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text())
    mutate(data)
    data["output_root"] = str(tmp_path / "adapters")
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(data))
    proc = run_cli("mi_tune.train", str(p), *extra)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return proc.stderr


def test_cli_misspelled_key(tmp_path):
    err = _cli_error(tmp_path, lambda d: d["objective"].update({"pooolng": "mean"}))
    assert "objective.pooolng" in err and "did you mean `pooling`" in err


def test_cli_wrong_type(tmp_path):
    err = _cli_error(tmp_path, lambda d: d["lora"].update({"r": "sixteen"}))
    assert "lora.r" in err and "'sixteen'" in err and "Fix:" in err


def test_cli_layer_out_of_range(tmp_path):
    err = _cli_error(tmp_path, lambda d: d["objective"].update({"layer": 40}))
    assert "layer=40 is out of range" in err and "[-4, 3]" in err


def test_cli_missing_data_file(tmp_path):
    err = _cli_error(tmp_path, lambda d: d["data"].update({"source": str(tmp_path / "nope.jsonl")}))
    assert "data.source" in err and "nope.jsonl" in err and "Fix:" in err


def test_cli_missing_recipe_and_bad_yaml(tmp_path):
    proc = run_cli("mi_tune.train", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "recipe" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  source: [unclosed\n")
    proc = run_cli("mi_tune.train", str(bad))
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr and "Traceback" not in proc.stderr
