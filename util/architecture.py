"""What a ViT / MAE state dict shows of its model (kind, sizes, pooling), read in this one place for loading,
torch.hub, --eval's sizes, main_infer, main_knn and the Hugging Face config."""
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn

StateDict = Dict[str, torch.Tensor]

CLASSIFIER_KINDS = ('classifier', 'linear probe')
KIND_WORDS = {
    'mae': 'an MAE checkpoint (encoder and decoder)',
    'encoder': 'an MAE encoder without its decoder (like mae_pretrain_vit_*.pth)',
    'classifier': 'a classifier (it has head.weight)',
    'linear probe': 'a linear-probe classifier (BatchNorm head: head.0.*, head.1.*)',
}


@dataclass
class Architecture:
    """What a ViT / MAE state dict shows of its model (0 or None where it shows nothing)."""
    kind: str  # a key of KIND_WORDS, or '' when the weights are not a ViT
    embed_dim: int = 0
    depth: int = 0
    patch_size: int = 0
    in_chans: int = 0
    grid: int = 0  # patches per side, from the position table
    num_classes: int = 0
    global_pool: Optional[bool] = None  # classifiers: fc_norm and the patch-token mean, or norm and the class token
    fc_norm: bool = False  # the final norm of global pooling, with or without a head (a headless classifier)
    decoder_embed_dim: int = 0
    decoder_depth: int = 0
    mlp_dim: int = 0  # the hidden width of the blocks' MLP
    decoder_mlp_dim: int = 0

    @property
    def img_size(self) -> int:
        return self.grid * self.patch_size

    def size_kwargs(self) -> dict:
        """What a factory of models_vit / models_mae needs to rebuild these weights' model: patch size, image size
        and, for classifiers, the class count and pooling (the linear probe's BatchNorm head aside)."""
        kwargs = {'patch_size': self.patch_size, 'in_chans': self.in_chans}
        if self.grid:
            kwargs['img_size'] = self.img_size
        if self.kind in CLASSIFIER_KINDS:
            kwargs.update(num_classes=self.num_classes, global_pool=self.global_pool)
        return kwargs

    def describe(self) -> str:
        return f'embed dim {self.embed_dim}, {self.depth} blocks, patch {self.patch_size}'


def count_blocks(state: StateDict, prefix: str) -> int:
    """Blocks numbered under prefix ('blocks.', 'vit.encoder.layer.', ...) in a state dict."""
    return len({k[len(prefix):].split('.')[0] for k in state if k.startswith(prefix)})


def width(state: StateDict, key: str) -> int:
    tensor = state.get(key)
    return tensor.shape[0] if tensor is not None else 0


def architecture_of(state: StateDict) -> Architecture:
    """Read the architecture off a ViT classifier or MAE state dict (official key names)."""
    kernel = state.get('patch_embed.proj.weight')
    if kernel is None or kernel.ndim != 4:
        return Architecture('')
    pos_embed = state.get('pos_embed')
    grid = int(round((pos_embed.shape[1] - 1) ** 0.5)) if pos_embed is not None and pos_embed.ndim == 3 else 0
    head = state.get('head.1.weight', state.get('head.weight'))
    if any(k.startswith('decoder_') for k in state):
        kind = 'mae'
    elif 'head.1.weight' in state:
        kind = 'linear probe'
    elif head is not None:
        kind = 'classifier'
    else:
        kind = 'encoder'
    return Architecture(
        kind, embed_dim=kernel.shape[0], depth=count_blocks(state, 'blocks.'), patch_size=kernel.shape[-1],
        in_chans=kernel.shape[1], grid=grid, num_classes=head.shape[0] if head is not None else 0,
        global_pool=('fc_norm.weight' in state) if kind in CLASSIFIER_KINDS else None,
        fc_norm='fc_norm.weight' in state,
        decoder_embed_dim=width(state, 'decoder_embed.weight'), decoder_depth=count_blocks(state, 'decoder_blocks.'),
        mlp_dim=width(state, 'blocks.0.mlp.fc1.weight'),
        decoder_mlp_dim=width(state, 'decoder_blocks.0.mlp.fc1.weight'))


def attention_heads(model: nn.Module) -> Dict[str, int]:
    """{'encoder': heads of the first block[, 'decoder': heads of the first decoder block]}: what weights do not
    show."""
    heads = {'encoder': model.blocks[0].attn.num_heads}
    if hasattr(model, 'decoder_blocks') and len(model.decoder_blocks):
        heads['decoder'] = model.decoder_blocks[0].attn.num_heads
    return heads
