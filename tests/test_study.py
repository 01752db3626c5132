"""graft-study: plans, the statistics, and a tiny study that is interrupted and continued."""

import json
import math
import signal
import subprocess
import sys
import time

import pytest
import torch

from graft import checkpoint
from graft.config import ConfigError
from graft.engine import machine_name
from graft.stats import paired_difference, t_quantile_975
from graft.study.archive import final_weights, write_json
from graft.study.plan import Arm, Run, command, load_plan, runs_of
from graft.study.runner import time_left
from helpers import ROOT, env

PLAN = ROOT / "tests" / "studies" / "tiny.yaml"


def test_t_quantiles():
    assert t_quantile_975(1) == 12.706 and t_quantile_975(2) == 4.303 and t_quantile_975(30) == 2.042
    assert t_quantile_975(60) == pytest.approx(2.0003, abs=1e-3)   # exact: 2.00030
    assert t_quantile_975(120) == pytest.approx(1.9799, abs=1e-3)  # exact: 1.97993
    with pytest.raises(ValueError):
        t_quantile_975(0)


def test_paired_difference_interval():
    d = paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])  # differences 1, 2, 3: mean 2, sd 1
    half = 4.303 / math.sqrt(3)
    assert (d.n, d.mean) == (3, 2.0)
    assert (d.low, d.high) == (pytest.approx(2 - half), pytest.approx(2 + half))
    assert not d.excludes_zero  # -0.48 .. 4.48
    assert paired_difference([5.0, 5.1, 5.2, 5.0], [4.0, 4.0, 4.1, 4.0]).excludes_zero
    assert d.diffs == (1.0, 2.0, 3.0) and not d.same_every_time
    assert paired_difference([84.5, 83.7], [83.54, 82.74]).same_every_time  # 0.96 twice, to float rounding
    one = paired_difference([1.0], [0.0])
    assert (one.low, one.high) == (-math.inf, math.inf) and not one.excludes_zero
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 2.0])


def test_difference_table_pairs_seeds_and_flags_a_zero_width_interval():
    from graft.study.report import difference_table
    per_arm = {"graft": {0: {"final": 84.0, "ensemble": 84.0}, 1: {"final": 83.0, "ensemble": 83.5},
                         2: {"final": 85.0, "ensemble": 84.5}},
               "average": {0: {"final": 83.0, "ensemble": 83.0}, 1: {"final": 83.0, "ensemble": 82.5}}}
    lines = difference_table([("graft", "average")], per_arm, [("final", "final"), ("ensemble", "ensemble final")])
    # Seed 2 has no partner: 2 pairs. Final differences 1 and 0; ensemble 1 and 1 (zero width).
    assert "| graft | average | final | 2 | +0.50 | [-5.85, +6.85] |" in lines
    assert "| graft | average | ensemble final | 2 | +1.00 | [+1.00, +1.00] |" in lines
    text = "\n".join(lines)
    assert "graft vs average, final: +0.50 points; the 95% interval includes 0" in text
    assert ("graft vs average, ensemble final: +1.00 points on each of 2 seeds: the difference was the same on "
            "every seed, so the interval has no width. Read it as 'above on each of 2 seeds'") in text
    tie = difference_table([("graft", "average")], {a: {0: {"final": 83.0}, 1: {"final": 84.0}} for a in per_arm},
                           [("final", "final")])
    assert "Read it as 'the same on each of 2 seeds'" in "\n".join(tie)
    # A narrow interval is not 'the same on every seed' (ImageNet-sized test sets step by 0.002),
    # and an interval above 0 does not mean above on every seed.
    near = {"graft": {s: {"final": 80.0 + d} for s, d in enumerate((0.500, 0.500, 0.502))},
            "average": {s: {"final": 80.0} for s in range(3)}}
    assert "same on every seed" not in "\n".join(difference_table([("graft", "average")], near, [("final", "final")]))
    mostly = {"graft": {s: {"final": 80.0 + d} for s, d in enumerate((0.5, 0.6, 0.4, 0.5, -0.05))},
              "average": {s: {"final": 80.0} for s in range(5)}}
    text = "\n".join(difference_table([("graft", "average")], mostly, [("final", "final")]))
    assert ("the 95% interval excludes 0: over these 5 seeds graft is above average on average (above on 4 of 5 "
            "seeds).") in text
    # A study under way: no seed finished in both arms yet, and no empty table.
    assert difference_table([("graft", "average")], {"graft": {0: {"final": 84.0}}, "average": {}},
                            [("final", "final")]) == ["No seed has finished in both arms of a pair yet.", ""]


