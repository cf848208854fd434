"""Training: one loop (loop.py) for both stages' objectives (stage1.py: autoencoder, stage2.py: base model),
fed by a batch source (ulsweep/data/sources.py).

    build.py       config -> networks and schedules
    runtime.py     device, precision, DDP slices, torch.compile
    state.py       weights, EMA, optimizer, RNG: what checkpoints hold
    accel.py       speed-ups that lean on torch internals, each with a checked fallback
    checkpoint.py  the run directory: checkpoints, images, result.json
    evaluation.py  which feature extractor; rFD / gFD
    sampling.py    reconstruction and generation
    hooks.py       how a loop reports to whoever runs it
"""
__all__ = ["train_autoencoder", "train_base"]


def __getattr__(name: str):  # lazy: importing ulsweep.train.hooks must not import torch and the models
    if name == "train_autoencoder":
        from ulsweep.train.stage1 import train_autoencoder
        return train_autoencoder
    if name == "train_base":
        from ulsweep.train.stage2 import train_base
        return train_base
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
