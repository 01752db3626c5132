"""graft-report: the arrays it draws come from metrics.jsonl unchanged; PNGs for a real run."""

import json

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from graft import core, plot  # noqa: E402
from graft.models import build_model  # noqa: E402
from helpers import ROOT, torchrun  # noqa: E402

LAYERS = ["stem.weight", "body.weight", "head.weight"]


def write_run(run_dir, networks=2, epochs=3, grafting=True):
    """metrics.jsonl as graft.train writes it, with values that encode (network, epoch, layer)."""
    run_dir.mkdir(parents=True)
    records = []
    for e in range(epochs):
        for n in range(networks):
            r = {"epoch": e, "network": n, "lr": 0.1 / (n + 1) / (e + 1), "test_acc": 10.0 * n + e,
                 "ensemble_acc": 50.0 + e, "filters": 48, "invalid_filters": {"0.1": n + e, "0.01": e}}
            if grafting and e < epochs - 1:
                r["graft"] = [{"layer": name, "entropy_self": 2.0 + 0.1 * i, "entropy_peer": 2.0,
                               "alpha": 0.5 + 0.01 * (n + 1) * (i - 1), "peer_distance": 1.0 / (e + 1) + 0.01 * i}
                              for i, name in enumerate(LAYERS)]
                r["mean_peer_distance"] = sum(g["peer_distance"] for g in r["graft"]) / len(LAYERS)
            records.append(r)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "config.yaml").write_text(f"model: resnet8\ngrafting:\n  enabled: {str(grafting).lower()}\n"
                                         "  level: layer\n  A: 0.4\n  c: 500\n  compat: default\n")
    return records


def test_the_arrays_are_the_records(tmp_path):
    records = write_run(tmp_path / "run")
    run = plot.load_run(tmp_path / "run")
    assert list(run.epochs) == [1, 2, 3] and run.networks == 2 and run.layers == LAYERS
    for r in records:
        n, e = r["network"], r["epoch"]
        assert run.acc[n, e] == r["test_acc"] and run.lr[n, e] == r["lr"]
        assert run.invalid["0.1"][n, e] == r["invalid_filters"]["0.1"]
        assert run.ensemble_acc[e] == r["ensemble_acc"]
        for i, g in enumerate(r.get("graft", [])):
            assert (run.alpha[n, i, e], run.score[n, i, e], run.peer_distance[n, i, e]) == (
                g["alpha"], g["entropy_self"], g["peer_distance"])
    assert np.isnan(run.alpha[:, :, -1]).all() and np.isnan(run.mean_peer_distance[:, -1]).all()  # no last graft
    assert run.A == 0.4 and "resnet8, 2 network(s), grafting: entropy, ring, A 0.4" in run.title
    assert run.split == "test" and run.score_name == "entropy"


def test_an_older_config_names_the_criterion_it_meant(tmp_path):
    """grafting.compat: reference (the official code's rule) and level: filter, as older
    versions saved them: titled by the criterion, and no entropy alpha scale for them."""
    write_run(tmp_path / "run")
    for old, criterion in (("compat: reference", "reference"), ("level: filter", "bn_scale")):
        (tmp_path / "run" / "config.yaml").write_text(f"model: resnet8\ngrafting:\n  A: 0.4\n  c: 500\n  {old}\n")
        run = plot.load_run(tmp_path / "run")
        assert f"grafting: {criterion}, ring" in run.title and run.A is None


def test_a_record_written_twice_counts_once_the_later(tmp_path):
    records = write_run(tmp_path / "run")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write(json.dumps(dict(records[0], test_acc=99.0)) + "\n")
    assert plot.load_run(tmp_path / "run").acc[0, 0] == 99.0


def test_a_run_selected_on_validation_draws_its_validation_curves(tmp_path, capsys):
    """The study's runs evaluate the validation split every epoch: val_acc, not test_acc."""
    records = write_run(tmp_path / "run")
    lines = []
    for r in records:
        r = dict(r, split="val")
        r["val_acc"] = r.pop("test_acc")
        lines.append(json.dumps(r))
    (tmp_path / "run" / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    run = plot.load_run(tmp_path / "run")
    assert run.split == "val" and run.split_name == "validation"
    assert [run.acc[r["network"], r["epoch"]] for r in records] == [r["test_acc"] for r in records]
    assert plot.main([str(tmp_path / "run")]) == 0


def test_metrics_it_cannot_draw_are_refused_and_missing_fields_said(tmp_path, capsys):
    run_dir = tmp_path / "run"
    records = write_run(run_dir)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "network": 0, "lr": 0.1}) + "\n")
    assert plot.main([str(run_dir)]) == 1
    assert "no accuracy in any record (neither test_acc nor val_acc)" in capsys.readouterr().err
    # Metrics from before the peer distance was logged: the panel says so, not "no grafting".
    old = [{k: v for k, v in r.items() if k != "mean_peer_distance"} for r in records]
    for r in old:
        for g in r.get("graft", []):
            g.pop("peer_distance")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    run = plot.load_run(run_dir)
    assert run.grafted and np.isnan(run.mean_peer_distance).all()
    assert plot.main([str(run_dir)]) == 0


