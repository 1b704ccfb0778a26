"""2-D sin-cos position embeddings (fixed, MAE encoder and decoder) and their resizing for new resolutions.

The table must stay bit-exact with the official one: released checkpoints store it, and a changed table would
shift every token. Hence the float32 grid, float64 frequencies and the official (w, h) order of the halves.
"""
import numpy as np
import torch
import torch.nn.functional as F

from util.distributed import print0


def get_1d_sincos_pos_embed_from_grid(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    """pos: positions of any shape (M values) -> [M, embed_dim]: sin of each frequency, then cos."""
    if embed_dim % 2:
        raise ValueError(f'sin-cos embedding needs an even dimension, got {embed_dim}')
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.
    omega = 1. / 10000 ** omega  # [D/2]
    angles = np.einsum('m,d->md', pos.reshape(-1), omega)  # [M, D/2], outer product
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def get_2d_sincos_pos_embed_from_grid(embed_dim: int, grid: np.ndarray) -> np.ndarray:
    """grid: [2, 1, H, W] -> [H*W, embed_dim]; the first half encodes grid[0], the second grid[1]."""
    if embed_dim % 2:
        raise ValueError(f'sin-cos embedding needs an even dimension, got {embed_dim}')
    emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """[grid_size*grid_size (+1), embed_dim] float64 table; with cls_token a zero row comes first."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # w goes first, as in the official table
    grid = grid.reshape([2, 1, grid_size, grid_size])
    pos_embed = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


def resize_pos_embed(pos_embed: torch.Tensor, num_extra_tokens: int, new_size: int) -> torch.Tensor:
    """[1, extra + S*S, D] -> [1, extra + new_size^2, D]: bicubic on the patch grid, extra tokens kept."""
    extra_tokens = pos_embed[:, :num_extra_tokens]
    pos_tokens = pos_embed[:, num_extra_tokens:]
    orig_size = int(pos_tokens.shape[1] ** 0.5)
    dim = pos_embed.shape[-1]
    pos_tokens = pos_tokens.reshape(-1, orig_size, orig_size, dim).permute(0, 3, 1, 2)
    pos_tokens = F.interpolate(pos_tokens, size=(new_size, new_size), mode='bicubic', align_corners=False)
    pos_tokens = pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra_tokens, pos_tokens), dim=1)


def interpolate_pos_embed(model: torch.nn.Module, checkpoint_model: dict, key: str = 'pos_embed') -> bool:
    """Resize checkpoint_model[key] in place to `model`'s patch grid (e.g. 14x14 -> 24x24 for 384 px); `key` is
    'pos_embed', or 'decoder_pos_embed' for an MAE's decoder table.

    The class token's row is kept as is. Returns True when the table was resized.
    """
    if key not in checkpoint_model:
        return False
    pos_embed_checkpoint = checkpoint_model[key]
    num_patches = model.patch_embed.num_patches
    num_extra_tokens = getattr(model, key).shape[-2] - num_patches
    orig_size = int((pos_embed_checkpoint.shape[-2] - num_extra_tokens) ** 0.5)
    new_size = int(num_patches ** 0.5)
    if orig_size == new_size:
        return False
    print0(f'Position interpolate from {orig_size}x{orig_size} to {new_size}x{new_size}')
    checkpoint_model[key] = resize_pos_embed(pos_embed_checkpoint, num_extra_tokens, new_size)
    return True
