"""Importing an image folder tree as a dataset: parallel, resumable, and honest about bad files.

    ds = import_image_folder("photos/", "s3://bucket/photos64", image_size=64, encoding="png")

Layout of the source: ImageFolder style. Files under a top-level subfolder get that folder's label (folders
sorted by name -> 0, 1, ...; `label_names` in the manifest); a flat folder gives unlabelled images (-1), as do
files lying directly in the root of a tree that has class folders. Files are found by extension
(`IMAGE_EXTENSIONS`, case-insensitive; hidden files and folders skipped), and each becomes one
image_size x image_size image (`ulsweep.data.images`: mode conversion, then EDM2's centre crop + Lanczos).

The order of work: list the files -> assign splits (stratified by label, `test_fraction`, `seed`) and shuffle
each split with `seed` -> cut into shards of `shard_rows` files -> if `channels` is not given, read every
header to see whether any image has colour -> write the shards in a process pool, each shard file atomically
followed by its done marker -> write `import_report.json` -> write `dataset.json` last. While the import runs
`DST/_import/` holds `state.json` (the source fingerprint, the options that shape the shards, the channels)
and one `<split>/part-NNNNN.json` marker per finished shard; it is removed once the manifest is written.

Resume: running the same import again continues an interrupted one; finished shards (marker present, shard
file of the recorded size) are kept as they are. A changed source (files added, removed or of another size)
or a changed option is refused, naming what changed; `overwrite=True` starts over.

Bad files (unreadable, truncated, not an image despite the extension, too large for Pillow) are skipped and
listed with the reason in `DST/import_report.json`; the import fails (report written, no manifest) when
more than `max_bad_fraction` of the listed files are bad.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import Counter
from typing import Any, Callable

import numpy as np

from ulsweep import io as uio
from ulsweep.data.builtin import stratified_split
from ulsweep.data.codec import CodecError, check_encoding
from ulsweep.data.folder_jobs import WORK_DIR, Pool, marker_rel, probe_colour, shard_rel, write_shard
from ulsweep.data.manifest import MANIFEST, DataError, filesystem
from ulsweep.data.reader import Dataset, open_dataset
from ulsweep.data.writer import SHARD_BYTES, build_manifest, publish_manifest

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
REPORT = "import_report.json"
STATE_VERSION = 1
TRANSFORM = "EDM2 center-crop: largest centred square, Pillow Lanczos resize"

# Test hook: called in the parent after each finished shard with the number finished so far (tests raise
# KeyboardInterrupt from it to interrupt an import at a known point).
_after_shard: Callable[[int], None] | None = None


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


# ----------------------------------------------------------------------------------------------
# Listing and planning (deterministic from the file list and the options)


def list_images(src: str) -> tuple[Any, str, list[str], str]:
    """(filesystem, root, sorted relative paths of image files, fingerprint of names and sizes)."""
    fs, root = filesystem(src)
    if not fs.isdir(root):
        raise DataError(f"{src}: image folder not found")
    found = fs.find(root, detail=True)
    rel, lines = [], []
    for path in sorted(found):
        r = path[len(root):].lstrip("/")
        if not r.lower().endswith(IMAGE_EXTENSIONS) or any(p.startswith(".") for p in r.split("/")):
            continue
        rel.append(r)
        lines.append(f"{r}\t{found[path].get('size')}\n")
    if not rel:
        raise DataError(f"{src}: no image files found (extensions {', '.join(IMAGE_EXTENSIONS)})")
    return fs, root, rel, hashlib.sha256("".join(lines).encode()).hexdigest()


def labels_of(rel: list[str]) -> tuple[np.ndarray, list[str] | None]:
    """int64 labels (index of the top-level folder; -1 for files in the root) and the class names."""
    classes = sorted({r.split("/", 1)[0] for r in rel if "/" in r})
    index = {c: i for i, c in enumerate(classes)}
    y = np.asarray([index[r.split("/", 1)[0]] if "/" in r else -1 for r in rel], np.int64)
    return y, classes or None


def plan_shards(src: str, labels: np.ndarray, test_fraction: float, seed: int,
                shard_rows: int) -> dict[str, list[list[int]]]:
    """{split: [file indices of shard 0, shard 1, ...]}: a stratified test split of round(N * test_fraction)
    files (at least 1 when test_fraction > 0), each split in an order shuffled with `seed`."""
    n = len(labels)
    n_test = max(int(round(n * test_fraction)), 1) if test_fraction > 0 else 0
    if n_test >= n:
        raise DataError(f"{src}: {n} image file(s) cannot be split with test_fraction={test_fraction}")
    train, test = stratified_split(labels, n_test, seed) if n_test else (np.arange(n), np.zeros(0, int))
    rng = np.random.default_rng(seed)
    plan = {}
    for split, idx in (("train", train), ("test", test)):
        if len(idx):
            order = [int(i) for i in rng.permutation(idx)]
            plan[split] = [order[k:k + shard_rows] for k in range(0, len(order), shard_rows)]
    return plan


# ----------------------------------------------------------------------------------------------
# State, resume and the report


def _read_json(fs, path: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable import state ({type(e).__name__}: {e}); delete it or pass "
                        f"--overwrite to start over") from e


def _check_state(out: str, old: dict, new: dict) -> None:
    """Refuse to resume an import whose source files or shaping options differ from this one's."""
    where = uio.join(out, WORK_DIR, "state.json")
    if old.get("version") != new["version"]:
        raise DataError(f"{where}: written by another importer version; pass --overwrite to start over")
    if old["source"] != new["source"]:
        o, n = old["source"], new["source"]
        what = (f"source folder was {o['uri']!r}, now {n['uri']!r}" if o["uri"] != n["uri"] else
                f"the source files changed ({o['files']} -> {n['files']} files, or files of another size)")
        raise DataError(f"{out}: cannot resume the unfinished import here: {what}; pass --overwrite to start over")
    for key, value in new["options"].items():
        if old["options"].get(key) != value:
            raise DataError(f"{out}: cannot resume the unfinished import here: option {key!r} was "
                            f"{old['options'].get(key)!r}, now {value!r}; rerun with the old value or pass "
                            f"--overwrite to start over")


