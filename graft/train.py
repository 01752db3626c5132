"""Train N networks with filter grafting: ``torchrun --nproc_per_node=N -m graft.train --config X``.

One process per network (or per replica in hybrid mode). Each epoch: train, evaluate (each
network as trained, and the ensemble of all networks), graft from the ring peer, checkpoint, log.
One network, or ``grafting.enabled=false``, is the baseline through the same code path.

Roles. A line of ``run`` runs on every rank unless it sits under ``topo.is_leader`` (replica 0
of each network: evaluation, checkpoints) or ``topo.is_main`` (rank 0: the run's files). Calls
marked ``# collective`` must be made by every rank of their role at the same point: moved under
a narrower condition, one deadlocks the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
import os
import random
import shlex
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from . import checkpoint, core, distill, log, ring
from .config import NOTHING_TO_RUN, Config, ConfigError, dump_config, load_config
from .data import DataError, Loaders, build_loaders, load_arrays, mix_seed
from .engine import accuracy, cpu_has_bf16, evaluate, make_autocast, train_one_epoch
from .errors import REPORTED_BY_LAUNCHER, UserError
from .grafter import Grafter
from .models import build_model
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


def network_seed(seed: int, network: int) -> int:
    """The seed of network ``network``'s initial weights: a hash of the pair. (seed + network
    gave network 1 of seed s the weights of network 0 of seed s + 1, so runs with nearby seeds
    shared a network's start.) Only a fresh start uses it: a resumed run loads its weights."""
    return mix_seed(seed, network, 2) % 2**32


def make_loaders(cfg: Config, topo: ring.Topology) -> Loaders:
    """This network's loaders (``test`` is None unless ``eval_split`` is val: the test set is then
    evaluated once more at the end). Collective over a node's ranks: local rank 0 decodes (and
    caches) the data first, the others then read the cache."""
    # Data order differs per network (not per replica), except in mutual distillation, where
    # every network must see the same batch to distill from the others' predictions on it.
    data_seed = cfg.seed if cfg.distill.mutual else cfg.seed + 1000 * topo.network
    splits = None
    if cfg.data.in_memory:
        if topo.local_rank == 0:
            splits = load_arrays(cfg.data)
        ring.arrive(topo, "data ready")                                          # collective: every rank
        if topo.local_rank != 0:
            splits = load_arrays(cfg.data)
    loaders = build_loaders(cfg.data, cfg.batch_size, cfg.eval_batch_size, seed=data_seed, device=topo.device,
                            channels_last=cfg.channels_last, rank_in_group=topo.replica,
                            group_size=topo.replicas, splits=splits)
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


def setup(cfg: Config, topo: ring.Topology, steps_per_epoch: int) -> Training:
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
    g = cfg.grafting
    grafter = Grafter(level=g.level, A=g.A, c=g.c, bins=g.bins, compat=g.compat, exchange=g.exchange, topology=topo)
    grafting = g.enabled and networks > 1
    if not grafting:
        why = "one network" if networks == 1 else "grafting.enabled=false"
        logger.info(f"baseline: no grafting ({why}); {networks} network(s) train independently")
    else:
        try:  # now, not at the end of the first epoch
            plan = grafter.plan(model)
        except ValueError as e:  # reference mode on a model without the official code's key names
            raise ConfigError(f"grafting.compat: {g.compat} with model {cfg.model}: {e}") from None
        alone = plan.convs_without_bn(model.state_dict()) if g.level == "filter" else []
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
                    make_autocast(cfg.amp, topo.device), loss_fn, grafter, grafting)


