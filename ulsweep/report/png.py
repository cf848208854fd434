"""Static PNGs of the dashboard's figures, with kaleido and a Chrome/Chromium; optional (the HTML page does
not need them), so every failure is a message, not an exception."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any


def find_browser() -> str | None:
    """Chrome/Chromium for kaleido: $BROWSER_PATH, Debian's chromium, Chrome on PATH, kaleido's own download."""
    env = os.environ.get("BROWSER_PATH")
    if env and os.path.isfile(env) and os.access(env, os.X_OK):
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    try:
        from choreographer.browsers.chromium import Chromium

        return Chromium.find_browser(skip_local=False)
    except Exception:  # noqa: BLE001 - choreographer missing or changed
        return None


def export_pngs(figures: dict[str, Any], out_dir: str | os.PathLike, width: int = 1400,
                height: int = 520) -> tuple[list[str], str | None]:
    """Write <out_dir>/<name>.png for each figure with kaleido. Returns (paths, None) or ([], why not)."""
    try:
        import kaleido
    except ImportError:
        return [], ("PNG export skipped: kaleido is not installed (pip install 'ulsweep[report]' or "
                    "pip install kaleido); the HTML dashboard does not need it")
    browser = find_browser()
    if browser is None:
        return [], ("PNG export skipped: no Chrome/Chromium found for kaleido (Debian: apt-get install -y "
                    "chromium; or set BROWSER_PATH to a Chrome binary); the HTML dashboard does not need it")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [{"fig": fig, "path": str(out / f"{name}.png"),
             "opts": {"format": "png", "width": width, "height": max(height, int(fig.layout.height or 0))}}
            for name, fig in figures.items()]
    try:
        errors = kaleido.write_fig_from_object_sync(jobs, kopts={"path": browser, "mathjax": False, "timeout": 120},
                                                    cancel_on_error=True)
    except Exception as ex:  # noqa: BLE001 - kaleido/choreographer raise many types
        return [], f"PNG export failed with {browser}: {type(ex).__name__}: {ex}"
    if errors:
        return [], f"PNG export failed with {browser}: {errors}"
    paths = [j["path"] for j in jobs if os.path.isfile(j["path"])]
    return paths, None if len(paths) == len(jobs) else f"PNG export wrote {len(paths)} of {len(jobs)} images"
