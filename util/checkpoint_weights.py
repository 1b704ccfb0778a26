"""The model weights in a checkpoint written by any training code: under which key they are, and the key names
the wrappers of the saved model leave (DDP, torch.compile, FSDP, activation checkpointing, EMA copies, a
Lightning module), removed, so that the same weights load whatever wrapped them. What cannot be read this way is
refused naming the cause (weights under another trainer's keys, a ViT beside other weights, FSDP shards)."""
from typing import Dict

import torch


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message is one line for the user."""


# where checkpoints keep their weights, first match wins: the official format and ours, other trainers (timm,
# Lightning), EMA copies saved alone (DeiT-style 'model_ema', timm's 'state_dict_ema'), DeepSpeed
WEIGHT_KEYS = ('model', 'state_dict', 'model_ema', 'state_dict_ema', 'ema', 'module')
# wrappers that put the whole model under one attribute: DDP, DataParallel, timm's ModelEma, torch's AveragedModel
WRAPPER_PREFIX = 'module.'
# module names a wrapper inserts into the keys below it, wherever it wraps (the whole model or each block):
# torch.compile, FSDP (1), activation checkpointing
WRAPPER_SEGMENTS = ('_orig_mod', '_fsdp_wrapped_module', '_checkpoint_wrapped_module')
# what torch.optim.swa_utils.AveragedModel keeps beside the averaged model's weights
AVERAGED_MODEL_EXTRAS = ('n_averaged',)
VIT_MARKER = 'patch_embed.proj.weight'
SHARDED_TYPES = ('DTensor', 'ShardedTensor')
SHARDED_CAUSE = ("it holds one process's shards of the weights (FSDP's DTensor / ShardedTensor), not the full "
                 'weights; save the full state dict instead (torch.distributed.checkpoint.state_dict.'
                 'get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))')


def model_state_from(checkpoint: dict, path: str) -> Dict[str, torch.Tensor]:
    """The weights of a checkpoint: under one of WEIGHT_KEYS ('model' for the official files and ours) or the dict
    itself (a bare state dict), with what wrappers leave in the keys removed (unwrap_keys). Raises
    CheckpointError when there are no weights."""
    state = next((checkpoint[k] for k in WEIGHT_KEYS if isinstance(checkpoint.get(k), dict)), checkpoint)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f'{path}: {no_weights_cause(checkpoint)}')
    if any(type(v).__name__ in SHARDED_TYPES for v in state.values()):
        raise CheckpointError(f'{path}: {SHARDED_CAUSE}')
    return unwrap_keys(dict(state))


def no_weights_cause(checkpoint: dict) -> str:
    """Why no weights were found: none anywhere, or weights under keys this code does not read (a DINO
    checkpoint's 'student' and 'teacher'), named."""
    elsewhere = [k for k, v in checkpoint.items() if isinstance(v, dict) and v
                 and all(isinstance(t, torch.Tensor) for t in v.values())]
    if not elsewhere:
        return "no model weights found (expected a state dict under 'model')"
    return (f"no model weights under {', '.join(repr(k) for k in WEIGHT_KEYS)}; it holds weights under "
            f"{', '.join(repr(k) for k in elsewhere)} (another trainer's layout): save the ViT's state_dict() under "
            "'model'")


def unwrap_keys(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Keys as the bare model names them: the segments torch.compile ('_orig_mod'), FSDP and activation
    checkpointing insert are dropped wherever they are; a 'module.' in front of every key (DDP, an EMA copy) is
    dropped, AveragedModel's counter with it; and a prefix in front of every key of a ViT (a Lightning module's
    'model.', a wrapper's attribute) is dropped when nothing else is in the dict."""
    state = {'.'.join(part for part in k.split('.') if part not in WRAPPER_SEGMENTS): v for k, v in state.items()}
    weights = [k for k in state if k not in AVERAGED_MODEL_EXTRAS]
    while weights and all(k.startswith(WRAPPER_PREFIX) for k in weights):
        state = {k[len(WRAPPER_PREFIX):]: state[k] for k in weights}
        weights = list(state)
    prefix = vit_prefix(state)
    if prefix and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def vit_prefix(state: Dict[str, torch.Tensor]) -> str:
    """'' when the ViT's patch embedding is at the top level (or absent), else what precedes it in its key
    ('backbone.' of 'backbone.patch_embed.proj.weight'), for saying where a checkpoint's ViT is."""
    if VIT_MARKER in state:
        return ''
    found = sorted(k[:-len(VIT_MARKER)] for k in state if k.endswith('.' + VIT_MARKER))
    return found[0] if found else ''
