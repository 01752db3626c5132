"""Train N networks with filter grafting: ``torchrun --nproc_per_node=N -m graft.train --config X``.

One process per network (or per replica in hybrid mode). Each epoch: train, evaluate (each
network as trained, and the ensemble of all networks), graft from the ring peer, checkpoint, log.
One network, or ``grafting.enabled=false``, is the baseline through the same code path.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoint, core, distill, ring
from .config import NOTHING_TO_RUN, Config, ConfigError, dump_config, load_config, save_config
from .data import DataError, InMemoryLoader, build_folder_loaders, load_arrays
from .errors import REPORTED_BY_LAUNCHER, UserError
from .grafter import Grafter
from .models import build_model
from .report import MetricsLog, Progress, TensorBoardLog, epoch_table, summarize


def initial_lr(cfg: Config, network: int, networks: int) -> float:
    """difflr (the official code's default for diversity): network k = 1..N starts at
    lr * (1 + cos(pi * (N - k) / N)) / 2, so the last network gets the full lr."""
    if not cfg.optim.difflr:
        return cfg.optim.lr
    k = network + 1
    return cfg.optim.lr * (1 + math.cos(math.pi * (networks - k) / networks)) / 2


def build_scheduler(cfg: Config, optimizer, steps_per_epoch: int):
    """Returns (scheduler, steps it per iteration?). Cosine is written in closed form, step by
    step, so that a resumed run with more ``epochs`` follows the longer curve from where it is."""
    if cfg.optim.schedule == "cosine":
        total = cfg.epochs * steps_per_epoch
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))), True
    if cfg.optim.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, cfg.optim.step_size, cfg.optim.gamma), False
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0), False


class Stop(UserError):
    """SIGTERM / SIGINT: stop between steps; the last complete checkpoint stays intact."""


class TrainingError(UserError):
    """Training cannot go on (the loss is NaN or Inf)."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _install_signal_handlers() -> dict:
    """Turn SIGTERM and SIGINT into Stop; returns the handlers they had."""
    def handler(signum, _frame):
        # Under srun a worker gets SIGTERM twice (from slurmstepd, then from torchrun's agent):
        # the second must not interrupt the first's clean stop.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Stop(f"received {signal.Signals(signum).name}: stopped; the last complete checkpoint "
                   "is intact, rerun the same command to resume")
    return {s: signal.signal(s, handler) for s in STOP_SIGNALS}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_one_epoch(model, loader, loss_fn, optimizer, scheduler, per_iter, scaler, autocast, progress,
                    device, group=None) -> dict:
    """One epoch of SGD. Loss, accuracy and images/s are the network's: summed over its replicas
    (``group``) in hybrid mode, where DDP talks to the replicas in every step."""
    model.train()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    with ring.collectives() if group is not None else contextlib.nullcontext():
        for images, labels in progress(loader):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            with autocast():
                outputs = model(images)
                loss = loss_fn(outputs, labels, images)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            if per_iter:
                scheduler.step()
            total_loss += loss.detach() * labels.numel()
            correct += (outputs.argmax(1) == labels).sum()
            seen += labels.numel()
            progress.step(total_loss, correct, seen)
        seconds = time.perf_counter() - start
        if not per_iter:
            scheduler.step()
        totals = torch.stack([total_loss.double(), correct.double(), torch.tensor(float(seen), device=device)])
        if group is not None:
            dist.all_reduce(totals, group=group)
    loss_sum, correct_n, seen_n = totals.tolist()
    if not math.isfinite(loss_sum):
        raise TrainingError("training loss is NaN or Inf (try a lower optim.lr)")
    return {"train_loss": loss_sum / max(seen_n, 1), "train_acc": 100.0 * correct_n / max(seen_n, 1),
            "images_per_sec": seen_n / seconds, "train_seconds": seconds}


@torch.no_grad()
def evaluate(model, loader, autocast, device, split: str = "test") -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Loss and accuracy (keys named after ``split``), plus the softmax outputs (for the
    ensemble) and labels."""
    model.eval()
    probs, labels_all, loss_sum = [], [], torch.zeros((), device=device)
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast():
            outputs = model(images).float()
        loss_sum += F.cross_entropy(outputs, labels, reduction="sum")  # no host sync per batch
        probs.append(outputs.softmax(1))
        labels_all.append(labels)
    probs, labels = torch.cat(probs), torch.cat(labels_all)
    return {f"{split}_loss": loss_sum.item() / len(labels), f"{split}_acc": accuracy(probs, labels)}, probs, labels


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 in percent, from the integer count (a float32 mean would print 27.59999930858612)."""
    return 100.0 * int((probs.argmax(1) == labels).sum()) / len(labels)


