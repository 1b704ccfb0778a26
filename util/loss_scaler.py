"""The loss scaler: backward, gradient clipping and the optimizer step, with an fp16 GradScaler or without one
(bf16, fp32). Autocast itself is the device layer's (util/device.py, Runtime.autocast)."""
from typing import Iterable, Optional

import torch


class LossScaler:
    """The official NativeScalerWithGradNormCount, backend-neutral: `grad_scaler` comes from the device layer
    (None when no loss scaling is needed). The gradient norm is computed only when clipping needs it (`clip_grad`,
    the --clip_grad norm); it returns the norm before clipping, else None."""

    state_dict_key = 'amp_scaler'

    def __init__(self, grad_scaler=None):
        self._scaler = grad_scaler

    def __call__(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, clip_grad: Optional[float] = None,
                 parameters: Optional[Iterable[torch.nn.Parameter]] = None,
                 update_grad: bool = True) -> Optional[torch.Tensor]:
        if self._scaler is not None:
            self._scaler.scale(loss).backward()
        else:
            loss.backward()
        if not update_grad:
            return None
        norm = None
        if clip_grad is not None:
            if self._scaler is not None:
                self._scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            norm = torch.nn.utils.clip_grad_norm_(list(parameters), clip_grad)
        if self._scaler is not None:
            self._scaler.step(optimizer)
            self._scaler.update()
        else:
            optimizer.step()
        return norm

    @property
    def scales_loss(self) -> bool:
        """Whether a GradScaler scales the loss (fp16): it then skips the steps whose gradients overflow."""
        return self._scaler is not None

    def state_dict(self) -> dict:
        return self._scaler.state_dict() if self._scaler is not None else {}

    def load_state_dict(self, state_dict: dict):
        if self._scaler is not None and state_dict:
            self._scaler.load_state_dict(state_dict)
