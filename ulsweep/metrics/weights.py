"""Weights files of feature extractors (local paths or fsspec URIs): SHA-256, reading, state-dict bytes."""
from __future__ import annotations

import hashlib
import io

import torch
from torch import Tensor

from ulsweep import io as uio

from .features import ExtractorError, WeightsHashError


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_bytes(uri: str) -> bytes:
    try:
        return uio.read_bytes(uri)
    except FileNotFoundError as e:
        raise ExtractorError(f"{uri}: file not found") from e


def state_dict_bytes(state_dict: dict[str, Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, buf)
    return buf.getvalue()


def state_dict_from_bytes(data: bytes, where: str) -> dict[str, Tensor]:
    try:
        sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure
        raise ExtractorError(f"{where}: not a loadable tensor state dict ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ExtractorError(f"{where}: expected a dict of tensors (a state dict)")
    return sd


def verify_sha256(data: bytes, where: str, expected: str, what: str) -> None:
    got = sha256_bytes(data)
    if got != expected.lower():
        raise WeightsHashError(
            f"{where}: SHA-256 mismatch for {what}: expected {expected}, file has {got}. "
            f"The file is corrupt, truncated, or not the expected weights.")
