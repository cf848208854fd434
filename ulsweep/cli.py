"""The `ulsweep` command line.

    ulsweep run EXPERIMENT.yaml [--resume] [--address ADDR] ...   a whole sweep (Ray Tune + Train, MLflow)
    ulsweep train ae EXPERIMENT.yaml [--set KEY=VALUE] [--dry-run]  one autoencoder (stage 1), no Ray
    ulsweep train base EXPERIMENT.yaml --ae CHECKPOINT [--base NAME]  one base model (stage 2), no Ray
    ulsweep report SWEEP | ui SWEEP                                 dashboard + CSV, MLflow UI on 127.0.0.1
    ulsweep data ... | features ... | flops ...                     datasets, feature extractors, FLOPs
    ulsweep fid A B [--extractor inception|PATH] [--json]         FID between two image folders / dataset splits
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from ulsweep.config import ConfigError, ExperimentConfig, check_data, dump_yaml, load_experiment, parse_overrides


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML (see experiments/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value by dotted key, e.g. --set ae.loss.loss_factor=4 (repeatable)")
    p.add_argument("--run-dir", default=None, help="output directory or URI (default: runs/<name>/<stage>)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def _load(args) -> ExperimentConfig:
    exp = load_experiment(args.config, parse_overrides(args.set))
    check_data(exp, file=args.config)
    return exp


def _cmd_train_ae(args) -> int:
    exp = _load(args)
    run_dir = args.run_dir or os.path.abspath(os.path.join("runs", exp.name, "train-ae"))
    if args.dry_run:
        print(dump_yaml(exp), end="")
        print(f"# run directory: {run_dir}")
        return 0
    from ulsweep.train.stage1 import train_autoencoder

    res = train_autoencoder(exp, run_dir)
    m = res.metrics
    print(f"latent bits/pixel: {m['bpp']:.5f} +- {m['bpp_se']:.5f}   PSNR: {m['psnr']:.2f} dB   "
          f"({res.steps} steps, {res.train_seconds:.0f} s in the loop)")
    print(f"checkpoint: {res.checkpoint}")
    return 0


def _cmd_train_base(args) -> int:
    exp = _load(args)
    names = [b.name for b in exp.base_models]
    name = args.base or names[0]
    if name not in names:
        raise ConfigError(f"no base model named {name!r} (defined: {', '.join(names)})", key="--base",
                          file=args.config)
    base = exp.base_models[names.index(name)]
    run_dir = args.run_dir or os.path.abspath(os.path.join("runs", exp.name, f"train-base-{name}"))
    if args.dry_run:
        print(dump_yaml(base), end="")
        print(f"# autoencoder: {args.ae}\n# run directory: {run_dir}")
        return 0
    from ulsweep.train.stage2 import train_base

    res = train_base(exp, base, args.ae, run_dir)
    print(f"base-model latent bits/pixel: {res.metrics['base_bpp']:.5f} +- {res.metrics['base_bpp_se']:.5f}"
          + "".join(f"   {k}: {v:.3f}" for k, v in res.metrics.items() if k.startswith(("gfd", "gfid"))))
    print(f"checkpoint: {res.checkpoint}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ulsweep", description="Latent bitrate sweeps of Unified Latents diffusion autoencoders.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = sub.add_parser("train", help="train one stage without Ray (debugging, single runs)")
    tsub = train.add_subparsers(dest="stage", required=True, metavar="STAGE")
    ae = tsub.add_parser("ae", help="stage 1: encoder + diffusion prior + diffusion decoder",
                         description="Train the autoencoder of the experiment's `ae` section; prints latent "
                                     "bits/pixel and PSNR. Resumes from the run directory's newest checkpoint.")
    _add_config_args(ae)
    ae.set_defaults(func=_cmd_train_ae)
    base = tsub.add_parser("base", help="stage 2: a base model on a frozen autoencoder's latents",
                           description="Train one of the experiment's `base_models` on the latents of a "
                                       "stage-1 checkpoint. The training split is encoded once per checkpoint "
                                       "and dataset (CHECKPOINT/latents/, reused by later base runs). Resumes "
                                       "from the run directory's newest checkpoint.")
    _add_config_args(base)
    base.add_argument("--ae", required=True, metavar="CHECKPOINT",
                      help="stage-1 checkpoint directory (…/checkpoints/step_XXXXXXXX)")
    base.add_argument("--base", default=None, metavar="NAME", help="which base_models entry (default: first)")
    base.set_defaults(func=_cmd_train_base)

    from ulsweep.data.cli import register as register_data
    from ulsweep.metrics.cli import register as register_metrics
    from ulsweep.report.cli import register as register_report
    from ulsweep.sweep.cli import register as register_sweep

    register_sweep(sub)
    register_report(sub)
    register_data(sub)
    register_metrics(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ulsweep.data import DataError
    from ulsweep.train.checkpoint import CheckpointError
    from ulsweep.train.hooks import TrainingDiverged

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="torch")
            return int(args.func(args) or 0)
    except (ConfigError, DataError, CheckpointError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    """The `ulsweep` console script: `main`, then the process's exit without the interpreter's teardown once
    nothing is left to run (`exit_now`)."""
    exit_now(main())


def exit_now(rc: int) -> None:
    """Exit with `rc` as `sys.exit` would, but, when no other thread runs, through `os._exit` once the atexit
    handlers have run and the standard streams are flushed: what is left of a normal exit is the interpreter's
    teardown of its modules (torch, Ray, MLflow), 2.3 s after a quickstart sweep on a 2-core machine, after
    everything the command had to do was done (its files written, its runs closed). Where the interpreter's
    `atexit._run_exitfuncs` is missing, or another thread is alive, the exit is the normal one."""
    import atexit
    import threading

    run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
    if run_exitfuncs is None or threading.active_count() > 1:
        sys.exit(rc)
    run_exitfuncs()  # they ran here: os._exit skips them
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream has nothing left to write
            pass
    os._exit(rc)


if __name__ == "__main__":
    entry()
