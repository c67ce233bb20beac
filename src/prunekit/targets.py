"""Which layers to prune: module types, name patterns, exclusions and per-layer overrides.

By default the final classifier (or a language model's output head) and embeddings stay dense: they
hold few weights and are the most fragile. ``prune_classifier=True`` or listing ``Embedding`` in
``types`` includes them. The report states what was left dense and why.

A layer the pattern cannot apply to (N:M on an input width that is not a multiple of M, blocks that do not
tile the weight: a CNN's first layer with 1 or 3 input channels) is *skipped*, with the reason logged and
reported, when it came from the default target set (types only); when the user named it (``include`` or
an override pattern matches it) it is an error that names ``exclude``, since they asked for that layer.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from prunekit.errors import PrunekitError, did_you_mean
from prunekit.masking import type_name
from prunekit.spec import Spec, parse

log = logging.getLogger(__name__)

DEFAULT_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d")


@dataclass(frozen=True)
class Targets:
    """Layer selection. Patterns are shell-style globs on module names (``"layer1.*"``)."""

    types: tuple[str, ...] = DEFAULT_TYPES
    include: tuple[str, ...] = ()  # empty: every module of a targeted type
    exclude: tuple[str, ...] = ()
    prune_classifier: bool = False

    def __post_init__(self) -> None:
        # a bare string would otherwise be iterated character by character ("fc*" -> "f", "c", "*")
        for field in ("types", "include", "exclude"):
            value = getattr(self, field)
            items = (value,) if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
                raise PrunekitError(f"targets {field} must be a list of strings, got {value!r}")
            object.__setattr__(self, field, tuple(items))


def classifier_name(model: nn.Module) -> str | None:
    """The output layer: ``get_output_embeddings()`` when the model has it, else the last nn.Linear."""
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        head = get_out()
        if head is not None:
            for name, module in model.named_modules():
                if module is head:
                    return name
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = name
    return last


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _check_types(model: nn.Module, targets: Targets) -> None:
    """A misspelt type would silently leave its layers dense: refuse it."""
    kinds = {type_name(m) for m in model.modules()}
    for kind in targets.types:
        if kind not in kinds and not isinstance(getattr(nn, kind, None), type):
            raise PrunekitError(
                f"targets type '{kind}' is neither a torch.nn module type nor in the model"
                f"{did_you_mean(kind, kinds | set(DEFAULT_TYPES))}; the model has: {', '.join(sorted(kinds))}"
            )


def _check_patterns(model: nn.Module, patterns: tuple[str, ...], field: str) -> None:
    """A glob that matches no module name (a typo) would silently prune the wrong layers: refuse it."""
    names = [name for name, _ in model.named_modules() if name]
    unused = [p for p in patterns if not _matches_any(p, names)]
    if unused:
        raise PrunekitError(
            f"targets {field} pattern(s) {unused} match no module; module names look like "
            f"{', '.join(repr(n) for n in names[:3])}"
        )


def _matches_any(pattern: str, names: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(n, pattern) for n in names)


def resolve(
    model: nn.Module,
    spec: Spec,
    targets: Targets | None = None,
    overrides: Mapping[str, Spec | str | float] | None = None,
    skipped: dict[str, str] | None = None,
) -> dict[str, Spec]:
    """Map each targeted module name to its spec (overrides win, first matching pattern first).

    Layers of the default target set that the spec cannot apply to are left out, and ``skipped`` (when
    given) gets each one's reason; a layer named by ``include`` or an override that does not fit is an
    error naming ``exclude``."""
    targets = targets or Targets()
    _check_types(model, targets)
    _check_patterns(model, targets.exclude, "exclude")
    overrides = {pattern: parse(value) for pattern, value in (overrides or {}).items()}
    head = None if targets.prune_classifier else classifier_name(model)
    chosen: dict[str, Spec] = {}
    found_skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if type_name(module) not in targets.types or name == head:
            continue
        if targets.include and not _matches(name, targets.include):
            continue
        if _matches(name, targets.exclude):
            continue
        pattern = next((p for p in overrides if fnmatch.fnmatchcase(name, p)), None)
        layer_spec = spec if pattern is None else overrides[pattern]
        try:
            layer_spec.check(tuple(module.weight.shape), name)
        except PrunekitError as exc:
            named = f"include {list(targets.include)}" if targets.include else None
            named = f"override '{pattern}'" if pattern is not None else named
            if named is not None:
                raise PrunekitError(
                    f"{exc}; the targets name it ({named}): leave it out with exclude=['{name}'] "
                    "(recipe: targets.exclude) or give it another pattern in the overrides"
                ) from None
            detail = str(exc).removeprefix(f"layer '{name}': ")
            reason = f"pattern {layer_spec} cannot apply: {detail}"
            log.warning("left dense: %s: %s", name, reason)
            found_skipped[name] = reason
            continue
        chosen[name] = layer_spec
    if skipped is not None:
        skipped.update(found_skipped)
    if not chosen and found_skipped:
        first = next(iter(found_skipped.items()))
        raise PrunekitError(
            f"the pattern fits none of the targeted layers ({len(found_skipped)} skipped; '{first[0]}': "
            f"{first[1]}); choose a pattern that tiles them, or an unstructured sparsity"
        )
    if not chosen:
        kinds = sorted({type_name(m) for m in model.modules()})
        raise PrunekitError(
            f"no layer matches the targets (types={list(targets.types)}, include={list(targets.include)}, "
            f"exclude={list(targets.exclude)}); the model has module types: {', '.join(kinds)}"
        )
    _check_patterns(model, targets.include, "include")  # after the check above: it names all of them
    unused = [p for p in overrides if not any(fnmatch.fnmatchcase(n, p) for n in chosen)]
    if unused:
        raise PrunekitError(f"override pattern(s) {unused} match no targeted layer")
    return chosen


def left_dense(
    model: nn.Module,
    chosen: Mapping[str, Spec],
    targets: Targets | None = None,
    skipped: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Weighted layers not pruned, with the reason (for reports); ``skipped``: the reasons
    :func:`resolve` gave for layers the pattern cannot apply to."""
    targets = targets or Targets()
    head = None if targets.prune_classifier else classifier_name(model)
    out = {}
    for name, module in model.named_modules():
        kind = type_name(module)
        if name in chosen or kind not in (*DEFAULT_TYPES, "Embedding", *targets.types):
            continue
        if skipped and name in skipped:
            out[name] = f"{skipped[name]} (skipped from the default targets; exclude it to say so)"
        elif name == head:
            out[name] = "final classifier (kept dense by default; prune_classifier: true includes it)"
        elif kind == "Embedding":
            out[name] = "embedding (kept dense by default)"
        elif kind in targets.types:
            out[name] = "not matched by the include/exclude patterns"
        else:
            out[name] = f"{kind} is not among the targeted types"
    return out
