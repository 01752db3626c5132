"""Data loading on the real CIFAR-10 sample fixture, and the in-memory loader's guarantees."""

import io
import tarfile
from dataclasses import replace as dataclass_replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import graft.data as data
import graft.log as graft_log
from graft.config import DataConfig
from graft.data import (
    ArraySplit,
    DataError,
    InMemoryLoader,
    build_folder_loaders,
    build_loaders,
    check_data,
    load_arrays,
)
from helpers import fill, small_disk

FIXTURE = Path(__file__).parent / "fixtures" / "cifar10_sample.tar.gz"
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IDENTITY = dict(mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))  # outputs raw 0..255


def tar_cfg(tmp_path, **kw) -> DataConfig:
    return DataConfig(name="tar", root=str(FIXTURE), cache_dir=str(tmp_path / "cache"), **kw)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The fixture decoded once for the module: (train, test, num_classes, mean, std, test)."""
    return load_arrays(tar_cfg(tmp_path_factory.mktemp("full")))


def png_bytes(color, size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def make_tar(path: Path, files: dict, dirs=()) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def id_split(n: int, value=None) -> ArraySplit:
    """Labels are sample ids, so batches reveal which samples they hold."""
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    if value is not None:
        images.fill_(value)
    return ArraySplit(images, torch.arange(n))


def collect(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


# ---------------------------------------------------------------- loading the fixture


def test_fixture_loads(full):
    train, test, num_classes, mean, std, also_test = full
    assert also_test is test  # eval_split=test: the evaluated split is the test split
    assert FIXTURE.stat().st_size < 2_100_000
    assert train.images.shape == (1000, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (500, 3, 32, 32) and test.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64 and num_classes == 10
    assert torch.bincount(train.labels).tolist() == [100] * 10
    assert torch.bincount(test.labels).tolist() == [50] * 10
    # Real photographs, not noise: CIFAR-like channel statistics.
    for m, ref in zip(mean, data.CIFAR10_MEAN):
        assert abs(m - ref) < 0.03
    for s in std:
        assert 0.2 < s < 0.3


def test_second_load_uses_cache(tmp_path, monkeypatch, capsys):
    graft_log.setup(0, 1)  # as graft-train does: info to stdout
    cfg = tar_cfg(tmp_path)
    train, test, *_ = load_arrays(cfg)
    (cache,) = (tmp_path / "cache").glob("*.pt")
    # The decode (10 s for all of CIFAR-10) says what it does; reading the cache says nothing.
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith(f"data: decoding {FIXTURE} (") and line.endswith(f"MB) at 32 px into {cache}; once: later "
                                                                              "runs read that file")
    assert cache.name.startswith(data._sha256(str(FIXTURE))[:16]) and "32px" in cache.name
    mtime = cache.stat().st_mtime_ns

    def no_tar(*args, **kwargs):
        raise AssertionError("the archive was opened despite the cache")

    monkeypatch.setattr(data.tarfile, "open", no_tar)
    train2, test2, *_ = load_arrays(cfg)
    assert cache.stat().st_mtime_ns == mtime
    assert torch.equal(train.images, train2.images) and torch.equal(test.labels, test2.labels)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".tmp")]
    assert capsys.readouterr().out == ""


def test_top_level_folder_is_stripped(tmp_path):
    files = {f"cifar/{s}/{c}/0.png": png_bytes(i * 40, (32, 32))
             for s in ("train", "test") for i, c in enumerate(["a", "b"])}
    path = make_tar(tmp_path / "prefixed.tar.gz", files)
    train, test, n, *_ = load_arrays(DataConfig(name="tar", root=str(path), cache_dir=str(tmp_path)))
    assert n == 2 and train.labels.tolist() == [0, 1]
    assert train.images[1, 0].float().mean().item() == pytest.approx(40, abs=1)


def test_tree_reads_like_imagefolder(tmp_path):
    """Stray files beside the class folders and hidden folders are ignored, nested images
    count, and an archive made with ``tar -C dir .`` (a "./" root) is read like any other."""
    files = {f"./cifar/{s}/{c}/0.png": png_bytes(i * 40, (32, 32))
             for s in ("train", "test") for i, c in enumerate(["a", "b"])}
    files.update({"./cifar/train/.DS_Store": b"junk", "./cifar/train/README": b"notes",
                  "./cifar/train/.ipynb_checkpoints/x.png": png_bytes(0), "./cifar/train/b/sub/1.png": png_bytes(99)})
    path = make_tar(tmp_path / "messy.tar.gz", files, dirs=["."])
    train, test, n, *_ = load_arrays(DataConfig(name="tar", root=str(path), cache_dir=str(tmp_path)))
    assert n == 2 and train.labels.tolist() == [0, 1, 1] and test.labels.tolist() == [0, 1]


def test_unwritable_cache_is_a_warning(tmp_path, capsys):
    graft_log.setup(0, 1)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    train, *_ = load_arrays(DataConfig(name="tar", root=str(FIXTURE), cache_dir=str(blocker / "cache")))
    assert len(train.labels) == 1000
    err = capsys.readouterr().err
    assert err.startswith("graft: warning: data.cache_dir: ") and "cannot write the decoded data" in err


def test_a_full_disk_under_the_cache_is_a_warning(tmp_path, capsys):
    """On a real full file system (torch.save's own writer would turn ENOSPC into an opaque
    RuntimeError): the cache is optional, training goes on."""
    graft_log.setup(0, 1)
    with small_disk(tmp_path / "disk") as disk:
        fill(disk)
        train, *_ = load_arrays(DataConfig(name="tar", root=str(FIXTURE), cache_dir=str(disk)))
        assert len(train.labels) == 1000
        assert sorted(p.name for p in disk.iterdir()) == [".filler"]  # no half-written cache left
    err = capsys.readouterr().err
    assert "cannot write the decoded data (disk full)" in err and "training goes on" in err


@pytest.mark.parametrize("kind", ["one class", "empty validation"])
def test_degenerate_data_is_refused_before_training(tmp_path, kind):
    """One class trains to 100% at once; an empty validation split failed after a whole epoch."""
    classes = ["a"] if kind == "one class" else ["a", "b"]
    root = tmp_path / "tree"
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            (root / split / c / "0.png").write_bytes(png_bytes((10, 20, 30)))
    cfg = DataConfig(name="imagefolder", root=str(root), image_size=8,
                     **({"val_fraction": 0.1, "eval_split": "val"} if kind != "one class" else {}))
    message = "holds 1 class\\(es\\); classification needs 2" if kind == "one class" else \
        "data.eval_split: val: nothing to evaluate: data.val_fraction=0.1 holds out no image"
    for in_memory in (True, False):
        with pytest.raises(DataError, match=message):
            build_loaders(dataclass_replace(cfg, in_memory=in_memory, workers=0), 2, 2, seed=0, device="cpu")


def test_a_foreign_cache_file_is_rebuilt(tmp_path):
    cfg = tar_cfg(tmp_path)
    load_arrays(cfg)
    (cache,) = (tmp_path / "cache").glob("*.pt")
    torch.save({"train_images": torch.zeros(3, 3, 3, 3), "train_labels": torch.zeros(1)}, cache)
    train, *_ = load_arrays(cfg)
    assert train.images.shape == (1000, 3, 32, 32)


def test_a_stop_while_reading_the_cache_goes_through_and_a_cut_cache_is_rebuilt(tmp_path, monkeypatch):
    """Ctrl-C (graft's Stop) or MemoryError while the cache was read were taken for a damaged
    cache: the archive was decoded again and the stop was lost."""
    from graft.errors import Stop

    cfg = tar_cfg(tmp_path)
    load_arrays(cfg)
    (cache,) = (tmp_path / "cache").glob("*.pt")
    for error in (Stop("received SIGINT: stopped between steps"), MemoryError()):
        def interrupted(*args, error=error, **kwargs):
            raise error

        with monkeypatch.context() as m:
            m.setattr(torch, "load", interrupted)
            with pytest.raises(type(error)):
                load_arrays(cfg)
    for cut in (100, cache.stat().st_size // 2):  # torch's reader: RuntimeError, or EINVAL from a seek
        cache.write_bytes(cache.read_bytes()[:cut])
        train, *_ = load_arrays(cfg)
        assert train.images.shape == (1000, 3, 32, 32)


def test_subsets_are_balanced_and_first_k(tmp_path, full):
    train, test, *_ = load_arrays(tar_cfg(tmp_path, train_subset=200, test_subset=55))
    assert torch.bincount(train.labels).tolist() == [20] * 10
    assert torch.bincount(test.labels).tolist() == [6] * 5 + [5] * 5
    # The first 20 images of each class, in file order.
    expect = torch.cat([full[0].images[c * 100 : c * 100 + 20] for c in range(10)])
    assert torch.equal(train.images, expect)


def test_validation_split(tmp_path, full):
    train, val, *_, test = load_arrays(tar_cfg(tmp_path, val_fraction=0.1, eval_split="val"))
    assert torch.equal(test.images, full.test.images)  # the test split comes along for the end
    assert torch.bincount(train.labels).tolist() == [90] * 10
    assert torch.bincount(val.labels).tolist() == [10] * 10
    whole = full[0].images.view(10, 100, 3, 32, 32)
    assert torch.equal(train.images, whole[:, :90].reshape(-1, 3, 32, 32))
    assert torch.equal(val.images, whole[:, 90:].reshape(-1, 3, 32, 32))
    # Disjoint by content too (no training image reappears in validation).
    seen = {bytes(x.numpy()) for x in train.images}
    assert not any(bytes(x.numpy()) in seen for x in val.images)
    # eval_split="test" still holds the validation images out of train.
    train_t, test, *_ = load_arrays(tar_cfg(tmp_path, val_fraction=0.1))
    assert len(train_t) == 900 and len(test) == 500


def test_build_loaders_in_memory(tmp_path):
    loaders = build_loaders(tar_cfg(tmp_path, val_fraction=0.1, eval_split="val"), 64, 100, seed=3, device="cpu")
    assert (len(loaders.train.labels), len(loaders.eval.labels), len(loaders.test.labels)) == (900, 100, 500)
    assert (loaders.train.batch_size, loaders.eval.batch_size, loaders.num_classes) == (64, 100, 10)
    assert loaders.train.train and not loaders.eval.train and not loaders.test.train
    # eval_split test: one loader (one copy of the test images on the device), not two.
    loaders = build_loaders(tar_cfg(tmp_path), 64, 100, seed=3, device="cpu")
    assert loaders.test is loaders.eval and len(loaders.eval.labels) == 500


def test_synthetic():
    train, test, n, mean, std, _ = load_arrays(DataConfig(name="synthetic"))
    assert train.images.shape == (512, 3, 32, 32) and test.images.shape == (256, 3, 32, 32)
    assert n == 10 and torch.bincount(train.labels).tolist() == [52] * 2 + [51] * 8
    assert all(abs(m - 0.5) < 0.01 for m in mean)


def test_imagefolder_in_memory_resizes(tmp_path):
    for s in ("train", "test"):
        for i, c in enumerate(["x", "y", "z"]):
            (tmp_path / s / c).mkdir(parents=True)
            Image.new("RGB", (48, 40), (i * 50, 0, 0)).save(tmp_path / s / c / "a.png")
    train, test, n, *_ = load_arrays(DataConfig(name="imagefolder", root=str(tmp_path), image_size=32))
    assert n == 3 and train.images.shape == (3, 3, 32, 32) and test.labels.tolist() == [0, 1, 2]
    assert train.images[2, 0].float().mean().item() == pytest.approx(100, abs=1)


def test_an_undecodable_image_in_memory_is_named(tmp_path):
    """The in-memory path (every image decoded up front): one DataError naming the image, the
    folder it is in, and PIL's reason."""
    for s in ("train", "test"):
        for i, c in enumerate(["x", "y"]):
            (tmp_path / s / c).mkdir(parents=True)
            Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(tmp_path / s / c / "a.jpg")
    bad = tmp_path / "train" / "y" / "a.jpg"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(DataError, match=rf"^data.root: cannot decode image 'train/y/a.jpg' in {tmp_path}: \S"):
        load_arrays(DataConfig(name="imagefolder", root=str(tmp_path), image_size=8))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("name,where,message", [
    ("tar", "nope.tar.gz", "data.root: no such file: {root} "),
    ("imagefolder", "nope", "data.root: no such directory: {root}/train "),
    ("cifar10", "", "data.root: cifar10 not found: expected the python-version batches in {root}/cifar-10-batches-py "
                    r"\(set data.root .*data.download=true .*, or data.name=tar data.root=FILE.tar.gz "),
])
def test_missing_data_is_named_before_loading(tmp_path, name, where, message):
    cfg = DataConfig(name=name, root=str(tmp_path / where).rstrip("/"), cache_dir=str(tmp_path))
    expected = message.format(root=cfg.root)
    with pytest.raises(DataError, match=expected):
        check_data(cfg)
    with pytest.raises(DataError, match=expected):  # the same error as loading it
        load_arrays(cfg)
    if name == "imagefolder":
        with pytest.raises(DataError, match=expected):
            build_folder_loaders(cfg, 2, seed=0)
    check_data(DataConfig(name="synthetic"))
    check_data(tar_cfg(tmp_path))


def test_empty_class_folder(tmp_path):
    files = {"train/dog/0.png": png_bytes("red"), "test/cat/0.png": png_bytes("red"),
             "test/dog/0.png": png_bytes("blue")}
    path = make_tar(tmp_path / "empty.tar.gz", files, dirs=["train/", "train/cat/"])
    with pytest.raises(ValueError, match=f"class folder 'train/cat' in {path} has no images"):
        load_arrays(DataConfig(name="tar", root=str(path), cache_dir=str(tmp_path)))


def test_class_lists_differ(tmp_path):
    files = {"train/dog/0.png": png_bytes("red"), "train/cat/0.png": png_bytes("red"),
             "test/dog/0.png": png_bytes("blue"), "test/emu/0.png": png_bytes("blue")}
    path = make_tar(tmp_path / "differ.tar.gz", files)
    with pytest.raises(ValueError, match=r"only in train: \['cat'\], only in test: \['emu'\]"):
        load_arrays(DataConfig(name="tar", root=str(path), cache_dir=str(tmp_path)))


def flip_last_byte_of_data(blob: bytes) -> bytes:
    """Damage the compressed stream just before gzip's 8-byte CRC/length trailer."""
    return blob[:-9] + bytes([blob[-9] ^ 0xFF]) + blob[-8:]


@pytest.mark.parametrize("blob", [np.random.default_rng(0).bytes(5000), FIXTURE.read_bytes()[:100_000],
                                  flip_last_byte_of_data(FIXTURE.read_bytes())],
                         ids=["random", "truncated", "damaged-after-the-end-marker"])
def test_corrupt_archive(tmp_path, blob):
    path = tmp_path / "bad.tar.gz"
    path.write_bytes(blob)
    with pytest.raises(ValueError, match=f"data.root: cannot read archive {path}: "):
        load_arrays(DataConfig(name="tar", root=str(path), cache_dir=str(tmp_path)))


def test_unknown_name():
    with pytest.raises(ValueError, match="data.name: unknown data set 'mnist'"):  # graft.config refuses it first
        load_arrays(DataConfig(name="mnist"))


# ---------------------------------------------------------------- InMemoryLoader


def test_loader_is_a_function_of_seed_and_epoch():
    split = id_split(300)

    def run(seed, epoch):
        loader = InMemoryLoader(split, 64, train=True, device="cpu", seed=seed, **IDENTITY)
        loader.set_epoch(epoch)
        return collect(loader)

    x1, y1 = run(0, 3)
    x2, y2 = run(0, 3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert sorted(y1.tolist()) == list(range(300))
    _, y3 = run(0, 4)
    _, y4 = run(1, 3)
    assert not torch.equal(y1, y3) and not torch.equal(y1, y4)


def test_loader_lengths():
    split = id_split(300)
    assert len(InMemoryLoader(split, 64, train=True, device="cpu", **IDENTITY)) == 5
    loader = InMemoryLoader(split, 64, train=True, device="cpu", drop_last=True, **IDENTITY)
    assert len(loader) == 4 and len(list(loader)) == 4
    # A last training batch of a single image is dropped; in evaluation nothing is.
    assert [len(y) for _, y in InMemoryLoader(id_split(129), 64, train=True, device="cpu", **IDENTITY)] == [64, 64]
    assert [len(y) for _, y in InMemoryLoader(id_split(129), 64, train=False, device="cpu", **IDENTITY)] == [64, 64, 1]


def test_eval_order_fixed_and_normalized(full):
    train, test, _, mean, std, _ = full
    loader = InMemoryLoader(test, 128, train=False, device="cpu", mean=mean, std=std, seed=5)
    loader.set_epoch(7)
    x, y = collect(loader)
    assert x.dtype == torch.float32 and x.shape == (500, 3, 32, 32)
    assert torch.equal(y, test.labels)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (test.images.float() / 255 - m) / s)
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.15
    assert ((x.std(dim=(0, 2, 3)) - 1).abs() < 0.2).all()


def test_crops_are_shifted_windows():
    loader = InMemoryLoader(id_split(256, value=255), 256, train=True, device="cpu", **IDENTITY)
    x, _ = next(iter(loader))
    inside = x[:, 0] > 0  # (B, 32, 32): the part of the window that covers the image
    assert ((x == 0) | (x == 255)).all()
    rows, cols = inside.any(2), inside.any(1)
    assert torch.equal(inside, rows[:, :, None] & cols[:, None, :])  # one rectangle
    for mask in (rows, cols):  # contiguous, at most 4 rows/cols lost to padding
        assert (mask.sum(1) >= 28).all()
        assert ((mask[:, 1:].int() - mask[:, :-1].int()).abs().sum(1) <= 1).all()
    shifts = 32 - rows.sum(1)
    assert len(shifts.unique()) == 5  # offsets 0..8 give shifts 0..4


def test_flips_about_half():
    ramp = (8 + 7 * torch.arange(32)).to(torch.uint8).expand(512, 3, 32, 32).contiguous()
    loader = InMemoryLoader(ArraySplit(ramp, torch.arange(512)), 512, train=True, device="cpu", **IDENTITY)
    x, _ = next(iter(loader))
    row = x[:, 0, 16]
    up = [bool((r[r > 0].diff() > 0).all()) for r in row]
    down = [bool((r[r > 0].diff() < 0).all()) for r in row]
    assert all(u != d for u, d in zip(up, down))  # each sample is the ramp or its mirror
    assert 0.4 < sum(down) / 512 < 0.6


def test_replicas_see_disjoint_shares():
    split = id_split(301)
    whole = InMemoryLoader(split, 32, train=True, device="cpu", seed=3, **IDENTITY)
    whole.set_epoch(2)
    shares = []
    for rank in range(2):
        loader = InMemoryLoader(split, 32, train=True, device="cpu", seed=3, rank_in_group=rank,
                                group_size=2, **IDENTITY)
        loader.set_epoch(2)
        shares.append(collect(loader)[1])
        assert len(shares[-1]) == 150 and len(loader) == 5
    assert not set(shares[0].tolist()) & set(shares[1].tolist())
    interleaved = torch.stack(shares, 1).reshape(-1)
    assert torch.equal(interleaved, whole.indices()[:300])
    # Evaluation is never sharded: every replica evaluates the whole split.
    with pytest.raises(ValueError, match="group_size: evaluation is never sharded"):
        InMemoryLoader(split, 32, train=False, device="cpu", rank_in_group=1, group_size=2, **IDENTITY)
    assert collect(InMemoryLoader(split, 32, train=False, device="cpu", **IDENTITY))[1].tolist() == list(range(301))


# ---------------------------------------------------------------- folder loaders


def test_build_folder_loaders(tmp_path):
    for s, n in (("train", 6), ("test", 3)):
        for i, c in enumerate(["x", "y"]):
            (tmp_path / s / c).mkdir(parents=True)
            for k in range(n):
                Image.new("RGB", (40, 36), (i * 100, k * 10, 0)).save(tmp_path / s / c / f"{k}.png")
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), workers=0, in_memory=False, image_size=24)
    train, evals, test, n = build_folder_loaders(cfg, 2, 3, seed=0)
    assert n == 2 and len(train.dataset) == 12 and test is evals
    assert (train.batch_size, evals.batch_size) == (2, 3)
    train.set_epoch(1)
    assert train.sampler.epoch == 1
    x, y = next(iter(train))
    assert x.shape == (2, 3, 24, 24) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert sum(len(b[1]) for b in evals) == 6

    cfg.val_fraction, cfg.eval_split = 0.5, "val"
    shares = [build_folder_loaders(cfg, 2, seed=0, rank_in_group=r, group_size=2) for r in range(2)]
    assert len(shares[0].train.dataset) == 6  # 3 of 6 per class held out
    assert [len(s.eval.dataset) for s in shares] == [6, 6]  # every replica evaluates the whole split
    assert [len(s.train.sampler) for s in shares] == [3, 3]
    assert [len(s.test.dataset) for s in shares] == [6, 6]  # the test split stays reachable
    assert build_loaders(cfg, 2, 3, seed=0, device="cpu").eval.batch_size == 3  # the same path, picked
