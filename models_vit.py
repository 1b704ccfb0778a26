"""Vision Transformer classifier used for MAE fine-tuning and linear probing.

State-dict keys are those of the official MAE fine-tuned checkpoints. `Attention` and `Block` are shared with the
MAE encoder/decoder in models_mae.py.
"""
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_
from torch.utils.checkpoint import checkpoint

ATTENTION_IMPLS = ('sdpa', 'eager')


class Attention(nn.Module):
    """Multi-head self-attention with the official `qkv`/`proj` layout.

    `impl='sdpa'` uses torch's fused kernels (flash / memory-efficient where the device has them);
    `impl='eager'` is the official formula, softmax(q k^T * scale) v, kept as a numerical reference.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True,
                 attn_drop: float = 0., proj_drop: float = 0., impl: str = 'sdpa'):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f'embed dim {dim} is not divisible by num_heads {num_heads}')
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, N, head_dim] each
        if self.impl == 'sdpa':
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            attn = self.attn_drop(attn.softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4., qkv_bias: bool = True,
                 drop: float = 0., attn_drop: float = 0., drop_path: float = 0.,
                 norm_layer=nn.LayerNorm, attn_impl: str = 'sdpa'):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop, impl=attn_impl)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    """Apply `blocks` in order; with grad_checkpointing, recompute activations in backward to save memory."""
    for blk in blocks:
        if grad_checkpointing and x.requires_grad:
            x = checkpoint(blk, x, use_reentrant=False)
        else:
            x = blk(x)
    return x


def set_attention_impl(model: nn.Module, impl: str) -> nn.Module:
    """Switch every attention layer of `model` to 'sdpa' or 'eager' (the official formula)."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f'unknown attention implementation {impl!r}; choose from {ATTENTION_IMPLS}')
    for m in model.modules():
        if isinstance(m, Attention):
            m.impl = impl
    return model


class VisionTransformer(nn.Module):
    """ViT classifier with global average pooling (official fine-tune default) or class-token pooling.

    global_pool=True: mean of the patch tokens -> `fc_norm` -> head (no `norm.*` keys).
    global_pool=False: `norm` -> class token -> head (no `fc_norm.*` keys).
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.,
                 qkv_bias: bool = True, drop_rate: float = 0., attn_drop_rate: float = 0.,
                 drop_path_rate: float = 0., norm_layer=partial(nn.LayerNorm, eps=1e-6),
                 global_pool: bool = True, attn_impl: str = 'sdpa'):
        super().__init__()
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device='cpu')]  # stochastic depth decay
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, dpr[i], norm_layer,
                  attn_impl)
            for i in range(depth)])
        if global_pool:
            self.fc_norm = norm_layer(embed_dim)
        else:
            self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.initialize_weights()

    def initialize_weights(self):
        # timm 0.3.2's ViT init, which the official MAE classifier inherits
        trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        self.apply(_init_vit_weights)

    def no_weight_decay(self) -> set:
        return {'pos_embed', 'cls_token'}

    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)  # [N, L, D]
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
        if self.global_pool:
            return self.fc_norm(x[:, 1:, :].mean(dim=1))  # [N, D]
        return self.norm(x)[:, 0]  # [N, D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _init_vit_weights(m: nn.Module):
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.zeros_(m.bias)
        nn.init.ones_(m.weight)


def _vit(embed_dim: int, depth: int, num_heads: int, patch_size: int, overrides: dict) -> VisionTransformer:
    config = dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4,
                  qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    config.update(overrides)
    return VisionTransformer(**config)


def vit_tiny_patch16(**kwargs) -> VisionTransformer:
    return _vit(192, 12, 3, 16, kwargs)


def vit_small_patch16(**kwargs) -> VisionTransformer:
    return _vit(384, 12, 6, 16, kwargs)


def vit_base_patch16(**kwargs) -> VisionTransformer:
    return _vit(768, 12, 12, 16, kwargs)


def vit_large_patch16(**kwargs) -> VisionTransformer:
    return _vit(1024, 24, 16, 16, kwargs)


def vit_huge_patch14(**kwargs) -> VisionTransformer:
    return _vit(1280, 32, 16, 14, kwargs)


# Not official MAE configs: larger ViTs to train with --fsdp. ViT-g/14 (Zhai et al., Scaling Vision Transformers:
# width 1408, depth 40, MLP 6144, 16 heads) and ViT-2B/14 (Singh et al. 2023, MAE pre-pretraining: width 2560,
# depth 24, MLP 10240, 32 heads).
def vit_giant_patch14(**kwargs) -> VisionTransformer:
    return _vit(1408, 40, 16, 14, {'mlp_ratio': 48 / 11, **kwargs})  # 1408 x 48 / 11 = 6144


def vit_2b_patch14(**kwargs) -> VisionTransformer:
    return _vit(2560, 24, 32, 14, kwargs)


MODELS = {f.__name__: f for f in (vit_tiny_patch16, vit_small_patch16, vit_base_patch16, vit_large_patch16,
                                  vit_huge_patch14, vit_giant_patch14, vit_2b_patch14)}


def build_classifier(name: str, patch_size: Optional[int] = None, **kwargs) -> VisionTransformer:
    """Build a classifier by factory name (patch_size None: the factory's own); unknown names raise ValueError
    listing the choices."""
    if name not in MODELS:
        raise ValueError(f'unknown model {name!r}; choose from: {", ".join(MODELS)}')
    if patch_size is not None:
        kwargs['patch_size'] = patch_size
    return MODELS[name](**kwargs)


def add_batchnorm_head(model: VisionTransformer) -> VisionTransformer:
    """The linear-probing head: BatchNorm1d(affine=False, eps=1e-6) before the linear layer (keys head.0.*,
    head.1.*, as the official linear-probe checkpoints)."""
    model.head = nn.Sequential(nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
    return model


def default_patch_size(factory: Callable[..., nn.Module]) -> int:
    """The patch size a factory builds with (of models_vit or models_mae), read off a model on the meta device
    (no memory, no init time)."""
    with torch.device('meta'):
        return factory().patch_embed.patch_size[0]
