"""Data: CIFAR-sized sets as uint8 tensors with on-device augmentation, ImageNet-style folders
through DataLoader workers.

Two paths, picked by the caller from ``DataConfig``:

* ``load_arrays`` + ``InMemoryLoader`` (cifar10, cifar100, tar, synthetic, imagefolder with
  ``in_memory``): the whole split lives on the training device as uint8 (CIFAR-10 is 184 MB);
  each batch is gathered, randomly cropped and flipped there in a few tensor ops. No worker
  processes, and the batches are a pure function of (seed, epoch), so a resumed run sees
  bit-identical data.
* ``build_folder_loaders`` (imagefolder without ``in_memory``): torchvision ``ImageFolder`` with
  the standard ImageNet transforms, decoded by DataLoader workers.

``build_loaders`` picks the path and returns ``Loaders``: training and graft-eval both call it.

Tar archives are decoded once (PIL, straight from the tar stream) and cached as one ``.pt``
file keyed by the archive's sha256, so later runs and the other ranks of a torchrun job load
tensors instead of JPEGs.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import logging
import math
import os
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler

from .checkpoint import DAMAGED, atomic_save
from .errors import CheckpointError, DataError

if TYPE_CHECKING:
    from .config import DataConfig

logger = logging.getLogger(__name__)

__all__ = [
    "DataError",
    "ArraySplit",
    "Splits",
    "check_data",
    "load_arrays",
    "balanced_subset",
    "InMemoryLoader",
    "Loaders",
    "build_loaders",
    "build_folder_loaders",
    "EpochLoader",
]

SPLITS = ("train", "test")
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


@dataclass
class ArraySplit:
    """One split held in memory: uint8 images (N, 3, H, W) and int64 labels (N,), on CPU."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, mask_or_index: Tensor) -> ArraySplit:
        return ArraySplit(self.images[mask_or_index], self.labels[mask_or_index])


# --------------------------------------------------------------------------------------------
# Loading arrays
# --------------------------------------------------------------------------------------------


class Splits(NamedTuple):
    """What ``load_arrays`` returns. ``eval`` is the split evaluated every epoch (``eval_split``);
    ``test`` is the test split, also when ``eval`` is the validation split, so that a run that
    selects on validation can still report the test set once, at its end."""

    train: ArraySplit
    eval: ArraySplit
    num_classes: int
    mean: tuple
    std: tuple
    test: ArraySplit


def load_arrays(cfg: DataConfig) -> Splits:
    """Return (train, eval, num_classes, mean, std, test) for in-memory data.

    Order of operations: ``train_subset``/``test_subset`` first (first k per class in file or
    index order), then ``val_fraction`` is held out of what remains of train (the last images
    of each class). Whenever ``val_fraction > 0`` train excludes the validation images;
    ``eval_split`` only chooses which split is evaluated every epoch.

    mean/std are per-channel, in [0, 1] units: the usual constants for cifar10, computed from
    the returned training images otherwise. ``cfg`` is a validated config (graft.config checks
    the name, the fractions and the split); the data's own paths are checked here.
    """
    check_data(cfg)
    if cfg.name in _CIFAR_DIRS:
        train, test, num_classes = _load_cifar(cfg)
    elif cfg.name == "tar":
        train, test, num_classes = _load_tar(cfg.root, cfg.image_size, cfg.cache_dir)
    elif cfg.name == "imagefolder":
        train, test, num_classes = _load_folder(cfg.root, cfg.image_size)
    elif cfg.name == "synthetic":
        train, test, num_classes = _synthetic(cfg.image_size)
    else:
        raise ValueError(f"data.name: unknown data set {cfg.name!r} (graft.config lists the valid ones)")

    if cfg.train_subset:
        train = train.take(balanced_subset(train.labels, cfg.train_subset, num_classes))
    if cfg.test_subset:
        test = test.take(balanced_subset(test.labels, cfg.test_subset, num_classes))
    val = None
    if cfg.val_fraction > 0:
        is_val = _holdout_mask(train.labels, cfg.val_fraction, num_classes)
        train, val = train.take(~is_val), train.take(is_val)

    if cfg.name == "cifar10":
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    else:
        mean, std = channel_stats(train.images)
    return Splits(train, val if cfg.eval_split == "val" else test, num_classes, mean, std, test)


