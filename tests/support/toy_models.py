"""Small hand-written models, each showing one thing real models do."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class InplaceZoo(nn.Module):
    """Every in-place spelling after a tapped value."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)
        self.fc3 = nn.Linear(4, 4)
        self.fc4 = nn.Linear(4, 4)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.fc1(x)
        a = self.act(a)  # nn.ReLU(inplace=True) overwrites fc1's output
        b = self.fc2(a)
        b += a  # x += y overwrites fc2's output
        c = self.fc3(b)
        c.relu_()  # method form
        d = self.fc4(c)
        d = F.relu(d, inplace=True)  # functional form
        return d * 2


class AliasUpdate(nn.Module):
    """``a = y; y += z``: eager mode shows the update through ``a``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        a = y
        y += z
        return a * 1.0


class PosAdd(nn.Module):
    """``x.add_(pos)`` whose result is unused: the mutation must survive pruning (as in mvit)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 3)
        self.pos = nn.Parameter(torch.randn(3))
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        x.add_(self.pos)
        return self.head(x)


class Shared(nn.Module):
    """One module instance called three times, and a parent whose output is its last child's."""

    def __init__(self) -> None:
        super().__init__()
        self.blk = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.ln = nn.LayerNorm(4)
        self.ln_1 = nn.LayerNorm(4)  # a real module whose name looks like a call suffix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blk(x)
        x = self.ln(x)
        x = self.blk(x)
        x = self.ln_1(x)
        x = self.ln(x)
        return self.blk(x)


class TrainBranch(nn.Module):
    """A forward that differs between train and eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.extra = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x)
        if self.training:
            x = self.extra(x)
        return x


class MultiIO(nn.Module):
    """Several positional and keyword inputs; tuple and dict valued submodules."""

    def __init__(self) -> None:
        super().__init__()
        self.split = Splitter()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor, *, scale: float = 1.0, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        a, b = self.split(x)
        out = self.fc(a + y) * scale
        if bias is not None:
            out = out + bias
        return {"out": out, "b": b}


class Splitter(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, x - 1


class DataDependent(nn.Module):
    """A submodule whose code branches on a tensor value: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.gate = Gate()
        self.post = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(self.gate(self.pre(x)))


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.a(x)
        return self.b(x)


class PosEncoding(nn.Module):
    """Returns a tensor it updated in place (torchvision mvit's PositionalEncoding does this)."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat((x, x), dim=0)
        x.add_(self.pos)
        return x


class WithPosEncoding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = PosEncoding()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.enc(x)
        x.mul_(2)  # overwrites enc's output after enc returned it
        return self.fc(x)


class ExportRoot(nn.Module):
    """``inner`` under a root FX cannot trace (a Python bool of a size) and torch.export can:
    the export frontend's test bed (tests/capture/test_export_frontend.py, the export properties)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args[0].shape[0] > 0:
            return self.inner(*args, **kwargs)
        return args[0]


class DtypeBaked(nn.Module):
    """Reads its own dtype in forward, as Hugging Face masks do (``torch.finfo(dtype).min``): a
    graph bakes the value in, so ``model.double()`` (which keeps the Parameter objects) must
    rebuild it. Takes token ids, so the inputs keep their dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return self.fc(h) + torch.finfo(self.fc.weight.dtype).eps * 1e6
