"""Knowledge distillation during recovery (Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
Network", 2015): the pruned student learns the dense teacher's softened outputs as well as the labels,

    loss = alpha * KL(softmax(t / T) || softmax(s / T)) * T^2 + (1 - alpha) * CE(s, y)

``T^2`` keeps the soft term's gradients at the scale of the hard one when ``T`` changes (the paper's
remark). Optionally the student also matches the teacher's intermediate outputs on named layers (mean
squared error, as in FitNets, Romero et al. 2015), added with weight ``feature_weight``.

Feature matching compares the two models' outputs of the *same-named* module, which must have the same
shape: it works for unstructured / N:M masks and for a structurally pruned student only on layers whose
output kept its shape (e.g. the block outputs a residual connection fixes, not a thinned conv inside a
block). A mismatch is an error naming the layer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from prunekit.errors import PrunekitError, did_you_mean


def soft_target_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``KL(softmax(t / T) || softmax(s / T)) * T^2``, averaged over the batch."""
    log_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_t = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    return F.kl_div(log_s, log_t, reduction="batchmean", log_target=True) * temperature**2


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    temperature: float,
) -> torch.Tensor:
    """``alpha * soft_target_loss + (1 - alpha) * cross_entropy`` (Hinton et al. 2015)."""
    _check(alpha, temperature)
    hard = F.cross_entropy(student_logits, targets)
    return alpha * soft_target_loss(student_logits, teacher_logits, temperature) + (1 - alpha) * hard


def feature_loss(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over layers of the mean squared error between the student's and the teacher's outputs."""
    total = None
    for name, s in student.items():
        t = teacher[name]
        if s.shape != t.shape:
            raise PrunekitError(
                f"distill feature '{name}': the student's output has shape {tuple(s.shape)}, the teacher's "
                f"{tuple(t.shape)}; feature matching needs layers whose output shape pruning left unchanged"
            )
        term = F.mse_loss(s, t.detach())
        total = term if total is None else total + term
    if total is None:
        raise PrunekitError("distill features: no layer output was captured in the forward pass")
    return total


def _check(alpha: float, temperature: float) -> None:
    if not 0.0 <= alpha <= 1.0:
        raise PrunekitError(f"distill alpha must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise PrunekitError(f"distill temperature must be > 0, got {temperature}")


def _modules(model: nn.Module, names: Sequence[str], which: str) -> dict[str, nn.Module]:
    known = dict(model.named_modules())
    out = {}
    for name in names:
        if name not in known:
            raise PrunekitError(
                f"distill feature '{name}': the {which} has no module of that name"
                f"{did_you_mean(name, [n for n in known if n])}"
            )
        out[name] = known[name]
    return out


@contextmanager
def capture(
    model: nn.Module, names: Sequence[str], which: str = "model"
) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of the named modules during forward passes inside the block; the hooks are
    always removed on exit."""
    outputs: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str) -> Callable:
        def record(module, inputs, output) -> None:
            if not isinstance(output, torch.Tensor):
                raise PrunekitError(
                    f"distill feature '{name}': its output is a {type(output).__name__}, not a tensor"
                )
            outputs[name] = output

        return record

    try:
        for name, module in _modules(model, names, which).items():
            handles.append(module.register_forward_hook(hook(name)))
        yield outputs
    finally:
        for handle in handles:
            handle.remove()


def _unwrap(model: nn.Module) -> nn.Module:
    """DistributedDataParallel holds the user's model as ``.module``: feature names are the user's."""

    return model.module if isinstance(model, DistributedDataParallel) else model


class Distiller:
    """A frozen teacher and the distillation settings; ``distiller(student, inputs, targets)`` is the loss.

    The teacher is put in eval mode, its parameters stop requiring gradients, and it runs under
    ``torch.no_grad()``: only the student learns. Give ``task_loss`` (e.g. a label-smoothed
    cross-entropy) to replace the plain cross-entropy of the hard term.
    """

    def __init__(
        self,
        teacher: nn.Module,
        alpha: float = 0.5,
        temperature: float = 4.0,
        features: Sequence[str] = (),
        feature_weight: float = 1.0,
    ) -> None:
        _check(alpha, temperature)
        if feature_weight < 0:
            raise PrunekitError(f"distill feature_weight must be >= 0, got {feature_weight}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.features, self.feature_weight = tuple(features), float(feature_weight)
        _modules(self.teacher, self.features, "teacher")  # a typo fails now, not at the first step

    def __call__(
        self,
        student: nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        task_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        self.teacher.eval()  # a caller's model.train() on a container holding the teacher must not leak
        first = next(self.teacher.parameters(), None)
        if first is not None and first.device != inputs.device:  # a teacher restored on the CPU, say
            self.teacher.to(inputs.device)
        with capture(_unwrap(student), self.features, "student") as s_feats:
            logits = student(inputs)
        with torch.no_grad(), capture(self.teacher, self.features, "teacher") as t_feats:
            t_logits = self.teacher(inputs)
        hard = (task_loss or F.cross_entropy)(logits, targets)
        loss = self.alpha * soft_target_loss(logits, t_logits, self.temperature) + (1 - self.alpha) * hard
        if self.features and self.feature_weight > 0:
            loss = loss + self.feature_weight * feature_loss(s_feats, t_feats)
        return loss
