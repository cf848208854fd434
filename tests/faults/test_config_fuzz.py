"""Issue 24's config fuzzer, CI size: a few hundred seeded mutations of experiments/quickstart.yaml,
lf_sweep.yaml and ablations.yaml through the real command line's main() (`ulsweep run FILE --dry-run`: load,
data and search-space checks, the plan; no Ray, no MLflow). Every case passes, or exits 2 with one line on
stderr naming the file and the key at fault; no traceback, no hang (configfuzz.py says what is mutated and
how). The full size runs in benchmarks/faults/campaign.py."""
from __future__ import annotations

from collections import Counter

from configfuzz import SOURCES, cases, judge, run

N, SEED = 300, 24


def test_every_mutated_experiment_loads_or_names_its_file_and_key(tmp_path, digits_cache):
    outcomes = run(N, SEED, tmp_path)
    problems = [f"[{o.case.n}] {o.case.source} {o.case.what[:120]}: {o.problem}" for o in outcomes if o.problem]
    assert not problems, "\n".join(problems[:20])
    # not vacuous: the cases reach both outcomes, every mutation family and every source file
    rcs = Counter(o.rc for o in outcomes)
    assert rcs[0] >= N // 10 and rcs[2] >= N // 2, rcs
    kinds = Counter(o.case.kind for o in outcomes)
    assert set(kinds) >= {"none", "text", "override", "delete", "wrong_type", "number", "unknown_key", "space",
                          "empty_list", "huge", "unicode", "section_type"}, kinds
    assert {o.case.source for o in outcomes} == set(SOURCES)
    assert all(o.rc == 0 for o in outcomes if o.case.kind == "none")  # the shipped files pass


def test_the_judge_refuses_what_breaks_the_contract():
    f = "/x/e.yaml"
    assert judge(2, f"error: {f}: ae.loss.loss_factor: must be > 0 (got -1)\n", f) is None
    assert judge(2, f"error: {f}: ae.loss['lr ']: unknown key\n", f) is None
    assert judge(2, f"error: {f}: YAML syntax error: line 3, column 1: bad\n", f) is None
    assert judge(0, "", f) is None
    assert "traceback" in judge(2, "Traceback (most recent call last):\n  ...\nValueError: x\n", f)
    assert "lines" in judge(2, f"error: {f}: a: b\nmore\n", f)
    assert "name the file" in judge(2, "error: ae.loss.loss_factor: must be > 0\n", f)
    assert "name the file" in judge(2, f"error: {f}: must be > 0\n", f)
    assert "exit code 1" in judge(1, "", f)
    assert "exit 0 with stderr" in judge(0, "warning: x\n", f)


def test_cases_are_seeded():
    assert [c.text for c in cases(40, 7)] == [c.text for c in cases(40, 7)]
    assert [c.text for c in cases(40, 7)] != [c.text for c in cases(40, 8)]
