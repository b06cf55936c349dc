"""The autograd Function behind the fused losses: the gradient is computed in forward and saved."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

Kernel = Callable[..., tuple[Tensor, "Tensor | None"]]


class LossWithSavedGradient(torch.autograd.Function):
    """``apply(kernel, student, teacher, *args)``: a loss whose kernel returns ``(loss, grad)``.

    ``kernel(student, teacher, *args)`` computes the loss and its gradient in ``student``
    together (``grad`` None when none is needed), so that only the gradient is kept for backward:
    one student-sized tensor, instead of the intermediates autograd would tape.
    """

    @staticmethod
    def forward(ctx: Any, kernel: Kernel, student: Tensor, teacher: Tensor, *args: Any) -> Tensor:  # type: ignore[override]
        # The kernel picks its own precision: autocast must not downcast its intermediates.
        with torch.no_grad(), torch.autocast(student.device.type, enabled=False):
            loss, grad = kernel(student, teacher, *args)
        ctx.others = 1 + len(args)  # teacher and args: no gradient
        ctx.has_grad = grad is not None
        ctx.dtype = student.dtype
        if grad is not None:
            ctx.save_for_backward(grad)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        none = (None,) * ctx.others
        if not ctx.has_grad:
            return None, None, *none
        (grad,) = ctx.saved_tensors
        # The saved gradient is in the kernel's precision (fp32 for half logits: twice their
        # memory) and scaled there: in fp16, a loss scaler's 65536 is inf and a gradient divided
        # by a frame's pixel count underflows; only the result is rounded to the logits' dtype.
        # The upstream grad is usually exactly 1 (kd_weight 1): fp32 logits then get the saved
        # tensor itself, no copy. Otherwise scale out of place, so a retain_graph backward sees
        # it unchanged.
        if not bool(grad_loss == 1):
            grad = grad * grad_loss.to(grad.dtype)
        return None, grad.to(ctx.dtype), *none