def evaluate_network(model, loader, autocast, topo: ring.Topology, thresholds, split: str) -> dict:
    """Loss and accuracy on ``split``, the ensemble's accuracy and the invalid-filter counts (leaders)."""
    stats, probs, labels = evaluate(model, loader, autocast, topo.device, split)
    invalid = core.count_invalid_filters(model, thresholds)
    return {**stats, "ensemble_acc": ensemble_accuracy(topo, probs, labels), "filters": invalid["total"],
            "invalid_filters": {str(t): n for t, n in invalid["invalid"].items()}}


@ring.collectives()
def ensemble_accuracy(topo: ring.Topology, probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of the mean of all networks' softmax outputs (leaders only, one all_reduce)."""
    if topo.distributed:
        probs = probs.clone()
        dist.all_reduce(probs, group=topo.leader_group)
    return accuracy(probs, labels)


@torch.no_grad()
def final_test(model: nn.Module, test_loader, autocast, topo: ring.Topology, run_dir: Path) -> dict | None:
    """The test set, once, at the end of a run that selected on validation (``eval_split: val``):
    the final weights and the best-validation weights (best.pt), each network and the ensemble.
    Collective over the leaders; returns the result on rank 0, None elsewhere."""
    final, probs, labels = evaluate(model, test_loader, autocast, topo.device)
    best = checkpoint.load(checkpoint.network_dir(run_dir, topo.network) / "best.pt")
    model.load_state_dict(best["model"])  # the run is over: the final weights are in their checkpoint
    chosen, best_probs, _ = evaluate(model, test_loader, autocast, topo.device)
    mine = {"network": topo.network, "final_test_acc": final["test_acc"], "best_val_epoch": best["epoch"],
            "best_val_acc": best.get("acc", best.get("test_acc")), "best_val_test_acc": chosen["test_acc"]}
    ensemble = {"ensemble_final_test_acc": ensemble_accuracy(topo, probs, labels),
                "ensemble_best_val_test_acc": ensemble_accuracy(topo, best_probs, labels)}
    everyone = ring.all_gather_objects(topo, mine)
    if topo.rank != 0:
        return None
    return {"networks": {str(r["network"]): r for r in everyone}, **ensemble}


def make_grafter(cfg: Config, topo: ring.Topology) -> Grafter:
    """The config's grafting options on the run's topology."""
    g = cfg.grafting
    return Grafter(level=g.level, A=g.A, c=g.c, bins=g.bins, compat=g.compat, exchange=g.exchange, topology=topo)


def make_loaders(cfg: Config, topo: ring.Topology):
    """(train, eval, num_classes, test): ``test`` is None unless the run evaluates on validation
    every epoch and the test set at its end."""
    # Data order differs per network (not per replica), except in mutual distillation, where
    # every network must see the same batch to distill from the others' predictions on it.
    data_seed = cfg.seed if cfg.distill.mutual else cfg.seed + 1000 * topo.network
    if cfg.data.in_memory:
        if topo.local_rank == 0:  # decode (and cache) once per node; the other ranks read the cache
            data = load_arrays(cfg.data)
        ring.arrive(topo, "data ready")
        if topo.local_rank != 0:
            data = load_arrays(cfg.data)
        common = dict(device=topo.device, mean=data.mean, std=data.std, channels_last=cfg.channels_last)
        train_loader = InMemoryLoader(data.train, cfg.batch_size, train=True, seed=data_seed, drop_last=False,
                                      rank_in_group=topo.replica, group_size=topo.replicas, **common)
        eval_loader = InMemoryLoader(data.eval, cfg.eval_batch_size, train=False, **common)
        test_loader = InMemoryLoader(data.test, cfg.eval_batch_size, train=False, **common)
        return train_loader, eval_loader, data.num_classes, test_loader if cfg.data.eval_split == "val" else None
    train_loader, eval_loader, num_classes, test_loader = build_folder_loaders(
        cfg.data, cfg.batch_size, seed=data_seed, rank_in_group=topo.replica, group_size=topo.replicas)
    return train_loader, eval_loader, num_classes, test_loader if cfg.data.eval_split == "val" else None


def run(cfg: Config, topo: ring.Topology, log=print) -> dict | None:
    cfg = fresh_output_dir(cfg, topo, log)
    run_dir = Path(cfg.output_dir)
    networks = topo.networks
    grafting = cfg.grafting.enabled and networks > 1
    if topo.rank == 0:
        log(topo.describe())
        if not grafting:
            why = "one network" if networks == 1 else "grafting.enabled=false"
            log(f"baseline: no grafting ({why}); {networks} network(s) train independently")

    if cfg.distill.mutual and networks == 1:
        raise ConfigError("distill.mutual: needs 2 or more networks (--nproc_per_node)")
    seed_everything(cfg.seed + topo.network)  # replicas of one network share the model seed
    train_loader, eval_loader, data_classes, test_loader = make_loaders(cfg, topo)
    split = cfg.data.eval_split
    if len(train_loader) == 0:
        raise DataError(f"batch_size={cfg.batch_size}: larger than the training set of this network's "
                        "replica; nothing to train (lower batch_size)")
    if cfg.num_classes and cfg.num_classes < data_classes:
        raise ConfigError(f"num_classes: {cfg.num_classes}, but the data has {data_classes} classes")
    cfg = dataclasses.replace(cfg, num_classes=cfg.num_classes or data_classes)
    model = build_model(cfg.model, cfg.num_classes).to(topo.device)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    lr0 = initial_lr(cfg, topo.network, networks)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr0, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov)
    scheduler, per_iter = build_scheduler(cfg, optimizer, len(train_loader))
    use_amp = cfg.amp != "off"
    if cfg.amp == "fp16" and topo.device.type != "cuda":
        raise ConfigError("amp: fp16 needs CUDA; on the CPU use amp=bf16 (fast where the CPU has AVX512-BF16 or AMX)")
    amp_dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if use_amp and cfg.amp == "fp16" else None

    def autocast():
        return torch.autocast(topo.device.type, amp_dtype) if use_amp else contextlib.nullcontext()

    teachers = distill.load_teachers(cfg.distill.teachers, topo.device, cfg.channels_last, cfg.num_classes)
    loss_fn = distill.make_loss(cfg, teachers, topo.leader_group if networks > 1 else None)
    if topo.rank == 0 and (teachers or cfg.distill.mutual):
        log(f"distillation: {len(teachers)} teacher(s){', mutual' if cfg.distill.mutual else ''}, "
            f"tau {cfg.distill.tau:g}, weight {cfg.distill.weight:g}")
    grafter = make_grafter(cfg, topo)
    if grafting and cfg.grafting.level == "filter" and topo.rank == 0:
        alone = grafter.plan(model).convs_without_bn(model.state_dict())
        if alone:
            log(f"filter level: {len(alone)} conv(s) with no BatchNorm after them blend with their layer "
                f"alpha: {', '.join(alone)}")
    metrics = MetricsLog(run_dir / "metrics.jsonl") if topo.rank == 0 else None
    start_epoch, best, pending_graft = 0, -1.0, False
    if cfg.resume == "auto":
        start_epoch, best, pending_graft = resume(cfg, topo, model, optimizer, scheduler, scaler, metrics, log)
    if topo.rank == 0:  # only now: a refused resume leaves the run's config.yaml as it was
        save_config(cfg, run_dir / "config.yaml")
        if start_epoch == 0 and metrics.read():
            log(f"starting over: the metrics of the earlier run are kept in {metrics.set_aside()}")

    train_model = model
    if topo.replicas > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[topo.device.index] if topo.device.type == "cuda" else None,
            process_group=topo.network_group)
    if cfg.compile:
        train_model = torch.compile(train_model)

    show = cfg.progress and topo.local_rank == 0 and sys.stderr.isatty()
    tensorboard = TensorBoardLog(run_dir, purge_from=start_epoch) if topo.rank == 0 else None
    thresholds = tuple(cfg.invalid_thresholds)
    if pending_graft:
        grafter.graft(model, epoch=start_epoch - 1)
        if topo.rank == 0:
            log(f"grafted after epoch {start_epoch}: it was the last epoch of the run now extended")
    for epoch in range(start_epoch, cfg.epochs):
        train_loader.set_epoch(epoch)
        epoch_start = time.perf_counter()
        progress = Progress(show, f"net {topo.network} epoch {epoch + 1}/{cfg.epochs}", len(train_loader))
        lr = optimizer.param_groups[0]["lr"]
        record = {"epoch": epoch, "network": topo.network, "lr": lr}
        record.update(train_one_epoch(train_model, train_loader, loss_fn, optimizer, scheduler, per_iter, scaler,
                                      autocast, progress, topo.device, topo.network_group))
        ring.arrive(topo, f"epoch {epoch} trained")  # a dead peer is named here, not by a collective
        if topo.is_leader:  # each network as trained, before grafting, as the paper reports it
            record.update(evaluate_network(model, eval_loader, autocast, topo, thresholds, split))
            if record[f"{split}_acc"] > best:  # model selection on the evaluated split
                best = record[f"{split}_acc"]
                checkpoint.save_best(run_dir, topo.network, epoch, best, split, cfg.setup(networks),
                                     model.state_dict())
        grafted = grafting and epoch < cfg.epochs - 1
        if grafted:
            result = grafter.graft(model, epoch=epoch)
            record.update({"peer": result.peer, "graft_seconds": result.seconds, "graft_bytes": result.bytes})
            if result.report is not None:
                record["mean_alpha"] = result.mean_alpha
                record["mean_peer_distance"] = result.mean_peer_distance
                record["graft"] = result.records()
                record["entropy_table"] = result.table.tolist()
        else:
            record.update({"peer": None, "graft_seconds": 0.0, "graft_bytes": 0})
        record["epoch_seconds"] = time.perf_counter() - epoch_start
        if topo.is_leader:  # the resume point: grafted weights, ready for the next epoch
            checkpoint.save_epoch(run_dir, topo.network, epoch, {
                "setup": cfg.setup(networks), "best_acc": best, "grafted": grafted, "record": record,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler else None, "rng": checkpoint.capture_rng(topo.device),
            })
        records = ring.all_gather_objects(topo, record) if topo.is_leader else None
        if metrics is not None:
            metrics.write(records)
            tensorboard.write(records)
            log(epoch_table(records, cfg.epochs, thresholds))

    summary = None
    test = None
    if test_loader is not None and topo.is_leader:
        test = final_test(model, test_loader, autocast, topo, run_dir)
    records = metrics.read() if metrics is not None else []
    if records:
        summary = summarize(records, test)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log(summary["table"])
    return summary


