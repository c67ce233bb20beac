"""A causal LM whose weights stay on disk until a block needs them.

:func:`skeleton` builds the model from its config with every parameter on the ``meta`` device (no memory)
and every buffer real (rotary frequencies and the like are computed from the config, as at load time).
:class:`Materialiser` reads a module's parameters from the :class:`~prunekit.llm.checkpoint.Checkpoint`
into it, in the dtype ``from_pretrained`` would give them, and puts them back on ``meta`` when done; tied
parameters (an LM head sharing the embedding) are read once and set everywhere they appear.
:class:`StreamedBlocks` is the block source of :func:`prunekit.calib.sequential.sequential` built on it:
each block is read when the runner reaches it, handed to a writer when the runner is done with it (the
pruned shard), then freed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from prunekit.analysis.memory import return_freed_memory
from prunekit.errors import PrunekitError
from prunekit.llm.checkpoint import Checkpoint
from prunekit.llm.load import import_transformers

BlockWriter = Callable[[int, dict[str, torch.Tensor]], None]


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create every parameter registered inside the block on ``meta``; buffers stay real.

    The technique of accelerate's ``init_empty_weights(include_buffers=False)``: ``register_parameter`` is
    wrapped for the duration, so a module's ``__init__`` runs unchanged but holds no weight memory."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def skeleton(directory: str | Path, dtype: torch.dtype) -> nn.Module:
    """The causal LM of ``directory``'s config, parameters on ``meta``, built in ``dtype``."""
    transformers = import_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory), local_files_only=True)
        with parameters_on_meta():
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    except PrunekitError:
        raise
    except Exception as exc:
        raise PrunekitError(f"could not build the model of {directory} from its config: {exc}") from exc
    return model.eval()


class Materialiser:
    """Reads parameters of a :func:`skeleton` from its checkpoint, module by module, and frees them.

    Every parameter of the model must have a tensor in the checkpoint under its own name, or under the name
    without (or with) the model's ``base_model_prefix``, or share its storage with one that has (tied
    weights); persistent buffers are read when the checkpoint has them and keep their computed value
    otherwise, as in ``from_pretrained``.
    """

    def __init__(self, model: nn.Module, checkpoint: Checkpoint) -> None:
        self.model = model
        self.checkpoint = checkpoint
        available = set(checkpoint.names())
        prefix = getattr(model, "base_model_prefix", "") or ""

        def key_for(name: str) -> str | None:
            candidates = [name]
            if prefix and name.startswith(prefix + "."):
                candidates.append(name[len(prefix) + 1 :])
            elif prefix:
                candidates.append(f"{prefix}.{name}")
            return next((c for c in candidates if c in available), None)

        # parameters by identity: a tied parameter appears under several names, read from whichever has a key
        groups: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(param), []).append(name)
        self.key: dict[str, str] = {}  # model parameter/buffer name -> checkpoint key
        self.aliases: dict[str, list[str]] = {}  # the name a tensor is read under -> every name it is set to
        for names in groups.values():
            found = [(n, key_for(n)) for n in names]
            found = [(n, k) for n, k in found if k is not None]
            if not found:
                raise PrunekitError(
                    f"the checkpoint in {checkpoint.directory} has no tensor for '{names[0]}' (it may use "
                    "another naming scheme): load the model in memory instead (--in-memory)"
                )
            self.key[found[0][0]] = found[0][1]
            self.aliases[found[0][0]] = names
        persistent = dict(model.named_buffers())
        for name in list(persistent):
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner) if owner else model
            if leaf in module._non_persistent_buffers_set:
                continue
            key = key_for(name)
            if key is not None:
                self.key[name] = key
                self.aliases[name] = [name]

    def names_under(self, prefix: str) -> list[str]:
        """The names read for the module at ``prefix`` ("" for the whole model)."""
        if not prefix:
            return list(self.key)
        return [n for n in self.key if n.startswith(prefix + ".")]

    def _set_all(self, name: str, value: torch.Tensor) -> None:
        """Set ``value`` under ``name`` and its aliases: one Parameter object for all, so ties stay ties."""
        if _is_param(self.model, name):
            value = nn.Parameter(value, requires_grad=False)
        for alias in self.aliases[name]:
            owner, _, leaf = alias.rpartition(".")
            module = self.model.get_submodule(owner) if owner else self.model
            if leaf in module._parameters:
                module._parameters[leaf] = value  # type: ignore[assignment]
            else:
                module._buffers[leaf] = value

    def _current(self, name: str) -> torch.Tensor:
        return self.model.get_parameter(name) if _is_param(self.model, name) else self.model.get_buffer(name)

    def load(self, names: list[str]) -> None:
        """Read ``names`` (keys of :attr:`key`) into the model, cast to the dtype the model holds them in."""
        tensors = self.checkpoint.read(self.key[n] for n in names)
        for name in names:
            current = self._current(name)
            value = tensors.pop(self.key[name])
            if tuple(value.shape) != tuple(current.shape):
                raise PrunekitError(
                    f"checkpoint tensor '{self.key[name]}' has shape {tuple(value.shape)}, the model "
                    f"expects {tuple(current.shape)}"
                )
            self._set_all(name, value.to(current.dtype))

    def free(self, names: list[str]) -> None:
        """Put ``names``' parameters back on ``meta`` (buffers read from the checkpoint stay)."""
        for name in names:
            current = self._current(name)
            if isinstance(current, nn.Parameter):
                self._set_all(name, torch.empty(current.shape, dtype=current.dtype, device="meta"))

    def state(self, names: list[str]) -> dict[str, torch.Tensor]:
        """``names``' current values under their checkpoint keys, in the checkpoint's dtypes."""
        return {
            self.key[n]: self._current(n).detach().to(self.checkpoint.dtype_of(self.key[n])) for n in names
        }