def test_invalid_filters_are_compared_where_some_run_has_them():
    """The invalid-filter counts get a paired table of their own, under the thresholds where some
    run ended with one; none where every count is 0 (the recipe that has none)."""
    from graft.study.report import difference_table, invalid_metrics

    def run(low, high):
        return {"invalid": {"0.1": low, "0.01": high}, "invalid<0.1": low, "invalid<0.01": high}

    per_arm = {"independent": {0: run(60.0, 0.0), 1: run(58.0, 0.0)}, "graft": {0: run(30.5, 0.0), 1: run(31.5, 0.0)}}
    counted = invalid_metrics(per_arm)
    assert counted == [("invalid<0.1", "invalid filters, L1 < 0.1")]
    lines = difference_table([("graft", "independent")], per_arm, counted)
    assert "| graft | independent | invalid filters, L1 < 0.1 | 2 | -28.00 | [-47.06, -8.94] |" in lines
    assert invalid_metrics({"independent": {0: run(0, 0)}, "graft": {0: run(0, 0)}}) == []
    # The mean per network hides where the filters are: the fewest and the most any network had.
    from graft.study.report import invalid_cell

    seed0 = {"invalid": {"0.1": 37.0, "0.01": 29.0}, "invalid_networks": {"0.1": [3, 71], "0.01": [0, 58]},
             "filters": 688}
    even = {"invalid": {"0.1": 14.0}, "invalid_networks": {"0.1": [14, 14]}, "filters": 688}
    assert invalid_cell([seed0]) == "<0.1: 37.0 (3 to 71), <0.01: 29.0 (0 to 58) of 688"
    assert invalid_cell([even]) == "<0.1: 14.0 of 688"
    assert invalid_metrics({"independent": {}}) == []


def test_where_invalid_says_how_many_a_graft_cannot_revive():
    """The share of invalid filters whose peer is invalid at the same position, per arm and
    threshold, over the runs that measured it (an older weights.json lacks it)."""
    from graft.study.report import where_invalid

    def run(invalid, both):
        return {"invalid": {"0.1": invalid}, "invalid_in_both": None if both is None else {"0.1": both}}

    per_arm = {"independent": {0: run(37.0, 1.0), 1: run(48.5, 6.0), 2: run(40.0, None)},
               "graft": {0: run(14.0, 14.0)}, "average": {}}
    lines = where_invalid(per_arm, ["0.1"])
    assert "| independent | < 0.1 | 2 | 42.8 | 3.5 | 8% |" in lines
    assert "| graft | < 0.1 | 1 | 14.0 | 14.0 | 100% |" in lines
    assert not any(line.startswith("| average") for line in lines)
    assert where_invalid({"graft": {0: run(14.0, None)}}, ["0.1"]) == []
    assert "| graft | < 0.1 | 1 | 0.0 | 0.0 | - |" in where_invalid({"graft": {0: run(0.0, 0.0)}}, ["0.1"])


