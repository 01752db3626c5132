#!/usr/bin/env python
"""Cut a small class-balanced sample out of an ImageFolder .tar(.gz) archive, for the tests.

Takes the first k files per class (sorted by name) of train/ and test/, copies their bytes
unchanged, and writes a tar.gz whose bytes depend only on the input and the arguments
(fixed member order, zeroed owners and times, gzip header without a time stamp).

    python scripts/make_fixture.py \
        --source ../shared/data/cifar10-jpeg.tar.gz --out tests/fixtures/cifar10_sample.tar.gz \
        --train-per-class 100 --test-per-class 50
"""

from __future__ import annotations

import argparse
import gzip
import io
import posixpath
import tarfile
from collections import defaultdict

SPLITS = ("train", "test")


def read_members(source: str) -> dict[str, bytes]:
    """All regular files of the archive, by path (one streaming pass)."""
    files = {}
    with tarfile.open(source, mode="r|*") as tar:
        for member in tar:
            if member.isfile():
                files[member.name.lstrip("./")] = tar.extractfile(member).read()
    return files


def strip_top_level(files: dict[str, bytes]) -> dict[str, bytes]:
    """Drop a single top-level folder (e.g. ``cifar10/train/...``) if the splits sit under one."""
    tops = {path.split("/", 1)[0] for path in files}
    if tops & set(SPLITS) or len(tops) != 1:
        return files
    return {path.split("/", 1)[1]: data for path, data in files.items() if "/" in path}


def select(files: dict[str, bytes], per_class: dict[str, int]) -> list[tuple[str, bytes]]:
    """First k files per (split, class) in sorted path order."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in files:
        parts = path.split("/")
        if len(parts) == 3 and parts[0] in per_class:
            groups[parts[0], parts[1]].append(path)
    chosen = []
    for (split, _), paths in sorted(groups.items()):
        chosen += [(p, files[p]) for p in sorted(paths)[: per_class[split]]]
    return chosen


def write_tar_gz(out: str, chosen: list[tuple[str, bytes]]) -> None:
    """Deterministic tar.gz: folder entries then files, all in sorted order, no times or owners."""
    dirs = sorted({posixpath.dirname(p) for p, _ in chosen} | {p.split("/")[0] for p, _ in chosen})
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for d in dirs:
                info = tarfile.TarInfo(d + "/")
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
                tar.addfile(info)
            for path, data in sorted(chosen):
                info = tarfile.TarInfo(path)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source", default="../shared/data/cifar10-jpeg.tar.gz")
    parser.add_argument("--out", default="tests/fixtures/cifar10_sample.tar.gz")
    parser.add_argument("--train-per-class", type=int, default=100)
    parser.add_argument("--test-per-class", type=int, default=50)
    args = parser.parse_args()

    files = strip_top_level(read_members(args.source))
    chosen = select(files, {"train": args.train_per_class, "test": args.test_per_class})
    write_tar_gz(args.out, chosen)
    counts = defaultdict(int)
    for path, _ in chosen:
        counts[path.split("/")[0]] += 1
    print(f"wrote {args.out}: " + ", ".join(f"{s} {counts[s]}" for s in SPLITS))


if __name__ == "__main__":
    main()
