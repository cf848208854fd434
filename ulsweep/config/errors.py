"""The error every configuration problem raises: located by file and dotted key."""
from __future__ import annotations

import re
from typing import Any

_MISSING = object()
NO_VALUE = _MISSING  # ConfigError.value when the error names no value


class ConfigError(ValueError):
    """A configuration problem, located by file and dotted key."""

    def __init__(self, message: str, *, key: str | None = None, value: Any = _MISSING,
                 file: str | None = None):
        self.message, self.key, self.value, self.file = message, key, value, file
        super().__init__(self._render())

    def _render(self) -> str:
        where = ": ".join(p for p in (self.file, self.key) if p)
        got = "" if self.value is _MISSING else f" (got {self.value!r})"
        return f"{where}: {self.message}{got}" if where else f"{self.message}{got}"

    def located(self, prefix: str = "", file: str | None = None) -> "ConfigError":
        key = ".".join(p for p in (prefix, self.key) if p) or None
        return ConfigError(self.message, key=key, value=self.value, file=self.file or file)


def _require(ok: bool, key: str, value: Any, message: str) -> None:
    if not ok:
        raise ConfigError(message, key=key, value=value)



_PLAIN = re.compile(r"[\w-]+(?:\.[\w-]+)*")


def key_join(prefix: str, name: Any) -> str:
    """The dotted key of `name` under `prefix`; a name that is not a plain (dotted) word, e.g. 'lr ' or
    'eval:{x', is quoted, `ae.loss['lr ']`, so that an error line shows where the key ends."""
    name = str(name)
    if _PLAIN.fullmatch(name):
        return f"{prefix}.{name}" if prefix else name
    return f"{prefix}[{name!r}]" if prefix else f"[{name!r}]"
