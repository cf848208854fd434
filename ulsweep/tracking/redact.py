"""Keep credentials out of what ulsweep prints, stores and logs to MLflow.

Credentials reach ulsweep two ways: as environment variables (AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS,
MLFLOW_TRACKING_PASSWORD, ...) and as the userinfo part of a URI (postgresql://user:password@host/db). Neither
may end up in MLflow params, tags or artifacts, in sweep.json / summary.json, or on the console:

    redact_uri("postgresql://mlflow:hunter2@db:5432/mlflow") == "postgresql://mlflow:***@db:5432/mlflow"
    redact_text(text)   every URI's userinfo in `text` masked, and every credential env var's value too

Storage URIs are different: Ray Tune and Ray Train write the storage path into their own logs and state, which
ulsweep cannot filter, so `check_no_userinfo` refuses a storage URI that carries credentials.
"""
from __future__ import annotations

import os
import re
from typing import Mapping

MASK = "***"
# scheme://userinfo@ ; userinfo stops at '/', '@' or whitespace (RFC 3986: no '/' in userinfo)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/@\s'\"]+)@")
_CREDENTIAL_NAME = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|PRIVATE_KEY|ACCESS_KEY|API_KEY|"
                              r"SESSION_KEY)", re.IGNORECASE)
_CREDENTIAL_PREFIXES = ("AWS_", "GOOGLE_", "AZURE_", "GCP_", "GCLOUD_")
# cloud settings under those prefixes that are not secrets (masking "us-east-1" everywhere helps no one)
_NOT_SECRET_SUFFIXES = ("_REGION", "_PROFILE", "_ENDPOINT_URL", "_PROJECT", "_ZONE")
_MIN_SECRET_LEN = 6  # shorter values ("1", "true", "us-east-1"...) would mask harmless text


def is_credential_name(name: str) -> bool:
    """True for environment variable names that hold (or point to) credentials."""
    up = name.upper()
    if _CREDENTIAL_NAME.search(up):
        return True
    return up.startswith(_CREDENTIAL_PREFIXES) and not up.endswith(_NOT_SECRET_SUFFIXES)


def _mask_userinfo(m: re.Match) -> str:
    user, sep, _password = m.group("userinfo").partition(":")
    # user:password -> keep the user name; a lone token (https://TOKEN@host) is masked whole
    return f"{m.group('scheme')}{user}:{MASK}@" if sep else f"{m.group('scheme')}{MASK}@"


def redact_uri(uri: str | None) -> str | None:
    """`uri` with the password (or a lone token) in its userinfo replaced by ***."""
    if uri is None:
        return None
    return _USERINFO.sub(_mask_userinfo, uri)


def has_userinfo(uri: str) -> bool:
    return bool(_USERINFO.match(uri.strip()))


def split_userinfo(uri: str) -> tuple[str, str | None, str | None]:
    """(uri without userinfo, user, password), user and password percent-decoded (None where absent)."""
    from urllib.parse import unquote

    m = _USERINFO.match(uri)
    if not m:
        return uri, None, None
    user, sep, password = m.group("userinfo").partition(":")
    return m.group("scheme") + uri[m.end():], unquote(user), (unquote(password) if sep else None)


def is_redacted(uri: str | None) -> bool:
    return bool(uri) and f"{MASK}@" in uri


def environ_snapshot(source: Mapping[str, str] | None = None, attempts: int = 10) -> dict[str, str]:
    """A copy of os.environ (or `source`). Iterating os.environ while another thread removes a variable raises KeyError
    (os.environ lists its keys, then looks each up): MLflow's telemetry thread does that in a trial process, so
    a trial's first params failed to log. Copy again until the environment held still."""
    env = os.environ if source is None else source
    for _ in range(attempts - 1):
        try:
            return dict(env)
        except (KeyError, RuntimeError):  # a variable went away (or the mapping changed size) mid-copy
            continue
    return dict(env)


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of credential-like environment variables, longest first (so overlaps mask whole)."""
    env = environ_snapshot() if environ is None else environ
    vals = {v for k, v in env.items() if is_credential_name(k) and v and len(v) >= _MIN_SECRET_LEN}
    return sorted(vals, key=len, reverse=True)


def redact_text(text: str, environ: Mapping[str, str] | None = None) -> str:
    """`text` with URI userinfo masked and the values of credential-like environment variables masked."""
    out = _USERINFO.sub(_mask_userinfo, text)
    for v in secret_values(environ):
        out = out.replace(v, MASK)
    return out


def check_no_userinfo(uri: str, what: str) -> None:
    """Raise ValueError if `uri` carries credentials (user:password@ or token@)."""
    if has_userinfo(uri):
        raise ValueError(f"{what} {redact_uri(uri)!r} carries credentials in the URI; pass them through the "
                         f"environment instead (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for s3://, "
                         f"GOOGLE_APPLICATION_CREDENTIALS for gs://): see cluster/README.md")
