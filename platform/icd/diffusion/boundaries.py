"""Multi-boundary consistency models: which boundary a step from timestep t lands on.

The reverse (decoder) model starts segments at ``reverse_timesteps`` (e.g. 999, 779, 519,
259) and lands on the next lower one, the last on 0 (the clean sample). The forward
(encoder) model starts at ``forward_timesteps`` (e.g. 19, 259, 519, 779) and lands on the
next higher one, the last on T - 1 (999).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Boundaries:
    reverse_timesteps: tuple[int, ...]  # descending segment starts of the decoder
    forward_timesteps: tuple[int, ...]  # ascending segment starts of the encoder
    num_train_timesteps: int = 1000

    def __post_init__(self):
        rev, fwd, top = self.reverse_timesteps, self.forward_timesteps, self.num_train_timesteps - 1
        if list(rev) != sorted(rev, reverse=True) or len(set(rev)) != len(rev):
            raise ValueError(f"reverse_timesteps must be strictly decreasing, got {rev}")
        if list(fwd) != sorted(fwd) or len(set(fwd)) != len(fwd):
            raise ValueError(f"forward_timesteps must be strictly increasing, got {fwd}")
        if any(not 0 <= t <= top for t in (*rev, *fwd)):
            raise ValueError(f"timesteps must lie in [0, {top}], got {rev} / {fwd}")

    @classmethod
    def from_config(cls, method) -> "Boundaries":
        return cls(tuple(method.reverse_timesteps), tuple(method.forward_timesteps), method.num_train_timesteps)

    @property
    def reverse_targets(self) -> tuple[int, ...]:
        """Where each reverse step lands: [779, 519, 259, 0] for the default starts."""
        return (*self.reverse_timesteps[1:], 0)

    @property
    def forward_targets(self) -> tuple[int, ...]:
        """Where each forward step lands: [259, 519, 779, 999] for the default starts."""
        return (*self.forward_timesteps[1:], self.num_train_timesteps - 1)

    def reverse_boundary(self, t: torch.Tensor) -> torch.Tensor:
        """s(t) = the largest reverse boundary strictly below t (0 if none); t = 0 stays 0."""
        bounds = torch.tensor(sorted(set(self.reverse_targets)), device=t.device)
        below = bounds.unsqueeze(0) < t.reshape(-1, 1)
        idx = below.sum(dim=1) - 1
        return torch.where(idx >= 0, bounds[idx.clamp(min=0)], torch.zeros_like(t)).reshape(t.shape)

    def forward_boundary(self, t: torch.Tensor) -> torch.Tensor:
        """s(t) = the smallest forward boundary strictly above t (T - 1 if none)."""
        bounds = torch.tensor(sorted(set(self.forward_targets)), device=t.device)
        above = bounds.unsqueeze(0) > t.reshape(-1, 1)
        count = above.sum(dim=1)
        idx = len(bounds) - count
        top = torch.full_like(t, self.num_train_timesteps - 1)
        return torch.where(count > 0, bounds[idx.clamp(max=len(bounds) - 1)], top).reshape(t.shape)


def teacher_timestep(t: torch.Tensor, boundary: torch.Tensor, step: int, direction: str) -> torch.Tensor:
    """The teacher's DDIM point: t - step toward the reverse boundary, t + step toward the forward one, clamped to it."""
    if direction == "reverse":
        return torch.maximum(t - step, boundary)
    if direction == "forward":
        return torch.minimum(t + step, boundary)
    raise ValueError(f"direction must be 'forward' or 'reverse', got {direction!r}")
