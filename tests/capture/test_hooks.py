"""The hook path and automatic fallback on small models."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import fxtap
from support.toy_models import DataDependent, InplaceZoo, Shared
from support.truth import assert_same, assert_unchanged, hook_truth, model_fingerprint


@pytest.mark.parametrize("name", ["fc1", "fc2", "fc3", "fc4", "act"])
def test_hooks_values_survive_later_inplace_ops(name: str) -> None:
    torch.manual_seed(0)
    model = InplaceZoo()
    x = torch.randn(8, 4)
    out = fxtap.tap(model, [name], mode="hooks")(x)
    assert_same(out[name], hook_truth(model, x)[name])


def test_hooks_and_fx_agree_on_repeated_calls() -> None:
    torch.manual_seed(0)
    model = Shared()
    x = torch.randn(2, 4)
    names = ["blk", "blk_1", "blk_2", "blk.0_2", "ln", "ln_1", "ln_2"]
    by_fx = fxtap.tap(model, names, mode="fx")(x)
    by_hooks = fxtap.tap(model, names, mode="hooks")(x)
    assert_same(by_hooks, {k: v.detach() for k, v in by_fx.items()})


def test_hooks_functional_name_points_to_nearest_module() -> None:
    with pytest.raises(fxtap.TapNameError, match="nearest module whose output can be hooked is 'layer1.0'"):
        import torchvision

        fxtap.tap(torchvision.models.resnet18(), ["layer1.0.add"], mode="hooks")


def test_hooks_missing_call_is_reported() -> None:
    tapped = fxtap.tap(Shared(), ["blk_5"], mode="hooks")
    with pytest.raises(fxtap.MissingCallError, match="call 6 of 'blk', which ran 3 time"):
        tapped(torch.randn(1, 4))


def test_hooks_early_exit_skips_the_rest_of_the_model() -> None:
    ran: list[str] = []
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    model[2].register_forward_pre_hook(lambda m, a: ran.append("2"))
    out = fxtap.tap(model, ["1"], mode="hooks")(torch.randn(1, 2))
    assert list(out) == ["1"] and ran == []
    fxtap.tap(model, ["1"], mode="hooks", keep_output=True)(torch.randn(1, 2))
    assert ran == ["2"]


def test_hooks_removed_after_exception_and_mode_kept() -> None:
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.fc(x)
            raise RuntimeError("boom")

    model = Boom().eval()
    before = model_fingerprint(model)
    tapped = fxtap.tap(model, ["fc"], mode="hooks", keep_output=True)
    with pytest.raises(RuntimeError, match="boom"):
        tapped(torch.randn(1, 2))
    assert_unchanged(before, model)


def test_hooks_threads_never_mix() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    tapped = fxtap.tap(model, ["0", "2"], mode="hooks", keep_output=True)
    inputs = [torch.full((1, 4), float(i)) for i in range(8)]
    results: dict[int, dict[str, torch.Tensor]] = {}

    def work(i: int) -> None:
        for _ in range(20):
            results[i] = tapped(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, x in enumerate(inputs):
        assert_same(results[i]["0"], model[0](x).detach())
        assert_same(results[i]["2"], results[i]["output"].detach())
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_auto_falls_back_locally_for_untraceable_submodule() -> None:
    torch.manual_seed(0)
    model = DataDependent()
    x = torch.randn(3, 4)
    if model.pre(x).sum() <= 0:
        x = model.pre.weight.pinverse() @ (-(model.pre(x) - model.pre.bias)).T
        x = x.T.detach()
    assert model.pre(x).sum() > 0  # the gate takes branch a
    names = ["pre", "gate.a", "gate", "post"]
    with pytest.warns(fxtap.FallbackWarning, match=r"submodule 'gate' \(Gate\): TraceError") as record:
        tapped = fxtap.tap(model, names, keep_output=True)
    assert len(record) == 1
    assert tapped.mode == "mixed"
    assert tapped.paths == {"pre": "fx", "gate.a": "hook", "gate": "fx", "post": "fx"}
    out = tapped(x)
    truth = hook_truth(model, x)
    for name in [*names, "output"]:
        assert_same(out[name], truth[name])
    report = tapped.report()
    assert "gate.a" in report and "hook" in report and "TraceError" in report
    with pytest.raises(fxtap.MissingCallError, match="'gate.b'"), pytest.warns(fxtap.FallbackWarning):
        fxtap.tap(model, ["gate.b"])(x)  # the branch that did not run


def test_fx_mode_names_the_untraceable_submodule() -> None:
    with pytest.raises(fxtap.TraceFailedError, match=r"submodule 'gate' \(Gate\).*\n.*mode=\"auto\"") as info:
        fxtap.tap(DataDependent(), ["pre"], mode="fx")
    assert info.value.module == "gate"


def test_auto_with_untraceable_root_uses_hooks() -> None:
    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return self.fc(x)
            return -x

    model = Root()
    with pytest.warns(fxtap.FallbackWarning, match="the forward of Root itself"):
        tapped = fxtap.tap(model, ["fc"])
    assert tapped.mode == "hooks"
    x = torch.ones(1, 2)
    assert_same(tapped(x)["fc"], model.fc(x).detach())


def test_hooked_name_inside_a_leaf_keeps_the_leaf_alive() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, dropout=0.0)
    model = nn.Sequential(layer, nn.Linear(8, 2)).eval()
    x = torch.randn(1, 3, 8)
    truth = hook_truth(model, x)
    tapped = fxtap.tap(model, ["0.linear1"])
    assert tapped.paths == {"0.linear1": "hook"}
    assert_same(tapped(x)["0.linear1"], truth["0.linear1"])
    targets = [n.target for r in tapped._runners.values() for n in r.graph.graph.nodes if n.op == "call_module"]
    assert targets == ["0"]  # the leaf runs, the Linear after it is pruned


def test_hooked_name_inside_untraceable_leaf_alone() -> None:
    torch.manual_seed(0)
    model = DataDependent()
    x = torch.randn(3, 4)
    truth = hook_truth(model, x)
    branch = "gate.a" if "gate.a" in truth else "gate.b"
    with pytest.warns(fxtap.FallbackWarning):
        tapped = fxtap.tap(model, [branch])
    assert_same(tapped(x)[branch], truth[branch])


class _EagerRoot(nn.Module):
    """An untraceable root around a traceable child with a functional op."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 1e9:
            x = x * 0
        y = self.block(x)
        return y + 1


