"""`ulsweep data ...`: import, materialise and inspect datasets.

    ulsweep data import fashion-mnist [--src DIR] --out URI
    ulsweep data import folder SRC --out URI --image-size N [--format png|jpeg|webp|raw] [--quality Q]
        [--channels 1|3] [--workers K] [--max-bad-fraction F] [--test-fraction F] [--seed S]
    ulsweep data builtin NAME [--out URI] [--cache-dir DIR]
    ulsweep data info URI [--verify]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

from ulsweep import io as uio
from ulsweep.data.builtin import BUILDERS, materialise, resolve_dataset
from ulsweep.data.codec import ENCODINGS
from ulsweep.data.folder import REPORT, default_workers
from ulsweep.data.importers import DEFAULT_FASHION_MNIST, import_fashion_mnist, import_image_folder
from ulsweep.data.manifest import DataError
from ulsweep.data.reader import Dataset, open_dataset


def _summary(ds: Dataset) -> str:
    C, H, W = ds.image_shape
    splits = ", ".join(f"{s}={n}" for s, n in ds.splits.items())
    enc = "" if ds.encoding == "raw" else f" {ds.encoding}" + (f" q{ds.quality}" if ds.quality else "")
    return f"{ds.uri}: {ds.name} {C}x{H}x{W} uint8{enc}, {splits}, content_hash {ds.content_hash}"


def _run(fn) -> int:
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            line = fn()
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(line)
    return 0


def cmd_import_fashion_mnist(args: argparse.Namespace) -> int:
    def go():
        t = time.perf_counter()
        ds = import_fashion_mnist(args.src, args.out, overwrite=args.overwrite)
        return f"imported {_summary(ds)} in {time.perf_counter() - t:.1f} s"
    return _run(go)


def _import_summary(report: dict) -> str:
    """What the folder importer did: channels, mode conversions by kind, bad files."""
    lines = [f"channels: {report['channels']['channels']} ({report['channels']['how']})",
             f"transform: {report['transform']}", "conversions:"]
    lines += [f"  {n:8d}  {kind}" for kind, n in report["conversions"].items()]
    lines.append(f"bad files: {report['bad_count']} of {report['listed']} (skipped; listed in "
                 f"{uio.join(report['out'], REPORT)})")
    return "\n".join(lines)


def cmd_import_folder(args: argparse.Namespace) -> int:
    def go():
        t = time.perf_counter()
        ds = import_image_folder(args.src, args.out, args.image_size, args.test_fraction, args.seed,
                                 encoding=args.format, quality=args.quality, channels=args.channels,
                                 workers=args.workers, max_bad_fraction=args.max_bad_fraction,
                                 shard_rows=args.shard_rows, overwrite=args.overwrite, progress=True)
        report = json.loads(uio.read_bytes(uio.join(args.out, REPORT)))
        return (_import_summary(report) + "\n"
                + f"imported {_summary(ds)} in {time.perf_counter() - t:.1f} s ({report['status']})")
    return _run(go)


def cmd_builtin(args: argparse.Namespace) -> int:
    def go():
        spec = args.name if args.name.startswith("builtin:") else f"builtin:{args.name}"
        path = (materialise(spec, args.out, overwrite=args.overwrite) if args.out
                else resolve_dataset(spec, args.cache_dir))
        return path
    return _run(go)


def cmd_info(args: argparse.Namespace) -> int:
    def go():
        ds = open_dataset(resolve_dataset(args.uri, args.cache_dir))
        if args.verify:
            for split in ds.splits:
                ds.load_split(split, verify=True)
        return _summary(ds) + (" (all shards verified)" if args.verify else "")
    return _run(go)


def register(subparsers) -> None:
    """Add the `data` command and its subcommands to an argparse `subparsers` object."""
    p = subparsers.add_parser("data", help="import, materialise and inspect datasets",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="data_command", metavar="{import,builtin,info}", required=True)

    p_imp = sub.add_parser("import", help="import a dataset into the Parquet format")
    imp = p_imp.add_subparsers(dest="import_kind", metavar="{fashion-mnist,folder}", required=True)

    q = imp.add_parser("fashion-mnist", help="Fashion-MNIST idx .gz files (Debian dataset-fashion-mnist)")
    q.add_argument("--src", default=DEFAULT_FASHION_MNIST, help=f"directory of idx files (default {DEFAULT_FASHION_MNIST})")
    q.add_argument("--out", required=True, help="dataset path or fsspec URI to write")
    q.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    q.set_defaults(func=cmd_import_fashion_mnist)

    q = imp.add_parser("folder", help="an ImageFolder tree of images (class = top-level subfolder)",
                       description="Import a folder tree of images (PNG, JPEG, WebP, BMP, GIF, TIFF): class labels "
                       "from top-level subfolders (a flat folder: unlabelled), EDM2's center-crop transform "
                       "(largest centred square, Lanczos resize), mode conversion to the dataset's channels, "
                       "shards written in parallel. Bad files are skipped and listed in OUT/import_report.json. "
                       "Rerunning an interrupted import resumes it.")
    q.add_argument("src", help="folder (path or fsspec URI)")
    q.add_argument("--out", required=True, help="dataset path or fsspec URI to write")
    q.add_argument("--image-size", type=int, required=True, help="square side after centre crop + resize")
    q.add_argument("--format", choices=ENCODINGS, default="png",
                   help="how images are stored: png (lossless, default), jpeg / webp (lossy, need --quality), "
                   "raw (uint8 pixels)")
    q.add_argument("--quality", type=int, help="jpeg / webp quality, 1..100")
    q.add_argument("--channels", type=int, choices=(1, 3),
                   help="channels of the dataset (default: 3 if any image has colour, else 1)")
    q.add_argument("--workers", type=int,
                   help=f"processes writing shards (default min(cpu count, 8) = {default_workers()}; "
                   "1 for memory://)")
    q.add_argument("--max-bad-fraction", type=float, default=0.01,
                   help="fail (report written, no dataset) when more than this share of files is bad "
                   "(default 0.01)")
    q.add_argument("--test-fraction", type=float, default=0.1, help="share of images in the test split")
    q.add_argument("--seed", type=int, default=0, help="seed of the train/test assignment and shard order")
    q.add_argument("--shard-rows", type=int, help="images per shard (default: ~64 MiB of raw RGB pixels)")
    q.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset or unfinished import at --out")
    q.set_defaults(func=cmd_import_folder)

    q = sub.add_parser("builtin", help="materialise a built-in dataset and print its path")
    q.add_argument("name", help=f"one of {', '.join(BUILDERS)} (or builtin:NAME)")
    q.add_argument("--out", help="write here (any fsspec URI) instead of the cache")
    q.add_argument("--cache-dir",
                   help="cache directory (default $ULSWEEP_CACHE/datasets, else ~/.cache/ulsweep/datasets)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    q.set_defaults(func=cmd_builtin)

    q = sub.add_parser("info", help="print name, shape, splits and content hash")
    q.add_argument("uri", help="dataset path, fsspec URI or builtin:NAME")
    q.add_argument("--verify", action="store_true", help="also read every shard and check its SHA-256")
    q.add_argument("--cache-dir", help="cache directory for builtin:NAME (default as for `data builtin`)")
    q.set_defaults(func=cmd_info)
