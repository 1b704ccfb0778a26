"""AdamW as the official recipes build it, with a choice of kernel (the parameter groups: util/lr_decay.py)."""
import torch

from util.distributed import print0


def make_adamw(param_groups, lr: float, adamw_impl: str, device_type: str,
               betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """'auto' is torch's own choice (foreach on accelerators: the official numbers); 'fused' is one kernel per
    step where the backend has it (CUDA, MPS, CPU), equal to rounding; 'foreach' and 'loop' force the others."""
    kwargs = {}
    if adamw_impl == 'fused' and device_type not in ('cuda', 'mps', 'cpu'):
        print0(f'--adamw_impl fused: not available on {device_type}; using foreach')
        adamw_impl = 'foreach'
    if adamw_impl == 'fused':
        kwargs['fused'] = True
    elif adamw_impl == 'foreach':
        kwargs['foreach'] = True
    elif adamw_impl == 'loop':
        kwargs['foreach'] = False
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, **kwargs)
