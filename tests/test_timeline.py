"""Trial timelines: phases from the loop's marks (ulsweep/sweep/timeline.py), the MLflow tag that holds them,
and the report's frame, table, Gantt chart and summary (ulsweep/report/timeline.py). The sweep tests check
the same on real runs (test_sweep.check_timelines)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types

import pandas as pd
import pytest

from ulsweep import tracking
from ulsweep.report import timeline as rt
from ulsweep.sweep import timeline as T

REC = {"t_trial": 100.0, "t_fit": 101.0, "t_loop": 103.0, "t_setup_end": 105.5, "t_first_step_end": 125.5,
       "t_train_end": 185.5, "t_eval_end": 195.5, "t_fit_end": 197.0}


def test_phases_follow_the_marks_and_cover_the_attempt():
    ph = T.phases(REC)
    assert [p for p, _, _ in ph] == ["start", "setup", "first_step", "train", "evaluate", "finish"]
    assert T.durations(ph) == {"start": 3.0, "setup": 2.5, "first_step": 20.0, "train": 60.0, "evaluate": 10.0,
                               "finish": 1.5}
    assert sum(T.durations(ph).values()) == REC["t_fit_end"] - REC["t_trial"]


def test_the_mlflow_run_opening_is_its_own_phase_and_older_records_count_it_in_start():
    ph = T.phases({**REC, "t_run": 100.75})
    assert [p for p, _, _ in ph][:2] == ["tracking", "start"]
    assert T.durations(ph)["tracking"] == 0.75 and T.durations(ph)["start"] == 2.25
    assert "tracking" not in T.durations(T.phases(REC))  # a record from before the mark: start from t_trial


def test_imports_come_first_and_older_records_count_them_in_tracking():
    ph = T.phases({**REC, "t_imports": 100.5, "t_run": 100.75})
    assert [p for p, _, _ in ph][:3] == ["imports", "tracking", "start"]
    assert T.durations(ph)["imports"] == 0.5 and T.durations(ph)["tracking"] == 0.25
    older = T.durations(T.phases({**REC, "t_run": 100.75}))  # a record from before the imports mark
    assert "imports" not in older and older["tracking"] == 0.75


def test_a_missing_mark_merges_its_phase_into_the_next_and_stale_marks_are_ignored():
    resumed = {**REC, "t_first_step_end": None}  # a resumed run with no step left to take
    assert T.durations(T.phases(resumed))["train"] == 80.0 and "first_step" not in T.durations(T.phases(resumed))
    stale = {**REC, "t_setup_end": 50.0, "t_eval_end": 250.0}  # from an earlier attempt's result.json
    d = T.durations(T.phases(stale))
    assert "setup" not in d and d["first_step"] == 22.5 and d["finish"] == 11.5
    assert T.phases({"t_trial": 5.0}) == [] and T.phases({"t_trial": 5.0, "t_fit_end": 4.0}) == []


def test_a_failed_attempt_is_start_then_failed():
    ph = T.phases({"t_trial": 10.0, "t_fit": 12.0, "t_fit_end": 40.0, "error": True})
    assert ph == [("start", 10.0, 12.0), ("failed", 12.0, 40.0)]


def test_tag_numbers_attempts_drops_the_oldest_when_too_long_and_refuses_garbage():
    tag = T.add_attempt(None, T.phases({"t_trial": 0.0, "t_fit": 1.0, "t_fit_end": 2.0, "error": True}))
    tag = T.add_attempt(tag, T.phases(REC))
    rows = T.parse_tag(tag)
    assert [r[0] for r in rows] == [1, 1] + [2] * 6 and rows[2] == [2, "start", 100.0, 103.0]
    big = tag
    for _ in range(200):
        big = T.add_attempt(big, T.phases(REC))
    assert len(big) <= T.TAG_MAX_CHARS and T.parse_tag(big)[-1][0] == 202 and T.parse_tag(big)[0][0] > 2
    for bad in ("", "{", json.dumps({"a": 1}), json.dumps([[1, "lunch", 0, 1]]), json.dumps([[1, "train", 0]])):
        assert T.parse_tag(bad) == []


def _run(key: str, kind: str, tag: str | None, process: str | None = None):
    tags = {tracking.TAG_KEY: key, tracking.TAG_KIND: kind, **({T.TAG: tag} if tag else {}),
            **({T.TAG_PROCESS: process} if process else {})}
    return types.SimpleNamespace(data=types.SimpleNamespace(tags=tags), info=types.SimpleNamespace(run_name=key))


def _shifted(dt: float) -> dict:
    return {k: v + dt for k, v in REC.items()}


@pytest.fixture
def tl():
    ae0 = T.add_attempt(None, T.phases(REC))
    ae1 = T.add_attempt(None, T.phases(_shifted(30.0)))  # overlaps ae0's training: 155.5 -> 215.5
    base = T.add_attempt(T.add_attempt(None, [("start", 300.0, 301.0), ("failed", 301.0, 310.0)]),
                         T.phases(_shifted(300.0)))  # trains 485.5 -> 545.5 after a failed attempt
    return rt.timeline_frame([_run("ae-0000", "ae", ae0, T.process_tag("h", 11, 12, 1)), _run("ae-0001", "ae", ae1),
                              _run("ae-0000-s", "base", base, T.process_tag("h", 11, 12, 3)), _run("old", "ae", None)])


def test_report_frame_table_and_summary_against_hand_sums(tl):
    assert set(tl["key"]) == {"ae-0000", "ae-0001", "ae-0000-s"} and len(tl) == 6 + 6 + 2 + 6
    t = rt.phase_table(tl).set_index(["kind", "phase"])
    assert t.loc[("ae", "train"), "trial-seconds"] == pytest.approx(120.0)
    assert t.loc[("ae", "first_step"), "share of kind"] == pytest.approx(40.0 / 194.0)
    assert t.loc[("base", "failed"), "trial-seconds"] == pytest.approx(9.0)
    assert t.groupby("kind")["share of kind"].sum().tolist() == pytest.approx([1.0, 1.0])
    s = rt.summary(tl)
    assert s["span_s"] == pytest.approx(497.0 - 100.0)  # first start to the base trial's end
    assert s["training_s"] == pytest.approx((215.5 - 125.5) + 60.0)  # the union: overlapping AEs count once
    assert s["training_share"] == pytest.approx(150.0 / 397.0)
    assert s["ready_median_s[ae]"] == pytest.approx(25.5) and s["ready_max_s[base]"] == pytest.approx(25.5)
    r = rt.ready_seconds(tl)
    assert list(r["key"]) == ["ae-0000", "ae-0001", "ae-0000-s"] and list(r["attempt"]) == [1, 1, 2]
    # the process tag belongs to a run's last attempt: the base trial's second attempt ran in a warm process
    assert r["process_trial"].astype(object).where(r["process_trial"].notna(), None).tolist() == [1, None, 3]
    first_base = tl[(tl["key"] == "ae-0000-s") & (tl["attempt"] == 1)]
    assert first_base["process_trial"].isna().all() and len(first_base) == 2


def test_process_tag_round_trip_and_unreadable_values():
    assert T.process_trial(T.process_tag("node-1.local", 4242, 4250, 7)) == 7
    assert T.process_trial(T.process_tag("a trial 3", 1, 5, 2)) == 2  # the last " trial " counts
    for bad in (None, "", "trial 3", "h:1 trial", "h:1 trial x", "h:1 trial -2"):
        assert T.process_trial(bad) is None, bad


def test_union_seconds_closed_form():
    assert rt.union_seconds([]) == 0.0
    assert rt.union_seconds([(0, 2), (1, 3), (5, 6), (5.5, 5.7)]) == 4.0
    assert rt.union_seconds([(0, 10), (2, 3)]) == 10.0


def test_gantt_has_a_bar_per_phase_and_attempt_and_the_markdown_states_the_numbers(tl):
    fig = rt.timeline_figure(tl)
    assert sum(len(tr.y) for tr in fig.data) == len(tl)
    assert {tr.name for tr in fig.data} == {rt.PHASE_LABELS[p] for p in set(tl["phase"])}
    rows = list(fig.layout.yaxis.categoryarray)
    assert rows[::-1] == ["ae-0000", "ae-0001", "ae-0000-s #1", "ae-0000-s #2"]  # first start at the top
    train = next(tr for tr in fig.data if tr.name == rt.PHASE_LABELS["train"])
    assert min(train.base) == pytest.approx(25.5)  # seconds since the first trial started
    assert set(train.customdata) == {"<br>fresh process", "", "<br>warm process (its trial 3)"}
    md = rt.markdown(tl)
    assert "397 s" in md and "150 s" in md and "(38%)" in md and "ae 25.5 s (max 25.5)" in md
    assert "in warm, reused processes 25.5 s (1 trial); in fresh ones 25.5 s (1 trial)" in md
    assert "| ae | first step (compile) | 40 | 21% |" in md


def test_the_final_evaluations_parts_median_per_kind_in_the_markdown(tl):
    import pandas as pd

    runs = pd.DataFrame([
        {"kind": "ae", "time/evaluate_bpp_s": 1.0, "time/evaluate_sampling_s": 4.0, "time/evaluate_fd_s": 2.0},
        {"kind": "ae", "time/evaluate_bpp_s": 3.0, "time/evaluate_sampling_s": 6.0, "time/evaluate_fd_s": None},
        {"kind": "base", "time/evaluate_bpp_s": 0.5, "time/evaluate_sampling_s": 40.0, "time/evaluate_fd_s": 9.0,
         "time/setup_encode_s": 3.0},
        {"kind": "base", "time/evaluate_bpp_s": None, "time/evaluate_sampling_s": None, "time/evaluate_fd_s": None,
         "time/setup_encode_s": None},
    ])
    p = rt.evaluation_parts(runs).set_index(["kind", "part"])
    assert p.loc[("ae", "evaluate_bpp_s"), "median per trial (s)"] == pytest.approx(2.0)
    assert p.loc[("ae", "evaluate_fd_s"), "trials"] == 1  # a trial without the part is not counted
    assert p.loc[("base", "evaluate_sampling_s"), "median per trial (s)"] == pytest.approx(40.0)
    assert list(p.loc["ae"].index) == ["evaluate_bpp_s", "evaluate_sampling_s", "evaluate_fd_s"]  # in order
    md = rt.markdown(tl, runs)
    assert "| base | final evaluation: sampling (reconstructions / generations) | 40.0 | 1 |" in md
    assert "| base | setup: encode the members' latents | 3.0 | 1 |" in md  # a stacked group's setup, first
    assert list(p.loc["base"].index)[0] == "setup_encode_s"
    assert "by part" not in rt.markdown(tl, pd.DataFrame([{"kind": "ae", "bpp": 0.1}]))  # older sweeps: none


def test_the_imports_warm_up_warns_instead_of_failing_the_trial_early(monkeypatch, caplog):
    # a module that does not import fails again where the trial uses it, with its run and retry budget in place
    import sys

    from ulsweep.sweep import trial

    monkeypatch.setitem(trial.IMPLS, "broken", ("ulsweep_no_such_module", "ulsweep_no_such_module"))
    with caplog.at_level("WARNING", logger=trial.log.name):
        trial.import_trial_modules("broken", local=True)
    assert "could not import ulsweep_no_such_module" in caplog.text
    assert {"mlflow", "torch", "ray.train.torch"} <= set(sys.modules)
    caplog.clear()
    trial.import_trial_modules("broken", local=False)  # workers mode: the training modules load in the workers
    assert caplog.text == ""
    trial.import_trial_modules("broken", local=True, stacked=True)  # its group's actor trains it: not them either
    assert caplog.text == ""


def test_a_stacked_members_trial_process_imports_no_torch():
    """In local mode a stacked member's process only relays what its group's actor trains: its imports, trainer,
    identity checks (finished run? which checkpoint?) and dataset inputs do without torch, which cost each of 18
    fresh processes several seconds at a sweep's start. Checked in a fresh interpreter."""
    import subprocess
    import sys

    code = """
import sys
from ulsweep.config import experiment_from_dict
from ulsweep.sweep import trial
trial.import_trial_modules("ulsweep", local=True, stacked=True)
from ulsweep.sweep.trial import make_trainer, worker_config
from ulsweep.sweep.stacking import train_in_group  # its module; the function imports the identity checks
from ulsweep.train.identity import stage1_hash
from ulsweep.train.checkpoint import finished_result, read_meta
import ulsweep.data.builtin, ulsweep.data.reader, ulsweep.tracking.datasets
from ulsweep.train.latent_store import published_latents  # a base member logs its latents
exp = experiment_from_dict({"resources": {"num_workers": 0}})
stage1_hash(exp)
wcfg = worker_config(exp, exp.resources, "ae", "ae-0000", "/tmp/x", "", "r", "ulsweep", stack_group="g")
t = make_trainer(wcfg, exp.resources, storage_path="/tmp/x", name="ae-0000", in_tune=True)
print(type(t).__name__, "torch" in sys.modules)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split()[-2:] == ["DataParallelTrainer", "False"], p.stdout


def test_every_timed_part_has_its_label_in_the_report():
    """The report's table names each part a trial's timings record (sweep.timeline.PARTS): one missing was a
    KeyError in `ulsweep report` for every sweep that timed it."""
    assert set(rt.PART_LABELS) == set(T.PARTS)


# ----------------------------------------------------------------------------------------------
# the driver's own steps (ulsweep/sweep/clock.py)


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="process start times come from Linux's /proc")
def test_process_start_time_is_when_the_child_process_began():
    code = "from ulsweep.sweep.clock import process_start_time; print(repr(process_start_time()))"
    before = time.time()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    after = time.time()
    started = float(p.stdout)
    # /proc counts in clock ticks (10 ms) and its uptime in hundredths of a second: 0.05 s either side
    assert before - 0.05 <= started <= after + 0.05, (before, started, after)


def test_driver_clock_steps_are_back_to_back_from_the_command():
    from ulsweep.sweep.clock import DriverClock

    clock = DriverClock(t_command=time.time() - 2.0)
    clock.mark("check")
    time.sleep(0.02)
    clock.mark("fit")
    ph = clock.phases()
    assert [p["phase"] for p in ph] == ["command", "check", "fit"]
    assert ph[0]["seconds"] == pytest.approx(2.0, abs=0.05)
    assert ph[2]["seconds"] >= 0.02
    for a, b in zip(ph, ph[1:]):
        assert b["start"] == pytest.approx(a["start"] + a["seconds"], abs=0.002)
    assert json.loads(clock.tag()) == {p["phase"]: pytest.approx(p["seconds"], abs=0.01) for p in ph}
    assert clock.line().startswith("driver: command 2.0 s, check ")
    # no command start known, or one after the clock's: no command step
    assert DriverClock().phases() == [] and DriverClock(t_command=time.time() + 5).phases() == []
    # a step that ran in a thread beside the others: listed apart, which stay back to back, and last in the tag
    t = time.time()
    clock.beside("ray_shutdown", t - 1.5, t)
    clock.mark("summary")
    assert [p["phase"] for p in clock.phases()] == ["command", "check", "fit", "summary"]
    assert clock.phases_beside() == [{"phase": "ray_shutdown", "start": round(t - 1.5, 3), "seconds": 1.5}]
    assert list(json.loads(clock.tag())) == ["command", "check", "fit", "summary", "ray_shutdown (beside)"]
    assert clock.line().endswith("; beside: ray_shutdown 1.5 s")
