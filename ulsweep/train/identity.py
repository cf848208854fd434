"""The config a run's checkpoints and `result.json` belong to: `stage1_hash` (an autoencoder's) and `stage2_hash` (a
base model's); what members of a stacked group may differ in (`MEMBER_KEYS`, `BASE_MEMBER_KEYS`) and so must
share (`shared_settings`); the latent's shape. Plain config arithmetic, without torch: a stacked member's trial
process asks whether its run has finished already, and the sweep's driver plans its groups and precompile tasks,
without importing torch (ulsweep/sweep/stacking.py: the group's actor trains them)."""
from __future__ import annotations

from ulsweep.config import BaseStageConfig, ExperimentConfig, config_hash, flatten, to_dict

# what members of an autoencoder group may differ in; everything else of their data, autoencoder and evaluation
# must agree (ulsweep/train/group.py); and a base group's members, besides (ulsweep/train/group_base.py)
MEMBER_KEYS = ("ae.loss.loss_factor", "ae.loss.sigmoid_bias", "ae.train.seed")
BASE_MEMBER_KEYS = ("base.train.seed",)


def shared_settings(exp: ExperimentConfig) -> dict:
    """What members of a group must agree on: the run's data, autoencoder and evaluation settings (flattened)
    but MEMBER_KEYS."""
    flat = flatten(to_dict({"data": exp.data, "ae": exp.ae, "eval": exp.eval}))
    return {k: v for k, v in flat.items() if k not in MEMBER_KEYS}


def latent_shape(exp: ExperimentConfig) -> tuple[int, int, int]:
    """The latent an experiment's autoencoder gives for its images (data.image_size): (channels, h, w)."""
    s, d = exp.data.image_size, exp.ae.model.downsample
    return exp.ae.model.latent_channels, s // d, s // d


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