@dataclass
class TrainState:
    """What a resume point restores: the weights, optimizer, schedule, scaler and RNGs, the last
    completed epoch (-1: none), whether it was grafted, the best evaluated accuracy so far and
    that epoch's metrics record. ``state_dict`` / ``load_state_dict`` are each other's inverse;
    the checkpoint adds the format, the network and the setup (checkpoint.save_epoch)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    device: torch.device
    epoch: int = -1
    grafted: bool = False
    best_acc: float = -1.0
    record: dict | None = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "grafted": self.grafted, "best_acc": self.best_acc, "record": self.record,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                "rng": checkpoint.capture_rng(self.device)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.grafted = state["epoch"], state.get("grafted", True)
        self.best_acc, self.record = state.get("best_acc", -1.0), state.get("record")
        self.model.load_state_dict(state["model"])  # onto the model's device
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):  # the curve as configured now:
            for group, base, f in zip(self.optimizer.param_groups, self.scheduler.base_lrs,  # epochs may have grown
                                      self.scheduler.lr_lambdas):
                group["lr"] = base * f(self.scheduler.last_epoch)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        checkpoint.restore_rng(state["rng"])  # CPU tensors, as torch.set_rng_state wants


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def run(cfg: Config, topo: ring.Topology) -> dict | None:
    """Train this rank's network for ``cfg.epochs``; returns the run's summary on rank 0."""
    logger.info(topo.describe())
    seed_everything(network_seed(cfg.seed, topo.network))  # replicas of one network share it
    loaders = make_loaders(cfg, topo)                                                   # collective: a node's ranks
    cfg = dataclasses.replace(cfg, num_classes=cfg.num_classes or loaders.num_classes)
    t = setup(cfg, topo, len(loaders.train))                                            # collective: replicas
    state = TrainState(t.model, t.optimizer, t.scheduler, t.scaler, topo.device)
    resumed = resume(cfg, topo, state) if cfg.resume == "auto" else []                  # collective: every rank
    out = RunLog(cfg, state.epoch + 1, resumed) if topo.is_main else None
    if t.grafting and not state.grafted and 0 <= state.epoch < cfg.epochs - 1:  # a run extended after its last epoch
        late = graft(t, state.epoch)                                                    # collective: every rank
        logger.info(f"grafted after epoch {state.epoch + 1}: it was the last epoch of the run now extended")
        state.grafted = True
        if topo.is_leader:
            state.record = state.record and {**state.record, **late}  # None: a checkpoint older than records in it
            records = ring.all_gather_objects(topo, state.record)                       # collective: leaders
            if topo.is_main:
                out.grafted_late([r for r in records if r])
    for epoch in range(state.epoch + 1, cfg.epochs):
        start = time.perf_counter()
        record = {"epoch": epoch, "network": topo.network, "lr": t.optimizer.param_groups[0]["lr"],
                  **train_epoch(cfg, topo, t, loaders.train, epoch)}                    # collective: replicas
        ring.arrive(topo, f"epoch {epoch} trained")  # a dead peer is named here        # collective: every rank
        if topo.is_leader:  # each network as trained, before grafting, as the paper reports it
            record.update(evaluate_network(cfg, topo, t, loaders.eval))                 # collective: leaders (ensemble)
            keep_if_best(cfg, topo, state, record, epoch)
        grafted = t.grafting and epoch < cfg.epochs - 1  # the last epoch's weights are the result
        record.update(graft(t, epoch) if grafted else NOT_GRAFTED)                      # collective: every rank
        record["epoch_seconds"] = time.perf_counter() - start
        state.epoch, state.grafted, state.record = epoch, grafted, record
        if topo.is_leader:  # the resume point: grafted weights, ready for the next epoch
            checkpoint.save_epoch(cfg.output_dir, topo.network, epoch,
                                  {"setup": cfg.setup(topo.networks), **state.state_dict()})
            records = ring.all_gather_objects(topo, record)                             # collective: leaders
            if topo.is_main:
                out.epoch(records)
    test = None
    if loaders.test is not None and topo.is_leader:
        test = final_test(cfg, topo, t, loaders.test)                                   # collective: leaders
    return out.finish(test) if out is not None else None


def train_epoch(cfg: Config, topo: ring.Topology, t: Training, loader, epoch: int) -> dict:
    """One epoch of this network's training, with a progress bar on each node's first terminal."""
    loader.set_epoch(epoch)
    show = cfg.progress and topo.local_rank == 0 and sys.stderr.isatty()
    progress = Progress(show, f"net {topo.network} epoch {epoch + 1}/{cfg.epochs}", len(loader))
    return train_one_epoch(t.train_model, loader, t.loss_fn, t.optimizer, t.scheduler, t.per_iter, t.scaler,
                           t.autocast, progress, topo.device, topo.network_group)


def evaluate_network(cfg: Config, topo: ring.Topology, t: Training, loader) -> dict:
    """Loss and accuracy on the evaluated split, the ensemble's accuracy and the invalid-filter
    counts. Collective: leaders."""
    stats, probs, labels = evaluate(t.model, loader, t.autocast, topo.device, cfg.data.eval_split)
    invalid = core.count_invalid_filters(t.model, tuple(cfg.invalid_thresholds))
    return {**stats, "ensemble_acc": ensemble_accuracy(topo, probs, labels), "filters": invalid["total"],
            "invalid_filters": {str(thr): n for thr, n in invalid["invalid"].items()}}


def keep_if_best(cfg: Config, topo: ring.Topology, state: TrainState, record: dict, epoch: int) -> None:
    """Model selection on the evaluated split: best.pt holds the best weights so far (leaders)."""
    split = cfg.data.eval_split
    if record[f"{split}_acc"] > state.best_acc:
        state.best_acc = record[f"{split}_acc"]
        checkpoint.save_best(cfg.output_dir, topo.network, epoch, state.best_acc, split, cfg.setup(topo.networks),
                             state.model.state_dict())


NOT_GRAFTED = {"peer": None, "graft_seconds": 0.0, "graft_bytes": 0}


def graft(t: Training, epoch: int) -> dict:
    """Graft from the ring peer; the epoch's record entries. Collective: every rank."""
    result = t.grafter.graft(t.model, epoch=epoch)
    record = {"peer": result.peer, "graft_seconds": result.seconds, "graft_bytes": result.bytes}
    if result.report is not None:  # leaders
        record.update({"mean_alpha": result.mean_alpha, "mean_peer_distance": result.mean_peer_distance,
                       "graft": result.records(), "entropy_table": result.table.tolist()})
    return record


