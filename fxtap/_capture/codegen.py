"""What torch.fx's generated code must be able to write, and what fxtap does where it cannot.

FX writes a graph as Python source. Three things break that source, and each has its answer here:

- module outputs that are not plain tuples, lists or dicts (a namedtuple, a dataclass, a
  ``ModelOutput``): ``Made`` records, rebuilt by a node calling their class (``materialize``) or
  at run time (``realize``);
- fixed non-tensor arguments that are containers (``size=(4, 4)``): FX makes each item a
  placeholder and writes code that does not compile, so they are bound outside FX
  (``split_fixed``, ``with_fixed``);
- attribute paths that are not valid Python (a submodule named ``in``), or any other failure of
  code generation: ``check_code`` raises ``CodeError``, which ``fx.trace`` turns into a trace
  failure, so that code falls back like any other. (``tap()`` writes only the code of the graph
  it builds, and checks each traced graph's code only when that fails: ``fx.Unwritten``.)

And ``for_torchscript`` makes the code of a finished graph one that ``torch.jit.script`` reads.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import keyword
import types
import typing
from collections import OrderedDict
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from .._errors import summary
from .._values import assert_is_none, thawed

__all__ = ["CodeError", "Made", "as_argument", "check_code", "for_torchscript", "materialize", "realize", "split_fixed", "with_fixed"]


class Made(NamedTuple):
    """A module output FX cannot write as a literal in generated code (a namedtuple, a dataclass,
    a Hugging Face ``ModelOutput``): its class and its fields. ``build`` makes it a node calling
    the class; ``realize`` makes it the object. A NamedTuple itself, so ``fx.node.map_arg``
    reaches the nodes in ``fields``."""

    cls: type
    fields: dict[str, Any]


def as_argument(value: Any) -> Any:
    """A module's output as a graph argument: proxies become nodes, and containers that are not
    plain tuples, lists or dicts become ``Made`` records (``map_aggregate`` would drop a
    dataclass's values and a dict subclass's type, and FX's code names a namedtuple's class
    without importing it)."""
    if isinstance(value, fx.Proxy):
        return value.node
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return Made(type(value), {k: as_argument(v) for k, v in zip(value._fields, value)})
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        if isinstance(value, dict):  # ModelOutput: only the fields that are set
            return Made(type(value), {k: as_argument(v) for k, v in value.items()})
        return Made(type(value), {f.name: as_argument(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init})
    if type(value) in (tuple, list):
        return type(value)(as_argument(v) for v in value)
    if isinstance(value, dict):
        fields = {k: as_argument(v) for k, v in value.items()}
        return Made(OrderedDict, fields) if type(value) is OrderedDict else fields  # other subclasses: a dict
    return value


def realize(value: Any) -> Any:
    """``value`` with every ``Made`` record turned into its object (for values read at run time)."""
    if isinstance(value, Made):
        if value.cls is OrderedDict:  # keys need not be identifiers
            return OrderedDict((k, realize(v)) for k, v in value.fields.items())
        return value.cls(**{k: realize(v) for k, v in value.fields.items()})
    if isinstance(value, tuple):
        return tuple(realize(v) for v in value)
    if isinstance(value, list):  # fx.node.map_arg makes lists immutable_list
        return [realize(v) for v in value]
    if isinstance(value, dict):
        return {k: realize(v) for k, v in value.items()}
    return value


def materialize(graph: fx.Graph, value: Any) -> Any:
    """``value`` with every ``Made`` record turned into a node that calls its class."""
    if isinstance(value, Made):
        if value.cls is OrderedDict:  # keys need not be identifiers: OrderedDict([(key, value), ...])
            return graph.call_function(OrderedDict, ([(k, materialize(graph, v)) for k, v in value.fields.items()],))
        return graph.call_function(value.cls, (), {k: materialize(graph, v) for k, v in value.fields.items()})
    if isinstance(value, (tuple, list)):
        return type(value)(materialize(graph, v) for v in value)
    if isinstance(value, dict):
        return {k: materialize(graph, v) for k, v in value.items()}
    return value


def split_fixed(concrete_args: dict[str, Any] | None) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The arguments FX can specialise (``None``, numbers, strings: one value each), and those it
    cannot: FX makes each item of a fixed tuple or list a placeholder of its own and then writes
    code that does not compile (``x, size_1 = (4, 4), ... = ...``)."""
    if not concrete_args:
        return concrete_args, {}
    values = {name: thawed(value) for name, value in concrete_args.items()}
    fixed = {name: v for name, v in values.items() if pytree.tree_leaves(v) != [v]}
    return {name: v for name, v in values.items() if name not in fixed}, fixed


