"""The fxtap bugs the real-model matrix found, each minimised to a few lines (fixed; kept as regressions).

Each test states the right behaviour; each failed before its fix in fxtap and now guards it.
"""

from __future__ import annotations


import torch
import torch.fx
from torch import nn
from support.truth import hook_truth, quiet_fallbacks

import fxtap


# -- 1. timm levit_128s: a cache dict on the module keeps a Proxy after tracing ---------------------------
class Cached(nn.Module):
    """timm's levit Attention in eval: ``attention_bias_cache[str(device)] = biases`` on first use."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(4))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.bias * 2
        return x + self.cache[key]


def test_tracing_leaves_no_proxy_in_a_module_cache() -> None:
    model = Cached().eval()
    fxtap.names(model)
    assert model.cache == {}, f"the model was changed: {model.cache}"
    x = torch.randn(2, 4)
    out = fxtap.tap(model, ["add"])(x)  # today: KeyError 'mul', a node of the first trace's graph
    torch.testing.assert_close(out["add"], x + model.bias * 2, rtol=0, atol=0)


# -- 2. torchvision mvit_v2_s: a wrapped function that writes into its input, result unused, is pruned ----
def add_shortcut(x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    """torchvision.models.video.mvit._add_shortcut, which mvit calls for its side effect only."""
    x += shortcut
    return x


torch.fx.wrap("add_shortcut")


class ResidualPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.project = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        add_shortcut(y, x)  # in place; the result is not used
        return self.project(y)


def test_wrapped_inplace_call_with_unused_result_runs() -> None:
    torch.manual_seed(0)
    model = ResidualPool().eval()
    x = torch.randn(2, 4)
    out = fxtap.tap(model, ["project"])(x)
    torch.testing.assert_close(out["project"], hook_truth(model, x)["project"], rtol=0, atol=0)


# -- 3. torchvision efficientnet: a wrapped function that returns its input is not seen as an alias -----
def passthrough(x: torch.Tensor, training: bool) -> torch.Tensor:
    """torchvision.ops.stochastic_depth: the input itself in eval mode."""
    return x * 2 if training else x


torch.fx.wrap("passthrough")


class MBConvLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = passthrough(self.fc(x), self.training)  # MBConv: result = self.stochastic_depth(result)
        y += x  # result += input
        return y


def test_value_read_through_a_wrapped_alias_is_copied_before_an_inplace_add() -> None:
    torch.manual_seed(0)
    model = MBConvLike().eval()
    x = torch.randn(2, 4)
    out = fxtap.tap(model, ["fc", "add"])(x)
    torch.testing.assert_close(out["fc"], hook_truth(model, x)["fc"], rtol=0, atol=0)


# -- 4. retinanet / ssdlite heads: hooks planned inside a grandchild that the real call traces through -----
class ListHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Linear(4, 4), nn.ReLU())  # not a torch.nn leaf: FX traces through it

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.conv(x) for x in xs]  # a loop over a list: untraceable with one tensor, fine with a list


class Neck(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = ListHead()

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.head(xs)


class EagerRoot(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.neck = Neck()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.sum() > 0:  # the root runs eagerly
            x = -x
        return self.neck([x, 2 * x])


def test_hooked_names_inside_a_child_traced_with_a_list_argument() -> None:
    torch.manual_seed(0)
    model = EagerRoot().eval()
    x = torch.randn(2, 4)
    names = ["neck.head", "neck.head.conv", "neck.head.conv_1"]
    with quiet_fallbacks():
        tapped = fxtap.tap(model, names)
    out = tapped(x)  # was: MissingCallError, the hooks on neck.head.conv never fired
    truth = hook_truth(model, x)
    for name in names:
        torch.testing.assert_close(out[name], truth[name], rtol=0, atol=0)


# -- 5. torchvision's own wrapped functions: the fix of 2 and 3 skips every module named torch* ------------
class TorchvisionMBConv(nn.Module):
    """torchvision's MBConv / CNBlock in eval: ``torchvision.ops.stochastic_depth`` returns its input."""

    def __init__(self) -> None:
        super().__init__()
        from torchvision.ops import StochasticDepth

        self.fc = nn.Linear(4, 4)
        self.stochastic_depth = StochasticDepth(0.2, "row")  # calls the torch.fx.wrap'ed stochastic_depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stochastic_depth(self.fc(x))
        y += x
        return y


def test_torchvision_stochastic_depth_is_seen_as_an_alias() -> None:
    torch.manual_seed(0)
    model = TorchvisionMBConv().eval()
    x = torch.randn(2, 4)
    out = fxtap.tap(model, ["fc", "add"])(x)
    torch.testing.assert_close(out["fc"], hook_truth(model, x)["fc"], rtol=0, atol=0)
