"""Training throughput of one network: our loop against a reference loop in the official code's style.

Ours: uint8 images held on the device, crop + flip per batch on the device (graft.data), channels_last.
Reference (grafting_cifar/grafting.py's data path): arrays turned into PIL images per sample,
RandomCrop(32, 4) + RandomHorizontalFlip + ToTensor + Normalize, a DataLoader with 2 workers,
NCHW float32. Same model, optimizer, batch size and real CIFAR-10 images. Runs are paired and
interleaved (ours, reference, reference, ours, ...): this machine's speed drifts by tens of
percent, so the figure is the median of the per-pair ratios. On CUDA (``--device cuda``) the
reference loop's batches come through pinned memory, as in the official code with ``pin_memory``.

    python benchmarks/bench_throughput.py [--models resnet32 mobilenetv2] [--pairs 4] [--device cuda] [--write]
"""

import argparse
import itertools
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

from common import write_section
from graft.config import DataConfig
from graft.data import InMemoryLoader, load_arrays
from graft.engine import is_channels_last, to_device
from graft.models import build_model

ROOT = Path(__file__).resolve().parent.parent


class PILDataset(torch.utils.data.Dataset):
    """CIFAR-style: an HWC uint8 array per sample, made a PIL image, then the transforms."""

    def __init__(self, images, labels, transform):
        self.images = images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def epochs(loader):
    """The loader's batches, epoch after epoch (a small data set has fewer batches than steps)."""
    for epoch in itertools.count():
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(epoch)
        yield from loader


def train_steps(model, batches, steps: int, warmup: int, device: torch.device, bf16: bool = False) -> float:
    """Images per second over ``steps`` SGD steps after ``warmup`` steps (``bf16``: under
    ``torch.autocast(device, torch.bfloat16)``, what ``amp=bf16`` does)."""
    model.train()
    channels_last = is_channels_last(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    seen, start = 0, None
    for step, (images, labels) in enumerate(itertools.islice(batches, warmup + steps)):
        if step == warmup:
            sync()
            start = time.perf_counter()
            seen = 0
        images, labels = to_device(images, labels, device, channels_last)  # as graft's engine does
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(images), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += labels.numel()
    sync()
    return seen / (time.perf_counter() - start)


def ours(model_name, split, mean, std, steps, warmup, device, channels_last=True, bf16=False):
    torch.manual_seed(0)
    model = build_model(model_name, 10).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = InMemoryLoader(split, 128, train=True, device=device, mean=mean, std=std, seed=0)
    return train_steps(model, epochs(loader), steps, warmup, device, bf16=bf16)


def reference(model_name, split, mean, std, steps, warmup, device):
    torch.manual_seed(0)
    model = build_model(model_name, 10).to(device)
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(mean, std)])
    # Persistent workers: a small data set is gone through many times, a worker restart each time
    # would be charged to the reference (the official code goes through 391 batches per start).
    loader = torch.utils.data.DataLoader(PILDataset(split.images, split.labels, transform), batch_size=128,
                                         shuffle=True, num_workers=2, persistent_workers=True,
                                         pin_memory=device.type == "cuda")
    return train_steps(model, epochs(loader), steps, warmup, device)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    parser.add_argument("--models", nargs="+", default=["resnet32", "mobilenetv2"])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)

    data = load_arrays(DataConfig(name="tar", root=args.data, train_subset=128 * 20))
    train, mean, std = data.train, data.mean, data.std
    rows = ["| model | ours, channels_last (img/s) | ours, NCHW (img/s) | ours, amp=bf16 (img/s) | "
            "reference loop (img/s) | ours / reference (median of pairs) | ours bf16 / reference |",
            "|---|---|---|---|---|---|---|"]
    for name in args.models:
        o, o_nchw, o_bf16, r, ratios, ratios_bf16 = [], [], [], [], [], []
        for pair in range(args.pairs):
            runs = [("ours", ours), ("ref", reference)]
            if pair % 2:
                runs.reverse()
            got = {label: fn(name, train, mean, std, args.steps, args.warmup, device) for label, fn in runs}
            o.append(got["ours"])
            r.append(got["ref"])
            ratios.append(got["ours"] / got["ref"])
            o_nchw.append(ours(name, train, mean, std, args.steps, args.warmup, device, channels_last=False))
            o_bf16.append(ours(name, train, mean, std, args.steps, args.warmup, device, bf16=True))
            ratios_bf16.append(o_bf16[-1] / got["ref"])
            print(f"{name} pair {pair}: ours {got['ours']:.0f}, reference {got['ref']:.0f}, "
                  f"ours NCHW {o_nchw[-1]:.0f}, ours bf16 {o_bf16[-1]:.0f} img/s", flush=True)
        rows.append(f"| {name} | {statistics.median(o):.0f} | {statistics.median(o_nchw):.0f} | "
                    f"{statistics.median(o_bf16):.0f} | {statistics.median(r):.0f} | "
                    f"{statistics.median(ratios):.2f}x | {statistics.median(ratios_bf16):.2f}x |")
    where = "CPU" if device.type == "cpu" else "GPU"
    body = (f"## Training throughput of one network ({where})\n\n"
            f"Batch 128, SGD, real CIFAR-10 images, {args.steps} timed steps after {args.warmup} warm-up "
            f"steps, {args.pairs} interleaved pairs, {torch.get_num_threads()} threads. \"ours\" is the default "
            "(fp32, channels_last); \"amp=bf16\" adds bfloat16 autocast"
            + (" (native or emulated: the Machine line says which)" if device.type == "cpu" else "")
            + "; the bf16 ratio uses the same pair's reference run.\n\n" + "\n".join(rows))
    if args.write:
        write_section(f"throughput-{where.lower()}", body)
    else:
        print(body)


if __name__ == "__main__":
    main()
