"""The config a run's checkpoints and `result.json` belong to: `stage1_hash` (an autoencoder's) and `stage2_hash` (a
base model's). Plain config hashing, without torch: a stacked member's trial process asks whether its run has
finished already without importing torch (ulsweep/sweep/stacking.py: its group's actor trains it)."""
from __future__ import annotations

from ulsweep.config import BaseStageConfig, ExperimentConfig, config_hash


def stage1_hash(exp: ExperimentConfig) -> str:
    """The config a stage-1 run's checkpoints and result belong to: its data, autoencoder and evaluation. Not
    resources, tracking, storage or the search, which a sweep may change on resume (the sweep's identity leaves
    them out too, ulsweep/sweep/state.py), nor the base models, which train in runs of their own."""
    return config_hash({"data": exp.data, "ae": exp.ae, "eval": exp.eval})


def stage2_hash(exp: ExperimentConfig, base: BaseStageConfig, ae_meta: dict) -> str:
    """Identity of a base run: its data section, its own config, the exact AE weights it sits on and its
    evaluation (as stage1_hash: a finished run's result.json answers a rerun only when it was evaluated the same
    way; a changed `eval` refuses the run directory instead of returning metrics of another evaluation)."""
    return config_hash({"data": exp.data, "base": base, "ae_sha256": ae_meta["sha256"], "eval": exp.eval})
