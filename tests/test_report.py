"""The run summary: final and best accuracy per network, the ensemble's, mean and spread."""

import json

import pytest

from graft.config import Config
from graft.records import EpochRecord
from graft.report import MetricsLog, RunLog, epoch_table, summarize


def record(network, epoch, test_acc, ensemble_acc, **more):
    return EpochRecord(epoch, network, acc=test_acc, ensemble_acc=ensemble_acc, **more)


def test_final_is_the_last_epoch_and_best_the_maximum():
    records = [record(1, 2, 50.0, 61.0), record(0, 0, 40.0, 45.0), record(1, 0, 42.0, 45.0),
               record(0, 1, 60.0, 62.0), record(1, 1, 55.0, 62.0), record(0, 2, 58.0, 61.0),
               record(0, 2, 57.0, 61.0)]  # epoch 2 of network 0 written twice: the later counts
    s = summarize(records)
    assert s["networks"]["0"] == {"final_acc": 57.0, "best_acc": 60.0, "best_epoch": 1, "epochs": 3}
    assert s["networks"]["1"] == {"final_acc": 50.0, "best_acc": 55.0, "best_epoch": 1, "epochs": 3}
    assert s["final_acc_mean"] == pytest.approx(53.5) and s["final_acc_std"] == pytest.approx(4.9497, abs=1e-4)
    assert (s["ensemble_final_acc"], s["ensemble_best_acc"]) == (61.0, 62.0)
    assert "       0   57.00   60.00          2" in s["table"]  # epochs print from 1


def test_one_network_has_no_spread():
    s = summarize([record(0, 0, 30.0, 30.0), record(0, 1, 35.0, 35.0)])
    assert (s["final_acc_std"], s["best_acc_std"], s["final_acc_mean"]) == (0.0, 0.0, 35.0)


def test_epoch_table_shows_mean_alpha_and_peer_distance_or_a_dash():
    base = dict(epoch=0, lr=0.1, train_loss=2.0, train_acc=20.0, acc=25.0, ensemble_acc=30.0, filters=48,
                invalid_filters={"0.1": 1}, images_per_sec=100.0, epoch_seconds=1.0, graft_seconds=0.01)
    table = epoch_table([EpochRecord(network=0, mean_alpha=0.4567, mean_peer_distance=0.01234, **base),
                         EpochRecord(network=1, **base)], 3, [0.1])
    head, grafted, plain = table.splitlines()[1:]
    assert head.split()[5:7] == ["alpha", "dist"]
    assert grafted.split()[5:7] == ["0.457", "0.012"] and plain.split()[5:7] == ["-", "-"]


def test_resumed_checkpoint_records_win_over_the_logged_ones(tmp_path):
    """metrics.jsonl can be ahead of the checkpoints: epoch 1 logged with a late graft (an extended
    run) that was never saved, epoch 2 logged but not checkpointed. A resume after epoch 1 keeps the
    checkpoints' records and adds the one that was never logged."""
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write([record(k, e, 50.0 + e, 60.0) for e in (0, 1, 2) for k in (0, 1)])
    log.replace([record(0, 1, 51.0, 60.0, peer=1)])  # in place: one record per (epoch, network)
    assert [(r.epoch, r.network, r.peer) for r in log.read()] == [
        (0, 0, None), (0, 1, None), (1, 0, 1), (1, 1, None), (2, 0, None), (2, 1, None)]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    lines.remove(json.dumps(record(1, 1, 51.0, 60.0).to_json()))  # as if stopped before network 1's epoch 1 was logged
    (tmp_path / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    resumed = [record(k, 1, 51.0, 60.0, peer=None) for k in (0, 1)]
    RunLog(Config(output_dir=str(tmp_path), epochs=4), first_epoch=2, resumed=resumed)
    assert sorted((r.epoch, r.network, r.peer) for r in log.read()) == [
        (0, 0, None), (0, 1, None), (1, 0, None), (1, 1, None)]


def test_the_end_of_a_run_closes_tensorboard(tmp_path):
    """Its writer's thread and file stay open until closed (a process that trains twice, a test
    suite, a notebook)."""
    pytest.importorskip("torch.utils.tensorboard")
    out = RunLog(Config(output_dir=str(tmp_path), epochs=1), first_epoch=0, resumed=[])
    invalid = {str(float(t)): 0 for t in Config().invalid_thresholds}
    out.epoch([record(k, 0, 50.0, 60.0, lr=0.1, train_loss=1.0, train_acc=50.0, filters=8, invalid_filters=invalid)
               for k in (0, 1)])
    writer = out.tensorboard.writer
    assert writer is not None and writer.all_writers
    assert out.finish(None)["networks"]
    assert out.tensorboard.writer is None and writer.all_writers is None  # SummaryWriter.close() empties it
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_a_record_keeps_the_on_disk_keys_of_its_split():
    """metrics.jsonl keeps the keys of every version: the evaluated split's accuracy under
    val_acc or test_acc; a line of an older version reads back with its split."""
    val = EpochRecord(3, 1, split="val", loss=0.5, acc=61.0, ensemble_acc=62.0)
    line = val.to_json()
    assert (line["val_acc"], line["val_loss"], line["split"]) == (61.0, 0.5, "val") and "test_acc" not in line
    assert EpochRecord.from_json(line) == val
    old = {"epoch": 0, "network": 0, "lr": 0.1, "test_loss": 1.0, "test_acc": 40.0, "peer": 1, "graft_seconds": 0.1,
           "mean_alpha": 0.5, "graft": [{"layer": "a", "alpha": 0.5}], "unknown_later_key": 1}
    r = EpochRecord.from_json(old)
    assert (r.split, r.acc, r.loss, r.grafts, r.mean_alpha) == ("test", 40.0, 1.0, 1, 0.5)
