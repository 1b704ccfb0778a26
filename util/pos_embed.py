"""2-D sin-cos position embeddings (fixed, MAE encoder and decoder) and their resizing for new resolutions.

The table must stay bit-exact with the official one: released checkpoints store it, and a changed table would
shift every token. Hence the float32 grid, float64 frequencies and the official (w, h) order of the halves.
"""
from typing import Optional, Sequence, Tuple, Union

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


def grid_shape(grid_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    """(rows, columns) of a patch grid given as one side (square) or (height, width)."""
    if isinstance(grid_size, int):
        return grid_size, grid_size
    height, width = grid_size
    return int(height), int(width)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: Union[int, Sequence[int]],
                            cls_token: bool = False) -> np.ndarray:
    """[H*W (+1), embed_dim] float64 table for a grid of H rows and W columns (grid_size: one side for a square,
    or (H, W)); with cls_token a zero row comes first. Row k is the patch at row k // W, column k % W (the order of
    PatchEmbed's tokens); its first half encodes the column, its second the row, as the official square table
    does (for a square grid the table is the official one, bit for bit)."""
    height, width = grid_shape(grid_size)
    grid_h = np.arange(height, dtype=np.float32)
    grid_w = np.arange(width, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0)  # w goes first, as in the official table; [2, H, W]
    grid = grid.reshape([2, 1, height, width])
    pos_embed = get_2d_sincos_pos_embed_from_grid(embed_dim, grid)
    if cls_token:
        pos_embed = np.concatenate([np.zeros([1, embed_dim]), pos_embed], axis=0)
    return pos_embed


def resize_pos_embed(pos_embed: torch.Tensor, num_extra_tokens: int, new_size: Union[int, Sequence[int]],
                     orig_size: Optional[Union[int, Sequence[int]]] = None) -> torch.Tensor:
    """[1, extra + H*W, D] -> [1, extra + H'*W', D]: bicubic on the patch grid, extra tokens kept. orig_size: the
    table's grid (default: square, from its length); new_size: one side or (H', W')."""
    extra_tokens = pos_embed[:, :num_extra_tokens]
    pos_tokens = pos_embed[:, num_extra_tokens:]
    if orig_size is None:
        orig_size = int(pos_tokens.shape[1] ** 0.5)
    (height, width), dim = grid_shape(orig_size), pos_embed.shape[-1]
    pos_tokens = pos_tokens.reshape(-1, height, width, dim).permute(0, 3, 1, 2)
    pos_tokens = F.interpolate(pos_tokens, size=grid_shape(new_size), mode='bicubic', align_corners=False)
    pos_tokens = pos_tokens.permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat((extra_tokens, pos_tokens), dim=1)


def interpolate_pos_embed(model: torch.nn.Module, checkpoint_model: dict, key: str = 'pos_embed',
                          orig_grid: Optional[Sequence[int]] = None) -> bool:
    """Resize checkpoint_model[key] in place to `model`'s patch grid (e.g. 14x14 -> 24x24 for 384 px, or to a
    rectangular grid such as 14x28); `key` is 'pos_embed', or 'decoder_pos_embed' for an MAE's decoder table.
    orig_grid: the checkpoint's (rows, columns); default square (every official checkpoint), read off its length.

    The class token's row is kept as is. Returns True when the table was resized. Raises ValueError when the
    checkpoint's table is not square and orig_grid is not given."""
    if key not in checkpoint_model:
        return False
    pos_embed_checkpoint = checkpoint_model[key]
    new_grid = grid_shape(tuple(model.patch_embed.grid_size))
    num_extra_tokens = getattr(model, key).shape[-2] - new_grid[0] * new_grid[1]
    num_tokens = pos_embed_checkpoint.shape[-2] - num_extra_tokens
    if orig_grid is None:
        if num_tokens == new_grid[0] * new_grid[1]:
            return False
        side = int(round(num_tokens ** 0.5))
        if side * side != num_tokens:
            raise ValueError(f'{key}: {num_tokens} positions are not a square grid; say which (rows, columns) the '
                             f'checkpoint was trained on to resize it to {new_grid[0]}x{new_grid[1]}')
        orig_grid = (side, side)
    orig_grid = grid_shape(orig_grid)
    if orig_grid == new_grid:
        return False
    print0(f'Position interpolate from {orig_grid[0]}x{orig_grid[1]} to {new_grid[0]}x{new_grid[1]}')
    checkpoint_model[key] = resize_pos_embed(pos_embed_checkpoint, num_extra_tokens, new_grid, orig_grid)
    return True
