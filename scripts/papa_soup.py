"""PAPA's end product is the population's average (its 'soup'), not each network. Evaluate the
mean of a finished run's final networks on the validation and test splits: the weights averaged,
with the BN statistics averaged too ('avg'), or recomputed on 100 training batches in train mode
('avg+bn reset', as a soup needs: averaged statistics do not describe the averaged weights).
    python scripts/papa_soup.py RUN_DIR [EPOCH]      (RUN_DIR: a 2-network run with its checkpoints)"""
import contextlib
import sys
from pathlib import Path

import torch

from graft import checkpoint
from graft.config import load_config
from graft.data import build_loaders
from graft.engine import evaluate
from graft.models import build_model

run = Path(sys.argv[1])
epoch = int(sys.argv[2]) if len(sys.argv) > 2 else 15
cfg = load_config(run / "config.yaml")
states = [checkpoint.load(checkpoint.epoch_path(run, k, epoch - 1))["model"] for k in (0, 1)]
soup = {k: (v + states[1][k]) / 2 if v.is_floating_point() else v for k, v in states[0].items()}
dev = torch.device("cpu")
loaders = build_loaders(cfg.data, cfg.batch_size, cfg.eval_batch_size, seed=0, device=dev)
model = build_model(cfg.model, loaders.num_classes)
val_loader = build_loaders(cfg.data.__class__(**{**cfg.data.__dict__, "eval_split": "val"}), cfg.batch_size,
                           cfg.eval_batch_size, seed=0, device=dev, train=False).eval


def report(name):
    val = evaluate(model, val_loader, contextlib.nullcontext, dev)[0]["acc"]
    test = evaluate(model, loaders.test, contextlib.nullcontext, dev)[0]["acc"]
    print(f"{run.name} {name}: val {val:.2f} test {test:.2f}", flush=True)


model.load_state_dict(soup)
report("avg")
for m in model.modules():
    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
        m.reset_running_stats()
        m.momentum = None  # a cumulative mean over the batches below
model.train()
if hasattr(loaders.train, "set_epoch"):
    loaders.train.set_epoch(0)
with torch.no_grad():
    for i, (images, _) in enumerate(loaders.train):
        model(images)
        if i == 99:
            break
model.eval()
report("avg+bn reset")
for k in (0, 1):
    model.load_state_dict(states[k])
    report(f"network {k}")
