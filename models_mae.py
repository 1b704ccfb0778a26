"""Masked Autoencoder with a ViT backbone (He et al., 2021), in the official checkpoint format.

The encoder sees only the visible patches; a light decoder reconstructs the pixels of the masked ones. Keys,
initialisation, masking and loss follow the official implementation, so its released checkpoints load strictly.
"""
from functools import partial
from typing import Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import PatchEmbed

from models_vit import Block, run_blocks
from util.pos_embed import get_2d_sincos_pos_embed


class MaskedAutoencoderViT(nn.Module):
    """Masked Autoencoder with a VisionTransformer backbone. img_size: one side (square) or (height, width), each
    divisible by patch_size; in_chans: image channels (3 for RGB; the decoder predicts patch_size**2 * in_chans
    values per patch, and the loss covers every channel)."""

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 1024, depth: int = 24, num_heads: int = 16,
                 decoder_embed_dim: int = 512, decoder_depth: int = 8, decoder_num_heads: int = 16,
                 mlp_ratio: float = 4., norm_layer=nn.LayerNorm, norm_pix_loss: bool = False,
                 *, attn_impl: str = 'sdpa', decoder_mlp_ratio: Optional[float] = None):
        super().__init__()
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        self.grad_checkpointing = False

        # encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)  # fixed
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer, attn_impl=attn_impl)
            for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)  # fixed
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, decoder_mlp_ratio or mlp_ratio, qkv_bias=True,
                  norm_layer=norm_layer, attn_impl=attn_impl)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)

        self.initialize_weights()

    def initialize_weights(self):
        grid_size = tuple(self.patch_embed.grid_size)  # (rows, columns)
        for param in (self.pos_embed, self.decoder_pos_embed):
            table = get_2d_sincos_pos_embed(param.shape[-1], grid_size, cls_token=True)
            param.data.copy_(torch.from_numpy(table).float().unsqueeze(0))

        # patch embedding initialised like nn.Linear, not like a conv
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))

        # timm's trunc_normal_(std=.02) is effectively normal_(std=.02): the cut-off is at +-2, not +-2 std
        nn.init.normal_(self.cls_token, std=.02)
        nn.init.normal_(self.mask_token, std=.02)
        self.apply(_init_mae_weights)

    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: [N, C, H, W] -> [N, L, p*p*C], L = (H/p) * (W/p) patches in row-major order, each patch's values
        row by row, pixel by pixel, channels last (the official order). Raises ValueError for another channel
        count or a side not divisible by p."""
        p, c = self.patch_size, self.in_chans
        if imgs.shape[1] != c or imgs.shape[2] % p or imgs.shape[3] % p:
            raise ValueError(f'images must have {c} channels and sides divisible by {p}, got '
                             f'{tuple(imgs.shape[1:])}')
        h, w = imgs.shape[2] // p, imgs.shape[3] // p
        x = imgs.reshape(imgs.shape[0], c, h, p, w, p)
        x = torch.einsum('nchpwq->nhwpqc', x)
        return x.reshape(imgs.shape[0], h * w, p ** 2 * c)

    def unpatchify(self, x: torch.Tensor, grid_size: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """x: [N, L, p*p*C] -> [N, C, H, W]. grid_size: the (rows, columns) of the L patches; default the model's
        grid when L fits it, else a square one."""
        p, c = self.patch_size, self.in_chans
        if grid_size is None:
            own = tuple(self.patch_embed.grid_size)
            side = int(round(x.shape[1] ** .5))
            grid_size = own if own[0] * own[1] == x.shape[1] else (side, side)
        h, w = grid_size
        if h * w != x.shape[1] or x.shape[2] != p * p * c:
            raise ValueError(f'{x.shape[1]} patches of {x.shape[2]} values do not form a {h}x{w} grid of {p}x{p} '
                             f'patches with {c} channels')
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum('nhwpqc->nchpwq', x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def random_masking(self, x: torch.Tensor, mask_ratio: float,
                       noise: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample random masking by argsorting noise: the patches with the smallest noise stay visible.

        x: [N, L, D]. Returns the visible tokens [N, len_keep, D], the binary mask [N, L] (0 keep, 1 remove)
        and ids_restore [N, L], which undoes the shuffle.
        """
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(N, L, device=x.device)  # noise in [0, 1], drawn exactly as the official code does

        ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, D))

        # a patch is masked when its rank in the shuffle is past len_keep (same as the official scatter/gather)
        mask = (ids_restore >= len_keep).to(x.dtype)
        return x_masked, mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float,
                        noise: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.patch_embed(imgs)  # [N, L, D]
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)

        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # [N, 1 + len_keep, D]
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)  # [N, 1 + len_keep, Dd]

        # append mask tokens, then unshuffle back to the image's patch order
        num_masked = ids_restore.shape[1] + 1 - x.shape[1]
        mask_tokens = self.mask_token.expand(x.shape[0], num_masked, -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # no cls token
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1)  # [N, 1 + L, Dd]

        x = x + self.decoder_pos_embed
        x = run_blocks(self.decoder_blocks, x, self.grad_checkpointing)
        x = self.decoder_pred(self.decoder_norm(x))  # [N, 1 + L, p*p*C]
        return x[:, 1:, :]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error on the masked patches only.

        imgs: [N, C, H, W], pred: [N, L, p*p*C], mask: [N, L] with 1 on masked patches.
        """
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean, std = per_patch_stats(target)
            target = (target - mean) / std
        loss = ((pred - target) ** 2).mean(dim=-1)  # [N, L], mean loss per patch
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75,
                noise: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)  # [N, L, p*p*C]
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


def per_patch_stats(patches: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """patches [N, L, p*p*C] -> each patch's mean and std [N, L, 1], as the norm-pix loss normalises targets
    (std = sqrt(unbiased var + 1e-6)); reconstruction figures undo it with the same numbers."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return mean, (var + 1.e-6) ** .5


