"""Threads: tracing in one thread never changes what a call in another thread computes.

torch.fx patches ``nn.Module.__call__`` process-wide while it traces. These tests run eager calls,
tapped calls, first calls (which build lazily) and ``tap()``/``names()`` in several threads at
once, with a tiny switch interval so that threads interleave inside traces. Every result is
compared with eager values computed beforehand in one thread, so no schedule can make them pass
by luck; the models are tiny so that many interleavings are cheap.
"""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch import nn

import fxtap
from support.truth import assert_same, assert_unchanged, model_fingerprint


_ORIGINAL = (nn.Module.__call__, nn.Module.__getattr__)


class Traceable(nn.Module):
    """Traceable; its non-tensor argument makes a non-default call build a graph lazily."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        y = self.fc1(x) * scale
        return self.fc2(torch.relu(y)) + y


class EagerRoot(nn.Module):
    """Data-dependent control flow in the root: it runs eagerly, its child is traced at first call."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            x = -x
        y = self.block(x)
        return self.head(y + 1)


@contextmanager
def _fine_switching() -> Iterator[None]:
    """Switch threads every microsecond, so they interleave inside traces and builds."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def _run_threads(work: Callable[[int], None], count: int) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            work(i)
        except BaseException as error:  # reported by the caller
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    with _fine_switching():
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return errors


def _stress(rounds: int, calls: int, threads: int = 8) -> None:
    torch.manual_seed(0)
    traceable, eager_root = Traceable().eval(), EagerRoot().eval()
    before = (model_fingerprint(traceable), model_fingerprint(eager_root))
    inputs = [torch.randn(2, 4) for _ in range(threads)]
    with torch.no_grad():
        truth_t = [(traceable(x), traceable.fc1(x), traceable(x, 2.0), traceable.fc1(x) * 2.0) for x in inputs]
        truth_e = []
        for x in inputs:
            x_in = -x if x.sum() > 0 else x
            truth_e.append((eager_root(x), eager_root.block(x_in)))
    names_t = fxtap.names(traceable)
    for _ in range(rounds):
        # fresh Tapped objects: every round has concurrent first calls that build lazily
        tapped_t = fxtap.tap(traceable, ["fc1", "mul"])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fxtap.FallbackWarning)
            tapped_e = fxtap.tap(eager_root, ["block", "block.0"], keep_output=True)
        graphs: list[Any] = [None] * threads

        def work(i: int) -> None:
            x = inputs[i]
            out_t, fc1, out_t2, mul2 = truth_t[i]
            out_e, block = truth_e[i]
            graphs[i] = tapped_t.graph_module()  # concurrent first builds: one graph for all
            for j in range(calls):
                kind = (i + j) % 6
                if kind == 0:
                    assert_same(traceable(x).detach(), out_t)
                elif kind == 1:
                    assert_same(eager_root(x).detach(), out_e)
                elif kind == 2:
                    got = tapped_t(x, 2.0)  # a non-default argument: its graph is built lazily
                    assert_same(got["fc1"].detach(), fc1)
                    assert_same(got["mul"].detach(), mul2)
                elif kind == 3:
                    got = tapped_e(x)
                    assert_same(got["block"].detach(), block)
                    assert_same(got["output"].detach(), out_e)
                elif kind == 4:
                    assert_same(tapped_t(x)["fc1"].detach(), fc1)
                elif i == 0 and j % 50 == 4:  # tracing in this thread while the others call
                    assert fxtap.names(traceable) == names_t
                    assert_same(fxtap.tap(traceable, ["fc1"])(x)["fc1"].detach(), fc1)
                else:
                    assert_same(traceable(x, 2.0).detach(), out_t2)

        errors = _run_threads(work, threads)
        assert errors == [], errors[:3]
        assert all(g is graphs[0] for g in graphs)  # built once
        alone = fxtap.tap(traceable, ["fc1", "mul"]).graph_module()
        assert graphs[0].code == alone.code  # the trace recorded no other thread's calls
    assert "forward" not in eager_root.block.__dict__
    assert (nn.Module.__call__, nn.Module.__getattr__) == _ORIGINAL  # every patch undone
    assert_unchanged(before[0], traceable)
    assert_unchanged(before[1], eager_root)


def test_threads_tracing_never_affects_other_threads() -> None:
    _stress(rounds=3, calls=60)


@pytest.mark.slow
def test_threads_stress_eight_threads_200_calls_20_rounds() -> None:
    _stress(rounds=20, calls=200)


def test_threads_first_calls_of_an_eager_root_build_once() -> None:
    torch.manual_seed(0)
    model = EagerRoot().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        tapped = fxtap.tap(model, ["block.0", "block"])
    x = torch.randn(2, 4)
    errors = _run_threads(lambda i: [tapped(x) for _ in range(5)], 8)
    assert errors == []
    (runner,) = tapped._runners.values()
    (region,) = runner.placement.regions
    assert len(region._graphs) == 1


class Exportable(nn.Module):
    """FX cannot trace this root (a Python bool of a size); torch.export can."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 0:
            x = x * 2
        return self.head(self.block(x) + 1)


