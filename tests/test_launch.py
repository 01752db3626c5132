"""graft-run, and what a user sees when a run under torchrun goes wrong: one line per problem."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

from graft import checkpoint, launch
from graft.errors import REPORTED_BY_LAUNCHER
from helpers import ROOT, env, torchrun

QUICKSTART = ROOT / "configs" / "quickstart.yaml"
FIXTURE = ROOT / "tests" / "fixtures" / "cifar10_sample.tar.gz"
STOPPED = "graft: stopped by {}: the workers stopped between steps; the last complete checkpoint is intact; {}"
RERUN = "rerun the same command to resume"


def tiny(tmp_path, *overrides, epochs=1):
    """Overrides for a run of seconds: ResNet-8 on a few hundred images of the fixture."""
    return [f"output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", "model=resnet8",
            f"epochs={epochs}", "batch_size=50", "data.train_subset=200", "data.test_subset=100", "progress=false",
            *overrides]


def graft_run(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "graft.launch", *map(str, args)], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout, **kw)


def error_lines(text):
    return [line for line in text.splitlines() if line.startswith("graft: error:")]


def test_graft_run_is_a_console_script():
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python 3.11+)
    assert '\ngraft-run = "graft.launch:main"\n' in pyproject and '\ngraft-train = "graft.train:main"\n' in pyproject


def test_torchrun_options_go_to_torchrun_and_the_rest_to_graft():
    args, config, overrides, printing = launch.parse_args([
        "--nnodes=2", "--nproc_per_node", "4", "--rdzv-backend", "c10d", "--rdzv-endpoint", "head:29500",
        "--rdzv-id", "7", "--max-restarts=3", "--rdzv-conf", "join_timeout=60", "--config", "c.yaml", "epochs=3",
        "optim.lr=0.1"])
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend, args.rdzv_endpoint, args.rdzv_id) == \
        ("2", "4", "c10d", "head:29500", "7")
    assert args.max_restarts == 3 and args.rdzv_conf == "join_timeout=60" and not args.standalone
    assert (config, overrides, printing) == ("c.yaml", ["epochs=3", "optim.lr=0.1"], False)
    assert args.module and args.training_script == "graft.train"
    assert args.training_script_args == ["--config", "c.yaml", "epochs=3", "optim.lr=0.1"]
    args, config, overrides, _ = launch.parse_args(["--standalone", "epochs=1"])
    assert args.standalone and config is None and args.training_script_args == overrides == ["epochs=1"]


@pytest.mark.parametrize("argv,message", [
    (["--config", "c.yaml", "epochs=3", "--nproc_per_node=2"],
     "torchrun options and --config go before the key=value overrides: --nproc_per_node=2"),
    (["-m", "graft.train", "--config", "c.yaml"], "graft-run starts 'python -m graft.train' itself"),
    ([], "graft-run: nothing to run: give --config FILE"),
])
def test_bad_command_lines_print_usage(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        launch.parse_args(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: graft-run [torchrun options] --config FILE [key=value ...]") and message in err


@pytest.mark.parametrize("args,line", [
    (["--config", QUICKSTART, "optim.lrr=0.1"],
     "graft: error: command line: unknown key 'optim.lrr' (did you mean 'optim.lr'?)"),
    (["--config", QUICKSTART, "epochs=abc"], "graft: error: command line: epochs: expected int, got 'abc'"),
    (["--config", QUICKSTART, "batch_size=0"], "graft: error: command line: batch_size: must be >= 1; got 0"),
    (["--config", "nope.yaml"], "graft: error: nope.yaml: cannot read config file: No such file or directory"),
    (["--config", QUICKSTART, "data.root=nope.tar.gz"],
     "graft: error: data.root: no such file: nope.tar.gz (expected a .tar.gz of train/ and test/ ImageFolder trees)"),
    (["--config", QUICKSTART, "data.name=cifar10", "data.root=nowhere"],
     "graft: error: data.root: cifar10 not found: expected the python-version batches in nowhere/cifar-10-batches-py "
     "(set data.root to the folder holding cifar-10-batches-py/, data.download=true to fetch them when online, or "
     "data.name=tar data.root=FILE.tar.gz for a .tar.gz of train/ and test/ image folders)"),
])
def test_bad_config_or_data_stops_before_any_worker_starts(args, line, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(launch.torchrun, "run", lambda _: pytest.fail("workers started"))
    assert launch.main(["--standalone", "--nproc_per_node=2", *map(str, args)]) == 1
    out, err = capsys.readouterr()
    assert (out, err) == ("", line + "\n")


def test_empty_config_file_is_refused(tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("# to do\n")
    assert launch.main(["--config", str(tmp_path / "empty.yaml")]) == 1
    assert error_lines(capsys.readouterr().err) == [
        f"graft: error: {tmp_path / 'empty.yaml'}: empty config file (no keys): nothing says what to train; start "
        "from one of configs/ (configs/quickstart.yaml is the smallest)"]


def test_a_config_error_is_one_line_and_nothing_else():
    proc = graft_run("--standalone", "--nproc_per_node=2", "--config", QUICKSTART, "epochs=abc")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == "graft: error: command line: epochs: expected int, got 'abc'\n"


def test_failure_lines_are_distinct_and_say_how_each_worker_ended(tmp_path):
    def failure(local_rank, exitcode, message=None):
        path = tmp_path / f"error{local_rank}.json"
        if message is not None:
            path.write_text(json.dumps({"message": message, "timestamp": 1}))
        return ProcessFailure(local_rank, 1000 + local_rank, exitcode, str(path))

    same = "graft: error: amp: fp16 needs CUDA"
    error = ChildFailedError("graft.train", {
        0: failure(0, 1, same), 1: failure(1, 1, same), 2: failure(2, -signal.SIGKILL), 3: failure(3, 1),
        4: failure(4, 1, "graft: error: rank 4 (network 4): data.root: cannot read archive x.tar.gz")})
    assert launch.failure_lines(error) == [
        same, "graft: error: rank 2 was killed by SIGKILL",
        "graft: error: rank 3 exited with code 1; its output above says why",
        "graft: error: rank 4 (network 4): data.root: cannot read archive x.tar.gz"]
    # For a script, whose own messages count ranks within a network: the network and that rank.
    assert launch.failure_lines(error, replicas=2)[1:3] == [
        "graft: error: network 1 (its rank 0) was killed by SIGKILL",
        "graft: error: network 1 (its rank 1) exited with code 1; its output above says why"]
    # Workers torchrun stopped because another failed: their lines are its consequence.
    stopped = ChildFailedError("graft.train", {
        0: failure(5, 1, "graft: error: rank 0 (network 0): x/config.yaml: cannot write the run's config (disk full)"),
        1: failure(6, 1, "graft: error: rank 1 (network 1): received SIGTERM: stopped between steps; ...")})
    assert launch.failure_lines(stopped) == [
        "graft: error: rank 0 (network 0): x/config.yaml: cannot write the run's config (disk full)"]
    # So are a lost connection to a stopped peer and a replica whose leader refused to graft.
    nan = "graft: error: epoch 2: NaN or Inf weights in network 1 (layer 'fc.weight'); nobody grafts, ..."
    lost = ("graft: error: rank 2 (network 1): communication with the other ranks failed (RuntimeError: Connection "
            "closed by peer); a peer probably stopped first: see its error")
    refused = ("graft: error: rank 1, network 0: epoch 2: rank 0 refused to graft (see its error); the weights stay "
               "as they were")
    consequences = ChildFailedError("graft.train", {0: failure(20, 1, nan), 1: failure(21, 1, refused),
                                                    2: failure(22, 1, lost)})
    assert launch.failure_lines(consequences) == [nan]
    alone = ChildFailedError("graft.train", {2: failure(23, 1, lost)})
    assert launch.failure_lines(alone) == [lost]  # nothing else said why: kept
    # Lines that differ only in the rank they name (every network found the same bad data): one.
    bad = "data.root: d holds 1 class(es); classification needs 2 or more class folders"
    alike = ChildFailedError("graft.train", {
        r: failure(10 + r, 1, f"graft: error: rank {r} (network {r // 2}): {bad}") for r in range(4)})
    assert launch.failure_lines(alike) == [f"graft: error: ranks 0, 1, 2, 3 (networks 0, 1): {bad}"]


def test_how_a_worker_reports_an_error(tmp_path, monkeypatch, capsys):
    """One line. A config error is the same on every rank: rank 0 says it. Under torchrun the line
    also goes into the worker's error file; under graft-run only there (graft-run prints it)."""
    from graft.cli import report_error
    from graft.errors import ConfigError, PeerFailed, PeerTimeout

    error_file = tmp_path / "error.json"
    report_error(ConfigError("command line: epochs: expected int, got 'abc'"), 1)
    report_error(checkpoint.CheckpointError("x.pt: unreadable checkpoint"), 1, 1, distributed=True)
    assert capsys.readouterr().err == "graft: error: rank 1 (network 1): x.pt: unreadable checkpoint\n"
    # A failure every rank gathered is said once, by rank 0, with its reason.
    failed = PeerFailed("network 1 (rank 1) cannot resume: x.pt: unreadable")
    for rank in (0, 1, 2, 3):
        report_error(failed, rank, rank, distributed=True)
    assert capsys.readouterr().err == "graft: error: network 1 (rank 1) cannot resume: x.pt: unreadable\n"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    report_error(ConfigError("command line: epochs: expected int, got 'abc'"), 1)
    assert capsys.readouterr().err == ""
    line = json.loads(error_file.read_text())["message"]
    assert line == "graft: error: command line: epochs: expected int, got 'abc'"
    monkeypatch.setenv("GRAFT_RUN", "1")
    report_error(PeerTimeout("rank 1: network 0 (rank 0) did not arrive"), 1, 1, distributed=True)
    assert capsys.readouterr().err == ""
    assert json.loads(error_file.read_text())["message"] == "graft: error: rank 1: network 0 (rank 0) did not arrive"


