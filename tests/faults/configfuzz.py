"""A seeded fuzzer of experiment files, run through the real command line (`ulsweep run FILE --dry-run`, which
loads the file, checks its data path and search space and prints the plan without starting Ray or MLflow).

Each case mutates one of the shipped experiment files: a key deleted, a value of the wrong type, a number out
of range or huge (or NaN/inf), an unknown key, broken YAML text, a search space of the wrong shape, an empty
list, unicode where names go, a wrong `--set` override. The contract: the command exits 0 (the mutation is a
valid experiment), or it exits 2 with exactly one line on stderr, `error: FILE: KEY: ...`, naming the file and
the dotted key at fault (YAML syntax errors name the line and column, a non-mapping document says so). No
traceback, no other output on stderr, and no case may take longer than `CASE_LIMIT_S` (a hang).

Used by tests/faults/test_config_fuzz.py (a few hundred cases in CI) and benchmarks/faults/campaign.py (the
full size)."""
from __future__ import annotations

import contextlib
import copy
import io
import random
import re
import signal
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("quickstart.yaml", "lf_sweep.yaml", "ablations.yaml")
CASE_LIMIT_S = 10.0

# what an error line may name after the file: a dotted key (with [i] indices), the override flag, a YAML
# position, or the document itself
_SEG = r"""\[(?:\d+|'[^']*'|"[^"]*")\]"""
_KEY = r"(--set|(?:[\w-]+|" + _SEG + r")(?:" + _SEG + r"|\.[\w-]+)*)"
_LOCATED = re.compile(r"^error: (?P<file>.+?): (?:(?P<key>" + _KEY + r"): .+"
                      r"|YAML syntax error: (?:line \d+, column \d+|character \d+): .+|top level must be a mapping.*)$")


@dataclass
class Case:
    n: int
    source: str
    kind: str  # the mutation's family
    what: str  # the mutation, in words
    text: str  # the mutated file's text
    overrides: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    case: Case
    rc: int | None
    stderr: str
    seconds: float
    problem: str | None  # None: the contract holds


# ----------------------------------------------------------------------------------------------
# mutations


def _paths(d, prefix=()):
    """Every (path, value) of a nested dict/list, parents before children."""
    if isinstance(d, dict):
        for k, v in d.items():
            yield prefix + (k,), v
            yield from _paths(v, prefix + (k,))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield prefix + (i,), v
            yield from _paths(v, prefix + (i,))


def _parent(d, path):
    node = d
    for p in path[:-1]:
        node = node[p]
    return node


WRONG_TYPES = ["a string", "", [], [1, 2], {}, {"x": 1}, True, None, 3, -1.5, "1e3", [[]], {"values": [1]}]
NUMBERS = [0, -1, -0.0, 1, 2, 10**30, -10**30, 1e308, -1e308, float("nan"), float("inf"), float("-inf"), 1e-320,
           2**63, 0.5, 7, 1000003, 10**6]
UNICODE = ["λ-sweep", "名前", "emoji-\U0001f680", "e\u0301", "\u202eevil", "tab\there", "a" * 5000, "x/y",
           "..", "\x00nul", " ", "ß" * 40]
SPACE_SHAPES = [[], {}, [1.5, 4.0], 2.0, "values", {"values": []}, {"values": [[1]]}, {"values": {"a": 1}},
                {"values": "1.5"}, {"low": 1.0}, {"high": 2.0}, {"low": 5, "high": 1}, {"low": "a", "high": "b"},
                {"low": 1, "high": 8, "int": True, "step": 0}, {"low": 0, "high": 1, "log": True},
                {"low": 1, "high": 2, "log": "yes"}, {"low": 1.0, "high": 2.0, "int": True},
                {"values": [1.5], "low": 1}, {"values": [None]}, {"values": [float("nan")]},
                {"low": float("nan"), "high": 2.0}, {"low": -float("inf"), "high": float("inf")},
                {"values": [1.5, 2.5], "extra": 1}, {"low": 1, "high": 10**30, "int": True}]
SPACE_KEYS = ["ae.loss.loss_factor", "ae.nope", "search.method", "", ".", "ae..x", "base_models.0.train.steps",
              "base_models.9.train.steps", "ae.model", "resources.num_workers", "名前.x", "ae.loss.loss_factor.x"]
EMPTY_LISTS = [("base_models",), ("search", "metrics"), ("search", "modes"), ("search", "points")]
HUGE = [("search", "num_samples"), ("search", "max_concurrent"), ("ae", "train", "steps"),
        ("ae", "train", "batch_size"), ("data", "image_size"), ("ae", "model", "latent_channels"),
        ("search", "max_trials"), ("eval", "gfd_samples"), ("ae", "train", "keep_checkpoints"),
        ("resources", "num_workers"), ("resources", "cpus_per_worker"), ("resources", "max_worker_failures")]