def test_a_first_call_exporting_is_never_seen_by_other_threads_calling_the_model() -> None:
    # torch.export swaps the parameters of what it traces for fake tensors while it runs: fxtap
    # exports a twin, so a thread calling the model itself meanwhile computes with the real ones
    torch.manual_seed(0)
    model, x = Exportable().eval(), torch.randn(2, 4)
    with torch.no_grad():
        truth = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        tapped = fxtap.tap(model, ["block", "head"])
    exporting = threading.Event()
    calls = 0

    def call_the_model(i: int) -> None:
        nonlocal calls
        if i == 0:  # the tapped call: mixed mode, then the export
            exporting.set()
            tapped(x)
            exporting.clear()
            return
        exporting.wait(timeout=60)
        while exporting.is_set():
            with torch.no_grad():
                out = model(x)
            assert type(out) is torch.Tensor, type(out)  # not a FakeTensor
            assert_same(out, truth)
            calls += 1

    assert _run_threads(call_the_model, 3) == []
    tapped(x)
    assert tapped.mode == "export", tapped.report()
    assert all(type(p) is nn.Parameter for p in model.parameters())


class _HeldExport(nn.Module):
    """Its forward, while torch.export traces it, waits until the test lets it go on."""

    def __init__(self, inside: threading.Event, release: threading.Event) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.inside, self.release = inside, release

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inside.set()
        self.release.wait(timeout=60)
        return self.fc(x)


@pytest.mark.parametrize("root", ["traceable", "eager"])
def test_a_model_changed_while_another_thread_exports_is_seen(root: str) -> None:
    # a non-strict torch.export sets torch.compiler.is_compiling() for the whole process: the
    # guards of calls in other threads still run (fxtap asks whether *this* thread is traced)
    torch.manual_seed(0)
    model = Traceable().eval() if root == "traceable" else Exportable().eval()
    x = torch.randn(2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxtap.FallbackWarning)
        tapped = fxtap.tap(model, ["fc2" if root == "traceable" else "head"], keep_output=True)
        tapped(x), tapped(x)  # graphs built (and, for the eager root, exported)
    inside, release = threading.Event(), threading.Event()
    exported: list[object] = []

    def export_elsewhere() -> None:
        try:
            exported.append(torch.export.export(_HeldExport(inside, release), (torch.randn(2, 4),), strict=False))
        except Exception as error:  # noqa: BLE001 - reported below, in the test's thread
            exported.append(error)

    other = threading.Thread(target=export_elsewhere)
    other.start()
    try:
        assert inside.wait(timeout=60)
        assert torch.compiler.is_compiling()  # the process-wide flag, set by the other thread's export
        replaced = "fc2" if root == "traceable" else "head"
        setattr(model, replaced, nn.Linear(4, 4 if root == "traceable" else 2))  # the built graph is outdated
        with torch.no_grad():
            out = tapped(x)
            truth = model(x)
        assert_same(out["output"], truth)
    finally:
        release.set()
        other.join(timeout=60)
    # fxtap did not export (the eager root's model changed) while the other thread exported:
    # torch.export's global state would have broken that export
    assert len(exported) == 1 and isinstance(exported[0], torch.export.ExportedProgram), exported
