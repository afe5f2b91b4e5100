"""Recipes and suites: one loader; every shipped YAML validates; bad files give one clear message and exit code 2."""

from pathlib import Path

import pytest
import yaml

from mi_tune.config import ModelConfig, Recipe, config_from_dict, load_config, load_recipe, parse_overrides, recipe_from_dict
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


# ---- one loader for recipes and evaluation suites -----------------------------------------------------


def _schema(path: Path):
    """recipes/ hold training recipes; eval/ holds suites, whose `task:` says probe or downstream."""
    from mi_tune.eval.suites import DownstreamSuite, ProbeSuite

    if path.parent.name == "recipes":
        return Recipe, "recipe"
    return {"probe": ProbeSuite, "downstream": DownstreamSuite}[yaml.safe_load(path.read_text())["task"]], "suite"


YAML_FILES = sorted((ROOT / "recipes").glob("*.y*ml")) + sorted((ROOT / "eval").glob("*.y*ml"))


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_yaml_file_loads_through_the_one_loader(path):
    schema, what = _schema(path)
    config = load_config(path, schema, what=what)
    assert isinstance(config, schema)
    assert {p.parent.name for p in YAML_FILES} == {"recipes", "eval"} and len(YAML_FILES) >= 9


def test_probe_models_are_recipe_model_blocks():
    from mi_tune.eval.suites import ProbeSuite

    suite = load_config(ROOT / "eval" / "paper-probe.yaml", ProbeSuite, ["models=[{source: x/y, quantization: 4bit, gguf_file: m.gguf}]"],
                        what="suite")
    (m,) = suite.models
    assert isinstance(m, ModelConfig) and m.model_config() == ModelConfig(source="x/y", quantization="4bit", gguf_file="m.gguf")


def _typo_message(schema, data: dict) -> str:
    with pytest.raises(UserError) as exc:
        config_from_dict({**data, "seeed": 1}, schema, "file.yaml")
    return str(exc.value)


def test_a_typo_reads_the_same_in_a_recipe_and_in_both_suites():
    from mi_tune.eval.suites import DownstreamSuite, ProbeSuite

    valid = {Recipe: yaml.safe_load((ROOT / "recipes" / "tiny.yaml").read_text()),
             ProbeSuite: yaml.safe_load((ROOT / "eval" / "probe-cpu.yaml").read_text()),
             DownstreamSuite: yaml.safe_load((ROOT / "eval" / "downstream-cpu.yaml").read_text())}
    for schema, data in valid.items():
        head, line = _typo_message(schema, data).splitlines()
        assert head == "file.yaml has 1 problem(s):", schema
        assert line.startswith("  - seeed: got 1; allowed: known fields: ") and line.endswith("Fix: unknown key; did you mean `seed`?"), line


def test_a_suite_typo_on_the_command_line_exits_2_naming_field_and_fix(tmp_path):
    for name, task in (("probe-cpu.yaml", "probe"), ("downstream-cpu.yaml", "downstream")):
        text = (ROOT / "eval" / name).read_text().replace("\nmax_length:", "\nmax_lenght:")
        bad = tmp_path / name
        bad.write_text(text)
        proc = run_cli("mi_tune.eval", str(bad), "--model", "x") if task == "downstream" else run_cli("mi_tune.eval", str(bad))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert f"suite {bad} has 1 problem(s)" in proc.stderr and "max_lenght: got" in proc.stderr
        assert "did you mean `max_length`?" in proc.stderr


def test_suite_overrides_use_the_recipe_syntax_and_checks():
    from mi_tune.eval.downstream import load_suite

    suite, specs = load_suite(ROOT / "eval" / "downstream-cpu.yaml", ["tasks.stsb.max_samples=40", "batch_size=8"])
    assert specs["stsb"].max_samples == 40 and suite.batch_size == 8 and suite.name == "downstream-cpu"
    with pytest.raises(UserError, match=r"tasks\.stsb\.max_sample: .*did you mean `max_samples`"):
        load_suite(ROOT / "eval" / "downstream-cpu.yaml", ["tasks.stsb.max_sample=40"])
    with pytest.raises(UserError, match=r"tasks\.new\.family: got None.*Fix: add `family:`"):  # a field without default is required
        load_suite(ROOT / "eval" / "downstream-cpu.yaml", ["tasks.new.data=x.jsonl"])
