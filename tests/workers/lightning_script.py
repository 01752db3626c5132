"""A Lightning script with graft's callback, run by tests/test_lightning.py under graft-run.

    graft-run --standalone --nproc_per_node=2 tests/workers/lightning_script.py OUT/net{network} SEED \
        EPOCHS|steps=K [CKPT]

Each network is a Trainer of its own. Two recording callbacks, listed around GraftCallback,
keep the weights before and after every graft; the module logs its validation and epoch ends.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from graft.lightning import GraftCallback


def make_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))


class Module(pl.LightningModule):
    def __init__(self, out: Path):
        super().__init__()
        self.net, self.out, self.log_ = make_model(), out, []

    def training_step(self, batch, _):
        images, labels = batch
        return F.cross_entropy(self.net(images), labels)

    def validation_step(self, batch, _):
        self.log_.append(("validated", self.current_epoch))

    def on_train_epoch_end(self):
        self.log_.append(("epoch end", self.current_epoch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class Recorder(pl.Callback):
    """Weights before (listed before GraftCallback) and after (listed after it) each graft."""

    def __init__(self, module, when):
        self.module, self.when = module, when

    def on_train_epoch_end(self, trainer, pl_module):
        state = {k: v.clone() for k, v in pl_module.net.state_dict().items()}
        self.module.log_.append((self.when, trainer.current_epoch, state))


def data(seed):
    g = torch.Generator().manual_seed(1234)
    images, labels = torch.randn(48, 3, 8, 8, generator=g), torch.randint(0, 3, (48,), generator=g)
    dataset = TensorDataset(images, labels)  # an order that is a function of (seed, epoch): resumable
    return DataLoader(dataset, batch_size=8, sampler=DistributedSampler(dataset, 1, 0, seed=seed))


def main():
    out, seed, epochs = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    # EPOCHS, or steps=K: a run bounded by optimizer steps (6 per epoch here), max_epochs unset
    steps = int(epochs.removeprefix("steps=")) if epochs.startswith("steps=") else -1
    epochs = -1 if steps != -1 else int(epochs)
    ckpt = sys.argv[4] if len(sys.argv) > 4 else None
    pl.seed_everything(seed)
    module = Module(out)
    trainer = pl.Trainer(max_epochs=epochs, max_steps=steps,
                         accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(out), num_sanity_val_steps=0,
                         callbacks=[Recorder(module, "before"), GraftCallback(timeout=60), Recorder(module, "after"),
                                    pl.callbacks.ModelCheckpoint(dirpath=str(out), save_last=True)])
    val = DataLoader(TensorDataset(torch.randn(8, 3, 8, 8), torch.zeros(8, dtype=torch.long)), batch_size=8)
    trainer.fit(module, data(seed), val, ckpt_path=ckpt)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"log": module.log_, "final": module.net.state_dict()}, out / f"log{'-resumed' if ckpt else ''}.pt")


if __name__ == "__main__":
    main()
