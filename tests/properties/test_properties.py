"""Property tests on random models: the FX path, the hook path and the truth agree.

The models come from ``strategies.cases`` (nested containers and custom blocks, residuals,
concatenation, views, shared modules, in-place ops, dropout, batch norm, train-only branches,
untraceable code, several and keyword inputs, tuple and dict outputs). The truth is one eager
forward: module outputs cloned in plain forward hooks, functional ops cloned by the model's own
code right after they run (``strategies.case_truth``).

Values are compared exactly (``rtol=atol=0``): every model runs on CPU in float32, and both
paths run the same kernels in the same order as the eager model. Gradients (property 5) are
compared within ``rtol=1e-5, atol=1e-5 * (1 + max |gradient|)``: where two requested names are
one tensor, autograd sums their contributions in another order on each path. Dropout in train mode draws
the same masks on every path because the global RNG is seeded with ``SEED`` before each run:
FX prunes random ops only when no later kept random op (an opaque leaf counts as one) depends on
the RNG state they leave.

Profiles (tests/conftest.py): ``ci`` (200 examples per property, the default) and
``thorough`` (5,000): ``HYPOTHESIS_PROFILE=thorough python -m pytest tests/test_properties.py``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxtap
from support.budget import examples
from support.strategies import Case, Truth, case_truth, cases, seed_rng
from support.truth import assert_same, assert_unchanged, model_fingerprint, quiet_fallbacks

SEED = 0


def _run(tapped: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    seed_rng(SEED)  # the truth ran from the same RNG state
    return tapped(*args, **kwargs)


def _tap(model: nn.Module, names: list[str], **options: Any) -> fxtap.Tapped:
    """``fxtap.tap`` with fallback warnings silenced (the tests below check paths themselves)."""
    with quiet_fallbacks():
        return fxtap.tap(model, names, **options)


def _draw_names(data: st.DataObject, names: list[str], label: str = "names") -> list[str]:
    count = data.draw(st.integers(1, min(6, len(names))), label=f"number of {label}")
    return data.draw(st.permutations(names), label=label)[:count]


def _setup(case: Case) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any], Truth, list[str]]:
    model, args, kwargs = case.build()
    truth = case_truth(model, args, kwargs, seed=SEED)
    return model, args, kwargs, truth, truth.names


def _expected(truth: Truth, names: list[str]) -> dict[str, Any]:
    return {name: truth.values[name] for name in names}


# -- 1. FX == hooks == truth ------------------------------------------------------------------------------
@given(case=cases(), data=st.data())
def test_property_fx_hooks_and_truth_agree(case: Case, data: st.DataObject) -> None:
    model, args, kwargs, truth, names = _setup(case)
    chosen = _draw_names(data, names)
    by_fx = _run(fxtap.tap(model, chosen, mode="fx"), args, kwargs)
    assert list(by_fx) == chosen
    assert_same(by_fx, _expected(truth, chosen))
    modules = [name for name in chosen if name in truth.modules]  # hooks capture module calls only
    if modules:
        by_hooks = _run(fxtap.tap(model, modules, mode="hooks"), args, kwargs)
        assert_same(by_hooks, _expected(truth, modules))


@given(case=cases(untraceable=True))
def test_property_names_list_every_truth_name_in_order(case: Case) -> None:
    model, args, _, truth, names = _setup(case)
    if case.optional_inputs:  # names() lists the graph of the default arguments: x alone
        truth = case_truth(model, args[:1], {}, seed=SEED)
        names = truth.names
    listed = fxtap.names(model, train=model.training)
    paths = {path for path, _ in model.named_modules()}
    assert {name for name in names if name in paths} <= set(listed)  # every module that ran
    if not case.root_untraceable:  # else later calls of locally traced code are known only at run time
        traced = [name for name in names if name not in truth.hook_only]
        assert [name for name in listed if name in traced] == traced  # graph order


# -- 2. mode="auto" on models with untraceable parts ------------------------------------------------------
@settings(max_examples=examples(60))
@given(case=cases(untraceable=True), data=st.data())
def test_property_auto_equals_truth_and_reports_paths(case: Case, data: st.DataObject) -> None:
    model, args, kwargs, truth, names = _setup(case)
    chosen = _draw_names(data, names)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tapped = fxtap.tap(model, chosen)
        out = _run(tapped, args, kwargs)  # paths describe the last call (a name may need its arguments)
    paths = tapped.paths
    assert list(paths) == chosen
    expected = {name: "hook" if name in truth.hook_only else "fx" for name in chosen}
    assert paths == expected
    kinds = set(paths.values())
    if kinds == {"fx"}:  # "fx" only when one graph computes every name; an eager root is "mixed"
        assert tapped.mode == ("mixed" if case.root_untraceable else "fx")
    else:
        assert tapped.mode == ("hooks" if kinds == {"hook"} else "mixed")
    assert all(w.category is fxtap.FallbackWarning for w in caught), [str(w.message) for w in caught]
    if "hook" in paths.values():
        assert caught, "a name is captured by hooks but no FallbackWarning was emitted"
    if not case.untraceable:
        assert not caught
    assert_same(out, _expected(truth, chosen))


# -- 3. pruning never changes a value -------------------------------------------------------------------
@settings(max_examples=examples(30))
@given(case=cases(untraceable=True), data=st.data())
def test_property_more_names_and_no_pruning_change_nothing(case: Case, data: st.DataObject) -> None:
    model, args, kwargs, truth, names = _setup(case)
    chosen = _draw_names(data, names)
    extra = [name for name in _draw_names(data, names, "extra") if name not in chosen]
    alone = _run(_tap(model, chosen), args, kwargs)
    assert_same(alone, _expected(truth, chosen))
    together = _run(_tap(model, extra + chosen), args, kwargs)
    assert_same({name: together[name] for name in chosen}, alone)
    everything = _run(_tap(model, names, keep_output=True), args, kwargs)  # nothing is pruned
    assert_same({name: everything[name] for name in chosen}, alone)
    assert_same(everything["output"], truth.values["output"])


# -- 4. the user's model is left as it was --------------------------------------------------------------
_RUNNING = ("running_mean", "running_var", "num_batches_tracked")


def _attributes(model: nn.Module) -> dict[str, list[str]]:
    """Each module's instance attributes (a left-over ``forward`` or proxy would show here)."""
    return {path: sorted(module.__dict__) for path, module in model.named_modules()}