def test_a_worker_error_is_printed_once_without_a_traceback(tmp_path):
    proc = graft_run("--standalone", "--nproc_per_node=2", "--config", QUICKSTART, *tiny(tmp_path, "amp=fp16"))
    assert proc.returncode == 1
    # Both workers fail with this line: graft-run prints it once, and the workers themselves not at all.
    assert proc.stderr.splitlines() == [
        "graft: error: amp: fp16 needs CUDA; on the CPU use amp=bf16 (fast where the CPU has AVX512-BF16 or AMX)"]


def test_a_run_through_graft_run(tmp_path):
    proc = graft_run("--standalone", "--nproc_per_node=2", "--max-restarts=0", "--config", QUICKSTART, *tiny(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("grafting: entropy, A 0.4, c 500, 10 bins, from ring peer k-1 (0 -> 1 -> 0), at each epoch's end"
            in proc.stdout)
    assert "summary (test accuracy, %)" in proc.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["network"] for r in records) == [0, 1]
    assert proc.stderr == ""


@pytest.mark.parametrize("sig,who,resume,hint", [
    (signal.SIGINT, "group", "auto", RERUN),
    (signal.SIGTERM, "launcher", "never",
     "to resume, rerun with output_dir=(the directory the run named) resume=auto")],
    ids=["ctrl-c", "sigterm-to-the-launcher-under-resume-never"])
def test_a_stop_ends_in_one_line(tmp_path, sig, who, resume, hint):
    """Ctrl-C reaches every process of the terminal's group; a scheduler may signal the launcher only.
    Under resume=never the same command would start afresh, so the line must not suggest it."""
    proc = subprocess.Popen([sys.executable, "-m", "graft.launch", "--standalone", "--nproc_per_node=2", "--config",
                             str(QUICKSTART), *tiny(tmp_path, f"resume={resume}", epochs=50)], cwd=ROOT, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    run_dir = tmp_path / "run"
    deadline = time.monotonic() + 240
    try:
        while not all(checkpoint.epoch_path(run_dir, k, 0).exists() for k in (0, 1)):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint came"
            time.sleep(0.05)
        os.killpg(proc.pid, sig) if who == "group" else proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + sig
    assert stderr.splitlines() == [STOPPED.format(sig.name, hint)]
    for k in (0, 1):
        newest, _, skipped = checkpoint.newest_complete(run_dir, k)
        assert newest >= 0 and not skipped


@pytest.mark.parametrize("launched", [True, False], ids=["graft-run-worker", "anyone-else"])
def test_ctrl_c_while_a_worker_starts_is_quiet(launched):
    """A Ctrl-C can land while a worker still imports torch (a minute on a busy machine): a
    graft-run worker then exits 130 with no traceback. Anyone else importing graft keeps Python's
    own KeyboardInterrupt."""
    environ = {k: v for k, v in env().items() if k != REPORTED_BY_LAUNCHER}
    if launched:
        environ[REPORTED_BY_LAUNCHER] = "1"
    code = "import os, signal, graft; os.kill(os.getpid(), signal.SIGINT); import time; time.sleep(5)"
    # SIGINT as a terminal leaves it: a suite started in the background (nohup ... &) passes it on ignored.
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=environ, capture_output=True, text=True,
                          timeout=120, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if launched:
        assert (proc.returncode, proc.stderr) == (130, "")
    else:
        assert "KeyboardInterrupt" in proc.stderr


# ---------------------------------------------------------------- plain torchrun -m graft.train


def test_under_torchrun_a_config_error_is_printed_by_one_rank(tmp_path):
    proc = torchrun(2, "-m", "graft.train", "--config", QUICKSTART, "epochs=abc")
    assert proc.returncode != 0
    assert error_lines(proc.stderr) == ["graft: error: command line: epochs: expected int, got 'abc'"]


def test_under_torchrun_a_waiting_rank_stops_on_sigterm(tmp_path):
    """Rank 0 finds no data; rank 1 waits for it at "data ready". torchrun stops it with SIGTERM,
    which must land in that wait: a wait that ignored it would end by SIGKILL 30 s later, silently."""
    missing = f"data.root={tmp_path}/nope.tar.gz"
    proc = torchrun(2, "-m", "graft.train", "--config", QUICKSTART, *tiny(tmp_path, missing))
    assert proc.returncode != 0
    assert error_lines(proc.stderr) == [
        f"graft: error: rank 0 (network 0): data.root: no such file: {tmp_path}/nope.tar.gz (expected a .tar.gz of "
        "train/ and test/ ImageFolder trees)",
        "graft: error: rank 1 (network 1): received SIGTERM: stopped between steps; it stopped before its first "
        "checkpoint: nothing to resume"]


def test_output_is_line_buffered_into_a_file(tmp_path):
    """nohup and Slurm send stdout to a file: each epoch's table must be there when the epoch ends."""
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "graft.train", "--config", str(QUICKSTART),
                                 *tiny(tmp_path, epochs=50)], cwd=ROOT, env=env(), stdout=out,
                                stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 240
            while "epoch 1/50" not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
                time.sleep(0.05)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    assert "topology: 1 network(s)" in log.read_text()


def test_a_script_and_its_arguments_go_to_the_script_worker(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("")
    args, config, words, printing = launch.parse_args(["--standalone", "--nproc_per_node=4", "--data-parallel", "2",
                                                       str(script), "--epochs", "3", "--out", "runs/net{network}"])
    assert config is None and not printing and args.module and args.training_script == "graft.script_worker"
    assert args.training_script_args == ["--", str(script), "--epochs", "3", "--out", "runs/net{network}"]
    assert args.data_parallel == 2
    args, *_ = launch.parse_args(["--nproc_per_node=2", "-m", "mypkg.train", "--lr", "0.1"])
    assert args.training_script_args == ["-m", "mypkg.train", "--lr", "0.1"]
    # In graft's trainer mode --data-parallel is the config's data_parallel.
    args, _, overrides, _ = launch.parse_args(["--data-parallel=2", "--config", "c.yaml", "epochs=1"])
    assert overrides == ["epochs=1", "data_parallel=2"]
