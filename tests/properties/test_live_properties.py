"""Property: the model after ``tap()`` is the model that runs.

A random model (untraceable code, eager roots and the export frontend included) is tapped and
called twice, so that every graph is built (and an eagerly running root exported); then the
*user's* model is changed the way people change a model after building a feature extractor, and
the next tapped call must equal the changed model run eagerly (``strategies.case_truth``):

* a value in a config object a block reads (``self.config.gain``, ``self.config.sub.shift``):
  a trace bakes it into the graph as a constant;
* a ``Linear`` swapped for another, a weight reassigned, every float tensor loaded in place.

Profiles as in test_properties.py (``ci`` 200 examples, ``thorough`` 5,000).
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from support.budget import examples
from support.strategies import Configured, _annotate, case_truth, cases, seed_rng
from support.truth import assert_same, quiet_fallbacks
from torch import nn

import fxtap

SEED = 0


def _run(tapped: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    seed_rng(SEED)  # the truth runs from the same RNG state
    return tapped(*args, **kwargs)


def _changes(model: nn.Module) -> list[tuple[str, str]]:
    """(what, path) pairs this model offers."""
    found: list[tuple[str, str]] = [("load_in_place", "")]
    for path, module in model.named_modules():
        if isinstance(module, Configured):
            found += [("config_gain", path), ("config_shift", path)]
        if type(module) is nn.Linear and path:
            found += [("swap_linear", path), ("reassign_weight", path)]
    return found


def _change(model: nn.Module, what: str, path: str, value: float) -> None:
    if what == "load_in_place":
        model.load_state_dict({k: v + value if v.is_floating_point() else v for k, v in model.state_dict().items()})
        return
    module = model.get_submodule(path)
    if what == "config_gain":
        module.config.gain = value
    elif what == "config_shift":
        module.config.sub.shift = value
    elif what == "reassign_weight":
        module.weight = nn.Parameter(torch.full_like(module.weight, value / module.in_features))
    else:  # swap_linear: every parent that holds this Linear (a shared one is held once)
        parent_path, _, name = path.rpartition(".")
        fresh = nn.Linear(module.in_features, module.out_features)
        with torch.no_grad():
            fresh.weight.fill_(value / module.in_features)
        setattr(model.get_submodule(parent_path), name, fresh)
        _annotate(model)  # the truth's recorder reads each module's scope and call kind

@settings(max_examples=examples(50))
@given(case=cases(untraceable=True), data=st.data())
def test_property_a_change_after_tap_is_seen_on_the_next_call(case: Any, data: st.DataObject) -> None:
    model, args, kwargs = case.build()
    names = case_truth(model, args, kwargs, seed=SEED).names
    count = data.draw(st.integers(1, min(6, len(names))), label="number of names")
    chosen = data.draw(st.permutations(names), label="names")[:count]
    with quiet_fallbacks():
        tapped = fxtap.tap(model, chosen)
    _run(tapped, args, kwargs)
    _run(tapped, args, kwargs)  # the graphs are built (an eager root is exported after its first call)
    what, path = data.draw(st.sampled_from(_changes(model)), label="change")
    value = data.draw(st.sampled_from((-2.0, 0.5, 3.0)), label="value")
    _change(model, what, path, value)
    truth = case_truth(model, args, kwargs, seed=SEED)
    assume(all(name in truth.values for name in chosen))  # a branch on a value may skip a module now
    out = _run(tapped, args, kwargs)
    assert list(out) == chosen
    assert_same(out, {name: truth.values[name] for name in chosen})
