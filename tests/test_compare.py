"""python -m mi_tune.compare on the embedded store and on a real `mlflow server`: the table (differing
params, final metrics, sort order), child runs folded into their parent, the PNG overlays, the logged
comparison run, and clear errors. Runs are logged with the tracker directly (no training: fast)."""

import math
import struct
from pathlib import Path

import pytest

from mi_tune.compare import main as compare_main
from mi_tune.tracking import MlflowTracker

from .conftest import run_cli
from .mlflow_server import mlflow_server, mlflow_server_boot  # noqa: F401  (fixtures)

LRS = [1e-4, 3e-4, 1e-3]
HELDOUT = [0.30, 0.35, 0.25]  # best is the middle learning rate
EVAL_LOSS = [3.2, 3.4, 3.0]  # lowest is the last one
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROBE_SETS = ("toy", "news_2")  # evaluation sets of the probe child runs; each also logs the probe's other metrics
PROBE_OTHER = ("cosine", "bleu", "mi_lb_bits", "ce_gain_over_prior_bits")


@pytest.fixture(scope="module", autouse=True)
def _boot_server(mlflow_server_boot):
    """Start the server now, without waiting: it boots while the embedded-store tests run."""


def probe_point(layer: int, i: int) -> dict:
    """One layer of a probe child run: probe_<variant>_<set>_<metric>, base and base + adapter, every metric."""
    acc = {"base": 0.2 + 0.1 * math.sin(layer), "adapter": 0.2 + 0.1 * math.sin(layer) + 0.01 * (i + 1)}
    return {f"{v}_{s}_{m}": acc[v] + (0.05 * j if m == "recoverability_acc" else 0.5)
            for v in acc for j, s in enumerate(PROBE_SETS) for m in ("recoverability_acc", *PROBE_OTHER)}


