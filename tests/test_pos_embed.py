"""Sin-cos position embeddings and their bicubic interpolation to a new grid."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import models_vit
import models_mae
from util.pos_embed import get_2d_sincos_pos_embed, interpolate_pos_embed


def sincos_reference(embed_dim, row, col):
    """One token's embedding, written from the definition: [sin(col w), cos(col w), sin(row w), cos(row w)]."""
    quarter = embed_dim // 4
    omegas = [1.0 / 10000 ** (k / quarter) for k in range(quarter)]
    return ([math.sin(col * w) for w in omegas] + [math.cos(col * w) for w in omegas]
            + [math.sin(row * w) for w in omegas] + [math.cos(row * w) for w in omegas])


def test_table_shape_dtype_and_zero_class_token_row():
    table = get_2d_sincos_pos_embed(768, 14, cls_token=True)
    assert table.shape == (197, 768) and table.dtype == np.float64
    assert not table[0].any()
    assert get_2d_sincos_pos_embed(768, 14).shape == (196, 768)


def test_values_at_known_positions_follow_the_definition():
    grid = 14
    table = get_2d_sincos_pos_embed(16, grid, cls_token=True)
    for row, col in [(0, 0), (0, 1), (1, 0), (3, 7), (13, 13)]:
        np.testing.assert_allclose(table[1 + row * grid + col], sincos_reference(16, row, col), atol=1e-12)


def test_first_half_encodes_the_column_and_second_half_the_row():
    table = get_2d_sincos_pos_embed(768, 14)
    assert table[1, 0] == np.sin(1.0)  # row 0, column 1: first frequency is 1
    assert table[1, 384] == 0.0  # row 0: sin(0)
    assert table[14, 0] == 0.0 and table[14, 384] == np.sin(1.0)  # row 1, column 0


def test_interpolation_14_to_24_keeps_the_class_token_and_is_bicubic():
    model = models_vit.vit_base_patch16(img_size=384, num_classes=0, depth=1)
    pos = torch.randn(1, 197, 768)
    checkpoint = {'pos_embed': pos.clone()}
    assert interpolate_pos_embed(model, checkpoint)
    new = checkpoint['pos_embed']
    assert new.shape == (1, 1 + 24 * 24, 768)
    assert torch.equal(new[:, 0], pos[:, 0])
    grid = pos[:, 1:].reshape(1, 14, 14, 768).permute(0, 3, 1, 2)
    bicubic = F.interpolate(grid, size=(24, 24), mode='bicubic', align_corners=False)
    assert torch.allclose(new[:, 1:], bicubic.permute(0, 2, 3, 1).reshape(1, 576, 768), atol=1e-6)
    bilinear = F.interpolate(grid, size=(24, 24), mode='bilinear', align_corners=False)
    assert not torch.allclose(new[:, 1:], bilinear.permute(0, 2, 3, 1).reshape(1, 576, 768), atol=1e-3)
    model.load_state_dict({**model.state_dict(), 'pos_embed': new})


def test_interpolation_leaves_a_matching_table_untouched():
    model = models_vit.vit_base_patch16(num_classes=0, depth=1)
    pos = torch.randn(1, 197, 768)
    checkpoint = {'pos_embed': pos}
    assert not interpolate_pos_embed(model, checkpoint)
    assert checkpoint['pos_embed'] is pos


def test_a_rectangular_table_follows_the_official_axes_and_a_square_one_is_unchanged():
    """Rows in PatchEmbed's order (row-major over H rows of W columns), first half the column, second the row;
    (14, 14) gives the official square table bit for bit."""
    height, width = 3, 5
    table = get_2d_sincos_pos_embed(16, (height, width), cls_token=True)
    assert table.shape == (1 + height * width, 16) and not table[0].any()
    for k in range(height * width):
        np.testing.assert_allclose(table[1 + k], sincos_reference(16, k // width, k % width), atol=1e-12)
    assert np.array_equal(get_2d_sincos_pos_embed(768, (14, 14), True), get_2d_sincos_pos_embed(768, 14, True))
    mae = models_mae.mae_vit_tiny_patch16(img_size=(32, 48), patch_size=8, depth=1, decoder_depth=1)
    np.testing.assert_array_equal(mae.pos_embed[0].numpy(),
                                  get_2d_sincos_pos_embed(192, (4, 6), cls_token=True).astype(np.float32))


def test_tables_are_interpolated_to_and_between_rectangular_grids():
    model = models_vit.vit_base_patch16(img_size=(224, 448), num_classes=0, depth=1)  # 14 x 28
    pos = torch.randn(1, 197, 768)
    checkpoint = {'pos_embed': pos.clone()}
    assert interpolate_pos_embed(model, checkpoint)
    grid = pos[:, 1:].reshape(1, 14, 14, 768).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(14, 28), mode='bicubic', align_corners=False).permute(0, 2, 3, 1)
    assert torch.allclose(checkpoint['pos_embed'][:, 1:], expected.reshape(1, 14 * 28, 768), atol=1e-6)
    model.load_state_dict({**model.state_dict(), 'pos_embed': checkpoint['pos_embed']})
    rectangular = {'pos_embed': torch.randn(1, 1 + 7 * 21, 768)}  # 147 positions: no square; the grid must be said
    with pytest.raises(ValueError, match=r'147 positions are not a square grid; say which \(rows, columns\)'):
        interpolate_pos_embed(model, dict(rectangular))
    assert interpolate_pos_embed(model, rectangular, orig_grid=(7, 21))
    assert rectangular['pos_embed'].shape == (1, 1 + 14 * 28, 768)
