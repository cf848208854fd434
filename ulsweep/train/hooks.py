"""How a training loop talks to whoever runs it (plain CLI, tests, Ray Train): hooks in, a result or a
`TrainingDiverged` out."""
from __future__ import annotations

from dataclasses import dataclass, field


class TrainHooks:
    """Callbacks of a training loop. The default does nothing; subclass to forward to Ray / MLflow.

    All metric values are plain floats; `step` counts optimizer steps already taken.
    """

    # the claim (compile_gate.claim_ahead) of a task of this node that compiles this run's training step ahead of
    # it (ulsweep/sweep/precompile.py), or None: while it is held, a run with `train.gate_compile: eager` trains
    # uncompiled rather than compiling the step itself
    compile_claim: str | None = None

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Called every `train.log_every` steps (training curves) and after each evaluation."""

    def before_checkpoint(self, step: int) -> None:
        """Called on rank 0 before the checkpoint of `step` is written: what the hooks hold for steps up to it
        must be durable by then, since a run resumed from that checkpoint does not log those steps again."""

    def checkpoint_saved(self, step: int, path: str, metrics: dict[str, float]) -> None:
        """Called on rank 0 after a checkpoint was written atomically to `path` (local path or URI)."""

    def should_stop(self) -> bool:
        """Polled between steps; returning True ends training early after a final checkpoint."""
        return False

    def diverged(self, step: int, runs: list[bool], error: TrainingDiverged) -> bool:
        """Called on rank 0 when a loss turned non-finite by `step`: `runs` tells which of the loop's runs did
        (one, or each member of a group, ulsweep/train/group.py). True trains on without them (their values are
        no longer read); False, the default, ends training with `error`."""
        return False

    def dataset_shard(self, name: str):
        """This rank's shard of a dataset the runner streams (Ray Train's `get_dataset_shard`), or None: the
        stage then builds its stream in this process (ulsweep/data/stream.py)."""
        return None


@dataclass
class StageResult:
    """What a finished training stage hands back."""

    metrics: dict[str, float]  # final evaluation metrics (bits/pixel, PSNR, FLOPs, ...)
    checkpoint: str  # path or URI of the final checkpoint
    steps: int
    train_seconds: float  # wall time inside the training loop (excluding start-up)
    extra: dict = field(default_factory=dict)


class TrainingDiverged(RuntimeError):
    """Loss became NaN/Inf; the last good checkpoint (`checkpoint`, None if there is none) is kept,
    nothing newer is written."""

    def __init__(self, message: str, checkpoint: str | None = None):
        super().__init__(message)
        self.checkpoint = checkpoint

    def __reduce__(self):  # crosses Ray process boundaries with its checkpoint
        return (type(self), (str(self), self.checkpoint))