INSERTS = [":", "[", "]", "{", "}", "- ", "&a", "*a", "!!python/object:os.system ", "%", "@", "`", "\"", "'", "? ",
           "|\n"]
SET_KEYS = ["ae.loss.loss_factor", "search.space", "base_models.0.name", "base_models.5.name", "data", "x",
            "ae..x", "", "resources.num_workers", "search.metrics", "ae.train.steps.x", "名前"]
SET_VALUES = ["4", "-1", "abc", "[1, 2", "{a: 1}", "", "null", ".nan", "1e999", "[]", "true", "'x'", "{{"]


def _dump(d) -> str:
    return yaml.safe_dump(d, sort_keys=False, allow_unicode=True)


def _mutate_tree(rng: random.Random, d: dict) -> tuple[str, str, dict]:
    kind = rng.choice(["delete", "wrong_type", "number", "unknown_key", "space", "empty_list", "huge", "unicode",
                       "section_type", "duplicate_base"])
    paths = [p for p, _ in _paths(d)]
    if kind == "delete":
        p = rng.choice(paths)
        del _parent(d, p)[p[-1]]
        return kind, f"deleted {_fmt(p)}", d
    if kind == "wrong_type":
        p = rng.choice(paths)
        v = copy.deepcopy(rng.choice(WRONG_TYPES))
        _parent(d, p)[p[-1]] = v
        return kind, f"{_fmt(p)} = {v!r}", d
    if kind == "number":
        leaves = [p for p, v in _paths(d) if isinstance(v, (int, float)) and not isinstance(v, bool)] or paths
        p, v = rng.choice(leaves), rng.choice(NUMBERS)
        _parent(d, p)[p[-1]] = v
        return kind, f"{_fmt(p)} = {v!r}", d
    if kind == "unknown_key":
        sections = [()] + [p for p, v in _paths(d) if isinstance(v, dict)]
        p = rng.choice(sections)
        node = _parent(d, p + ("",)) if p else d
        k = rng.choice(["bogus", "stepz", "lr ", "Steps", "名前", "0", "space", "train"])
        node[k] = rng.choice([1, "x", {"a": 1}])
        return kind, f"{_fmt(p + (k,))} added", d
    if kind == "space":
        space = d.setdefault("search", {}).setdefault("space", {})
        if rng.random() < 0.5 and space:
            k = rng.choice(list(space))
        else:
            k = rng.choice(SPACE_KEYS)
        v = copy.deepcopy(rng.choice(SPACE_SHAPES))
        if rng.random() < 0.15:
            d["search"]["space"] = v
            return kind, f"search.space = {v!r}", d
        space[k] = v
        return kind, f"search.space.{k} = {v!r}", d
    if kind == "empty_list":
        p = rng.choice(EMPTY_LISTS)
        node = d
        for k in p[:-1]:
            node = node.setdefault(k, {})
        node[p[-1]] = []
        return kind, f"{_fmt(p)} = []", d
    if kind == "huge":
        p = rng.choice(HUGE)
        node = d
        for k in p[:-1]:
            node = node.setdefault(k, {})
        v = rng.choice([10**9, 10**12, 2**31, 10**18, 10**100, 1e300])
        node[p[-1]] = v
        return kind, f"{_fmt(p)} = {v!r}", d
    if kind == "unicode":
        p = rng.choice([("name",), ("base_models", 0, "name"), ("data", "path"), ("search", "metrics", 0),
                        ("tracking", "experiment"), ("storage",), ("ae", "model", "preset")])
        node = d
        for k in p[:-1]:
            node = node.setdefault(k, {}) if isinstance(k, str) else node[k]
        v = rng.choice(UNICODE)
        node[p[-1]] = v
        return kind, f"{_fmt(p)} = {v!r}", d
    if kind == "section_type":
        k = rng.choice(["data", "ae", "base_models", "search", "resources", "eval", "tracking"])
        v = copy.deepcopy(rng.choice(WRONG_TYPES))
        d[k] = v
        return kind, f"{k} = {v!r}", d
    # duplicate_base
    d.setdefault("base_models", [{"name": "b"}])
    if d["base_models"]:
        d["base_models"].append(copy.deepcopy(d["base_models"][0]))
    return kind, "base_models[0] repeated", d