def test_pngs_for_runs_and_their_comparison(tmp_path, capsys):
    import matplotlib.image

    write_run(tmp_path / "graft", networks=3)
    write_run(tmp_path / "base", grafting=False)
    compare = tmp_path / "compare.png"
    assert plot.main([str(tmp_path / "graft"), str(tmp_path / "base"), "--compare", str(compare)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "graft" / "report.png"), str(tmp_path / "base" / "report.png"), str(compare)]
    for path in printed:
        height, width, _ = matplotlib.image.imread(path).shape
        assert width > 1000 and height > 400


def test_a_directory_without_metrics_is_named(tmp_path, capsys):
    assert plot.main([str(tmp_path / "nothing")]) == 1
    assert capsys.readouterr().err.strip() == f"graft-report: error: {tmp_path / 'nothing'}: no metrics.jsonl " \
                                              "(not a graft run directory?)"


def test_report_of_a_real_run(tmp_path):
    out = tmp_path / "run"
    proc = torchrun(2, "-m", "graft.train", "--config", ROOT / "configs" / "quickstart.yaml", "model=resnet8",
                    "epochs=3", "batch_size=50", "data.train_subset=200", "data.test_subset=100",
                    f"data.cache_dir={tmp_path / 'cache'}", "progress=false", f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = plot.load_run(out)
    model = build_model("resnet8", 10)
    assert run.networks == 2 and run.layers == list(core.module_plan(model).layers)
    assert run.filters == core.count_invalid_filters(model)["total"]
    grafted = run.alpha[:, :, :-1]
    assert not np.isnan(grafted).any() and np.allclose(grafted[0] + grafted[1], 1.0)  # N = 2: alphas mirror
    # Independently initialised networks start about sqrt(2) apart; a 2-network ring ends each
    # graft with two identical networks, which one epoch of training moves apart far less.
    first, second = run.peer_distance[:, :, 0], run.peer_distance[:, :, 1]
    assert (first > 0.5).all() and (second < first).all()
    assert plot.main([str(out)]) == 0 and (out / "report.png").stat().st_size > 10_000


def test_the_comparison_table_gives_summary_json_figures(tmp_path, monkeypatch):
    """Networks at 90 and 92 at the end once read ± 1.00 (population std) where summary.json says
    1.41 (sample std), and "best acc" was the single best network at its best epoch (92), not the
    mean of each network's best (91.5)."""
    from graft.report import MetricsLog, summarize

    accs = {0: [50.0, 91.0, 90.0], 1: [60.0, 88.0, 92.0]}
    for name in ("a", "b"):
        records = write_run(tmp_path / name)
        for r in records:
            r["test_acc"] = accs[r["network"]][r["epoch"]]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = summarize(MetricsLog(tmp_path / "a" / "metrics.jsonl").read())
    run = plot.load_run(tmp_path / "a")
    (final, final_std), (best, best_std) = plot.accuracy_over_networks(run)
    assert (final, final_std, best, best_std) == pytest.approx(
        (summary["final_acc_mean"], summary["final_acc_std"], summary["best_acc_mean"], summary["best_acc_std"]))
    assert (final, best) == (91.0, 91.5) and final_std == pytest.approx(2 ** 0.5)

    figures = []
    make = plot._figure
    monkeypatch.setattr(plot, "_figure", lambda *size: figures.append(make(*size)) or figures[-1])
    plot.draw_comparison([run, plot.load_run(tmp_path / "b")], tmp_path / "compare.png")
    (table,) = [t for ax in figures[0].axes for t in ax.tables]
    cells = {(r, c): cell.get_text().get_text() for (r, c), cell in table.get_celld().items()}
    assert (cells[0, 3], cells[0, 4]) == ("final, mean ± std", "best, mean ± std")
    assert (cells[1, 3], cells[1, 4]) == ("91.00 ± 1.41", "91.50 ± 0.71")
