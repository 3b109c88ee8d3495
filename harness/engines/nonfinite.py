"""The non-finite guard: an optimizer step whose loss or gradient norm is not finite is skipped on every rank, counted,
and a run of too many in a row stops the job; parameters are checked finite before a checkpoint is written.

How a step is found bad without a per-step host read (the idea of PyTorch's ``GradScaler``, which skips fp16 overflow
steps with an on-device ``found_inf`` flag that the fused optimizers honour):

* A non-finite loss on any rank is *poisoned* into the gradients (:meth:`NonfiniteGuard.watch_loss`: the loss is
  multiplied by NaN where it is not finite, by exactly 1.0 otherwise), so every gradient of that rank is NaN, and the
  gradient reduction (DDP all-reduce, FSDP2 reduce-scatter + the norm's all-reduce, DeepSpeed's partitioned norm)
  makes the global gradient norm NaN on every rank. The one flag ``~isfinite(global grad norm)`` is therefore the
  same on every rank, with no extra collective in the step.
* Plain / DDP / FSDP2 engines (:meth:`NonfiniteGuard.optimizer_step`): the fused AdamW takes the flag as its
  ``found_inf`` tensor and leaves parameters, moments and step counters untouched on the device; a non-fused AdamW
  (``optim.fused=false``, which reads its step counters on the host every step anyway) reads the flag on the host and
  does not step.
* DeepSpeed ZeRO 1-3 skip a step whose global gradient norm is not finite themselves (0.19.8: ``stage_1_and_2.py``
  and ``stage3.py`` call ``is_invalid_grad_norm`` in ``step`` with fp32 master weights, which is every precision this
  harness gives them, and count it in ``skipped_steps``); ZeRO-0 with our fused AdamW gets the ``found_inf`` flag.
* fp16 with a dynamic loss scale: the poisoned gradients make the scaler skip the step (it also halves the scale and
  counts a ``skipped_optimizer_steps``); ``nonfinite_steps`` counts only steps whose *loss* was non-finite, since
  gradient overflow is the loss scale's business.

Every engine advances the LR schedule on a skipped step (the schedule is keyed on samples seen, and the samples
were consumed; torch's ``GradScaler`` with a scheduler and open_clip do the same; DeepSpeed by itself does not, so
its engine steps the schedule on a skip).

Counters live on the device and are read at log steps (:meth:`NonfiniteGuard.status`, one small all-reduce there so
every rank decides alike); a stop is therefore detected up to ``train.log_every_steps - 1`` steps late (those steps
are skipped too, so no parameter changes meanwhile) or at the next checkpoint save, whichever comes first.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

from harness.core import hooks
from harness.core.errors import NonFiniteError
from harness.distributed.collectives import all_reduce_floats


def local_parameter_tensors(module: torch.nn.Module) -> List[torch.Tensor]:
    """The parameter storage this rank holds: ZeRO-3 partitions (``ds_tensor``), FSDP2 local shards, else each
    parameter."""
    out = []
    for p in module.parameters():
        t = p.ds_tensor if hasattr(p, "ds_tensor") else (p.to_local() if hasattr(p, "to_local") else p)
        out.append(t.detach())
    return out


def parameters_finite(module: torch.nn.Module, device: torch.device) -> bool:
    """Whether every parameter element on every rank is finite (collective: one all-reduce; saves only)."""
    tensors = [t for t in local_parameter_tensors(module) if t.numel()]
    bad = float(sum(int((~torch.isfinite(t)).any()) for t in tensors))
    return all_reduce_floats([bad], "max", device)[0] == 0.0


def total_grad_norm(params, device: torch.device) -> torch.Tensor:
    """Global L2 norm of the gradients of ``params`` (a 0-dim device tensor; an FSDP2 DTensor norm is made full)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class NonfiniteGuard:
    """Finds, skips and counts optimizer steps with a non-finite loss or gradient norm (see the module docstring).

    Args:
        device: where the flags and counters live.
        max_in_a_row: ``train.max_nonfinite_steps``: this many skipped steps in a row stop the run (0: never).
        loss_scaled: fp16 with a dynamic loss scale: the scaler skips; only non-finite losses are counted here.
        rank: this process's rank (for the test hook only).
    """

    def __init__(self, device: torch.device, max_in_a_row: int, loss_scaled: bool, rank: int = 0):
        self.device, self.max_in_a_row, self.loss_scaled = device, max_in_a_row, loss_scaled
        zeros = lambda dtype: torch.zeros((), dtype=dtype, device=device)
        self.flag = zeros(torch.float32)  # 1.0: the last optimizer step was skipped as non-finite
        self.loss_bad = zeros(torch.float32)  # 1.0: some micro batch of the current step had a non-finite loss
        self.skipped, self.in_a_row = zeros(torch.int64), zeros(torch.int64)
        self.last_loss, self.last_norm = zeros(torch.float32), zeros(torch.float32)  # of the last skipped step
        self._loss = zeros(torch.float32)
        self.inject = hooks.nonfinite_loss_steps(rank)  # test hook

    def _injected(self, step: int) -> bool:
        return any(step == k or (onwards and step >= k) for k, onwards in self.inject)

    def watch_loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """The micro batch loss of optimizer step ``step`` (0-dim), to back-propagate: unchanged bit for bit when
        finite, NaN (so every gradient is NaN) when not. Records the flag on the device; no host read."""
        if self._injected(step):
            loss = loss + float("nan")  # the test hook: a non-finite loss at this step
        bad = ~torch.isfinite(loss.detach())
        torch.maximum(self.loss_bad, bad.float(), out=self.loss_bad)
        self._loss.copy_(loss.detach().float())
        return loss * torch.where(bad, float("nan"), 1.0).to(loss.dtype)

    def _record(self, grad_norm: Optional[torch.Tensor], external: Optional[bool] = None) -> None:
        """Set the step's flag and update the counters on the device; reset the loss flag for the next step."""
        if self.loss_scaled or grad_norm is None:
            self.flag.copy_(self.loss_bad)
        elif external is not None:  # DeepSpeed decided on the host already
            self.flag.fill_(float(external))
        else:
            self.flag.copy_((~torch.isfinite(grad_norm.detach().float())).float().reshape(()))
        f = self.flag.to(torch.int64)
        self.skipped.add_(f)
        self.in_a_row.mul_(f).add_(f)
        torch.where(self.flag > 0, self._loss, self.last_loss, out=self.last_loss)
        if grad_norm is not None:
            torch.where(self.flag > 0, grad_norm.detach().float().reshape(()), self.last_norm, out=self.last_norm)
        self.loss_bad.zero_()

    def optimizer_step(self, optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor, step_fn=None) -> None:
        """Step ``optimizer`` unless ``grad_norm`` (the global gradient norm, equal on every rank) is not finite.
        A fused optimizer gets the flag as ``found_inf`` (no host read); another reads it on the host (the non-fused
        AdamW reads its step counters on the host every step anyway). ``step_fn`` (default ``optimizer.step``) is a
        caller's step that calls ``optimizer.step`` among other bookkeeping (DeepSpeed ZeRO-0's ``engine.step``):
        it always runs, with the optimizer's own step made a no-op on a skip."""
        self._record(grad_norm)
        if optimizer.defaults.get("fused"):
            optimizer.found_inf = self.flag
            try:
                (step_fn or optimizer.step)()
            finally:
                del optimizer.found_inf
        elif not self.flag.item():
            (step_fn or optimizer.step)()
        elif step_fn is not None:
            optimizer.step = lambda *args, **kwargs: None
            try:
                step_fn()
            finally:
                del optimizer.step

    def count_scaled_step(self, grad_norm: Optional[torch.Tensor]) -> None:
        """fp16: the loss scale decided the step; count a non-finite loss."""
        self._record(grad_norm)

    def count_external_step(self, skipped: bool, grad_norm: Optional[torch.Tensor]) -> None:
        """DeepSpeed ZeRO 1-3 decided on the host (``skipped`` = its ``skipped_steps`` went up)."""
        self._record(grad_norm, None if self.loss_scaled else skipped)

    def status(self) -> Dict[str, int]:
        """``nonfinite_steps`` (total skipped as non-finite) and ``nonfinite_in_a_row``, the maxima over ranks
        (reads the device and all-reduces: log steps, saves and the summary only; every rank must call it)."""
        total, row = all_reduce_floats([float(self.skipped), float(self.in_a_row)], "max", self.device)
        return {"nonfinite_steps": int(total), "nonfinite_in_a_row": int(row)}

    def check(self, step: int, status: Dict[str, int]) -> None:
        """Raise when ``train.max_nonfinite_steps`` steps in a row were skipped (every rank sees the same status).

        Raises:
            NonFiniteError: naming the steps, the last skipped step's loss and gradient norm (this rank's).
        """
        row = status["nonfinite_in_a_row"]
        if not self.max_in_a_row or row < self.max_in_a_row:
            return
        here = f"this rank skipped {int(self.skipped)} in all, {int(self.in_a_row)} in a row"
        raise NonFiniteError(
            f"train.max_nonfinite_steps={self.max_in_a_row}: {row} optimizer steps in a row had a non-finite loss "
            f"or gradient norm and were skipped (steps {step - row + 1}-{step}; found at step {step}; {here}); the "
            f"last one: loss {float(self.last_loss):.6g}, gradient norm {float(self.last_norm):.6g}. The parameters "
            f"are those of step {step - row} (a skipped step leaves them unchanged). Lower optim.lr or check the data.")

    def check_now(self, step: int) -> None:
        """:meth:`check` with a fresh :meth:`status` (collective)."""
        if self.max_in_a_row:
            self.check(step, self.status())
