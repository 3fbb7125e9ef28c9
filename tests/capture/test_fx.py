"""The FX path on small models: values, in-place safety, pruning, modes, inputs, copies, errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import fxtap
from support.toy_models import AliasUpdate, InplaceZoo, MultiIO, PosAdd, Shared, TrainBranch, WithPosEncoding
from support.truth import assert_same, assert_unchanged, hook_truth, model_fingerprint


def _graph(tapped: fxtap.Tapped) -> torch.fx.GraphModule:
    graphs = [r.graph for r in tapped._runners.values() if r.graph is not None]
    assert graphs, "no FX graph was built"
    return graphs[-1]


@pytest.mark.parametrize("name", ["fc1", "fc2", "fc3", "fc4", "act"])
def test_tap_value_survives_later_inplace_op(name: str) -> None:
    torch.manual_seed(0)
    model = InplaceZoo()
    x = torch.randn(8, 4)
    truth = hook_truth(model, x)
    out = fxtap.tap(model, [name], mode="fx")(x)
    assert_same(out[name], truth[name])
    assert truth[name].min() < 0 or name == "act"  # the later op really changes the tensor


def test_inplace_values_all_together_and_with_output() -> None:
    torch.manual_seed(0)
    model = InplaceZoo()
    x = torch.randn(8, 4)
    truth = hook_truth(model, x)
    out = fxtap.tap(model, ["fc1", "fc2", "fc3", "fc4"], mode="fx", keep_output=True)(x)
    for name in ["fc1", "fc2", "fc3", "fc4", "output"]:
        assert_same(out[name], truth[name])


def test_only_overwritten_values_are_copied() -> None:
    model = InplaceZoo()
    tapped = fxtap.tap(model, ["fc1", "fc2", "add"], mode="fx")
    copies = [n for n in _graph(tapped).graph.nodes if n.target is fxtap._values.copy_value]
    assert sorted(str(n.args[0]) for n in copies) == ["fc1", "fc2"]


def test_inplace_add_keeps_eager_alias_semantics() -> None:
    torch.manual_seed(0)
    model = AliasUpdate()
    x, z = torch.randn(2, 3), torch.randn(2, 3)
    expected = model(x, z)
    out = fxtap.tap(model, ["fc", "add"], mode="fx", keep_output=True)(x, z)
    assert_same(out["output"], expected.detach())
    torch.testing.assert_close(out["add"], expected)
    torch.testing.assert_close(out["fc"] + z, expected)


def test_pruning_keeps_inplace_update_of_live_tensor() -> None:
    torch.manual_seed(0)
    model = PosAdd()
    x = torch.randn(2, 3)
    truth = hook_truth(model, x)
    tapped = fxtap.tap(model, ["head"], mode="fx")
    assert_same(tapped(x)["head"], truth["head"])


@pytest.mark.parametrize("names", [["enc"], ["enc", "enc.cat"], ["enc", "fc"], ["enc.cat", "mul_"]])
def test_module_output_is_taken_when_the_module_returns(names: list[str]) -> None:
    torch.manual_seed(0)
    model = WithPosEncoding()
    x = torch.randn(2, 3)
    truth = hook_truth(model, x)
    out = fxtap.tap(model, names, mode="fx")(x)
    with torch.no_grad():
        cat = torch.cat((x, x))
    expected = {"enc": truth["enc"], "enc.cat": cat, "fc": truth["fc"], "mul_": truth["enc"] * 2}
    for name in names:
        assert_same(out[name], expected[name])


def test_pruning_drops_everything_after_the_last_tap() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 3))
    tapped = fxtap.tap(model, ["1"], mode="fx")
    targets = [n.target for n in _graph(tapped).graph.nodes if n.op == "call_module"]
    assert targets == ["0", "1"]


def test_repeated_calls_and_suffix_never_collides_with_module_name() -> None:
    torch.manual_seed(0)
    model = Shared()
    x = torch.randn(2, 4)
    names = ["blk", "blk_1", "blk_2", "blk.1", "blk.1_1", "ln", "ln_1", "ln_2"]
    assert set(names) <= set(fxtap.names(model))
    out = fxtap.tap(model, names, mode="fx")(x)
    with torch.no_grad():
        blk = model.blk(x)
        ln = model.ln(blk)
        blk_1 = model.blk(ln)
        ln_1 = model.ln_1(blk_1)  # the module named ln_1
        ln_2 = model.ln(ln_1)  # the second call of ln: ln_1 is taken, so ln_2
        blk_2 = model.blk(ln_2)
    expected = {"blk": blk, "blk_1": blk_1, "blk_2": blk_2, "blk.1": blk, "blk.1_1": blk_1, "ln": ln, "ln_1": ln_1, "ln_2": ln_2}
    for name in names:
        assert_same(out[name], expected[name])


def test_parent_and_last_child_both_returned() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    out = fxtap.tap(model, ["1", "1.1"], mode="fx")(torch.randn(3, 2))
    assert list(out) == ["1", "1.1"]
    assert_same(out["1"], out["1.1"].detach())


def test_train_and_eval_graphs() -> None:
    torch.manual_seed(0)
    model = TrainBranch()
    x = torch.randn(2, 3)
    tapped = fxtap.tap(model, ["fc"], keep_output=True, mode="fx")
    assert_same(tapped(x)["output"], model.fc(x).detach() if not model.training else model.extra(model.fc(x)).detach())
    tapped.eval()
    assert not model.training
    assert_same(tapped(x)["output"], model.fc(x).detach())
    tapped.train()
    assert_same(tapped(x)["output"], model.extra(model.fc(x)).detach())


def test_name_valid_in_one_mode_only() -> None:
    model = TrainBranch().eval()
    assert "extra" in fxtap.names(model, train=True) and "extra" not in fxtap.names(model)
    with pytest.raises(fxtap.TapNameError, match="no tap named 'extra' in TrainBranch"):
        fxtap.tap(model, ["extra"], mode="fx")
    tapped = fxtap.tap(model.train(), ["extra"], mode="fx")
    tapped.eval()
    with pytest.raises(fxtap.TapNameError, match=r"'extra' exist\(s\) in train mode only: call .train\(\)"):
        tapped(torch.randn(1, 3))


def test_names_leaves_mode_unchanged() -> None:
    model = TrainBranch().eval()
    fxtap.names(model, train=True)
    assert not model.training and not model.fc.training


_SEEN: list[bool] = []  # the mode of the watched model, each time _WatchesMode's forward ran
_WATCHED: list[nn.Module] = []


class _WatchesMode(nn.Module):
    """Records, while it runs, the mode of a model other code may be running meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _SEEN.append(_WATCHED[0].training)  # plain Python: runs while tracing
        h = self.fc(x)
        return h * 2 if self.training else h


