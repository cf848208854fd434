"""`ulsweep run X.yaml [--resume] [--address ADDR] [--storage URI] [--tracking-uri URI] [--set K=V ...]
[--dry-run]`; wired into ulsweep/cli.py through `register(subparsers)`."""
from __future__ import annotations

import argparse
import sys
import time

from ulsweep.config import ConfigError, check_data, load_experiment, parse_overrides
from ulsweep.io import storage_retry_s


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "run", help="run a sweep: Ray Tune + Optuna search, Ray Train trials, MLflow lineage",
        description="Run the sweep of an experiment file: every autoencoder trial the search proposes, then "
                    "its base-model trials, all through Ray Train; results in MLflow (sweep -> AE trial -> "
                    "base trial). Default run directory: ./runs/<experiment name>. Ctrl-C stops the trials and "
                    "exits with 130; --resume continues. Damaged state files in the run directory are named "
                    "with what to do (exit code 2).")
    p.add_argument("experiment", help="experiment YAML file")
    p.add_argument("--resume", action="store_true",
                   help="continue the sweep in the run directory after a crash or kill (finished trials are kept)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray instance)")
    p.add_argument("--storage", default=None,
                   help="root for the run directory: local path or pyarrow/fsspec URI (default: the file's "
                        "`storage`, i.e. ./runs)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, the file's tracking.uri, else "
                        "sqlite:///<run dir>/mlflow.db)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set search.max_concurrent=1 (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved experiment and the AE trials the search would run, then exit")
    p.add_argument("--verbose", action="store_true", help="stream Ray worker logs to the console")
    p.add_argument("--train-impl", default="ulsweep", choices=["ulsweep", "fake"], help=argparse.SUPPRESS)
    p.set_defaults(func=handle_run, handler=handle_run)


def handle_run(args: argparse.Namespace) -> int:
    t_command = time.time()  # the driver's first step, "command" (sweep/clock.py): imports, config, data check
    from ulsweep.sweep.driver import SweepError, dry_run, run_sweep

    try:
        exp = load_experiment(args.experiment, parse_overrides(args.overrides))
        check_data(exp, file=args.experiment)
        if args.dry_run:
            return dry_run(exp, storage=args.storage, tracking_uri=args.tracking_uri)
        outcome = run_sweep(exp, resume=args.resume, address=args.address, storage=args.storage,
                            tracking_uri=args.tracking_uri, train_impl=args.train_impl, verbose=args.verbose,
                            t_command=t_command)
    except ConfigError as e:  # whatever the check, it is about this file
        print(f"error: {e if e.file else e.located(file=args.experiment)}", file=sys.stderr)
        return 2
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from ulsweep.tracking import is_storage_error

        if not is_storage_error(e):
            raise
        # the storage refused writes for longer than they are retried (ULSWEEP_STORAGE_RETRY_S)
        where = getattr(e, "filename", None) or "storage"
        why = " ".join((getattr(e, "strerror", None) or str(e)).split())[:300]
        print(f"error: {where}: {why}; writes were retried for {storage_retry_s():.0f} s; once the storage takes "
              f"writes again, continue with --resume (or start again if the run directory holds no sweep.json)",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside Tune's fit (which handles the first one itself), or a second one
        print("error: interrupted; continue the sweep with --resume", file=sys.stderr)
        return 130
    if not outcome.finished:
        return 130  # stopped by Ctrl-C; the driver said how to continue
    return 0 if outcome.ok else 1


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (`python -m ulsweep.sweep.cli run X.yaml`)."""
    parser = argparse.ArgumentParser(prog="ulsweep")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    from ulsweep.cli import exit_now

    exit_now(main())