def _done(fs, root: str, split: str, k: int) -> dict | None:
    """A finished shard's marker, if its shard file is still there with the recorded size."""
    marker = _read_json(fs, uio.join(root, marker_rel(split, k)))
    if marker is None:
        return None
    if marker["num_rows"]:
        try:
            if fs.size(uio.join(root, marker["file"])) != marker["size"]:
                return None
        except FileNotFoundError:
            return None
    return marker


def _report(src: str, out: str, n_listed: int, markers: list[dict], channels: dict, max_bad: float,
            status: str) -> dict:
    bad = sorted((b + [m["file"].split("/", 1)[0]] for m in markers for b in m["bad"]), key=lambda b: b[0])
    conversions = Counter()
    for m in markers:
        conversions.update(m["conversions"])
    return {"status": status, "source": src, "out": out, "listed": n_listed,
            "imported": sum(m["num_rows"] for m in markers), "bad_count": len(bad),
            "bad_fraction": len(bad) / n_listed, "max_bad_fraction": max_bad,
            "bad": [{"file": r, "reason": why, "split": split} for r, why, split in bad], "channels": channels,
            "conversions": dict(sorted(conversions.items(), key=lambda kv: (-kv[1], kv[0]))),
            "transform": TRANSFORM}


def _write_report(fs, root: str, report: dict) -> None:
    uio.write_atomic(fs, uio.join(root, REPORT), (json.dumps(report, indent=1) + "\n").encode())


# ----------------------------------------------------------------------------------------------
# The import


def _in_memory(uri: str) -> bool:
    protocol = filesystem(uri)[0].protocol
    return "memory" in (protocol if isinstance(protocol, tuple) else (protocol,))


def _check_args(src: str, out: str, image_size, encoding: str, quality, channels, test_fraction, workers,
                max_bad_fraction, shard_rows) -> None:
    def bad(key: str, value, what: str):
        raise DataError(f"{src}: {key}: {what} (got {value!r})")

    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(image_size) or image_size < 1:
        bad("image_size", image_size, "expected a positive integer")
    try:
        check_encoding(encoding, quality)
    except CodecError as e:
        raise DataError(f"{src}: format/quality: {e}") from e
    if channels is not None and channels not in (1, 3):
        bad("channels", channels, "expected 1 or 3")
    if not isinstance(test_fraction, (int, float)) or not 0.0 <= test_fraction < 1.0:
        bad("test_fraction", test_fraction, "expected a number in [0, 1)")
    if not is_int(workers) or workers < 1:
        bad("workers", workers, "expected a positive integer")
    if not isinstance(max_bad_fraction, (int, float)) or not 0.0 <= max_bad_fraction <= 1.0:
        bad("max_bad_fraction", max_bad_fraction, "expected a number in [0, 1]")
    if shard_rows is not None and (not is_int(shard_rows) or shard_rows < 1):
        bad("shard_rows", shard_rows, "expected a positive integer")
    if workers > 1 and any(_in_memory(u) for u in (src, out)):
        bad("workers", workers, "memory:// lives in one process; use workers=1 with memory:// folders")


