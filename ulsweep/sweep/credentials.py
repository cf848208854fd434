"""Keep the sweep driver's cloud credentials out of Ray's runtime environments (and so out of Ray's logs).

Ray Tune copies AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN and AWS_SECURITY_TOKEN from the
driver's environment into the runtime_env of every trial actor, and Ray's runtime-env agent then writes each
runtime_env, values included, into runtime_env_agent.log on every node (seen with Ray 2.60;
tests/test_cluster_e2e.py catches it). ulsweep turns that copy off: trial processes take credentials from
their node's own environment (instance profile, service account, Kubernetes Secret), as cluster/README.md says.
"""
from __future__ import annotations

import logging

from ulsweep.tracking.redact import is_credential_name

log = logging.getLogger(__name__)


def stop_tune_copying_credentials() -> list[str]:
    """Remove credential-like names from the variables Ray Tune copies into trial runtime envs; returns them."""
    try:
        from ray.tune.execution import class_cache
    except ImportError:  # a Ray without this module copies nothing this way
        return []
    names = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if not isinstance(names, (set, frozenset)):
        log.warning("ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE changed shape; cannot check whether "
                    "Ray copies credentials into trial runtime envs")
        return []
    dropped = sorted(n for n in names if is_credential_name(n))
    class_cache.ENV_VARS_TO_PROPAGATE = frozenset(n for n in names if not is_credential_name(n))
    return dropped
