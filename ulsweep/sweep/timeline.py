"""Where a trial's wall time went: its phases, from wall-clock marks (time.time(), seconds since the epoch).

    imports     Tune started the trial function -> the libraries the trial needs are imported (MLflow, torch, Ray
                Train; the training modules in Ray Train's local mode): seconds in a fresh trial process, nothing
                in a reused one; records older than this phase count it in `tracking`
    tracking    -> its MLflow run is open (client and store, run found or created with params, tags and
                datasets); records older than this phase count it in `start`
    start       -> the training function runs (Ray Train's worker group or local-mode trainer started, the
                worker's hooks and the stage's modules loaded)
    setup       data loaded or stream built, latents encoded or read (base models), networks built
    first_step  checkpoint restored, the first optimizer step: torch.compile's tracing and compilation and
                CUDA graph capture happen here (with `train.gate_compile: eager` a trial that another is
                compiling for takes this step uncompiled and compiles later, within `train`)
    train       the remaining optimizer steps, with logging and checkpoints at their intervals
    evaluate    the final evaluation (bits/pixel, PSNR, rFD/rFID; samples and gFD/gFID for base models)
    finish      final checkpoint, result.json, final metrics and images to MLflow, the trainer's tear-down
    failed      an attempt that raised: from its training function's start to the error reaching Tune

A mark that an attempt did not reach (a resumed run that had no step left, a failure) merges its phase into
the next one. Marks outside [t_trial, t_fit_end] (a finished result.json of an earlier attempt) are ignored.
"""
from __future__ import annotations

import json
import math

# mark -> the phase that ends at it, in order
MARKS = (("t_imports", "imports"), ("t_run", "tracking"), ("t_loop", "start"), ("t_setup_end", "setup"),
         ("t_first_step_end", "first_step"), ("t_train_end", "train"), ("t_eval_end", "evaluate"),
         ("t_fit_end", "finish"))
PHASES = tuple(p for _, p in MARKS) + ("failed",)
# the final evaluation's parts (ulsweep/train/evaluation.PartTimer; seconds in a trial's timings record): loading
# the feature extractors, the held-out bits/pixel, sampling (reconstructions or generations), the Fréchet
# distances (features and statistics), the FLOPs count
EVALUATE_PARTS = tuple(f"evaluate_{p}_s" for p in ("extractor", "bpp", "sampling", "fd", "flops"))
# a stacked group's setup before its first step (ulsweep/train/group.py, group_base.py; every member's record):
# waiting for the latents encoded ahead (base groups of a sweep: group_base.encode_ahead), reading its autoencoders'
# checkpoints (base groups), the data, encoding the members' latents together (and of that: waiting for the images,
# the encoder, storing the latents; ulsweep/train/latents.encode_split), reading each member's latents back,
# building the stacked networks and optimizer
SETUP_PARTS = tuple(f"setup_{p}_s" for p in ("encode_ahead", "checkpoints", "data", "encode", "encode_read",
                                             "encode_encoder", "encode_store", "latents", "models"))
# the first step's: resuming (a checkpoint, where there is one) and wrapping the objective for torch.compile
FIRST_STEP_PARTS = ("first_step_resume_s",)
# the training's: the first compiled step after uncompiled ones (ulsweep/train/loop.py `_switched`)
TRAIN_PARTS = ("train_compile_switch_s",)
PARTS = SETUP_PARTS + FIRST_STEP_PARTS + TRAIN_PARTS + EVALUATE_PARTS  # timed parts of a trial's phases, in order
# a stacked group's marks about its members' start (every member's record): when the group stopped waiting for its
# members (time.time()), when a group built ahead was ready and its seconds to build and warm (and, a base group's,
# how its compiled step was warmed: the compile gate's answer), how
# many of a base group's members had their checkpoints passed on and read before they joined, and how many had their
# latents encoded then (group_base.encode_ahead)
GROUP_MARKS = ("t_joined", "t_prepared_end", "prepared_s", "prepared_compile", "checkpoints_passed_on",
               "latents_encoded_ahead")
TAG = "ulsweep.timeline"  # MLflow tag: JSON list of [attempt, phase, start, end] of every attempt
TAG_MAX_CHARS = 5000  # MLflow's limit on a tag value (its sqlite store)
# MLflow tag: the process and thread of a trial's last attempt and how many trials that process had started by
# then, "<host>:<pid>/<thread id> trial <n>"; n > 1: a warm process that Tune reused (resources.reuse_processes)
TAG_PROCESS = "ulsweep.process"


def process_tag(host: str, pid: int, thread: int, n: int) -> str:
    return f"{host}:{pid}/{thread} trial {n}"


def process_trial(tag_value: str | None) -> int | None:
    """n of a TAG_PROCESS value (1: the attempt started its process), None where absent or unreadable."""
    head, sep, n = (tag_value or "").rpartition(" trial ")
    return int(n) if sep and head and n.isdigit() else None


def phases(rec: dict) -> list[tuple[str, float, float]]:
    """[(phase, start, end)] of one attempt's timings record (keys t_trial, t_fit_end and the loop's marks;
    `"error": True` for an attempt that failed)."""
    t0, t_end = rec.get("t_trial"), rec.get("t_fit_end")
    if not _finite(t0) or not _finite(t_end) or t_end < t0:
        return []
    if rec.get("error"):
        t_fit = rec.get("t_fit")
        t_fit = t_fit if _finite(t_fit) and t0 <= t_fit <= t_end else t0
        return [p for p in (("start", t0, t_fit), ("failed", t_fit, t_end)) if p[2] > p[1]]
    out, last = [], t0
    for mark, phase in MARKS:
        t = rec.get(mark)
        if _finite(t) and last <= t <= t_end:
            out.append((phase, last, t))
            last = t
    return out


def durations(ph: list[tuple[str, float, float]]) -> dict[str, float]:
    """Seconds per phase (summed where a phase occurs more than once)."""
    out: dict[str, float] = {}
    for name, a, b in ph:
        out[name] = out.get(name, 0.0) + (b - a)
    return out


def add_attempt(tag_value: str | None, ph: list[tuple[str, float, float]]) -> str:
    """The timeline tag with one more attempt's phases appended, numbered after the attempts it holds (the
    oldest attempts are dropped when the tag would exceed TAG_MAX_CHARS)."""
    rows = parse_tag(tag_value)
    attempt = 1 + max((r[0] for r in rows), default=0)
    rows += [[attempt, name, round(a, 2), round(b, 2)] for name, a, b in ph]
    text = json.dumps(rows, separators=(",", ":"))
    while len(text) > TAG_MAX_CHARS and rows:
        first = rows[0][0]
        rows = [r for r in rows if r[0] != first]
        text = json.dumps(rows, separators=(",", ":"))
    return text


def parse_tag(tag_value: str | None) -> list[list]:
    """The [attempt, phase, start, end] rows of a timeline tag; [] for a missing or unreadable tag."""
    if not tag_value:
        return []
    try:
        rows = json.loads(tag_value)
    except ValueError:
        return []
    ok = (isinstance(rows, list)
          and all(isinstance(r, list) and len(r) == 4 and r[1] in PHASES and _finite(r[2]) and _finite(r[3])
                  for r in rows))
    return rows if ok else []


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
