"""Keeping credentials out of what ulsweep prints and stores.

A tracking URI may carry a password (`https://user:secret@mlflow.example`). ulsweep connects with the
URI as given, but prints, logs and stores it (sweep.json, summary.json, dashboards) with the password
replaced by `***`. Environment credentials (AWS_*, GOOGLE_*, tokens) are never read or copied by ulsweep;
tests/faults/test_mlflow_outage.py checks that none reaches MLflow or a log.
"""
from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

MASK = "***"


def redact_uri(uri: str | None) -> str | None:
    """The URI with the password of its user info (if any) replaced by ***; other URIs unchanged."""
    if not uri or "@" not in uri or "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:
        return uri
    if not password:
        return uri
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:{MASK}@{host}"))


def is_redacted(uri: str | None) -> bool:
    return bool(uri) and f":{MASK}@" in uri


_REAL: dict[str, str] = {}  # redacted URI -> URI with credentials, in this process only (never pickled)


def remember(uri: str) -> str:
    """Record `uri` so that objects holding only its redacted form (pickled into Tune's state) can
    connect in this process; returns the redacted form."""
    red = redact_uri(uri)
    if red != uri:
        _REAL[red] = uri
    return red


def reveal(uri: str) -> str:
    """The URI with credentials for a redacted URI remembered in this process (else `uri` itself)."""
    return _REAL.get(uri, uri)