def make_runs(uri: str, experiment: str, scratch: Path) -> dict[str, str]:
    """Three training-like runs (params, curves, eval, held-out, downstream) plus a probe child run each."""
    names = {}
    for i, lr in enumerate(LRS):
        name = f"lr{lr:g}"
        t = MlflowTracker.open(uri, experiment, name, {"mi_tune.base_model": "tiny"}, scratch / "unsent.jsonl")
        t.log_params({"training.learning_rate": lr, "lora.r": 4, "run_name": name, "resolved.num_blocks": 3})
        for step in (2, 4, 6):
            t.log_metrics({"loss": 4.0 - step * lr * 100, "recoverability_acc": 0.1 + step * lr * 10}, step=step)
            t.log_metrics({"eval_loss": EVAL_LOSS[i] + (6 - step) * 0.1, "eval_recoverability_acc": 0.2 + 0.01 * step}, step=step)
        t.log_metrics({"heldout_enhanced_recoverability_acc": HELDOUT[i], "heldout_base_recoverability_acc": 0.28}, step=6)
        t.log_downstream({"sts": {"spearman": 0.5 + 0.01 * i}, "clustering": {"nmi": 0.1 + 0.02 * i}})
        t.end()
        child = MlflowTracker.open(uri, experiment, "probe", {"mlflow.parentRunId": t.run_id}, scratch / "unsent.jsonl")
        child.log_layer_curve({layer: probe_point(layer, i) for layer in range(4)})  # as eval/probe.py names them
        child.end()
        names[name] = t.run_id
    return names


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One embedded store for the module (creating one runs MLflow's migrations: seconds), one experiment of 3 runs."""
    root = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{root / 'mlruns.db'}"
    return uri, make_runs(uri, "lr-sweep", root), root


def _rows(stdout: str) -> list[list[str]]:
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#  run"))
    header = lines[start].split()
    rows = []
    for line in lines[start + 2:]:
        if not line[:1].isdigit():
            break
        rows.append(line.split())
    return [header, *rows]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def test_compare_embedded_store(store, tmp_path, capsys):
    uri, ids, _ = store
    compare_main(["--experiment", "lr-sweep", "--tracking-uri", uri, "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    header, *rows = _rows(out)
    assert "sorted by heldout_enhanced_recoverability_acc (higher is better)" in out
    assert "training.learning_rate" in header  # differs
    assert "lora.r" not in header and "run_name" not in header and "resolved.num_blocks" not in header  # same in all
    assert {"heldout_enhanced_recoverability_acc", "eval_loss", "downstream_sts_spearman", "downstream_clustering_nmi"} <= set(header)
    assert [r[1] for r in rows] == ["lr0.0003", "lr0.0001", "lr0.001"]  # by held-out accuracy, best first
    assert len(rows) == 3  # the probe child runs are folded into their parents, not rows of their own
    col = header.index("heldout_enhanced_recoverability_acc")
    assert [float(r[col]) for r in rows] == [0.35, 0.30, 0.25]
    for name in ("training_curves.png", "layer_curves.png", "downstream.png"):
        data = (tmp_path / "out" / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name
    # layer curves: recoverability accuracy only, one panel per evaluation set side by side (2 here), not a panel per
    # logged probe metric (20 here, 10 rows of panels: 4,400 pixels high)
    width, height = png_size(tmp_path / "out" / "layer_curves.png")
    assert width <= 1500 and height <= 700, (width, height)
    assert (tmp_path / "out" / "table.csv").read_text().splitlines()[0].startswith("run,run_id,status,training.learning_rate")

    # the comparison is logged as its own run, with the plots and the table as its description
    client = _client(uri)
    exp = client.get_experiment_by_name("lr-sweep")
    logged = client.search_runs([exp.experiment_id], filter_string="tags.`mi_tune.kind` = 'comparison'")
    assert len(logged) == 1
    files = {f.path for f in client.list_artifacts(logged[0].info.run_id)}
    assert {"training_curves.png", "layer_curves.png", "downstream.png", "table.md", "table.csv"} <= files
    assert set(logged[0].data.params["compared_runs"].split(",")) == set(ids.values())
    assert "| lr0.0003 |" in logged[0].data.tags["mlflow.note.content"]

    # a second comparison ignores the first; a loss sorts lowest first; a probe metric comes from the child run
    compare_main(["--experiment", "lr-sweep", "--tracking-uri", uri, "--out", str(tmp_path / "out2"), "--no-log",
                  "--metric", "eval_loss", "probe_adapter_toy_recoverability_acc"])
    out = capsys.readouterr().out
    header, *rows = _rows(out)
    assert "sorted by eval_loss (lower is better)" in out
    assert [r[1] for r in rows] == ["lr0.001", "lr0.0001", "lr0.0003"]
    probe, loss = header.index("probe_adapter_toy_recoverability_acc"), header.index("eval_loss")
    order = [2, 0, 1]  # make_runs' index of each row
    assert [float(r[loss]) for r in rows] == [EVAL_LOSS[i] for i in order]  # the value at the last step (6)
    # the child's latest value = its last layer (step 3), as the 4-significant-digit table shows it
    assert [float(r[probe]) for r in rows] == [float(f"{probe_point(3, i)['adapter_toy_recoverability_acc']:.4g}") for i in order]
    assert len(client.search_runs([exp.experiment_id], filter_string="tags.`mi_tune.kind` = 'comparison'")) == 1


def test_compare_chosen_runs(store, tmp_path, capsys):
    uri, ids, _ = store
    compare_main(["--runs", ids["lr0.001"], ids["lr0.0001"], "--tracking-uri", uri, "--out", str(tmp_path / "o"), "--no-log"])
    header, *rows = _rows(capsys.readouterr().out)
    assert [r[1] for r in rows] == ["lr0.0001", "lr0.001"]


def test_compare_errors_are_clear(store, tmp_path, capsys):
    uri = store[0]
    for argv, expected in [
        (["--tracking-uri", f"sqlite:///{tmp_path / 'nothing.db'}"], "no MLflow store at"),
        (["--tracking-uri", uri, "--experiment", "nope"], "'nope' is not in this store. Allowed: 'lr-sweep'"),
        (["--tracking-uri", uri, "--runs", "0123abcd"], "run '0123abcd' is not in this store"),
        (["--tracking-uri", uri, "--experiment", "lr-sweep", "--metric", "no_such_metric"], "no_such_metric not logged by any chosen run"),
    ]:
        with pytest.raises(SystemExit) as e:
            compare_main([*argv, "--no-log"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and expected in err and "Traceback" not in err
    assert not (tmp_path / "nothing.db").exists()  # a wrong path does not create an empty store


def test_compare_on_a_server(mlflow_server, tmp_path):
    ids = make_runs(mlflow_server.uri, "lr-sweep-server", tmp_path)
    proc = run_cli("mi_tune.compare", "--experiment", "lr-sweep-server", "--tracking-uri", mlflow_server.uri,
                   "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    header, *rows = _rows(proc.stdout)
    assert [r[1] for r in rows] == ["lr0.0003", "lr0.0001", "lr0.001"]
    assert f"at {mlflow_server.uri}" in proc.stdout
    assert all((tmp_path / "out" / n).read_bytes()[:8] == PNG_MAGIC for n in ("training_curves.png", "layer_curves.png", "downstream.png"))
    client = _client(mlflow_server.uri)
    exp = client.get_experiment_by_name("lr-sweep-server")
    logged = client.search_runs([exp.experiment_id], filter_string="tags.`mi_tune.kind` = 'comparison'")
    assert len(logged) == 1 and set(logged[0].data.params["compared_runs"].split(",")) == set(ids.values())
    local = client.download_artifacts(logged[0].info.run_id, "layer_curves.png")  # through the server's artifact proxy
    assert Path(local).read_bytes()[:8] == PNG_MAGIC


def test_differing_params_ignore_runs_that_logged_none():
    from mi_tune.compare import RunView, differing_params

    def view(name, params):
        return RunView(name, name, "FINISHED", "0", params, {})

    runs = [view("a", {"lr": "1e-4", "r": "4", "run_name": "a"}), view("b", {"lr": "0.0001", "r": "8", "run_name": "b"}),
            view("c", {"lr": "3e-4", "r": "8", "head.init": "fit"}), view("died-early", {})]
    assert differing_params(runs) == ["head.init", "lr", "r"]  # 1e-4 == 0.0001; run_name is its own column


def test_layer_curves_are_recoverability_per_evaluation_set_at_most_four_panels():
    from mi_tune.compare import MAX_LAYER_PANELS, RunView, probe_accuracy_curves

    def view(name, sets):
        metrics = {f"probe_{v}_{s}_{m}": 0.5 for s in sets for v in ("base", "adapter") for m in ("recoverability_acc", "cosine", "mi_lb_bits")}
        metrics |= {"probe_ag_news_recoverability_acc": 0.4, "eval_recoverability_acc": 0.3}  # a curve without variant; not a probe
        return RunView(name, name, "FINISHED", "0", {}, metrics)

    runs = [view("a", ["s1", "s2", "s3_x", "s4", "s5", "s6"]), view("b", ["s5", "s6"])]
    panels = probe_accuracy_curves(runs)
    assert MAX_LAYER_PANELS == 4 and list(panels) == ["ag_news", "s5", "s6", "s1"]  # the sets most runs have first
    assert {(r.name, v, k) for r, v, k in panels["s5"]} == {(n, v, f"probe_{v}_s5_recoverability_acc") for n in "ab" for v in ("base", "adapter")}
    assert {(r.name, v) for r, v, _ in panels["ag_news"]} == {("a", None), ("b", None)}
    assert {v for _, v, _ in probe_accuracy_curves([view("c", ["s3_x"])])["s3_x"]} == {"base", "adapter"}  # a set name with "_"