def _mutate_text(rng: random.Random, text: str) -> tuple[str, str]:
    ops = ["delete_char", "insert", "truncate", "indent", "tabs", "duplicate_key", "binary", "empty", "list_doc"]
    op = rng.choice(ops)
    if op == "delete_char":
        i = rng.randrange(len(text))
        return f"deleted char {i} ({text[i]!r})", text[:i] + text[i + 1:]
    if op == "insert":
        i, s = rng.randrange(len(text)), rng.choice(INSERTS)
        return f"inserted {s!r} at {i}", text[:i] + s + text[i:]
    if op == "truncate":
        i = rng.randrange(len(text))
        return f"truncated at {i}", text[:i]
    if op == "indent":
        lines = text.splitlines()
        j = rng.randrange(len(lines))
        lines[j] = " " * rng.choice([1, 3, 5]) + lines[j]
        return f"line {j + 1} indented", "\n".join(lines) + "\n"
    if op == "tabs":
        return "indentation by tabs", text.replace("  ", "\t")
    if op == "duplicate_key":
        return "a key repeated", text + rng.choice(["name: twice\n", "search: {}\n", "ae: 3\n"])
    if op == "binary":
        return "binary garbage", text[: len(text) // 2] + "\x00\x01\ufffe\x7f"
    if op == "empty":
        return "empty file", rng.choice(["", "\n", "# only a comment\n", "---\n", "null\n", "~\n"])
    return "not a mapping", rng.choice(["- a\n- b\n", "42\n", "just text\n", "[1, 2]\n", "---\na: 1\n---\nb: 2\n"])


def _fmt(p) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else (f".{k}" if i else str(k)) for i, k in enumerate(p))


def cases(n: int, seed: int) -> list[Case]:
    """`n` mutations, seeded; a few untouched sources first (they must pass)."""
    rng = random.Random(seed)
    texts = {s: (REPO / "experiments" / s).read_text() for s in SOURCES}
    out = [Case(i, s, "none", "unchanged", texts[s]) for i, s in enumerate(SOURCES)]
    while len(out) < n:
        src = rng.choice(SOURCES)
        r = rng.random()
        if r < 0.2:
            what, text = _mutate_text(rng, texts[src])
            out.append(Case(len(out), src, "text", what, text))
        elif r < 0.3:
            k, v = rng.choice(SET_KEYS), rng.choice(SET_VALUES)
            out.append(Case(len(out), src, "override", f"--set {k}={v}", texts[src], [f"{k}={v}"]))
        else:
            kind, what, d = _mutate_tree(rng, yaml.safe_load(texts[src]))
            try:
                text = _dump(d)
            except (yaml.YAMLError, ValueError) as e:  # unrepresentable (cannot happen with these values)
                text, what = texts[src], f"{what} (not dumpable: {e})"
            out.append(Case(len(out), src, kind, what, text))
    return out[:n]


# ----------------------------------------------------------------------------------------------
# running a case


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang


def run_case(case: Case, workdir: Path) -> Outcome:
    """`ulsweep run FILE --dry-run [--set ...]` in this process (main(), stderr captured, SIGALRM as the hang
    guard); checks the contract."""
    from ulsweep.cli import main

    path = workdir / f"case-{case.n:05d}.yaml"
    path.write_text(case.text, encoding="utf-8", errors="surrogatepass")
    argv = ["run", str(path), "--dry-run", "--storage", str(workdir / "runs")]
    for o in case.overrides:
        argv += ["--set", o]
    err, out = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, CASE_LIMIT_S)
    t0 = time.perf_counter()
    rc, problem = None, None
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = main(argv)
    except _Hang:
        problem = f"hang: no answer within {CASE_LIMIT_S:.0f} s"
    except SystemExit as e:  # argparse
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException as e:  # noqa: BLE001 - any escape is a finding
        problem = "traceback: " + "".join(traceback.format_exception_only(type(e), e)).strip()[:500]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    seconds = time.perf_counter() - t0
    stderr = err.getvalue()
    if problem is None:
        problem = judge(rc, stderr, str(path))
    path.unlink(missing_ok=True)
    return Outcome(case, rc, stderr, seconds, problem)


def judge(rc: int | None, stderr: str, path: str) -> str | None:
    """None when (rc, stderr) keeps the contract for the file at `path`, else what is wrong."""
    lines = [x for x in stderr.splitlines() if x.strip()]
    if "Traceback" in stderr:
        return "traceback on stderr"
    if rc == 0:
        return None if not lines else f"exit 0 with stderr: {stderr[:300]!r}"
    if rc != 2:
        return f"exit code {rc} (expected 0 or 2); stderr {stderr[:300]!r}"
    if len(lines) != 1:
        return f"{len(lines)} lines on stderr (expected one): {stderr[:500]!r}"
    m = _LOCATED.match(lines[0])
    if m is None or m["file"] != path:
        return f"error does not name the file and key: {lines[0][:300]!r}"
    return None


def run(n: int, seed: int, workdir: Path) -> list[Outcome]:
    workdir.mkdir(parents=True, exist_ok=True)
    return [run_case(c, workdir) for c in cases(n, seed)]