def _is_param(model: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    return leaf in module._parameters


class StreamedBlocks:
    """Block source for the runner: block ``i`` read on :meth:`load`, written and freed on :meth:`release`.

    ``blocks_path`` is the dotted path of the decoder blocks; everything else (embeddings, final norm, LM
    head) is read only inside :meth:`outside`. ``writer(index, tensors)`` receives each released block's
    tensors under their checkpoint keys, plus any checkpoint tensor under the block's prefix that the model
    does not hold (copied as is), so the shards it writes hold the whole checkpoint."""

    def __init__(
        self,
        model: nn.Module,
        checkpoint: Checkpoint,
        blocks_path: str,
        count: int,
        writer: BlockWriter | None = None,
    ) -> None:
        self.materialiser = Materialiser(model, checkpoint)
        self.checkpoint = checkpoint
        self.blocks_path = blocks_path
        self.count = count
        self.writer = writer
        self.block_names = [self.materialiser.names_under(f"{blocks_path}.{i}") for i in range(count)]
        inside = {n for names in self.block_names for n in names}
        self.outside_names = [n for n in self.materialiser.key if n not in inside]
        for index, names in enumerate(self.block_names):
            for name in names:  # a parameter shared with another block or the embeddings cannot stream
                if any(not a.startswith(f"{blocks_path}.{index}.") for a in self.materialiser.aliases[name]):
                    raise PrunekitError(
                        f"'{name}' is shared outside its block; load the model in memory (--in-memory)"
                    )
        # checkpoint keys of each block: those read into it, plus extras under its key prefix
        mapped = {self.materialiser.key[n] for n in self.materialiser.key}
        self.extra: list[list[str]] = [[] for _ in range(count)]
        for index, names in enumerate(self.block_names):
            if not names:
                continue
            name = names[0]
            suffix = name[len(f"{blocks_path}.{index}") :]
            key_prefix = self.materialiser.key[name][: -len(suffix)] + "."
            self.extra[index] = [
                k for k in checkpoint.names() if k.startswith(key_prefix) and k not in mapped
            ]
        claimed = {k for extra in self.extra for k in extra} | {
            self.materialiser.key[n] for names in self.block_names for n in names
        }
        self.outside_keys = [k for k in checkpoint.names() if k not in claimed]

    @contextlib.contextmanager
    def outside(self) -> Iterator[None]:
        self.materialiser.load(self.outside_names)
        try:
            yield
        finally:
            self.materialiser.free(self.outside_names)

    def load(self, index: int) -> nn.Module:
        self.materialiser.load(self.block_names[index])
        return self.materialiser.model.get_submodule(f"{self.blocks_path}.{index}")

    def release(self, index: int, block: nn.Module) -> None:
        try:
            if self.writer is not None:
                tensors = self.materialiser.state(self.block_names[index])
                tensors.update(self.checkpoint.read(self.extra[index]))
                self.writer(index, tensors)
        finally:
            self.materialiser.free(self.block_names[index])
            return_freed_memory()  # else the heap keeps every block's freed weights (see there)

    def outside_tensors(self) -> dict[str, torch.Tensor]:
        """Every checkpoint tensor that belongs to no block, as stored (embeddings, final norm, LM head)."""
        return self.checkpoint.read(self.outside_keys)
