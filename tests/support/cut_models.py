"""Small models whose cuts exercise one rule each (docs/cut.md): skips, model inputs read after
the cut, shape reads, in-place writes into a cut input, guards, state writes, untraceable code."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv(i: int, o: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """Two skips (``enc1``, ``enc2``) bypass the bottleneck ``mid``."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1, self.enc2, self.mid = _conv(3, 8), _conv(8, 16), _conv(16, 16)
        self.dec2, self.dec1 = _conv(32, 8), _conv(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        m = self.mid(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([F.interpolate(m, scale_factor=2.0), e2], 1))
        return self.dec1(torch.cat([F.interpolate(d2, scale_factor=2.0), e1], 1))


class GlobalSkip(nn.Module):
    """The model's input is read again at the end: a cut takes it as an extra argument."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x))) * scale + x


class BatchRead(nn.Module):
    """Reads the batch size of the input at the start and uses it after any cut."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 6), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        h = self.b(torch.tanh(self.a(x)))
        return h.reshape(n, 2, 3).sum(1)


class WritesInput(nn.Module):
    """In-place ops after ``a`` write into its output; a guard checks it."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.dim() == 2, "x must be 2-d")  # reads only the model input: dropped by a cut after it
        h = self.a(x)
        torch._assert(h.shape[1] == 8, "8 features")  # reads the cut input: kept
        h.mul_(2.0)
        h += 1.0
        return self.b(h)


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) if x.sum() > 0 else -x  # a branch on a tensor: FX cannot trace it


class HasGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.gate, self.b = nn.Linear(8, 8), Gate(), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.gate(self.a(x)))


class TrainHead(nn.Module):
    """Dropout and batch norm after ``a``: in train mode the cut draws and updates like the model."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.drop, self.b = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.drop(self.bn(self.a(x))))