def test_local_tracing_threads_never_mix_and_model_restored() -> None:
    torch.manual_seed(0)
    model = _EagerRoot()
    before = model_fingerprint(model)
    with pytest.warns(fxtap.FallbackWarning, match="the forward of _EagerRoot itself"):
        tapped = fxtap.tap(model, ["block.0", "block"], keep_output=True)
    assert tapped.paths == {"block.0": "fx", "block": "fx"}
    inputs = [torch.full((1, 4), float(i)) for i in range(6)]
    results: dict[int, dict[str, torch.Tensor]] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(30):
                results[i] = tapped(inputs[i])
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for i, x in enumerate(inputs):
        assert_same(results[i]["block.0"], model.block[0](x).detach())
        assert_same(results[i]["block"], torch.tanh(model.block[0](x)).detach())
    assert "forward" not in model.block.__dict__
    assert_unchanged(before, model)


def test_fallback_warning_points_at_the_users_line() -> None:
    # warnings.warn's stacklevel must skip fxtap's frames (it pointed into fxtap/_tap.py)
    class Flagged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = DataDependent()

        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            x = self.inner(x)
            if scale != 1.0:  # "mul" exists only for other scales: tap() defers its check
                x = x * scale
            return x

    with pytest.warns(fxtap.FallbackWarning) as caught:
        fxtap.tap(DataDependent(), ["gate.a"])
    assert caught[0].filename == __file__
    with pytest.warns(fxtap.FallbackWarning) as caught:
        fxtap.tap(Flagged(), ["mul"])
    assert caught[0].filename == __file__
