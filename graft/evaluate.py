"""Evaluate a saved checkpoint on a chosen split: ``graft-eval CHECKPOINT [key=value ...]``.

As torchvision's ``--test-only``: one process, no training. The run's own config.yaml (found
beside the checkpoint's run directory) gives the model and the data; overrides change it, e.g.
``data.root=...`` when the data moved. ``best.pt`` holds a network's best evaluated weights as
they were before that epoch's graft; ``epochNNNN.pt`` holds the weights after the graft (the
resume point), except for the last epoch, which is not grafted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from . import checkpoint, log
from .cli import say_error
from .config import ConfigError, load_config
from .data import DataError, build_loaders
from .engine import evaluate, make_autocast
from .models import build_model


def config_of(path: Path) -> Path:
    """run/checkpoints/net0/best.pt -> run/config.yaml, which must exist."""
    parents = path.resolve().parents
    if len(parents) < 3:
        raise ConfigError(f"{path}: not inside a run's checkpoints/netK/ folder: give --config (the run's "
                          "config.yaml)")
    config_file = parents[2] / "config.yaml"
    if not config_file.exists():
        raise ConfigError(f"{config_file}: not found; graft-eval reads the run's config.yaml beside its checkpoints/ "
                          "folder (or give --config)")
    return config_file


def evaluate_checkpoint(path: str | Path, split: str = "test", overrides=(), device: str = "auto",
                        config: str | Path | None = None) -> dict:
    """Evaluate ``path`` with the config of its run (or ``config``), changed by ``overrides``."""
    path = Path(path)
    state = checkpoint.load(path)  # raises CheckpointError naming the file
    config_file = Path(config) if config is not None else config_of(path)
    cfg = load_config(config_file, overrides)
    if split == "val":
        if cfg.data.val_fraction <= 0:
            raise ConfigError(f"--split val: {config_file} has data.val_fraction 0: this run held out no "
                              "validation split (--split test evaluates the test set)")
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_split="val"))
    try:
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           "cpu" if device == "auto" else device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {device}: expected auto, cpu, cuda or cuda:N")
    gpus = torch.cuda.device_count() if dev.type == "cuda" and torch.cuda.is_available() else 0
    if dev.type == "cuda" and not gpus:
        raise ConfigError(f"--device {device}: no CUDA GPU here (--device cpu, or auto)")
    if dev.type == "cuda" and (dev.index or 0) >= gpus:
        raise ConfigError(f"--device {device}: this machine has {gpus} CUDA GPU(s), cuda:0 to cuda:{gpus - 1}")
    loaders = build_loaders(dataclasses.replace(cfg.data, workers=0), 1, cfg.eval_batch_size, seed=0,
                            device=dev, train=False)
    loader = loaders.eval if split == "val" else loaders.test
    # num_classes 0 (every shipped config): from the data, as graft-train does.
    cfg = dataclasses.replace(cfg, num_classes=cfg.num_classes or loaders.num_classes)
    model = build_model(cfg.model, cfg.num_classes).to(dev)
    model = model.to(memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:  # the config (or an override) names another model than the one saved
        detail = " ".join(str(e).split())[:300]
        raise ConfigError(f"{path}: its weights do not fit model {cfg.model} with num_classes {cfg.num_classes} "
                          f"(from {config_file} and the overrides): {detail}") from None
    stats, _, labels = evaluate(model, loader, make_autocast(cfg.amp, dev), dev)
    return {"checkpoint": str(path), "network": state.get("network"), "epoch": state.get("epoch"),
            "split": split, "images": len(labels), f"{split}_loss": stats["loss"], f"{split}_acc": stats["acc"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="graft-eval", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a graft checkpoint: RUN/checkpoints/netK/best.pt or epochNNNN.pt")
    parser.add_argument("--split", choices=("test", "val"), default="test", help="split to evaluate (default: test)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    parser.add_argument("--config", help="the run's config (default: config.yaml beside the checkpoints/ folder)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the run's config")
    args = parser.parse_intermixed_args(argv)
    log.setup(0, 1)  # the data's decode line
    try:
        result = evaluate_checkpoint(args.checkpoint, args.split, args.overrides, args.device, args.config)
    except (ConfigError, DataError, checkpoint.CheckpointError, OSError) as e:
        say_error(str(e), "graft-eval")
        return 1
    if args.json:
        print(json.dumps(result))
    else:
        epoch = "" if result["epoch"] is None else f", epoch {result['epoch'] + 1}"
        print(f"{result['checkpoint']} (network {result['network']}{epoch}): {result['split']} accuracy "
              f"{result[args.split + '_acc']:.2f}%, loss {result[args.split + '_loss']:.4f}, "
              f"{result['images']} images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