def _init_mae_weights(m: nn.Module):
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)  # following official JAX ViT
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


def _mae(embed_dim: int, depth: int, num_heads: int, patch_size: int, overrides: dict) -> MaskedAutoencoderViT:
    config = dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                  decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4,
                  norm_layer=partial(nn.LayerNorm, eps=1e-6))
    config.update(overrides)
    return MaskedAutoencoderViT(**config)


# tiny and small are not official MAE configs: they exist for CPU work, so their decoders are scaled down too
def mae_vit_tiny_patch16(**kwargs) -> MaskedAutoencoderViT:
    return _mae(192, 12, 3, 16, {**dict(decoder_embed_dim=128, decoder_depth=4, decoder_num_heads=4), **kwargs})


def mae_vit_small_patch16(**kwargs) -> MaskedAutoencoderViT:
    return _mae(384, 12, 6, 16, {**dict(decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8), **kwargs})


def mae_vit_base_patch16(**kwargs) -> MaskedAutoencoderViT:
    return _mae(768, 12, 12, 16, kwargs)


def mae_vit_large_patch16(**kwargs) -> MaskedAutoencoderViT:
    return _mae(1024, 24, 16, 16, kwargs)


def mae_vit_huge_patch14(**kwargs) -> MaskedAutoencoderViT:
    return _mae(1280, 32, 16, 14, kwargs)


# Not official MAE configs: larger encoders to train with --fsdp, with the official 512-d x 8 decoder (MLP ratio 4).
# ViT-g/14 (Zhai et al.: width 1408, depth 40, MLP 6144, 16 heads); ViT-2B/14 (Singh et al. 2023: width 2560,
# depth 24, MLP 10240, 32 heads).
def mae_vit_giant_patch14(**kwargs) -> MaskedAutoencoderViT:
    return _mae(1408, 40, 16, 14, {'mlp_ratio': 48 / 11, 'decoder_mlp_ratio': 4.0, **kwargs})  # MLP 6144


def mae_vit_2b_patch14(**kwargs) -> MaskedAutoencoderViT:
    return _mae(2560, 24, 32, 14, kwargs)


MODELS = {f.__name__: f for f in (mae_vit_tiny_patch16, mae_vit_small_patch16, mae_vit_base_patch16,
                                  mae_vit_large_patch16, mae_vit_huge_patch14, mae_vit_giant_patch14,
                                  mae_vit_2b_patch14)}


def build_mae(name: str, patch_size: Optional[int] = None, **kwargs) -> MaskedAutoencoderViT:
    """Build an MAE by factory name (patch_size None: the factory's own); unknown names raise ValueError listing
    the choices."""
    if name not in MODELS:
        raise ValueError(f'unknown model {name!r}; choose from: {", ".join(MODELS)}')
    if patch_size is not None:
        kwargs['patch_size'] = patch_size
    return MODELS[name](**kwargs)
