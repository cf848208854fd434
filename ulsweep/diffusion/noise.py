"""Random draws for one run or for the K members of a stacked program (ulsweep/models/stacked.py).

A stacked program holds K runs' rows one after another on the batch dimension: member k's at [k*B, (k+1)*B).
`MemberGenerators` are the K members' own generators; `randn` and `rand` given them draw each member's B rows from
its own generator, so that every member sees the noise it would have drawn alone, in the same order. Given a
torch.Generator (or None) they are torch.randn and torch.rand.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


class MemberGenerators:
    """K members' generators as one: `get_state`/`set_state` stack their states (a checkpoint saves and a resume
    restores all of them); `randn`/`rand` split a draw's rows among them."""

    def __init__(self, gens: Sequence[torch.Generator]):
        if not gens:
            raise ValueError("member generators need at least one generator")
        self.gens, self.device = list(gens), gens[0].device

    def __len__(self) -> int:
        return len(self.gens)

    def get_state(self) -> torch.Tensor:
        return torch.stack([g.get_state() for g in self.gens])

    def set_state(self, state: torch.Tensor) -> None:
        if len(state) != len(self.gens):
            raise ValueError(f"a generator state of {len(state)} members for {len(self.gens)} members")
        for g, s in zip(self.gens, state):
            g.set_state(s.clone())


Generator = torch.Generator | MemberGenerators | None


def seeded(seeds: Sequence[int], device) -> torch.Generator | MemberGenerators:
    """A generator on `device` seeded with the one seed, or with several (a group's members: one each) their
    MemberGenerators."""
    gens = [torch.Generator(device).manual_seed(s) for s in seeds]
    return gens[0] if len(gens) == 1 else MemberGenerators(gens)


def _draw(fn, shape, generator: Generator, device, dtype) -> torch.Tensor:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not isinstance(generator, MemberGenerators):
        return fn(shape, generator=generator, device=device, dtype=dtype)
    k = len(generator)
    if not shape or shape[0] % k:
        raise ValueError(f"a draw of shape {shape} does not split into {k} members' rows")
    rows = (shape[0] // k, *shape[1:])
    return torch.cat([fn(rows, generator=g, device=g.device, dtype=dtype) for g in generator.gens])


def randn(shape, generator: Generator = None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise of `shape`; with MemberGenerators, member k's shape[0]/K rows from its generator."""
    return _draw(torch.randn, shape, generator, device, dtype)


def rand(shape, generator: Generator = None, device=None, dtype=None) -> torch.Tensor:
    """Uniform [0, 1) draws of `shape`; with MemberGenerators, member k's shape[0]/K rows from its generator."""
    return _draw(torch.rand, shape, generator, device, dtype)