def _prepare_out(fs, root: str, out: str, state: dict, overwrite: bool) -> tuple[dict | None, set[str]]:
    """Make `out` ready: (the unfinished import's state to resume or None, shard files of a dataset being
    overwritten, deleted once the new manifest is in place)."""
    work = uio.join(root, WORK_DIR)
    old_files: set[str] = set()
    if fs.exists(uio.join(root, MANIFEST)):
        if not overwrite:
            raise DataError(f"{uio.join(out, MANIFEST)}: a dataset already exists here (pass --overwrite)")
        try:
            old = json.loads(fs.cat_file(uio.join(root, MANIFEST)))
            old_files = {sh["file"] for info in old["splits"].values() for sh in info["shards"]}
        except Exception:  # an unreadable old manifest: nothing to clean up
            pass
        fs.rm(uio.join(root, MANIFEST))
    old_state = _read_json(fs, uio.join(work, "state.json"))
    if old_state is not None and not overwrite:
        _check_state(out, old_state, state)
        return old_state, old_files
    if fs.exists(work):
        fs.rm(work, recursive=True)
    return None, old_files


def _resolve_channels(src: str, rel: list[str], channels: int | None, pool: Pool, progress: bool) -> dict:
    """{"channels": 1 or 3, "how": why}: as given, else 3 when any header says colour."""
    if channels is not None:
        return {"channels": channels, "how": "given"}
    from tqdm import tqdm

    chunks = [rel[i:i + 256] for i in range(0, len(rel), 256)]
    colour, modes = 0, Counter()
    with tqdm(total=len(rel), unit="img", desc="reading headers", disable=not progress) as bar:
        for c, m, n in pool.unordered(probe_colour, [(src, ch) for ch in chunks]):
            colour += c
            modes.update(m)
            bar.update(n)
    seen = ", ".join(f"{k} {v}" for k, v in sorted(modes.items(), key=lambda kv: (-kv[1], kv[0])))
    return {"channels": 3 if colour else 1,
            "how": f"auto: {colour} of {sum(modes.values())} readable headers have colour (modes: {seen})"}


def _jobs(src: str, out: str, fs, root: str, plan: dict, rel: list[str], labels: np.ndarray, resume: bool,
          shard_opts: dict) -> tuple[dict[str, dict], list[dict]]:
    """(markers of shards already done, keyed by shard file; jobs for the others)."""
    markers, jobs = {}, []
    for split, shards in plan.items():
        for k, idx in enumerate(shards):
            done = _done(fs, root, split, k) if resume else None
            if done is not None:
                markers[done["file"]] = done
            else:
                jobs.append({"src": src, "out": out, "split": split, "index": k, **shard_opts,
                             "items": [(rel[i], int(labels[i])) for i in idx]})
    return markers, jobs


def _write_shards(pool: Pool, jobs: list[dict], markers: dict[str, dict], n_files: int, allowed: float,
                  progress: bool) -> bool:
    """Run the shard jobs, adding their markers to `markers`; False as soon as more than `allowed` files
    are bad (the jobs not yet started are dropped)."""
    from tqdm import tqdm

    done_files = sum(m["num_rows"] + len(m["bad"]) for m in markers.values())
    with tqdm(total=n_files, initial=done_files, unit="img", desc="importing", disable=not progress) as bar:
        for k, m in enumerate(pool.unordered(write_shard, jobs)):
            markers[m["file"]] = m
            bar.update(m["num_rows"] + len(m["bad"]))
            if _after_shard is not None:
                _after_shard(k + 1)
            if sum(len(m["bad"]) for m in markers.values()) > allowed:
                return False
    return True


def _splits(src: str, out: str, plan: dict, markers: dict[str, dict]) -> dict[str, list[dict]]:
    """The manifest's shard lists; shards whose files were all bad hold no rows and are left out."""
    splits = {}
    for split, shards in plan.items():
        entries = [markers[shard_rel(split, k)] for k in range(len(shards))]
        splits[split] = [{"file": m["file"], "num_rows": m["num_rows"], "sha256": m["sha256"]}
                         for m in entries if m["num_rows"]]
        if not splits[split]:
            raise DataError(f"{src}: none of the files assigned to split {split!r} could be read; "
                            f"see {uio.join(out, REPORT)}")
    return splits