def test_the_picture_gets_an_invalid_filter_panel_where_some_run_has_them(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    from graft.study.report import _plot

    def run(final, invalid):
        return {"final": final, "ensemble": final + 1, "curve": [50.0, 60.0, final], "curve_split": "val",
                "filters": 688, "invalid": {"0.1": invalid[-1]}, "invalid<0.1": invalid[-1],
                "invalid_curve": {"0.1": invalid}}

    plan = load_plan(PLAN)
    widths = []
    for counts in ([0.0, 0.0, 0.0], [0.0, 20.0, 60.0]):
        per_arm = {"independent": {0: run(80.0, counts)}, "graft": {0: run(81.0, [0.0, 0.0, 0.0])}}
        assert _plot(plan, per_arm, tmp_path / "p.png")
        widths.append(Image.open(tmp_path / "p.png").size[0])
    assert widths[1] == widths[0] * 3 // 2  # a third panel, as wide as each of the others


def test_time_left_goes_by_the_arm(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    plan = load_plan(PLAN)
    plan.results = str(tmp_path)
    runs = runs_of(plan)  # independent/seed0, graft/seed0, independent/seed1, graft/seed1
    assert time_left(runs, runs) is None  # nothing finished: no estimate
    for run, wall in zip(runs[:2], (600.0, 900.0)):
        run.archive.mkdir(parents=True)
        (run.archive / "summary.json").write_text("{}")
        write_json(run.archive / "study.json", {"finished": True, "wall_seconds": wall})
    assert time_left(runs, runs[2:]) == 600.0 + 900.0
    plan.arms.append(Arm(name="long"))
    assert time_left(runs, [*runs[2:], Run(plan.arms[-1], 0, tmp_path, tmp_path / "long")]) == 1500.0 + 750.0


def test_plan_errors_name_the_arm(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    plan = tmp_path / "plan.yaml"
    plan.write_text("name: x\nconfig: configs/quickstart.yaml\narms:\n  - name: a\n    overrides: [optim.lrr=1]\n")
    with pytest.raises(ConfigError, match=r"arm a: command line: unknown key 'optim.lrr' \(did you mean 'optim.lr'"):
        load_plan(plan)
    plan.write_text("name: x\nconfig: configs/quickstart.yaml\narms:\n  - name: a\n  - name: a\n")
    with pytest.raises(ConfigError, match="distinct name"):
        load_plan(plan)
    plan.write_text("name: x\nconfig: configs/quickstart.yaml\nseed: [1]\narms:\n  - name: a\n")
    with pytest.raises(ConfigError, match="unknown key 'seed' \\(did you mean 'seeds'"):
        load_plan(plan)
    plan.write_text("name: x\nconfig: configs/quickstart.yaml\nreference: b\narms:\n  - name: a\n")
    with pytest.raises(ConfigError, match="no arm named 'b'"):
        load_plan(plan)


def test_runs_go_seed_by_seed(monkeypatch):
    monkeypatch.chdir(ROOT)
    plan = load_plan(PLAN)
    assert [r.label for r in runs_of(plan)] == ["independent/seed0", "graft/seed0", "independent/seed1",
                                                "graft/seed1"]


def test_command_line_overrides_are_checked_and_set_the_process_count(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert {a.nproc for a in load_plan(PLAN).arms} == {2}
    # data_parallel=2 from graft-study's command line: 2 networks of 2 replicas, 4 processes
    # (with 2 processes the run would have trained 1 network, silently).
    plan = load_plan(PLAN, ["data_parallel=2"])
    assert {a.nproc for a in plan.arms} == {4}
    assert "--nproc_per_node=4" in command(plan, runs_of(plan)[0], extra=["data_parallel=2"])
    with pytest.raises(ConfigError, match="arm independent: command line: unknown key 'epoch'"):
        load_plan(PLAN, ["epoch=3"])


def test_final_weights_of_hand_made_checkpoints(tmp_path):
    def save(net, epoch, scale, dead=(), run=tmp_path):
        model = {"conv.weight": torch.full((4, 3, 3, 3), scale), "bn.running_mean": torch.zeros(4)}
        model["conv.weight"][list(dead)] = 0.001  # invalid filters: L1 norm 0.027
        checkpoint.save_epoch(run, net, {}, {"epoch": epoch, "model": model}, keep=3)

    save(0, 0, 5.0)  # an older epoch: only the last one counts
    save(0, 2, 1.0)
    assert final_weights(tmp_path, 1) is None  # one network: nothing to compare
    assert final_weights(tmp_path, 2) is None  # network 1 has no checkpoint
    save(1, 2, 2.0)
    record = final_weights(tmp_path, 2)
    # net0 against its ring peer net1: |2 - 1| / |1| = 1; net1 against net0: |1 - 2| / |2| = 0.5.
    assert record["per_network"] == [1.0, 0.5] and record["final_distance"] == 0.75
    assert record["epoch"] == 2 and record["layers"] == 1
    assert record["invalid_in_both"] == {"0.1": 0.0, "0.01": 0.0}
    # Filter 1 is invalid in both networks: a graft cannot revive it; 0 and 2, 3 it can.
    save(0, 0, 1.0, dead=[0, 1], run=tmp_path / "dead")
    save(1, 0, 2.0, dead=[1, 2, 3], run=tmp_path / "dead")
    record = final_weights(tmp_path / "dead", 2, thresholds=(0.1, 0.01))
    assert record["invalid_in_both"] == {"0.1": 1.0, "0.01": 0.0}
    assert record["invalid_in_both_per_network"] == [{"0.1": 1, "0.01": 0}] * 2
    save(1, 3, 2.0)  # the networks' last checkpoints disagree: not a finished run
    assert final_weights(tmp_path, 2) is None


def study(tmp_path, *args, **kw):
    cmd = [sys.executable, "-m", "graft.study", str(PLAN), "--root", str(tmp_path / "runs"),
           "--results", str(tmp_path / "results"), *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kw)


def test_tiny_study_interrupted_and_continued(tmp_path):
    runs, results = tmp_path / "runs" / "tiny", tmp_path / "results"
    first = study(tmp_path, "--max-runs", "1")
    out = first.communicate(timeout=300)[0]
    assert first.returncode == 0, out[-3000:]
    assert "[1/4] independent/seed0" in out and "stopped after 1 run(s)" in out
    assert (results / "tiny" / "independent" / "seed0" / "summary.json").exists()

    # Interrupt the next run (graft/seed0) once its first epoch is saved; it must stop cleanly.
    second = study(tmp_path)
    saved = runs / "graft" / "seed0" / "checkpoints" / "net1" / "epoch0001.pt"
    deadline = time.monotonic() + 240
    while not saved.exists() and time.monotonic() < deadline and second.poll() is None:
        time.sleep(0.05)
    assert saved.exists(), second.communicate()[0][-3000:]
    second.send_signal(signal.SIGTERM)
    out = second.communicate(timeout=120)[0]
    assert second.returncode == 130, out[-3000:]
    assert "interrupted: graft/seed0 stopped; the same command resumes it" in out
    assert not (results / "tiny" / "graft" / "seed0").exists()  # not finished, not archived

    dry = subprocess.run([sys.executable, "-m", "graft.study", str(PLAN), "--root", str(tmp_path / "runs"),
                          "--results", str(results), "--dry-run"], cwd=ROOT, env=env(), capture_output=True,
                         text=True)
    assert "# graft/seed0 (resumes)" in dry.stdout and "independent/seed0" not in dry.stdout

    third = study(tmp_path)
    out = third.communicate(timeout=400)[0]
    assert third.returncode == 0, out[-3000:]
    assert "1 of 4 runs finished" in out and "independent/seed0 ->" not in out  # not run again
    assert "resuming after epoch" in out
    state = json.loads((runs / "graft" / "seed0" / "study.json").read_text())
    assert len(state["attempts"]) == 2 and state["finished"]
    assert {a["machine"] for a in state["attempts"]} == {machine_name()}
    assert len(json.loads((runs / "independent" / "seed0" / "study.json").read_text())["attempts"]) == 1
    records = [json.loads(line) for line in (results / "tiny" / "graft" / "seed0" / "metrics.jsonl").open()]
    assert sorted((r["network"], r["epoch"]) for r in records) == [(n, e) for n in (0, 1) for e in range(3)]

    report = (results / "tiny.md").read_text()
    assert "Status: 4 of 4 runs finished" in report
    for label in ("independent/seed0", "graft/seed0", "independent/seed1", "graft/seed1"):
        summary = json.loads((results / "tiny" / label / "summary.json").read_text())
        final = sum(n["final_test_acc"] for n in summary["test"]["networks"].values()) / 2
        assert f"| {label} | 3 | {final:.2f} |" in report
    assert "| graft | independent | final | 2 |" in report
    assert "graft vs independent, final:" in report
    assert "| independent | 2 | 2 |" in report and "| graft | 2 | 2 |" in report
    distances = {label: json.loads((results / "tiny" / label / "weights.json").read_text())["final_distance"]
                 for label in ("independent/seed0", "graft/seed0", "independent/seed1", "graft/seed1")}
    assert all(d > 0 for d in distances.values())
    assert f"| {(distances['graft/seed0'] + distances['graft/seed1']) / 2:.3f} ± " in report

    # A run archived without weights.json (as before it existed), or with one from before the
    # invalid-filter overlap, gets a whole one from --report while its checkpoints are still there.
    weights = results / "tiny" / "graft" / "seed0" / "weights.json"
    assert set(json.loads(weights.read_text())["invalid_in_both"]) == {"0.1", "0.01"}
    weights.unlink()
    (results / "tiny" / "graft" / "seed1" / "weights.json").write_text(json.dumps({"final_distance": 0.5}))
    subprocess.run([sys.executable, "-m", "graft.study", str(PLAN), "--root", str(tmp_path / "runs"),
                    "--results", str(results), "--report"], cwd=ROOT, env=env(), check=True, capture_output=True)
    for label in ("graft/seed0", "graft/seed1"):
        again = json.loads((results / "tiny" / label / "weights.json").read_text())
        assert again["final_distance"] == distances[label] and "invalid_in_both" in again
    assert f"Machines: A: {machine_name()}." in report
    assert report.count(" | A |") == 4 and "Runs on different machines" not in report

    # Runs of one arm on two machines are flagged; a run from a runner that did not record its
    # machine shows '-'.
    for label, machine in (("graft/seed1", "Other CPU, 8 cores, no GPU"), ("independent/seed1", None)):
        path = results / "tiny" / label / "study.json"
        state = json.loads(path.read_text())
        for attempt in state["attempts"]:
            attempt.pop("machine")
            if machine:
                attempt["machine"] = machine
        if machine:  # and its runner was killed outright, before it saved any wall time
            state["wall_seconds"] = 0.0
        write_json(path, state)
    subprocess.run([sys.executable, "-m", "graft.study", str(PLAN), "--root", str(tmp_path / "runs"),
                    "--results", str(results), "--report"], cwd=ROOT, env=env(), check=True, capture_output=True)
    report = (results / "tiny.md").read_text()
    assert f"Machines: A: {machine_name()}; B: Other CPU, 8 cores, no GPU. -: not recorded" in report
    assert " | B |" in report and " | - |" in report
    assert "**Runs on different machines** in arm(s) graft: wall times compare only within a machine." in report
    assert "differ from their arm" not in report
    assert report.count("| ≥ ") == 2 and "≥: an attempt of the run was killed" in report  # graft's row and the run's
    # Runs that were not what the plan now says (here: graft-study given epochs=4) are listed.
    subprocess.run([sys.executable, "-m", "graft.study", str(PLAN), "--root", str(tmp_path / "runs"),
                    "--results", str(results), "--report", "epochs=4"], cwd=ROOT, env=env(), check=True,
                   capture_output=True)
    report = (results / "tiny.md").read_text()
    assert "- graft/seed1: epochs: 3 in the run, 4 in the plan" in report
    pytest.importorskip("matplotlib")
    assert (results / "tiny.png").stat().st_size > 10_000


def test_overrides_of_what_the_study_sets_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ConfigError, match=r"command line: seed=1: graft-study sets seed for each run"):
        load_plan(PLAN, ["seed=1"])  # every 'seed' would have been the same run
    plan = tmp_path / "plan.yaml"
    plan.write_text("name: x\nconfig: configs/quickstart.yaml\narms:\n  - name: a\n    overrides: [output_dir=y]\n")
    with pytest.raises(ConfigError, match=r"arm a: overrides: output_dir=y: graft-study sets output_dir"):
        load_plan(plan)


def test_a_run_that_exits_0_without_a_summary_fails_the_study(tmp_path, monkeypatch, capsys):
    from graft import study
    from graft.study import runner

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(runner, "run_one", lambda plan, run, extra=(): (0, []))  # as if it wrote elsewhere
    assert study.main([str(PLAN), "--root", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]) == 1
    assert "independent/seed0 failed (exit 0, but no " in capsys.readouterr().err


def test_a_runs_wall_time_is_saved_while_it_trains(tmp_path, monkeypatch):
    """A runner killed outright (a session's end) had no finally: the wall time saved while the
    run trained is what the report counts. It is saved on a clock, not when the run prints (a
    study's runs print once an epoch)."""
    from graft.study import runner

    plan = load_plan(PLAN)
    plan.results, plan.root = str(tmp_path / "results"), str(tmp_path / "runs")
    run = runs_of(plan)[0]
    run.dir.mkdir(parents=True)
    silent = "import time; time.sleep(0.6)"
    monkeypatch.setattr(runner, "command", lambda plan, run, extra=(): [sys.executable, "-c", silent])
    monkeypatch.setattr(runner, "WALL_TIME_EVERY", 0.1)
    saved = []
    monkeypatch.setattr(runner, "write_state", lambda run, state: saved.append(state["wall_seconds"]))
    assert runner.run_one(plan, run) == (0, [])
    assert saved[0] == 0.0 and 0 < saved[1] < saved[-1] and len(saved) >= 3  # during the run, then at its end
    assert saved[-1] >= 0.6


def test_a_failed_run_stops_the_study_repeating_its_error_line(tmp_path, monkeypatch, capsys):
    """The run's own process fails (not a mocked run_one): its 'graft: error:' line is repeated
    under graft-study's, which names the run and its log."""
    from graft import study
    from graft.study import runner

    monkeypatch.chdir(ROOT)
    fail = "print('epoch 1/3'); print('graft: error: data.root: no such file: x.tar.gz'); raise SystemExit(1)"
    monkeypatch.setattr(runner, "command", lambda plan, run, extra=(): [sys.executable, "-c", fail])
    assert study.main([str(PLAN), "--root", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]) == 1
    log = tmp_path / "runs" / "tiny" / "independent" / "seed0" / "log.txt"
    assert capsys.readouterr().err.splitlines() == [
        f"graft-study: error: independent/seed0 failed (exit 1); see {log}. Fix the cause and run the same command "
        "to resume.", "  graft: error: data.root: no such file: x.tar.gz"]
    assert "epoch 1/3" in log.read_text()


def test_a_damaged_archive_is_named(tmp_path, monkeypatch, capsys):
    from graft import study

    monkeypatch.chdir(ROOT)
    archive = tmp_path / "results" / "tiny" / "graft" / "seed0"
    archive.mkdir(parents=True)
    (archive / "study.json").write_text('<<<<<<< HEAD\n{"finished": true}\n')  # a merge conflict
    assert study.main([str(PLAN), "--results", str(tmp_path / "results"), "--report"]) == 2
    assert f"graft-study: error: {archive / 'study.json'}: cannot read" in capsys.readouterr().err
    write_json(archive / "study.json", {"finished": True, "wall_seconds": 1.0, "attempts": []})
    (archive / "summary.json").write_text("{}")
    (archive / "metrics.jsonl").write_text("")
    assert study.main([str(PLAN), "--results", str(tmp_path / "results"), "--report"]) == 2
    assert f"{archive / 'metrics.jsonl'}: no epoch records" in capsys.readouterr().err


def test_changes_to_the_results_do_not_make_the_code_dirty(tmp_path):
    from graft.study.archive import code_version

    def git(*args):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "s.md").write_text("report\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("commit", "-qm", "c")
    (tmp_path / "results" / "s.md").write_text("report, rewritten after a run\n")
    assert code_version(tmp_path / "results", repo=tmp_path)["dirty"] is False
    assert code_version(None, repo=tmp_path)["dirty"] is True
    (tmp_path / "code.py").write_text("x = 2\n")
    assert code_version(tmp_path / "results", repo=tmp_path)["dirty"] is True


def test_what_the_report_says_of_code_versions():
    from graft.study.report import _versions

    assert _versions({"a": set(), "b": set()}, []) == []  # nothing finished: nothing claimed
    assert _versions({"a": {"c0ffee" * 7}, "b": {"c0ffee" * 7}}, [])[0] == ("Every run ran one commit, c0ffeec0ff, "
                                                                           "from a clean tree.")
    assert _versions({"a": {"1" * 40}, "b": {"2" * 40}}, [])[0].startswith("**Arms ran different commits**")
    said = "\n".join(_versions({"a": {"unknown"}, "b": {"unknown"}}, []))
    assert "**Code version unknown** for runs of arm(s) a, b" in said and "clean tree" not in said


@pytest.mark.parametrize("text,message", [
    ("name: a\nname: b\n", r"key 'name' given twice"),
    ("name: ..\nconfig: configs/quickstart.yaml\narms: [{name: a}]\n", r"name: '\.\.': a study needs a name"),
    ("name: x\nconfig: configs/quickstart.yaml\narms: [{name: ../out}]\n", r"arms: each arm needs a distinct name"),
    ("name: x\nconfig: configs/quickstart.yaml\nseeds: [-1]\narms: [{name: a}]\n",
     r"seeds: a list of distinct seeds >= 0"),
    ("name: x\nconfig: configs/quickstart.yaml\narms: [{name: a, overrides: [grafting.A=0, grafting.A=0.4]}]\n",
     r"arm a: overrides: grafting.A is given twice"),
    ("name: x\nconfig: configs/quickstart.yaml\narms: [{name: a, overrides: [data.root=nope.tar.gz]}]\n",
     r"arm a: data.root: no such file: nope.tar.gz"),
])
def test_a_plan_is_checked_when_it_loads(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(ROOT)
    plan = tmp_path / "plan.yaml"
    plan.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_plan(plan)


def test_bad_files_and_arguments_of_graft_study_are_one_line(tmp_path, monkeypatch, capsys):
    from graft import study

    monkeypatch.chdir(ROOT)
    binary = tmp_path / "plan.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    assert study.main([str(binary)]) == 2
    assert capsys.readouterr().err.strip() == f"graft-study: error: {binary}: not a text file; expected a YAML plan"
    with pytest.raises(SystemExit):
        study.main([str(PLAN), "--max-runs=-1"])
    assert "--max-runs must be >= 0" in capsys.readouterr().err
    # A results folder that cannot be written: one line, no traceback.
    blocked = tmp_path / "results"
    blocked.write_text("a file, not a folder")
    assert study.main([str(PLAN), "--results", str(blocked), "--report"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (f"graft-study: error: {blocked}: cannot write the study's report (a file stands "
                                    "where a folder should be); give --results a folder that can be written")
    assert "Traceback" not in err
    # An archived summary without the figures the report reads: named.
    archive = tmp_path / "res" / "tiny" / "graft" / "seed0"
    archive.mkdir(parents=True)
    write_json(archive / "study.json", {"finished": True, "wall_seconds": 1.0, "attempts": []})
    (archive / "summary.json").write_text("{}")
    (archive / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "network": 0, "val_acc": 1.0}) + "\n")
    assert study.main([str(PLAN), "--results", str(tmp_path / "res"), "--report"]) == 2
    assert f"graft-study: error: {archive}: an archived file lacks a value the report needs" in capsys.readouterr().err
