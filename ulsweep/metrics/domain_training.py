"""Training a domain extractor: a `DomainCNN` classifier on labelled uint8 images."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .domain import DomainCNN
from .features import ExtractorError, check_u8


@dataclass
class DomainTrainResult:
    model: DomainCNN
    test_accuracy: float
    train_seconds: float
    epochs: int
    history: list[dict[str, float]]


@torch.no_grad()
def classifier_accuracy(model: DomainCNN, images_u8: Tensor, labels: Tensor, batch_size: int = 1024) -> float:
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(images_u8), batch_size):
        x = model.preprocess(images_u8[i:i + batch_size].to(device))
        correct += (model.logits(x).argmax(1).cpu() == labels[i:i + batch_size]).sum().item()
    model.train(was)
    return correct / max(1, len(images_u8))


def train_domain_extractor(train_images: Tensor, train_labels: Tensor, test_images: Tensor,
                           test_labels: Tensor, *, name: str, arch: str = "cnn-s-v1", epochs: int = 5,
                           batch_size: int = 256, lr: float = 3e-3, seed: int = 0, input_size: int | None = None,
                           device: str | torch.device = "cpu", log=None) -> DomainTrainResult:
    """Train a DomainCNN classifier: AdamW, one-cycle LR, label smoothing 0.05, random shifts of up to
    input_size // 12 pixels. Returns the model in eval mode and its accuracy on the test images."""
    check_u8(train_images)
    n, c, h, w = train_images.shape
    classes = int(max(train_labels.max().item(), test_labels.max().item())) + 1
    if train_labels.min().item() < 0:
        raise ExtractorError("the domain extractor needs labelled images (labels >= 0)")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DomainCNN(name, arch, c, input_size or max(h, w), classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = (n + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.15)
    shift = model.input_size // 12  # augmentation: +-2 px at 28x28 / 32x32, none at 8x8
    t0, history = time.perf_counter(), []
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        loss_sum = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            x = model.preprocess(train_images[idx].to(device))
            dx, dy = torch.randint(-shift, shift + 1, (2,), generator=g).tolist()  # random shift (wrap-around)
            if dx or dy:
                x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model.logits(x), train_labels[idx].to(device), label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
        acc = classifier_accuracy(model, test_images, test_labels)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / n, "test_accuracy": acc,
                        "seconds": time.perf_counter() - t0})
        if log:
            log(f"epoch {epoch + 1}/{epochs}: train loss {loss_sum / n:.4f}, test accuracy {acc:.4f}, "
                f"{time.perf_counter() - t0:.1f} s")
    model.eval().requires_grad_(False)
    return DomainTrainResult(model, history[-1]["test_accuracy"], time.perf_counter() - t0, epochs, history)