def with_fixed(model: nn.Module, fixed: dict[str, Any]) -> type[nn.Module]:
    """A subclass of ``model``'s class whose forward runs the original with the ``fixed``
    arguments at those values. FX reads the signature through ``__wrapped__`` (the graph keeps
    a placeholder for each, which the values of the call fill and nothing reads), and the
    wrapper shares the original's globals (FX wraps ``math`` functions found there)."""
    original = type(model).forward
    signature = inspect.signature(original)

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs)
        bound.arguments.update(fixed)
        return original(*bound.args, **bound.kwargs)

    shared = types.FunctionType(forward.__code__, original.__globals__, "forward", None, forward.__closure__)
    functools.update_wrapper(shared, original)
    return type(type(model).__name__, (type(model),), {"forward": shared, "__module__": type(model).__module__})


class CodeError(Exception):
    def __init__(self, path: str, kind: str, reason: str) -> None:
        where = f"submodule {path!r} ({kind})" if path else f"the forward of {kind} itself"
        super().__init__(f"torch.fx cannot write the code of {where}: {reason}")
        self.path, self.kind, self.reason = path, kind, reason


def _writable(target: str) -> bool:
    """Whether FX's code can name the attribute path ``target``: it writes ``self.a.b``, or
    ``getattr(self.a, "b")`` for a part that is not an identifier, but never checks keywords."""
    return all(
        not keyword.iskeyword(part) and (part.isidentifier() or (part.isprintable() and '"' not in part and "\\" not in part))
        for part in target.split(".")
    )


def check_code(graph: fx.Graph, root: nn.Module, *, write: bool = True) -> None:
    """Fail like a trace does when FX cannot write the graph's code (a submodule named ``in``:
    ``nn.ModuleDict({"in": ...})``), blaming the module whose code reads that path, so that it
    falls back like any other untraceable code. ``write=False`` checks the attribute paths only,
    not the whole generated code."""
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and not _writable(str(node.target)):
            scope = node.meta.get("fxtap_scope", "")
            bad = next(part for part in str(node.target).split(".") if not _writable(part))
            what = "a Python keyword" if keyword.iskeyword(bad) else "not writable as an attribute name"
            reason = f"SyntaxError: its code would name {str(node.target)!r}, and {bad!r} is {what}"
            raise CodeError(scope, type(root.get_submodule(scope)).__name__, reason)
    if not write:
        return
    try:
        compile(graph.python_code(root_module="self").src, "<fxtap>", "exec")
    except Exception as error:  # any other failure of FX's code generation
        raise CodeError("", type(root).__name__, summary(error)) from error


_SCALARS = (bool, int, float, str)


def for_torchscript(graph: fx.Graph) -> None:
    """Make ``graph``'s code readable by ``torch.jit.script``, as torchvision's extractor's is.

    - FX's guard on an argument fixed at ``None`` is annotated ``object``, which TorchScript
      cannot read: the graph calls fxtap's ``assert_is_none`` (the same check) instead.
    - No node keeps the annotation FX copied from the forward: under ``from __future__ import
      annotations`` it is a string that the code cannot name. An argument with a default gets
      the type of that default instead (an unannotated argument is a ``Tensor`` to TorchScript,
      so ``is_causal=False`` would not compile): ``None`` read only by its guard is ``Any``,
      any other ``None`` an ``Optional[Tensor]``.
    """
    for node in graph.nodes:
        node.type = None
        if node.op == "call_function" and node.target is torch.fx._symbolic_trace._assert_is_none:
            node.target = assert_is_none
        elif node.op == "placeholder" and node.args:
            node.type = _default_type(node, node.args[0])


def _default_type(node: fx.Node, default: Any) -> Any:
    if default is None:
        guarded = all(user.target in (assert_is_none, torch.fx._symbolic_trace._assert_is_none) for user in node.users)
        return typing.Any if guarded else typing.Optional[torch.Tensor]  # noqa: UP045 - a runtime type for FX's code and TorchScript
    return type(default) if type(default) in _SCALARS else None
