"""Property: op names given as eager code runs (``_capture.eager_ops``) mean what FX's mean.

On random traceable models (``strategies.cases(shapes=True)``: residuals, in-place ops, views,
shared modules, tuple-valued children, and blocks that compute with sizes, unpack ``chunk`` and
write through ``x[i] = v``), every module's own ops are named twice: by the FX trace, and by
running the model eagerly with eager naming on every module. Every name both give must be the
same value (``torch.equal``), and eager naming must give no name FX does not have: a name it
cannot be sure of is left out, never shifted.
"""

from __future__ import annotations

from hypothesis import assume, given
from support.eager_names import agreement
from support.strategies import Case, cases
from support.truth import quiet_fallbacks


@given(cases(shapes=True))
def test_eager_op_names_agree_with_fx(case: Case) -> None:
    assume(not case.optional_inputs)  # FX's names are those of the default call: the same call here
    model, args, kwargs = case.build()
    with quiet_fallbacks():
        found = agreement(model, args, kwargs)
    assert found.differ == [], f"names that mean other values than FX's: {found.differ}"
    assert found.eager_only == [], f"names FX does not have: {found.eager_only}"