def check_data(cfg: DataConfig) -> None:
    """Raise DataError when the data set named by ``cfg`` is not where ``data.root`` says: the
    same error the training processes would raise, found in a moment, before they start."""
    if cfg.name in _CIFAR_DIRS:
        folder = os.path.join(cfg.root, _CIFAR_DIRS[cfg.name])
        if not cfg.download and not os.path.isdir(folder):
            raise DataError(
                f"data.root: {cfg.name} not found: expected the python-version batches in {folder} (set data.root to "
                f"the folder holding {_CIFAR_DIRS[cfg.name]}/, data.download=true to fetch them when online, or "
                "data.name=tar data.root=FILE.tar.gz for a .tar.gz of train/ and test/ image folders)")
    elif cfg.name == "tar":
        if not os.path.isfile(cfg.root):
            raise DataError(f"data.root: no such file: {cfg.root} (expected a .tar.gz of train/ and test/ "
                            "ImageFolder trees)")
    elif cfg.name == "imagefolder":
        for split in SPLITS:
            if not os.path.isdir(os.path.join(cfg.root, split)):
                raise DataError(f"data.root: no such directory: {os.path.join(cfg.root, split)} "
                                "(expected a folder holding train/ and test/ ImageFolder trees)")


def _rank_in_class(labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Each sample's position among the samples of its class (in index order), and class sizes."""
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(labels)
    rank[order] = torch.arange(len(labels)) - starts[labels[order]]
    return rank, counts


def balanced_subset(labels: Tensor, k: int, num_classes: int) -> Tensor:
    """Boolean mask of the first ``k // C`` samples of every class (the first ``k % C`` classes
    get one more), so a subset is deterministic and as balanced as k allows."""
    rank, _ = _rank_in_class(labels, num_classes)
    quota = torch.full((num_classes,), k // num_classes, dtype=torch.long)
    quota[: k % num_classes] += 1
    return rank < quota[labels]


def _holdout_mask(labels: Tensor, fraction: float, num_classes: int) -> Tensor:
    """Boolean mask of the last ``round(fraction * n_c)`` samples of every class (at least one
    where a class has two or more), so validation is class-balanced and disjoint from train."""
    rank, counts = _rank_in_class(labels, num_classes)
    n_val = torch.round(counts.double() * fraction).long()
    n_val = torch.where(counts > 1, n_val.clamp(1, None), n_val).clamp(None, counts - 1)
    return rank >= (counts - n_val)[labels]


def channel_stats(images: Tensor) -> tuple[tuple, tuple]:
    """Per-channel mean and std in [0, 1] units, exactly, from 256-bin histograms (no float copy
    of the data set)."""
    values = torch.arange(256, dtype=torch.float64) / 255
    mean, std = [], []
    for c in range(images.shape[1]):
        hist = torch.bincount(images[:, c].reshape(-1), minlength=256).double()
        p = hist / hist.sum()
        m = (p * values).sum()
        mean.append(round(m.item(), 4))
        std.append(round((p * (values - m) ** 2).sum().sqrt().item(), 4))
    return tuple(mean), tuple(std)


def _load_cifar(cfg: DataConfig) -> tuple[ArraySplit, ArraySplit, int]:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if cfg.name == "cifar10" else torchvision.datasets.CIFAR100
    splits = []
    for train in (True, False):
        ds = cls(cfg.root, train=train, download=cfg.download)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        splits.append(ArraySplit(images, torch.as_tensor(ds.targets, dtype=torch.long)))
    return splits[0], splits[1], len(ds.classes)


def _synthetic(image_size: int) -> tuple[ArraySplit, ArraySplit, int]:
    """Random noise with balanced labels, for smoke tests only: nothing to learn here."""
    g = torch.Generator().manual_seed(0)
    splits = []
    for n in (512, 256):
        images = torch.randint(0, 256, (n, 3, image_size, image_size), generator=g,
                               dtype=torch.uint8)
        splits.append(ArraySplit(images, torch.arange(n) % 10))
    return splits[0], splits[1], 10


# --------------------------------------------------------------------------------------------
# Image trees (tar archives and folders) decoded to arrays
# --------------------------------------------------------------------------------------------


def _load_tar(path: str, image_size: int, cache_dir: str) -> tuple[ArraySplit, ArraySplit, int]:
    """Decode ``path`` once and keep the result as ``<cache_dir>/<sha256[:16]>-<size>px-v<version>.pt``."""
    cache_dir = os.path.expanduser(cache_dir or "~/.cache/graft")
    cache = os.path.join(cache_dir, f"{_sha256(path)[:16]}-{image_size}px-v{_CACHE_VERSION}.pt")
    if os.path.isfile(cache):
        try:
            return _read_cache(cache, image_size)
        except (*DAMAGED, OSError):  # damaged, foreign or unreadable: rebuilt below (a stop goes through)
            pass

    # CIFAR-10's 60,000 JPEGs take about 10 s (a minute on a busy CPU): say what is going on.
    logger.info(f"data: decoding {path} ({os.path.getsize(path) / 1e6:.1f} MB) at {image_size} px into {cache}; "
                "once: later runs read that file")
    try:
        _check_gzip(path)
        with tarfile.open(path, mode="r|*") as tar:
            files = {}
            for member in tar:
                name = posixpath.normpath(member.name)
                if name == ".":  # the root of an archive made with tar -C dir .
                    continue
                if member.isdir():
                    files.setdefault(name + "/", None)
                elif member.isfile():
                    files[name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"data.root: cannot read archive {path}: {e}") from None
    files = _strip_top_level(files)
    tree = _split_tree(files, path)
    train, test, classes = _decode_tree(tree, path, image_size, lambda key: files[key])

    blob = {"train_images": train.images, "train_labels": train.labels,
            "test_images": test.images, "test_labels": test.labels, "classes": classes}
    try:  # atomically: concurrent ranks never read a half-written cache
        atomic_save(blob, cache, "decoded data")
    except CheckpointError as e:  # the cache only saves time (a full disk too): train on, say why it is missing
        logger.warning(f"data.cache_dir: {e}; training goes on, and every run decodes the archive again")
    return train, test, len(classes)


_CACHE_VERSION = 2  # raise when decoding changes: old cache files are then ignored


def _read_cache(cache: str, image_size: int) -> tuple[ArraySplit, ArraySplit, int]:
    blob = torch.load(cache, map_location="cpu", weights_only=True)
    splits = []
    for split in SPLITS:
        images, labels = blob[f"{split}_images"], blob[f"{split}_labels"]
        if (images.dtype != torch.uint8 or images.shape[1:] != (3, image_size, image_size)
                or len(images) != len(labels) or len(labels) == 0
                or not 0 <= int(labels.min()) <= int(labels.max()) < len(blob["classes"])):
            raise ValueError(f"{cache}: not a decoded {split} split")
        splits.append(ArraySplit(images, labels))
    return splits[0], splits[1], len(blob["classes"])


def _check_gzip(path: str) -> None:
    """Read a gzip file to its end, which checks its CRC: the tar stream reader stops at the
    archive's end marker and would not notice damage after it (or a header damaged into one)."""
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            return
    with gzip.open(path) as f:
        while f.read(1 << 24):
            pass


def _load_folder(root: str, image_size: int) -> tuple[ArraySplit, ArraySplit, int]:
    """Decode a ``root/{train,test}/<class>/<image>`` tree into memory (no cache)."""
    logger.info(f"data: decoding the images under {root} at {image_size} px (a folder is decoded on every run; "
                "a .tar.gz of it, data.name=tar, only once)")
    files: dict[str, None] = {}
    for split in SPLITS:
        for dirpath, _, filenames in os.walk(os.path.join(root, split)):
            rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
            files[rel + "/"] = None
            files.update({f"{rel}/{f}": None for f in filenames})
    tree = _split_tree(files, root)

    def read(key: str) -> bytes:
        with open(os.path.join(root, key), "rb") as f:
            return f.read()

    train, test, classes = _decode_tree(tree, root, image_size, read)
    return train, test, len(classes)


def _strip_top_level(files: dict) -> dict:
    """Drop one enclosing folder (``cifar10/train/...``) when train/ and test/ sit under it."""
    tops = {key.split("/", 1)[0] for key in files}
    if tops & set(SPLITS) or len(tops) != 1:
        return files
    return {key.split("/", 1)[1]: v for key, v in files.items() if key.split("/", 1)[1]}


def _split_tree(files: dict, where: str) -> dict[str, dict[str, list[str]]]:
    """{split: {class: sorted image keys}} from the archive's paths ("dir/" keys mark folders).

    As torchvision's ImageFolder: a class is a folder under the split (hidden ones, such as
    .ipynb_checkpoints, are skipped), its images are found at any depth below it, and stray
    files next to the class folders are ignored.
    """
    tree: dict[str, dict[str, list[str]]] = {split: {} for split in SPLITS}
    for key in files:
        parts = key.rstrip("/").split("/")
        if parts[0] not in tree or len(parts) < 2 or parts[1].startswith("."):
            continue
        if len(parts) == 2 and not key.endswith("/"):  # a file beside the class folders
            continue
        images = tree[parts[0]].setdefault(parts[1], [])
        if len(parts) >= 3 and not key.endswith("/") and key.lower().endswith(IMG_EXTENSIONS):
            images.append(key)
    for split in SPLITS:
        if not tree[split]:
            raise DataError(f"data.root: no class folders under '{split}/' in {where}")
        for cls, images in tree[split].items():
            if not images:
                raise DataError(f"data.root: class folder '{split}/{cls}' in {where} has no images")
            images.sort()
    train_classes, test_classes = sorted(tree["train"]), sorted(tree["test"])
    if train_classes != test_classes:
        only_train = sorted(set(train_classes) - set(test_classes))
        only_test = sorted(set(test_classes) - set(train_classes))
        raise DataError(f"data.root: train/ and test/ class folders differ in {where}: "
                         f"only in train: {only_train or 'none'}, only in test: {only_test or 'none'}")
    return tree


def _decode_tree(tree, where: str, image_size: int, read) -> tuple[ArraySplit, ArraySplit, list]:
    """Decode every image with PIL into (N, 3, S, S) uint8; classes in sorted folder order."""
    from PIL import Image

    classes = sorted(tree["train"])
    splits = []
    for split in SPLITS:
        keys = [key for cls in classes for key in tree[split][cls]]
        labels = torch.repeat_interleave(
            torch.arange(len(classes)), torch.tensor([len(tree[split][c]) for c in classes]))
        out = np.empty((len(keys), image_size, image_size, 3), dtype=np.uint8)
        for i, key in enumerate(keys):
            try:
                with Image.open(io.BytesIO(read(key))) as im:
                    out[i] = _fit(im.convert("RGB"), image_size)
            except (OSError, ValueError, SyntaxError) as e:
                raise DataError(f"data.root: cannot decode image '{key}' in {where}: {e}") from None
        splits.append(ArraySplit(torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), labels))
    return splits[0], splits[1], classes


def _fit(im, size: int) -> np.ndarray:
    """The image as (size, size, 3): unchanged when it already is, else shorter side resized to
    ``size`` and the centre cropped (the usual eval transform)."""
    if im.size != (size, size):
        w, h = im.size
        scale = size / min(w, h)
        w, h = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((w, h), resample=3)  # bicubic
        left, top = (w - size) // 2, (h - size) // 2
        im = im.crop((left, top, left + size, top + size))
    return np.asarray(im)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# In-memory loader with on-device augmentation
# --------------------------------------------------------------------------------------------


def mix_seed(*values: int) -> int:
    """A 63-bit seed from a few small integers (splitmix64-style), so that nearby (seed, epoch)
    pairs give unrelated streams."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (v & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return x >> 1


class InMemoryLoader:
    """Batches from uint8 tensors held on ``device``; augmentation done per batch on that device.

    Train mode shuffles with ``torch.randperm`` (CPU generator seeded from (seed, epoch)), then
    applies a random 4-pixel zero-padded crop and a random horizontal flip to the whole batch
    with one gather (generator on ``device`` seeded from (seed, epoch, rank_in_group)). Eval
    mode keeps the stored order and does not augment. Call ``set_epoch`` before each epoch:
    the batches are then a pure function of (seed, epoch), which is what makes resume exact.

    With ``group_size > 1`` (train mode only: evaluation is never sharded) the replicas of one
    network draw the same permutation, cut to a multiple of ``group_size`` (every replica runs
    the same number of steps), and each takes every ``group_size``-th entry from
    ``rank_in_group`` on, so they see disjoint data.
    ``batch_size`` is the per-replica batch. A last training batch of a single image is
    dropped (BatchNorm cannot train on one value per channel, e.g. torchvision models at 32 px).
    """

    PAD = 4

    def __init__(self, split: ArraySplit, batch_size: int, *, train: bool, device, mean, std,
                 seed: int = 0, drop_last: bool = False, rank_in_group: int = 0, group_size: int = 1):
        if not 0 <= rank_in_group < group_size:
            raise ValueError(f"rank_in_group must be in [0, {group_size}), got {rank_in_group}")
        if group_size > 1 and not train:
            raise ValueError("group_size: evaluation is never sharded (every replica evaluates the whole split)")
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_size = batch_size
        self.train = train
        self.seed = seed
        self.drop_last = drop_last
        self.rank_in_group = rank_in_group
        self.group_size = group_size
        self.epoch = 0
        # Normalization folded into one multiply-add on the raw 0..255 values.
        mean = torch.as_tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        std = torch.as_tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._shift = -mean / std

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.labels) // self.group_size
        if self.drop_last:
            return n // self.batch_size
        if self.train and n % self.batch_size == 1 and n > 1:
            return n // self.batch_size  # a last batch of one image: BatchNorm cannot train on it
        return math.ceil(n / self.batch_size)

    def indices(self) -> Tensor:
        """This replica's sample indices for the current epoch, in batch order (CPU)."""
        n = len(self.labels)
        if not self.train:
            return torch.arange(n)
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        order = torch.randperm(n, generator=g)[: n // self.group_size * self.group_size]
        return order[self.rank_in_group :: self.group_size]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        index = self.indices().to(self.device)
        g = None
        if self.train:
            g = torch.Generator(device=self.device)
            g.manual_seed(mix_seed(self.seed, self.epoch, self.rank_in_group, 1))
        for b in range(len(self)):
            idx = index[b * self.batch_size : (b + 1) * self.batch_size]
            images = self.images[idx]
            if g is not None:
                images = self.augment(images, g)
            x = torch.addcmul(self._shift, images.float(), self._scale)
            yield x, self.labels[idx]

    @classmethod
    def augment(cls, images: Tensor, g: torch.Generator) -> Tensor:
        """Random crop of the zero-padded batch plus random horizontal flip, as one gather.

        Row indices are ``dy + arange(H)``; column indices are ``dx + arange(W)``, reversed
        for the samples picked for flipping. Both are drawn from ``g`` for the whole batch.
        """
        b, _, h, w = images.shape
        p = cls.PAD
        padded = F.pad(images, (p, p, p, p))
        offsets = torch.randint(0, 2 * p + 1, (b, 2), generator=g, device=images.device)
        flip = torch.rand(b, generator=g, device=images.device) < 0.5
        ar_h = torch.arange(h, device=images.device)
        ar_w = torch.arange(w, device=images.device)
        rows = offsets[:, :1] + ar_h  # (B, H)
        cols = offsets[:, 1:] + torch.where(flip[:, None], ar_w.flip(0), ar_w)  # (B, W)
        batch = torch.arange(b, device=images.device)[:, None, None, None]
        chans = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        return padded[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]


# --------------------------------------------------------------------------------------------
# ImageNet-style folders through DataLoader workers
# --------------------------------------------------------------------------------------------


class EpochLoader(DataLoader):
    """A DataLoader with ``set_epoch``, passed on to its sampler when that has one, so that the
    training loop can treat it like ``InMemoryLoader``."""

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


class Loaders(NamedTuple):
    train: InMemoryLoader | DataLoader | None  # None: built for evaluation only
    eval: InMemoryLoader | DataLoader   # the split evaluated every epoch (data.eval_split)
    test: InMemoryLoader | DataLoader   # the test split (the same loader as eval unless eval_split is val)
    num_classes: int


def build_loaders(cfg: DataConfig, batch_size: int, eval_batch_size: int, *, seed: int, device,
                  rank_in_group: int = 0, group_size: int = 1,
                  splits: Splits | None = None, train: bool = True) -> Loaders:
    """The loaders of one replica: in memory when ``cfg.in_memory`` (``splits`` when the caller
    has loaded them already), else DataLoaders over an ImageFolder tree. ``seed`` fixes the
    training order; ``batch_size`` is per replica; evaluation is never sharded. ``train=False``
    (graft-eval): no training loader, and the training images stay off the device."""
    if not cfg.in_memory:
        return build_folder_loaders(cfg, batch_size, eval_batch_size, seed=seed, rank_in_group=rank_in_group,
                                    group_size=group_size, pin_memory=torch.device(device).type == "cuda",
                                    train=train)
    data = load_arrays(cfg) if splits is None else splits
    common = dict(device=device, mean=data.mean, std=data.std)
    train = InMemoryLoader(data.train, batch_size, train=True, seed=seed, rank_in_group=rank_in_group,
                           group_size=group_size, **common) if train else None
    check_usable(cfg, data.num_classes, len(data.eval), len(data.test))
    eval_ = InMemoryLoader(data.eval, eval_batch_size, train=False, **common)
    test = eval_ if data.test is data.eval else InMemoryLoader(data.test, eval_batch_size, train=False, **common)
    return Loaders(train, eval_, test, data.num_classes)


def check_usable(cfg: DataConfig, num_classes: int, evaluated: int, tested: int) -> None:
    """Refuse, before any training, data that cannot give a meaningful run: one class (every
    network reaches 100% at once), or an empty split to evaluate (it would fail after a whole
    epoch)."""
    if num_classes < 2:
        raise DataError(f"data.root: {cfg.root} holds {num_classes} class(es); classification needs 2 or more "
                        "class folders")
    if evaluated == 0:
        why = (f"data.val_fraction={cfg.val_fraction:g} holds out no image (too few images per class)"
               if cfg.eval_split == "val" else "the test split is empty")
        raise DataError(f"data.eval_split: {cfg.eval_split}: nothing to evaluate: {why}")
    if tested == 0:
        raise DataError(f"data.root: {cfg.root}: the test split is empty")


def open_image(path: str):
    """ImageFolder's own loader, naming the file that cannot be decoded (PIL names none)."""
    from torchvision.datasets.folder import default_loader

    try:
        return default_loader(path)
    except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise DataError(f"data.root: cannot decode image {path}: {e}") from None


def build_folder_loaders(cfg: DataConfig, batch_size: int, eval_batch_size: int | None = None, *, seed: int,
                         rank_in_group: int = 0, group_size: int = 1, pin_memory: bool = False,
                         train: bool = True) -> Loaders:
    """``Loaders`` for an ImageFolder tree too big for memory (``test`` is ``eval`` unless
    ``eval_split`` is 'val'; ``eval_batch_size`` defaults to ``batch_size``).

    The train loader always uses a ``DistributedSampler`` (num_replicas=group_size,
    rank=rank_in_group, seed=seed; also for group_size 1), so the order is a function of
    (seed, epoch); set the epoch with ``train_loader.set_epoch(epoch)`` (``EpochLoader``, which
    calls ``train_loader.sampler.set_epoch``). Batches are CPU tensors (pinned with
    ``pin_memory``, for a CUDA device: pinning opens a CUDA context, so never for the CPU).
    Unlike ``InMemoryLoader``, only the order is exact on resume: the workers' augmentation
    RNG is seeded once per worker start, not per epoch.
    The eval loader yields the whole eval split, in order, on every replica.
    Subsets and the validation hold-out follow the same rules as ``load_arrays``.
    """
    import torchvision
    from torchvision import transforms as T

    if cfg.name != "imagefolder":
        raise DataError(f"data.name: build_folder_loaders needs 'imagefolder', got {cfg.name!r}")
    check_data(cfg)
    size = cfg.image_size
    normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                          normalize])
    eval_tf = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(),
                         normalize])
    folder = functools.partial(torchvision.datasets.ImageFolder, loader=open_image)
    train_ds = folder(os.path.join(cfg.root, "train"), transform=train_tf)
    test_ds = folder(os.path.join(cfg.root, "test"), transform=eval_tf)
    if train_ds.classes != test_ds.classes:
        raise DataError(f"data.root: train/ and test/ class folders differ in {cfg.root}: "
                         f"{len(train_ds.classes)} vs {len(test_ds.classes)} classes")
    num_classes = len(train_ds.classes)

    train_labels = torch.as_tensor(train_ds.targets)
    keep = torch.ones(len(train_labels), dtype=torch.bool)
    if cfg.train_subset:
        keep = balanced_subset(train_labels, cfg.train_subset, num_classes)
    kept = keep.nonzero().squeeze(1)
    train_idx, val_idx = kept, kept[:0]
    if cfg.val_fraction > 0:
        is_val = _holdout_mask(train_labels[kept], cfg.val_fraction, num_classes)
        train_idx, val_idx = kept[~is_val], kept[is_val]
    if cfg.test_subset:
        test_labels = torch.as_tensor(test_ds.targets)
        mask = balanced_subset(test_labels, cfg.test_subset, num_classes)
        test_ds = Subset(test_ds, mask.nonzero().squeeze(1).tolist())
    eval_ds = test_ds
    if cfg.eval_split == "val":
        eval_ds = Subset(folder(os.path.join(cfg.root, "train"), transform=eval_tf),
                         val_idx.tolist())
    if len(train_idx) < len(train_labels):
        train_ds = Subset(train_ds, train_idx.tolist())

    common = dict(num_workers=cfg.workers, pin_memory=pin_memory, persistent_workers=cfg.workers > 0)
    train_loader = None
    if train:
        sampler = DistributedSampler(train_ds, num_replicas=group_size, rank=rank_in_group,
                                     shuffle=True, seed=seed, drop_last=True)
        train_loader = EpochLoader(train_ds, batch_size=batch_size, sampler=sampler, drop_last=True,
                                   generator=torch.Generator().manual_seed(seed), **common)
    # Every network evaluates the whole eval split on its leader rank (see graft.train), so the
    # eval loader is not sharded across replicas.
    check_usable(cfg, num_classes, len(eval_ds), len(test_ds))
    eval_batch_size = eval_batch_size or batch_size
    eval_loader = EpochLoader(eval_ds, batch_size=eval_batch_size, shuffle=False, **common)
    test_loader = eval_loader
    if eval_ds is not test_ds:
        test_loader = EpochLoader(test_ds, batch_size=eval_batch_size, shuffle=False, **common)
    return Loaders(train_loader, eval_loader, test_loader, num_classes)