def fresh_output_dir(cfg: Config, topo: ring.Topology, log=print) -> Config:
    """``resume: never`` with checkpoints in output_dir: start afresh in output_dir-1, -2, ...
    (rank 0 decides, everyone follows); nothing already saved is touched."""
    if cfg.resume != "never":
        return cfg
    base, path, n = cfg.output_dir, cfg.output_dir, 0
    while (Path(path) / "checkpoints").exists():
        n += 1
        path = f"{base}-{n}"
    path = ring.all_gather_objects(topo, path, leaders_only=False)[0]
    if path != base and topo.rank == 0:
        log(f"resume=never: {base} holds checkpoints; this run writes to {path}")
    return dataclasses.replace(cfg, output_dir=path)


def resume(cfg, topo, model, optimizer, scheduler, scaler, metrics, log) -> tuple[int, float, bool]:
    """Restart from the newest epoch every network completed (``resume: auto``).

    Returns (first epoch to train, best accuracy so far, whether that epoch's graft is still to
    do: it was the last epoch of a run now extended). Damaged checkpoint files are skipped (and
    named); the networks agree on the epoch with one collective.
    """
    run_dir = Path(cfg.output_dir)
    newest, saved, skipped = checkpoint.newest_complete(run_dir, topo.network)
    for reason in skipped:
        log(f"rank {topo.rank}: skipping damaged checkpoint: {reason}")
    if saved is not None:  # a foreign setup is named before the networks try to agree
        path = checkpoint.epoch_path(run_dir, topo.network, newest)
        checkpoint.check_setup(path, saved.get("setup"), cfg.setup(topo.networks))
    everyone = ring.all_gather_objects(topo, newest, leaders_only=False)
    agreed = min(everyone)
    if agreed < 0:
        if max(everyone) >= 0:
            raise checkpoint.CheckpointError(
                f"{run_dir}: networks {[r // topo.replicas for r, e in enumerate(everyone) if e < 0]} have no "
                "usable checkpoint while others do; cannot resume consistently (resume=never starts afresh "
                "in a new directory)")
        return 0, -1.0, False
    if agreed + 1 > cfg.epochs:
        raise ConfigError(f"epochs: {cfg.epochs}, but the run in {run_dir} already completed {agreed + 1} epochs: "
                          f"nothing to train. epochs={agreed + 1} or more extends it; {checkpoint.ELSEWHERE}")
    path = checkpoint.epoch_path(run_dir, topo.network, agreed)
    if not path.exists():
        raise checkpoint.CheckpointError(f"{path}: missing, but epoch {agreed} is the newest that every "
                                         "network completed; cannot resume consistently")
    # On the CPU: load_state_dict moves tensors to the model's device, and the RNG states must
    # stay CPU tensors for torch.set_rng_state.
    state = saved if agreed == newest else checkpoint.load(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):  # the curve as configured now: epochs may
        for group, base, f in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):  # have grown
            group["lr"] = base * f(scheduler.last_epoch)
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    checkpoint.restore_rng(state["rng"])
    if topo.is_leader:
        for later in checkpoint.remove_epochs_after(run_dir, topo.network, agreed):
            log(f"rank {topo.rank}: removed {later}: an epoch after {agreed + 1}, which is trained again")
        stale = checkpoint.set_aside_best_after(run_dir, topo.network, agreed)
        if stale:
            log(f"rank {topo.rank}: {stale.name}: best.pt came from an epoch after {agreed + 1}, which is "
                "trained again; set aside")
        # The agreed epoch's records, in case the run stopped between its checkpoints and the metrics.
        saved_records = ring.all_gather_objects(topo, state.get("record"))
    if metrics is not None:
        have = {(r["epoch"], r["network"]) for r in metrics.truncate(after_epoch=agreed)}
        metrics.write([r for r in saved_records if r and (r["epoch"], r["network"]) not in have])
        log(f"resuming after epoch {agreed + 1}/{cfg.epochs} (the newest epoch every network completed)")
    pending = not state.get("grafted", True) and cfg.grafting.enabled and topo.networks > 1 and agreed < cfg.epochs - 1
    if len(set(ring.all_gather_objects(topo, pending, leaders_only=False))) > 1:
        raise checkpoint.CheckpointError(f"{run_dir}: the networks' checkpoints of epoch {agreed} disagree on whether "
                                         "it was grafted (files of two different runs?); cannot resume consistently")
    return agreed + 1, state.get("best_acc", -1.0), pending


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="graft-train", description=__doc__.splitlines()[0],
        epilog="Overrides use dotted keys, e.g. optim.lr=0.05 grafting.enabled=false epochs=2")
    parser.add_argument("--config", "-c", help="YAML config file (without one: the defaults of graft/config.py)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (file + overrides, validated) as YAML and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    if args.config is None and not args.overrides and not args.print_config:
        if int(os.environ.get("RANK", "0")) == 0:
            parser.print_usage(sys.stderr)
            print(f"{parser.prog}: {NOTHING_TO_RUN}", file=sys.stderr)
        raise SystemExit(2)
    return args


def report_error(e: BaseException, topo: ring.Topology | None) -> None:
    """Say ``graft: error: ...`` in one line. A config error is the same on every rank: rank 0
    says it. Under torchrun the line also goes into the error file torchrun gives each worker,
    where its failure summary and graft-run find it; under graft-run only there (see errors.py)."""
    rank = topo.rank if topo is not None else int(os.environ.get("RANK", "0"))
    named = isinstance(e, (ConfigError, ring.PeerTimeout, ring.GraftError))  # the same on every rank, or names it
    where = f"rank {topo.rank} (network {topo.network}): " if topo and topo.distributed and not named else ""
    line = f"graft: error: {where}{e}"
    recorded = False
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        try:
            Path(error_file).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))
            recorded = True
        except OSError:
            pass
    if (recorded and os.environ.get(REPORTED_BY_LAUNCHER) == "1") or (isinstance(e, ConfigError) and rank != 0):
        return
    print(line, file=sys.stderr, flush=True)


def main(argv=None) -> int:
    if isinstance(sys.stdout, io.TextIOWrapper):  # epoch by epoch into a file too (nohup, a Slurm log)
        sys.stdout.reconfigure(line_buffering=True)
    args = parse_args(argv)
    topo, finished, handlers = None, False, {}
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        topo = ring.setup(cfg.data_parallel, cfg.backend, cfg.device, cfg.timeout)
        handlers = _install_signal_handlers()
        run(cfg, topo)
        ring.arrive(topo, "end of run")  # nobody tears the group down under a peer still logging
        finished = True
        return 0
    except (UserError, OSError) as e:  # the file system's own errors name their file
        report_error(e, topo)
        return 1
    finally:
        for s in handlers:  # a late signal (torchrun passes one on) must not interrupt the teardown
            signal.signal(s, signal.SIG_IGN)
        # After an error too on gloo, whose live group aborts the interpreter's exit; NCCL's is
        # left to the process exit, as destroying it could wait on a collective a dead peer never joins.
        if topo is not None and (finished or topo.backend == "gloo"):
            ring.teardown(topo)
        for s, previous in handlers.items():
            signal.signal(s, previous)


if __name__ == "__main__":
    sys.exit(main())
