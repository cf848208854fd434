"""MLflow: runs and their lineage (runs.py), curves that survive outages (buffer.py), credentials kept out of
everything that is printed or stored (redact.py). `from ulsweep import tracking` gives the run API."""
from ulsweep.tracking.buffer import MetricBuffer, replay_spools
from ulsweep.tracking.runs import (TAG_CHECKPOINT, TAG_KEY, TAG_KIND, TAG_PARENT, TAG_SWEEP, client, close_orphans,
                                   create_sweep_run, credentials_to_env, default_artifact_location,
                                   default_tracking_uri, find_run, get_or_create_experiment, get_or_create_trial_run,
                                   is_storage_error, log_artifact, log_metrics, log_metrics_once, log_params, log_text,
                                   render_table, resolve_tracking_uri, retry, sweep_runs)

__all__ = ["MetricBuffer", "replay_spools", "TAG_CHECKPOINT", "TAG_KEY", "TAG_KIND", "TAG_PARENT", "TAG_SWEEP",
           "client", "close_orphans", "create_sweep_run", "credentials_to_env", "default_artifact_location",
           "default_tracking_uri", "find_run", "get_or_create_experiment", "get_or_create_trial_run",
           "is_storage_error", "log_artifact", "log_metrics", "log_metrics_once", "log_params", "log_text",
           "render_table", "resolve_tracking_uri", "retry", "sweep_runs"]