def import_image_folder(src: str, out: str, image_size: int, test_fraction: float = 0.1, seed: int = 0, *,
                        encoding: str = "png", quality: int | None = None, channels: int | None = None,
                        workers: int | None = None, max_bad_fraction: float = 0.01,
                        shard_rows: int | None = None, overwrite: bool = False, name: str | None = None,
                        progress: bool = False) -> Dataset:
    """Import the image folder tree `src` as an image_size x image_size dataset at `out` (module docstring).

    encoding: png (default; lossless), jpeg or webp (need `quality` 1..100) or raw. channels: 1 or 3;
    default 3 when any image has colour, else 1. workers: processes writing shards (default
    min(cpu count, 8); 1 for memory:// folders, which other processes cannot see). shard_rows: files per
    shard (default ~64 MiB of raw RGB pixels). The seed fixes the test split and the order of images in
    shards. progress: tqdm bars on stderr. Returns the dataset; what was done (channels, conversions by
    kind, bad files) is in `out`/import_report.json and the manifest's `source`.
    """
    if workers is None:  # memory:// exists in this process only
        workers = 1 if any(_in_memory(u) for u in (src, out)) else default_workers()
    _check_args(src, out, image_size, encoding, quality, channels, test_fraction, workers, max_bad_fraction,
                shard_rows)
    src_fs, src_root, rel, fingerprint = list_images(src)
    labels, classes = labels_of(rel)
    shard_rows = shard_rows or max(1, SHARD_BYTES // (3 * image_size * image_size))
    plan = plan_shards(src, labels, test_fraction, seed, shard_rows)
    options = {"image_size": image_size, "encoding": encoding, "quality": quality, "channels": channels,
               "test_fraction": test_fraction, "seed": seed, "shard_rows": shard_rows}
    state = {"version": STATE_VERSION, "source": {"uri": src_fs.unstrip_protocol(src_root), "files": len(rel),
                                                  "fingerprint": fingerprint},
             "options": options}
    fs, root = filesystem(out)
    old_state, old_files = _prepare_out(fs, root, out, state, overwrite)
    with Pool(workers) as pool:
        if old_state is not None:
            chan = old_state["resolved_channels"]
        else:
            chan = _resolve_channels(src, rel, channels, pool, progress)
            uio.write_atomic(fs, uio.join(root, WORK_DIR, "state.json"),
                             json.dumps({**state, "resolved_channels": chan}, indent=1).encode())
        markers, jobs = _jobs(src, out, fs, root, plan, rel, labels, old_state is not None,
                              {"image_size": image_size, "channels": chan["channels"], "encoding": encoding,
                               "quality": quality})
        kept = len(markers)
        ok = _write_shards(pool, jobs, markers, len(rel), max_bad_fraction * len(rel), progress)
    if not ok:
        n_bad = sum(len(m["bad"]) for m in markers.values())
        status = (f"failed: {n_bad} of {len(rel)} files are bad, more than max_bad_fraction={max_bad_fraction} "
                  f"allows; stopped after {len(markers)} of {sum(map(len, plan.values()))} shards, so more "
                  f"files may be bad")
        _write_report(fs, root, _report(src, out, len(rel), list(markers.values()), chan, max_bad_fraction, status))
        raise DataError(f"{src}: {status}; see {uio.join(out, REPORT)}")

    splits = _splits(src, out, plan, markers)
    report = _report(src, out, len(rel), list(markers.values()), chan, max_bad_fraction,
                     f"complete ({kept} shard(s) kept from an interrupted run)" if kept else "complete")
    _write_report(fs, root, report)
    source = {"importer": "image_folder", "src": src, "image_size": image_size, "test_fraction": test_fraction,
              "seed": seed, "transform": TRANSFORM, "channels": chan, "conversions": report["conversions"],
              "bad_files": report["bad_count"], "report": REPORT}
    publish_manifest(fs, root, build_manifest(
        name or os.path.basename(src_root.rstrip("/")) or "images", (chan["channels"], image_size, image_size),
        splits, encoding=encoding, quality=quality, label_names=classes, source=source))
    fs.rm(uio.join(root, WORK_DIR), recursive=True)
    for f in sorted(old_files - {sh["file"] for shards in splits.values() for sh in shards}):
        try:
            fs.rm(uio.join(root, f))
        except FileNotFoundError:
            pass
    if report["bad_count"]:
        warnings.warn(f"{src}: {report['bad_count']} bad image file(s) skipped, listed in "
                      f"{uio.join(out, REPORT)}", stacklevel=2)
    return open_dataset(out)
