"""Adaptive Layer Selection Network (METHOD.md section 3).

    h   = ReLU(Linear(C + D -> 512)); h = Dropout(0.1)(h); h = ReLU(Linear(512 -> 256))
    w_v = Softmax(Sigmoid(Linear(256 -> 4)) / tau)     per-sample weights of P2..P5
    w_l = Softmax(Sigmoid(Linear(256 -> 4)) / tau)     per-sample weights of L1..L4

Input: [x_v; x_l] = [GAP(P5); L4] of the student. The distiller feeds it detached features: the
policy reads the student, it does not shape it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn


class ALSN(nn.Module):
    def __init__(self, vis_dim: int, txt_dim: int, hidden: Sequence[int] = (512, 256), dropout: float = 0.1,
                 tau: float = 1.0, n_levels: int = 4):
        super().__init__()
        if len(hidden) != 2:
            raise ValueError(f"model.alsn_hidden: expected two widths (METHOD.md: [512, 256]), got {list(hidden)}")
        if tau <= 0:
            raise ValueError(f"model.alsn_tau must be > 0, got {tau}")
        h1, h2 = hidden
        self.trunk = nn.Sequential(
            nn.Linear(vis_dim + txt_dim, h1), nn.ReLU(), nn.Dropout(dropout), nn.Linear(h1, h2), nn.ReLU()
        )
        self.head_v = nn.Linear(h2, n_levels)
        self.head_l = nn.Linear(h2, n_levels)
        self.tau = float(tau)

    def forward(self, x_v: Tensor, x_l: Tensor, tau: float | None = None) -> tuple[Tensor, Tensor]:
        tau = self.tau if tau is None else tau
        h = self.trunk(torch.cat([x_v, x_l], dim=-1))
        w_v = (torch.sigmoid(self.head_v(h)) / tau).softmax(dim=-1)
        w_l = (torch.sigmoid(self.head_l(h)) / tau).softmax(dim=-1)
        return w_v, w_l


def entropy(w: Tensor, eps: float = 1e-12) -> Tensor:
    """Mean per-sample entropy of weights `[B, K]` (nats)."""
    return -(w * (w.clamp_min(eps)).log()).sum(-1).mean()


__all__ = ["ALSN", "entropy"]
