"""AdamW as the official recipes build it, with a choice of kernel (the parameter groups: util/lr_decay.py), and
the words a run header uses for any optimizer."""
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


# the settings worth a word in a run's header, as torch and util/lars.py name them in an optimizer's defaults
DESCRIBED_SETTINGS = ('betas', 'momentum')  # weight decay is per parameter group


def describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    """'AdamW (betas 0.9, 0.95)': the optimizer a run built, for its header."""
    settings = []
    for name in DESCRIBED_SETTINGS:
        value = optimizer.defaults.get(name)
        if value is not None:
            shown = ', '.join(f'{v:g}' for v in value) if isinstance(value, tuple) else f'{value:g}'
            settings.append(f'{name.replace("_", " ")} {shown}')
    return type(optimizer).__name__ + (f' ({"; ".join(settings)})' if settings else '')