@ring.collectives()
def ensemble_accuracy(topo: ring.Topology, probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy of the mean of all networks' softmax outputs. Collective: leaders (one all_reduce)."""
    if topo.distributed:
        probs = probs.clone()
        torch.distributed.all_reduce(probs, group=topo.leader_group)
    return accuracy(probs, labels)


@torch.no_grad()
def final_test(cfg: Config, topo: ring.Topology, t: Training, loader) -> dict | None:
    """The test set, once, at the end of a run that selected on validation (``eval_split: val``):
    the final weights and the best-validation weights (best.pt), each network and the ensemble.
    Collective: leaders. Returns the result on rank 0, None elsewhere."""
    final, probs, labels = evaluate(t.model, loader, t.autocast, topo.device)
    with ring.together(topo, "evaluate its best-validation weights", leaders_only=True):  # collective: leaders
        best = checkpoint.load(checkpoint.network_dir(cfg.output_dir, topo.network) / "best.pt")
    t.model.load_state_dict(best["model"])  # the run is over: the final weights are in their checkpoint
    chosen, best_probs, _ = evaluate(t.model, loader, t.autocast, topo.device)
    mine = {"network": topo.network, "final_test_acc": final["test_acc"], "best_val_epoch": best["epoch"],
            "best_val_acc": best.get("acc", best.get("test_acc")), "best_val_test_acc": chosen["test_acc"]}
    ensemble = {"ensemble_final_test_acc": ensemble_accuracy(topo, probs, labels),
                "ensemble_best_val_test_acc": ensemble_accuracy(topo, best_probs, labels)}
    everyone = ring.all_gather_objects(topo, mine)
    if not topo.is_main:
        return None
    return {"networks": {str(r["network"]): r for r in everyone}, **ensemble}


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


class Stop(UserError):
    """SIGTERM / SIGINT: stop between steps; the last complete checkpoint stays intact."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def how_to_resume(cfg: Config) -> str:
    """What a stopped run tells its user. Under resume=never the same command would not resume
    but start afresh beside it, so the hint names the directory (fresh_output_dir's choice)."""
    if cfg.resume == "never":
        return f"to resume it, rerun with output_dir={shlex.quote(cfg.output_dir)} resume=auto"
    return "rerun the same command to resume"


def _install_signal_handlers(resume_hint: str) -> dict:
    """Turn SIGTERM and SIGINT into Stop; returns the handlers they had."""
    def handler(signum, _frame):
        # Under srun a worker gets SIGTERM twice (from slurmstepd, then from torchrun's agent):
        # the second must not interrupt the first's clean stop.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Stop(f"received {signal.Signals(signum).name}: stopped; the last complete checkpoint "
                   f"is intact, {resume_hint}")
    return {s: signal.signal(s, handler) for s in STOP_SIGNALS}


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
    named = isinstance(e, (ConfigError, ring.PeerTimeout, ring.GraftError, ring.PeerFailed))  # names the rank
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
    log.setup()  # torchrun's RANK until the topology is known
    topo, finished, handlers = None, False, {}
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        topo = ring.setup(cfg.data_parallel, cfg.backend, cfg.device, cfg.timeout)
        log.setup(topo.rank, topo.world)
        cfg = fresh_output_dir(cfg, topo)                                           # collective: every rank
        handlers = _install_signal_handlers(how_to_resume(cfg))
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
