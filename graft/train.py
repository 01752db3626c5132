"""Train N networks with filter grafting: ``torchrun --nproc_per_node=N -m graft.train --config X``.

One process per network (or per replica in hybrid mode). Each epoch: train, evaluate (each
network as trained, and the ensemble of all networks), graft (the spec's rule: from the ring
peer at the epoch's end by default, or every k optimizer steps during training), checkpoint,
log. One network, or ``grafting.enabled=false``, is the baseline through the same code path.

Roles. A line of ``run`` runs on every rank unless it sits under ``topo.is_leader`` (replica 0
of each network: evaluation, checkpoints) or ``topo.is_main`` (rank 0: the run's files). Calls
marked ``# collective`` must be made by every rank of their role at the same point: moved under
a narrower condition, one deadlocks the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from . import checkpoint, cli, core, distill, log
from .checkpoint import ResumePoint
from .config import NOTHING_TO_RUN, Config, ConfigError, dump_config, load_config
from .data import DataError, Loaders, build_loaders, load_arrays
from .dist import Topology, all_gather_objects, arrive, collectives, teardown, together
from .dist import setup as setup_topology
from .engine import accuracy, cpu_has_bf16, evaluate, make_autocast, train_one_epoch
from .errors import GraftError
from .grafter import Grafter, network_seed
from .models import build_model
from .records import EpochRecord
from .report import Progress, RunLog
from .resume import fresh_output_dir, resume

logger = logging.getLogger("graft.train")  # not __name__: under -m that is __main__


# --------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_loaders(cfg: Config, topo: Topology) -> Loaders:
    """This network's loaders (``test`` is None unless ``eval_split`` is val: the test set is then
    evaluated once more at the end). Collective: every rank (a check-in): local rank 0 decodes (and
    caches) the data first, the others then read the cache."""
    # Data order differs per network (not per replica), except in mutual distillation, where
    # every network must see the same batch to distill from the others' predictions on it.
    data_seed = cfg.seed if cfg.distill.mutual else cfg.seed + 1000 * topo.network
    splits = None
    if cfg.data.in_memory:
        if topo.local_rank == 0:
            splits = load_arrays(cfg.data)
        arrive(topo, "data ready")                                               # collective: every rank
        if topo.local_rank != 0:
            splits = load_arrays(cfg.data)
    loaders = build_loaders(cfg.data, cfg.batch_size, cfg.eval_batch_size, seed=data_seed, device=topo.device,
                            rank_in_group=topo.replica, group_size=topo.replicas, splits=splits)
    if len(loaders.train) == 0:
        raise DataError(f"batch_size={cfg.batch_size}: larger than the training set of this network's "
                        "replica; nothing to train (lower batch_size)")
    if cfg.num_classes and cfg.num_classes < loaders.num_classes:
        raise ConfigError(f"num_classes: {cfg.num_classes}, but the data has {loaders.num_classes} classes")
    return loaders._replace(test=loaders.test if cfg.data.eval_split == "val" else None)


@dataclass
class Training:
    """What one network trains with, built in one place (``setup``)."""

    model: nn.Module          # the network: evaluated, grafted, checkpointed
    train_model: nn.Module    # what the training step calls: the model, in DDP (replicas) and/or compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    per_iter: bool            # the scheduler steps every iteration (else every epoch)
    scaler: torch.amp.GradScaler | None
    autocast: Callable
    loss_fn: Callable
    grafter: Grafter
    grafting: bool            # grafting.enabled, with more than one network
    per_step: bool            # grafts every k optimizer steps (else at each epoch's end)


def setup(cfg: Config, topo: Topology, steps_per_epoch: int) -> Training:
    """Model, optimizer, schedule, AMP, loss and grafter of this rank's network. Collective over
    a network's replicas (DDP broadcasts the model) and, in mutual distillation, nothing more."""
    networks = topo.networks
    if cfg.distill.mutual and networks == 1:
        raise ConfigError("distill.mutual: needs 2 or more networks (--nproc_per_node)")
    if cfg.amp == "fp16" and topo.device.type != "cuda":
        raise ConfigError("amp: fp16 needs CUDA; on the CPU use amp=bf16 (fast where the CPU has AVX512-BF16 or AMX)")
    if cfg.amp == "bf16" and topo.device.type == "cpu" and cpu_has_bf16() is False:
        logger.warning("amp: bf16 on a CPU without AVX512-BF16 or AMX is emulated, several times slower than "
                       "fp32 here; amp=off trains faster on this machine")
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = build_model(cfg.model, cfg.num_classes).to(topo.device, memory_format=memory_format)
    optimizer = torch.optim.SGD(model.parameters(), lr=initial_lr(cfg, topo.network, networks),
                                momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay,
                                nesterov=cfg.optim.nesterov)
    scheduler, per_iter = build_scheduler(cfg, optimizer, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
    teachers = distill.load_teachers(cfg.distill.teachers, topo.device, cfg.channels_last, cfg.num_classes)
    loss_fn = distill.make_loss(cfg, teachers, topo.leader_group if networks > 1 else None)
    if teachers or cfg.distill.mutual:
        logger.info(f"distillation: {len(teachers)} teacher(s){', mutual' if cfg.distill.mutual else ''}, "
                    f"tau {cfg.distill.tau:g}, weight {cfg.distill.weight:g}")
    spec = cfg.grafting.spec()
    grafter = Grafter(spec, epochs=cfg.epochs, exchange=cfg.grafting.exchange, topology=topo)
    grafting = cfg.grafting.enabled and networks > 1
    if not grafting:
        why = "one network" if networks == 1 else "grafting.enabled=false"
        logger.info(f"baseline: no grafting ({why}); {networks} network(s) train independently")
    else:
        logger.info(spec.describe(networks))
        try:  # now, not at the end of the first epoch
            plan = grafter.plan(model)
        except GraftError as e:  # reference mode on a model without the official code's key names
            problem = str(e).removeprefix("Grafter: ")
            if not problem.startswith("criterion: "):
                raise
            raise ConfigError(f"grafting.{problem} (model {cfg.model})") from None
        alone = plan.convs_without_bn(model.state_dict()) if spec.criterion == "bn_scale" else []
        if alone:
            logger.info(f"filter level: {len(alone)} conv(s) with no BatchNorm after them blend with their "
                        f"layer alpha: {', '.join(alone)}")
    train_model = model
    if topo.replicas > 1:
        train_model = nn.parallel.DistributedDataParallel(                      # collective: a network's replicas
            model, device_ids=[topo.device.index] if topo.device.type == "cuda" else None,
            process_group=topo.network_group)
    if cfg.compile:
        train_model = torch.compile(train_model)
    return Training(model, train_model, optimizer, scheduler, per_iter, scaler,
                    make_autocast(cfg.amp, topo.device), loss_fn, grafter, grafting, grafting and spec.per_step)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run(cfg: Config, topo: Topology, loaders: Loaders) -> dict | None:
    """Train this rank's network for ``cfg.epochs``; returns the run's summary on rank 0."""
    t = setup(cfg, topo, len(loaders.train))                                            # collective: replicas
    point = ResumePoint(t.model, t.optimizer, t.scheduler, t.scaler, t.grafter, topo.device)
    resumed = (resume(cfg, topo, point, grafting=t.grafting, per_step=t.per_step)     # collective: every rank
               if cfg.resume == "auto" else [])
    out = RunLog(cfg, point.epoch + 1, resumed) if topo.is_main else None
    for epoch in range(point.epoch + 1, cfg.epochs):
        start = time.perf_counter()
        lr = t.optimizer.param_groups[0]["lr"]
        record = EpochRecord(epoch, topo.network, lr=lr, split=cfg.data.eval_split)
        train_epoch(cfg, topo, t, loaders.train, epoch, record)   # collective: replicas (per-step grafts: every rank)
        arrive(topo, f"epoch {epoch + 1} trained")  # a dead peer is named here          # collective: every rank
        if topo.is_leader:  # each network as trained, before grafting, as the paper reports it
            evaluate_network(cfg, topo, t, loaders.eval, record)                        # collective: leaders (ensemble)
            keep_if_best(cfg, topo, point, record)
        if t.grafting and not t.per_step:
            result = t.grafter.graft(t.model, epoch=epoch)  # None after the last epoch  # collective: every rank
            if result is not None:
                record.add_graft(result)
        record.epoch_seconds = time.perf_counter() - start
        point.epoch, point.record = epoch, record
        if topo.is_leader:  # the resume point: grafted weights, ready for the next epoch
            with cli.saving_checkpoints(cfg.output_dir, topo.network, cfg.resume):
                checkpoint.save_epoch(cfg.output_dir, topo.network, cfg.setup(topo.networks), point.state_dict())
            records = all_gather_objects(topo, record)                                  # collective: leaders
            if topo.is_main:
                out.epoch(records)
    test = None
    if loaders.test is not None and topo.is_leader:
        test = final_test(cfg, topo, t, point, loaders.test)                            # collective: leaders
    return out.finish(test) if out is not None else None


def train_epoch(cfg: Config, topo: Topology, t: Training, loader, epoch: int, record: EpochRecord) -> None:
    """One epoch of this network's training, with a progress bar on each node's first terminal;
    under a per-step rule the grafts it does go into ``record``."""
    loader.set_epoch(epoch)
    show = cfg.progress and topo.local_rank == 0 and sys.stderr.isatty()
    progress = Progress(show, f"net {topo.network} epoch {epoch + 1}/{cfg.epochs}", len(loader))
    after_step = None
    if t.per_step:
        def after_step():
            result = t.grafter.step(t.model)                                            # collective: every rank
            if result is not None:
                record.add_graft(result)
    record.add_training(train_one_epoch(t.train_model, loader, t.loss_fn, t.optimizer, t.scheduler, t.per_iter,
                                        t.scaler, t.autocast, progress, topo.device,
                                        topo.network_group if topo.replicas > 1 else None, after_step))


def evaluate_network(cfg: Config, topo: Topology, t: Training, loader, record: EpochRecord) -> None:
    """Loss and accuracy on the evaluated split, the ensemble's accuracy and the invalid-filter
    counts, into ``record``. Collective: leaders."""
    stats, probs, labels = evaluate(t.model, loader, t.autocast, topo.device)
    invalid = core.count_invalid_filters(t.model, tuple(cfg.invalid_thresholds))
    record.loss, record.acc = stats["loss"], stats["acc"]
    record.ensemble_acc = ensemble_accuracy(topo, probs, labels)
    record.filters = invalid["total"]
    record.invalid_filters = {str(thr): n for thr, n in invalid["invalid"].items()}


def keep_if_best(cfg: Config, topo: Topology, point: ResumePoint, record: EpochRecord) -> None:
    """Model selection on the evaluated split: best.pt holds the best weights so far (leaders)."""
    if record.acc > point.best_acc:
        point.best_acc, point.best_epoch = record.acc, record.epoch
        with cli.saving_checkpoints(cfg.output_dir, topo.network, cfg.resume):
            checkpoint.save_best(cfg.output_dir, topo.network, record.epoch, record.acc, record.split,
                                 cfg.setup(topo.networks), point.model.state_dict())


def ensemble_accuracy(topo: Topology, probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of the mean of all networks' softmax outputs. Collective: leaders (one all_reduce)."""
    if topo.distributed and topo.networks > 1:
        probs = probs.clone()
        with collectives():
            torch.distributed.all_reduce(probs, group=topo.leader_group)
    return accuracy(probs, labels)


@torch.no_grad()
def final_test(cfg: Config, topo: Topology, t: Training, point: ResumePoint, loader) -> dict | None:
    """The test set, once, at the end of a run that selected on validation (``eval_split: val``):
    the final weights and the best-validation weights (best.pt), each network and the ensemble.
    Collective: leaders. Returns the result on rank 0, None elsewhere."""
    final, probs, labels = evaluate(t.model, loader, t.autocast, topo.device)
    with together(topo, "evaluate its best-validation weights", leaders_only=True):     # collective: leaders
        path = checkpoint.network_dir(cfg.output_dir, topo.network) / "best.pt"
        best = checkpoint.load(path)
        if point.best_epoch >= 0 and best["epoch"] != point.best_epoch:
            raise checkpoint.CheckpointError(
                f"{path}: holds epoch {best['epoch'] + 1}, but the validation records say epoch "
                f"{point.best_epoch + 1} was best; the summary would describe other weights than it tests. "
                "Restore the best.pt of that epoch, or evaluate with graft-eval")
    t.model.load_state_dict(best["model"])  # the run is over: the final weights are in their checkpoint
    chosen, best_probs, _ = evaluate(t.model, loader, t.autocast, topo.device)
    mine = {"network": topo.network, "final_test_acc": final["acc"], "best_val_epoch": best["epoch"],
            "best_val_acc": best.get("acc"), "best_val_test_acc": chosen["acc"]}
    ensemble = {"ensemble_final_test_acc": ensemble_accuracy(topo, probs, labels),
                "ensemble_best_val_test_acc": ensemble_accuracy(topo, best_probs, labels)}
    everyone = all_gather_objects(topo, mine)
    if not topo.is_main:
        return None
    return {"networks": {str(r["network"]): r for r in everyone}, **ensemble}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


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


def main(argv=None) -> int:
    if isinstance(sys.stdout, io.TextIOWrapper):  # epoch by epoch into a file too (nohup, a Slurm log)
        sys.stdout.reconfigure(line_buffering=True)
    args = parse_args(argv)
    log.setup()  # torchrun's RANK until the topology is known
    topo, finished, handlers = None, False, {}
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        topo = setup_topology(cfg.data_parallel, cfg.backend, cfg.device, cfg.timeout)
        log.setup(topo.rank, topo.world)
        cfg = fresh_output_dir(cfg, topo)                                           # collective: every rank
        handlers = cli.install_signal_handlers(cfg.output_dir, cfg.resume)
        logger.info(topo.describe())
        seed_everything(network_seed(cfg.seed, topo.network))  # replicas of one network share it
        loaders = make_loaders(cfg, topo)                                           # collective: every rank
        cfg = dataclasses.replace(cfg, num_classes=cfg.num_classes or loaders.num_classes)
        run(cfg, topo, loaders)
        arrive(topo, "end of run")  # nobody tears the group down under a peer still logging
        finished = True
        return 0
    except Exception as e:
        if not cli.is_user_error(e):
            raise
        rank = topo.rank if topo is not None else int(os.environ.get("RANK", "0"))
        cli.report_error(e, rank, topo.network if topo else None, bool(topo and topo.distributed))
        return 1
    finally:
        for s in handlers:  # a late signal (torchrun passes one on) must not interrupt the teardown
            signal.signal(s, signal.SIG_IGN)
        # After an error too: a live gloo group aborts the interpreter's exit, and NCCL's warns
        # there (not yet seen on a GPU: dist.teardown bounds the wait for a dead peer).
        if topo is not None:
            teardown(topo, failed=not finished)
        cli.restore_signal_handlers(handlers)


if __name__ == "__main__":
    sys.exit(main())