def test_names_in_the_other_mode_never_shows_it_on_the_model() -> None:
    # names(train=True) traces the model in train mode; another thread running the model
    # meanwhile must still see it in eval mode (it was flipped for the span of the trace)
    model = nn.Sequential(_WatchesMode()).eval()
    _WATCHED[:] = [model]
    _SEEN.clear()
    names = fxtap.names(model, train=True)
    assert "0.mul" in names and "0.mul" not in fxtap.names(model)
    assert _SEEN and not any(_SEEN)
    assert not model.training and not model[0].training


def test_model_unchanged_and_parameters_shared() -> None:
    model = InplaceZoo().eval()
    before = model_fingerprint(model)
    tapped = fxtap.tap(model, ["fc1", "add"], mode="fx")
    tapped(torch.randn(2, 4))
    assert_unchanged(before, model)
    assert {id(p) for p in tapped.parameters()} == {id(p) for p in model.parameters()}
    assert tapped.model is model


def test_gradients_flow_unless_detached() -> None:
    torch.manual_seed(0)
    model = InplaceZoo()
    x = torch.randn(4, 4)
    out = fxtap.tap(model, ["fc2"], mode="fx")(x)
    out["fc2"].sum().backward()
    assert model.fc1.weight.grad is not None and model.fc2.weight.grad is not None
    assert model.fc4.weight.grad is None  # pruned
    detached = fxtap.tap(model, ["fc2"], mode="fx", detach=True)(x)
    assert not detached["fc2"].requires_grad


