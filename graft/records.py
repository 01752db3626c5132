"""EpochRecord: the one shape of a network's per-epoch record.

Training fills it; metrics.jsonl stores it (one JSON line per network per epoch, with the keys
of every version so far: the evaluated split's accuracy under ``test_acc`` or ``val_acc``); the
epoch table, TensorBoard, summaries, study reports and pictures read it back through
``from_json``, never through raw keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class EpochRecord:
    epoch: int                              # counted from 0 (printed from 1)
    network: int
    lr: float | None = None                 # at the epoch's start
    train_loss: float | None = None
    train_acc: float | None = None
    images_per_sec: float = 0.0
    train_seconds: float = 0.0
    split: str = "test"                     # the split evaluated every epoch: test, or val when selecting on it
    loss: float | None = None               # on that split, as trained (before the epoch's graft)
    acc: float | None = None
    ensemble_acc: float | None = None       # the mean of every network's softmax, on that split
    filters: int = 0                        # conv filters, and those with an L1 norm under each threshold
    invalid_filters: dict[str, int] = field(default_factory=dict)
    grafts: int = 0                         # grafts this epoch: at its end, or every k optimizer steps
    peer: int | None = None                 # the network blended in (None: no graft, or the population's mean)
    graft_seconds: float = 0.0
    graft_bytes: int = 0
    mean_alpha: float | None = None         # of the epoch's last graft, over layers
    mean_peer_distance: float | None = None
    graft: list[dict] = field(default_factory=list)  # the last graft, per layer: scores, alpha, peer distance
    entropy_table: list | None = None       # the last graft's scores, networks x layers
    epoch_seconds: float = 0.0

    def add_training(self, stats: dict) -> None:
        """engine.train_one_epoch's statistics."""
        for key in ("train_loss", "train_acc", "images_per_sec", "train_seconds"):
            setattr(self, key, stats[key])

    def add_graft(self, result) -> None:
        """One graft (an exchange.GraftResult): counted, timed; its details kept on leaders."""
        self.grafts += 1
        self.graft_seconds += result.seconds
        self.graft_bytes += result.bytes
        self.peer = result.peer
        if result.report is not None:
            self.mean_alpha, self.mean_peer_distance = result.mean_alpha, result.mean_peer_distance
            self.graft, self.entropy_table = result.records(), result.table.tolist()

    def to_json(self) -> dict:
        """The metrics.jsonl line: the evaluated split's loss and accuracy under
        ``<split>_loss`` and ``<split>_acc``; graft details only where there was a graft."""
        out = dataclasses.asdict(self)
        loss, acc = out.pop("loss"), out.pop("acc")
        out[f"{self.split}_loss"], out[f"{self.split}_acc"] = loss, acc
        if not self.graft:
            for key in ("mean_alpha", "mean_peer_distance", "graft", "entropy_table"):
                out.pop(key)
        return out

    @classmethod
    def from_json(cls, values: dict) -> EpochRecord:
        """A metrics.jsonl line of any version (a field it lacks keeps its default; keys this
        version does not know are ignored)."""
        split = values.get("split") or ("val" if "val_acc" in values else "test")
        known = {f.name for f in dataclasses.fields(cls)} - {"split", "loss", "acc"}
        record = cls(**{k: v for k, v in values.items() if k in known})
        record.split, record.loss, record.acc = split, values.get(f"{split}_loss"), values.get(f"{split}_acc")
        if "grafts" not in values and values.get("peer") is not None:  # written before grafts were counted
            record.grafts = 1
        return record

    @property
    def key(self) -> tuple[int, int]:
        return self.epoch, self.network
