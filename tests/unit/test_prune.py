"""``prune.plan`` on tiny hand-written graphs: liveness, aliasing, copies, RNG and guards.

Each graph is built node by node with ``torch.fx.Graph``, as torch.fx's own tests check each pass
on its own, so a failure points at the pass and not at tracing or naming.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from fxtap._capture.prune import plan


def _graph() -> tuple[fx.Graph, fx.Node]:
    graph = fx.Graph()
    return graph, graph.placeholder("x")


def test_prune_keeps_only_what_the_wanted_value_needs() -> None:
    graph, x = _graph()
    a = graph.call_function(torch.relu, (x,))
    b = graph.call_function(torch.sin, (x,))  # nothing reads it
    c = graph.call_function(torch.cos, (a,))  # after the wanted value
    decided = plan(graph, nn.Module(), [(a, a)], [])
    assert decided.kept == {x, a}
    assert b not in decided.kept and c not in decided.kept
    assert decided.copies == {}


def test_prune_copies_a_value_that_a_later_kept_inplace_op_writes() -> None:
    graph, x = _graph()
    a = graph.call_function(torch.add, (x, 1))
    view = graph.call_method("view", (a, -1))
    write = graph.call_method("add_", (view, 1))  # writes into a's storage through the view
    decided = plan(graph, nn.Module(), [(a, a)], [write])
    assert {a, view, write} <= decided.kept
    assert decided.copies == {(a, a): a}  # copied right after it ran, before the write


def test_prune_drops_an_inplace_op_nothing_reads_and_copies_nothing() -> None:
    graph, x = _graph()
    a = graph.call_function(torch.add, (x, 1))
    write = graph.call_function(operator.iadd, (a, 1))  # x += 1 after the tap, result unused
    decided = plan(graph, nn.Module(), [(a, a)], [])
    assert write not in decided.kept
    assert decided.copies == {}


def test_prune_keeps_an_inplace_write_into_a_value_read_later() -> None:
    graph, x = _graph()
    a = graph.call_function(torch.add, (x, 1))
    graph.call_method("mul_", (a, 2))  # writes a; its result node is unused
    b = graph.call_function(torch.neg, (a,))  # reads a after the write
    decided = plan(graph, nn.Module(), [(b, b)], [])
    assert [n.target for n in graph.nodes if n in decided.kept and n.op != "placeholder"] == [torch.add, "mul_", torch.neg]


def test_prune_keeps_the_value_as_it_was_at_its_moment() -> None:
    graph, x = _graph()
    a = graph.call_function(torch.add, (x, 1))
    write = graph.call_method("relu_", (a,))  # the wanted moment is after this write
    decided = plan(graph, nn.Module(), [(a, write)], [])
    assert write in decided.kept  # the value at that moment includes the write
    assert decided.copies == {}


def test_prune_keeps_random_ops_before_a_kept_random_op() -> None:
    graph, x = _graph()
    first = graph.call_function(torch.rand, (3,))  # unused, but it advances the RNG state
    second = graph.call_function(torch.rand_like, (x,))
    out = graph.call_function(torch.add, (x, second))
    decided = plan(graph, nn.Module(), [(out, out)], [])
    assert {first, second, out} <= decided.kept


def test_prune_keeps_random_ops_no_kept_random_op_follows() -> None:
    # the generator's state after the call is state too (issue 13): the next call's draws read it
    graph, x = _graph()
    a = graph.call_function(torch.relu, (x,))
    late = graph.call_function(torch.rand_like, (x,))  # after the wanted value, unread
    decided = plan(graph, nn.Module(), [(a, a)], [])
    assert late in decided.kept


def test_prune_drops_dropout_that_draws_nothing() -> None:
    graph, x = _graph()
    a = graph.call_function(torch.relu, (x,))
    off = graph.call_function(torch.nn.functional.dropout, (x, 0.5, False))  # training=False
    decided = plan(graph, nn.Module(), [(a, a)], [])
    assert off not in decided.kept


def test_prune_keeps_a_guard_of_code_that_still_runs() -> None:
    graph, x = _graph()
    a = graph.call_function(torch.relu, (x,))
    a.meta["fxtap_scope"] = "block"
    check = graph.call_function(torch._assert, (True, "shape"))
    check.meta["fxtap_scope"] = "block"
    other = graph.call_function(torch._assert, (True, "elsewhere"))
    other.meta["fxtap_scope"] = "head"
    decided = plan(graph, nn.Module(), [(a, a)], [])
    assert check in decided.kept  # its module's code runs
    assert other not in decided.kept  # nothing of 'head' runs


def test_prune_treats_an_inplace_module_as_a_write() -> None:
    root = nn.Module()
    root.act = nn.ReLU(inplace=True)
    graph, x = _graph()
    a = graph.call_function(torch.add, (x, 1))
    act = graph.call_module("act", (a,))
    decided = plan(graph, root, [(a, a)], [act])
    assert decided.copies == {(a, a): a}