def test_multiple_inputs_keywords_and_container_values() -> None:
    torch.manual_seed(0)
    model = MultiIO()
    x, y, bias = torch.randn(2, 4), torch.randn(2, 4), torch.randn(4)
    tapped = fxtap.tap(model, ["split", "fc", "add"], keep_output=True, mode="fx")
    out = tapped(x, y, scale=3.0, bias=bias)
    assert isinstance(out["split"], tuple) and len(out["split"]) == 2
    assert_same(out["split"], (x * 2, x - 1))
    assert_same(out["add"], x * 2 + y)
    assert_same(out["output"], {"out": (model.fc(x * 2 + y) * 3.0 + bias).detach(), "b": x - 1})
    plain = tapped(x, y)  # defaults again: another specialisation of the graph
    assert_same(plain["output"]["out"], model.fc(x * 2 + y).detach())


def test_deepcopy_is_independent() -> None:
    torch.manual_seed(0)
    model = InplaceZoo()
    tapped = fxtap.tap(model, ["fc2"], mode="fx")
    x = torch.randn(2, 4)
    twin = copy.deepcopy(tapped)
    assert_same(twin(x)["fc2"], tapped(x)["fc2"].detach())
    with torch.no_grad():
        twin.model.fc1.weight.add_(1.0)
    assert not torch.equal(twin(x)["fc2"], tapped(x)["fc2"])
    assert twin.model.fc1.weight.data_ptr() != model.fc1.weight.data_ptr()


def test_save_and_load_round_trip() -> None:
    torch.manual_seed(0)
    tapped = fxtap.tap(InplaceZoo(), ["fc1", "add"], mode="fx")
    x = torch.randn(2, 4)
    buffer = io.BytesIO()
    torch.save(tapped, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert_same(loaded(x), {k: v.detach() for k, v in tapped(x).items()})


def test_compiled_model_is_unwrapped() -> None:
    model = InplaceZoo()
    compiled = torch.compile(model)
    tapped = fxtap.tap(compiled, ["fc1"], mode="fx")
    assert tapped.model is model
    x = torch.randn(2, 4)
    assert_same(tapped(x)["fc1"], hook_truth(model, x)["fc1"])


def test_user_hooks_never_see_proxies() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2)), nn.ReLU())
    seen: list[type] = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(type(o)))
    model[0][0].register_forward_hook(lambda m, i, o: seen.append(type(o)))
    with pytest.warns(fxtap.FallbackWarning, match="forward hook registered on '0'"):
        tapped = fxtap.tap(model, ["0"])
    assert seen == []  # tracing called no user hook
    tapped(torch.randn(1, 2))
    assert seen == [torch.Tensor, torch.Tensor]  # both hooks run with real tensors, as eagerly: the hooked block is opaque
    with pytest.raises(fxtap.TraceFailedError, match="forward hook registered on '0'"):
        fxtap.tap(model, ["0"], mode="fx")


def test_to_device_or_dtype_rebuilds_graph() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    tapped = fxtap.tap(model, ["0"], mode="fx")
    tapped.double()
    assert tapped(torch.randn(1, 2, dtype=torch.float64))["0"].dtype == torch.float64


def test_unknown_name_suggests_close_names() -> None:
    import torchvision

    model = torchvision.models.resnet18()
    with pytest.raises(fxtap.TapNameError) as info:
        fxtap.tap(model, ["layer2.relu"])
    message = str(info.value)
    assert message.startswith("no tap named 'layer2.relu' in ResNet.")
    assert "'layer2.0.relu', 'layer2.1.relu'" in message
    assert "fxtap.names(model)" in message
    assert isinstance(info.value, KeyError)


@pytest.mark.parametrize(
    ("names", "match"),
    [([], "empty"), (["fc1", "fc1"], "duplicate name 'fc1'"), ({"fc1": "a", "fc2": "a"}, "duplicate output key 'a'")],
)
def test_bad_requests_raise_value_error(names: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        fxtap.tap(InplaceZoo(), names)  # type: ignore[arg-type]


def test_output_key_clash_with_keep_output() -> None:
    with pytest.raises(ValueError, match="keep_output"):
        fxtap.tap(InplaceZoo(), {"fc1": "output"}, keep_output=True)


def test_rename_and_order() -> None:
    out = fxtap.tap(InplaceZoo(), {"fc3": "c", "fc1": "a"}, mode="fx")(torch.randn(1, 4))
    assert list(out) == ["c", "a"]