@settings(max_examples=examples(40))
@given(case=cases(untraceable=True), data=st.data())
def test_property_model_is_unchanged(case: Case, data: st.DataObject) -> None:
    model, args, kwargs, truth, names = _setup(case)
    # also on a Pair whose caller tells its output apart with isinstance: the caller then runs eagerly
    paths = [path for path, _ in model.named_modules()]
    hooked = model.get_submodule(data.draw(st.sampled_from(paths), label="user hook on"))
    hooked.register_forward_hook(lambda module, inputs, output: None)
    user_hooks = dict(hooked._forward_hooks)
    running = {name: b.detach().clone() for name, b in model.named_buffers() if name.endswith(_RUNNING)}
    before, attributes = model_fingerprint(model), _attributes(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        available = set(fxtap.names(model))  # the hooked module runs eagerly: only module calls inside it
    chosen = _draw_names(data, [n for n in names if n in available] or ["body"])
    modes = ["auto", "hooks"] + ([] if case.untraceable else ["fx"])
    fxtap.names(model, train=not model.training)  # listing the other mode's names changes nothing
    assert_unchanged(before, model)
    for mode in modes:
        request = chosen if mode != "hooks" else [n for n in chosen if n in truth.modules] or ["body"]
        try:
            tapped = _tap(model, request, mode=mode)
        except fxtap.TraceFailedError as error:  # mode="fx" refuses to trace through the user's hook
            assert mode == "fx" and "user hooks" in str(error), str(error)
            assert_unchanged(before, model)
            continue
        assert_unchanged(before, model)  # building changes nothing, in any mode
        _run(tapped, args, kwargs)
        # Train-mode batch norm updates its running statistics, as the model itself does when run.
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in running:
                    buffer.copy_(running[name])
        assert_unchanged(before, model)
        assert _attributes(model) == attributes
        assert dict(hooked._forward_hooks) == user_hooks


# -- 5. gradients ----------------------------------------------------------------------------------------
def _leaves(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _leaves(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):  # a Pair's "dataclass" output
        for field in dataclasses.fields(value):
            yield from _leaves(getattr(value, field.name))


def _grads(model: nn.Module, out: dict[str, Any]) -> list[torch.Tensor | None] | None:
    generator = torch.Generator().manual_seed(1)
    terms = [(t * torch.randn(t.shape, generator=generator)).sum() for v in out.values() for t in _leaves(v)]
    loss = torch.stack(terms).sum()
    if not loss.requires_grad:
        return None
    return list(torch.autograd.grad(loss, list(model.parameters()), allow_unused=True))


@settings(max_examples=examples(50))
@given(case=cases(untraceable=True), data=st.data())
def test_property_gradients_agree_between_paths(case: Case, data: st.DataObject) -> None:
    model, args, kwargs, truth, names = _setup(case)
    modules = [name for name in names if name in truth.modules]
    chosen = _draw_names(data, modules)
    by_graph = _grads(model, _run(_tap(model, chosen), args, kwargs))  # FX where the code traces
    by_hooks = _grads(model, _run(fxtap.tap(model, chosen, mode="hooks"), args, kwargs))
    if by_graph is None or by_hooks is None:
        assert by_graph is by_hooks is None
        return
    assert [g is None for g in by_graph] == [g is None for g in by_hooks]
    for a, b in zip(by_graph, by_hooks, strict=True):
        if a is not None:
            # Not exact: where two names are one tensor (a Sequential and its last layer), FX
            # returns it twice and hooks return two clones, so autograd sums in another order;
            # the error of a float32 sum scales with the size of its terms, not of the result.
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * (1 + float(b.abs().max())))


# -- 6. a Tapped is a function of its input --------------------------------------------------------------
@settings(max_examples=examples(50))
@given(case=cases(untraceable=True), mode=st.sampled_from(["auto", "hooks"]), data=st.data())
def test_property_calling_twice_gives_the_same_dict(case: Case, mode: str, data: st.DataObject) -> None:
    model, args, kwargs, truth, names = _setup(case)
    chosen = _draw_names(data, names if mode == "auto" else [n for n in names if n in truth.modules])
    tapped = _tap(model, chosen, mode=mode)
    inputs = [t.clone() for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)]
    first = _run(tapped, args, kwargs)
    second = _run(tapped, args, kwargs)
    assert list(first) == list(second) == chosen
    assert_same(second, first)
    assert_same([t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor)], inputs)
