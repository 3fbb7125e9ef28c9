"""Meta-tests: the reference helpers can fail."""

import pytest
import torch
from torch import nn

from support.truth import assert_same, assert_unchanged, hook_truth, model_fingerprint


def test_assert_same_fails_on_perturbed_tensor() -> None:
    x = torch.randn(3)
    with pytest.raises(AssertionError):
        assert_same(x + 1e-6, x)


def test_assert_same_fails_on_missing_key() -> None:
    with pytest.raises(AssertionError):
        assert_same({"a": torch.ones(1)}, {"a": torch.ones(1), "b": torch.ones(1)})


def test_hook_truth_sees_value_before_inplace_relu() -> None:
    model = nn.Sequential(nn.Identity(), nn.ReLU(inplace=True))
    x = -torch.ones(2)
    truth = hook_truth(model, x.clone())
    assert truth["0"].min() < 0 and truth["1"].min() == 0


def test_assert_unchanged_detects_mode_and_hook_changes() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    before = model_fingerprint(model)
    model.train(False)
    with pytest.raises(AssertionError):
        assert_unchanged(before, model)
    model.train(True)
    handle = model[0].register_forward_hook(lambda *a: None)
    with pytest.raises(AssertionError):
        assert_unchanged(before, model)
    handle.remove()
    assert_unchanged(before, model)
