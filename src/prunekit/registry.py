"""Every algorithm prunekit picks by name, in four registries with one mechanism and a public protocol each.

- ``CRITERIA``: factories ``(seed=...) -> Criterion`` scoring every weight (built-ins: ``prunekit.criteria``);
- ``LLM_METHODS``: :class:`LLMMethod` s pruning one layer of a language model (``prunekit.methods``);
- ``STRUCTURED_IMPORTANCE``: :class:`StructuredImportance` s scoring the units of a coupled group
  (``prunekit.structured.importance``);
- ``ALLOCATIONS``: :class:`Allocation` s deciding how much to prune where (``prunekit.allocate``).

A built-in is registered by the module that defines it (``@LLM_METHODS.register("wanda")``), which the
registry imports the first time it is asked for a name: nothing is discovered by walking packages.

Your own algorithm works everywhere a built-in does (Python, recipes, the command line):

- register it under a name before use: ``prunekit.methods.register_llm_method("mine", statistic="gram")``,
  ``prunekit.structured.register_importance("mine")``, or ``REGISTRY.register("mine")(obj)``; or
- name it ``"package.module:attribute"``: the module is imported as Python imports it (the working directory
  first, as for ``python -m``) and the attribute must follow the registry's protocol. This is how the
  command line reaches your code: ``prunekit llm prune --method mypkg.pruning:my_method``.

See docs/extending.md for a worked example of each.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, runtime_checkable

from prunekit.errors import PrunekitError, unknown_name

if TYPE_CHECKING:
    from torch import Tensor

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> objects of one family, with did-you-mean errors and ``module:attribute`` references.

    ``builtins``: the module whose import registers the built-in entries (imported on first lookup).
    ``protocol``: the class every entry must be an instance of (a ``runtime_checkable`` Protocol checks
    the attributes it names); ``None`` accepts any callable.
    """

    def __init__(self, kind: str, builtins: str | None = None, protocol: type | None = None) -> None:
        self.kind = kind
        self._builtins = builtins
        self._protocol = protocol
        self._items: dict[str, T] = {}

    def _load(self) -> None:
        if self._builtins is not None:
            module, self._builtins = self._builtins, None  # first: a lookup while it imports must not recurse
            importlib.import_module(module)

    def _check(self, name: str, obj: object) -> T:
        ok = isinstance(obj, self._protocol) if self._protocol is not None else callable(obj)
        if not ok:
            want = self._protocol.__name__ if self._protocol is not None else "a callable"
            raise PrunekitError(
                f"{self.kind} '{name}': {type(obj).__name__} is not a {want} "
                f"(see prunekit.registry.{want} for what an entry needs)"
            )
        return obj  # type: ignore[return-value]

    def register(self, name: str, *, replace: bool = False) -> Callable[[T], T]:
        """Decorator adding ``obj`` under ``name``; a taken name is an error unless ``replace=True``."""
        if not isinstance(name, str) or not name or ":" in name:
            raise PrunekitError(f"{self.kind} names are non-empty strings without ':', got {name!r}")

        def add(obj: T) -> T:
            self._load()
            if name in self._items and not replace:
                raise PrunekitError(f"{self.kind} '{name}' is already registered")
            self._items[name] = self._check(name, obj)
            return obj

        return add

    def unregister(self, name: str) -> None:
        """Forget ``name`` (an unknown name is an error, with a did-you-mean)."""
        self._load()
        if name not in self._items:
            raise unknown_name(self.kind, name, self._items)
        del self._items[name]

    def get(self, name: str) -> T:
        """The entry named ``name``, or the object a ``package.module:attribute`` reference names."""
        self._load()
        if name in self._items:
            return self._items[name]
        if isinstance(name, str) and ":" in name:
            return self._check(name, resolve_reference(name, self.kind))
        raise unknown_name(self.kind, name, self._items) from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def resolve_reference(reference: str, what: str) -> Any:
    """The object ``"package.module:attribute"`` names (dotted attributes allowed), imported as Python would
    from the working directory; a one-line error naming what is missing otherwise. The working directory is
    on the import path only while the module is imported (an entry on ``sys.path`` for the rest of the
    process could shadow packages imported later)."""
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise PrunekitError(f"{what} '{reference}': write a reference as package.module:attribute")
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)  # `python -m` and the interactive interpreter look here first
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise PrunekitError(f"{what} '{reference}': cannot import {module_name}: {exc}") from None
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PrunekitError(f"{what} '{reference}': {module_name} has no attribute '{attr}'")
        obj = getattr(obj, part)
    return obj


# -- the protocols ------------------------------------------------------------------------------------------
@runtime_checkable
class LLMMethod(Protocol):
    """One-shot pruning of one linear layer of a language model, applied block by block.

    ``statistic``: what the calibration pass gathers about the layer's input ``X`` (rows: tokens):
    ``None`` (nothing: weights only), ``"sq_norm"`` (the mean of ``x_j^2`` per input feature ``j``, Wanda's
    ``||X_j||^2 / n``) or ``"gram"`` (the mean of ``x x^T``, SparseGPT's Hessian up to a factor).
    ``method(weight, statistic, spec, config)``: ``weight`` is the layer's ``(out, in)`` float32 weight,
    ``statistic`` the tensor above (``None`` when not asked for), ``spec`` the layer's pattern
    (:mod:`prunekit.spec`), ``config`` the :class:`prunekit.llm.LLMPruneConfig` (``config.options`` holds a
    user method's own settings). Returns the new weight, same shape, exactly zero where pruned.
    """

    statistic: str | None

    def __call__(self, weight: Tensor, statistic: Tensor | None, spec: Any, config: Any) -> Tensor: ...


@runtime_checkable
class StructuredImportance(Protocol):
    """Importance of the units (channels, neurons, heads) of one coupled group; higher means keep.

    ``needs``: ``"weights"``, ``"gradients"`` (called once per calibration batch with ``group.grads`` set;
    the scores are averaged over batches) or ``"activations"`` (then ``accumulator(units, owner)`` returns
    an object with ``add_batch(activations)`` and ``value()``, fed every calibration batch).
    ``importance(group)``: ``group`` is a :class:`prunekit.structured.importance.UnitGroup` (its members'
    parameters with the unit each element belongs to); returns a float tensor of shape ``(group.units,)``.
    """

    needs: str

    def __call__(self, group: Any) -> Tensor: ...


@runtime_checkable
class Allocation(Protocol):
    """How much to prune where. ``applies_to`` says what it allocates: ``"layers"`` (per-layer sparsities
    of a prune stage), ``"llm-blocks"`` (per-decoder-block sparsities) or ``"structured-groups"``
    (per-group ratios of a structured stage); ``inputs`` what it is computed from, and so how ``fn`` is
    called: ``"shapes"`` means ``fn(shapes: {layer: weight shape}, target) -> {layer: sparsity}``."""

    applies_to: str
    inputs: str
    fn: Callable[..., Any]


CRITERIA: Registry[Callable[..., Any]] = Registry("criterion", "prunekit.criteria")
LLM_METHODS: Registry[LLMMethod] = Registry("method", "prunekit.methods", LLMMethod)
STRUCTURED_IMPORTANCE: Registry[StructuredImportance] = Registry(
    "structured importance", "prunekit.structured.importance", StructuredImportance
)
ALLOCATIONS: Registry[Allocation] = Registry("allocation", "prunekit.allocate", Allocation)
