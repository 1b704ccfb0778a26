"""MAE model: shapes, patchify, masking, loss, keys and initialisation against the official definitions."""
import math

import pytest
import torch
from conftest import TINY_MAE

import models_mae
from util.pos_embed import get_2d_sincos_pos_embed

BLOCK_KEYS = ['norm1.weight', 'norm1.bias', 'attn.qkv.weight', 'attn.qkv.bias', 'attn.proj.weight',
              'attn.proj.bias', 'norm2.weight', 'norm2.bias', 'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight',
              'mlp.fc2.bias']


def official_mae_vit_base_keys():
    keys = ['cls_token', 'pos_embed', 'mask_token', 'decoder_pos_embed',
            'patch_embed.proj.weight', 'patch_embed.proj.bias']
    keys += [f'blocks.{i}.{k}' for i in range(12) for k in BLOCK_KEYS]
    keys += ['norm.weight', 'norm.bias', 'decoder_embed.weight', 'decoder_embed.bias']
    keys += [f'decoder_blocks.{i}.{k}' for i in range(8) for k in BLOCK_KEYS]
    keys += ['decoder_norm.weight', 'decoder_norm.bias', 'decoder_pred.weight', 'decoder_pred.bias']
    return keys


def test_vit_base_mae_has_exactly_the_official_keys_and_shapes():
    sd = models_mae.mae_vit_base_patch16().state_dict()
    assert list(sd) == official_mae_vit_base_keys()
    assert len(sd) == 254
    assert sd['pos_embed'].shape == (1, 197, 768)
    assert sd['decoder_pos_embed'].shape == (1, 197, 512)
    assert sd['patch_embed.proj.weight'].shape == (768, 3, 16, 16)
    assert sd['decoder_pred.weight'].shape == (16 * 16 * 3, 512)
    assert sd['blocks.0.attn.qkv.weight'].shape == (3 * 768, 768)


@pytest.mark.parametrize('factory, dims', [
    ('mae_vit_base_patch16', (768, 12, 12, 16)),
    ('mae_vit_large_patch16', (1024, 24, 16, 16)),
    ('mae_vit_huge_patch14', (1280, 32, 16, 14)),
])
def test_factories_use_the_official_configs(factory, dims):
    embed_dim, depth, heads, patch = dims
    with torch.device('meta'):  # shapes only, no memory or init time
        model = getattr(models_mae, factory)()
    assert model.patch_embed.proj.weight.shape == (embed_dim, 3, patch, patch)
    assert len(model.blocks) == depth and model.blocks[0].attn.num_heads == heads
    assert len(model.decoder_blocks) == 8 and model.decoder_blocks[0].attn.num_heads == 16
    assert model.decoder_embed.out_features == 512
    assert model.norm.eps == 1e-6 and model.decoder_norm.eps == 1e-6


def test_factories_accept_overrides_for_32px_images_with_4px_patches(images):
    model = models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=4, depth=1, decoder_depth=1,
                                            norm_pix_loss=True)
    loss, pred, mask = model(images)
    assert model.norm_pix_loss
    assert pred.shape == (3, 64, 4 * 4 * 3) and mask.shape == (3, 64) and loss.ndim == 0


def test_forward_returns_scalar_loss_per_patch_prediction_and_mask(tiny_mae, images):
    loss, pred, mask = tiny_mae(images, mask_ratio=0.75)
    assert loss.shape == () and torch.isfinite(loss)
    assert pred.shape == (3, 64, 48)
    assert mask.shape == (3, 64)
    assert set(mask.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize('in_chans', [1, 3, 4])
def test_patchify_then_unpatchify_returns_the_images(in_chans):
    model = models_mae.mae_vit_tiny_patch16(in_chans=in_chans, **TINY_MAE)
    imgs = torch.randn(2, in_chans, 32, 32)
    patches = model.patchify(imgs)
    assert patches.shape == (2, 64, 16 * in_chans)
    assert torch.equal(model.unpatchify(patches), imgs)


def test_patchify_puts_one_patch_per_row_in_raster_order(tiny_mae):
    imgs = torch.arange(3 * 32 * 32, dtype=torch.float32).reshape(1, 3, 32, 32)
    patches = tiny_mae.patchify(imgs)
    # patch 9 is grid row 1, column 1: pixels [4:8, 4:8], channels last within the patch
    expected = imgs[0, :, 4:8, 4:8].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[0, 9], expected)


@pytest.mark.parametrize('in_chans, height, width', [(1, 32, 32), (4, 32, 48), (13, 48, 32)])
def test_any_channel_count_and_rectangular_grids_round_trip_in_raster_order(in_chans, height, width):
    model = models_mae.mae_vit_tiny_patch16(in_chans=in_chans, **{**TINY_MAE, 'img_size': (height, width)})
    rows, columns = height // 4, width // 4
    assert tuple(model.patch_embed.grid_size) == (rows, columns)
    imgs = torch.arange(2 * in_chans * height * width, dtype=torch.float32).reshape(2, in_chans, height, width)
    patches = model.patchify(imgs)
    assert patches.shape == (2, rows * columns, 16 * in_chans)
    row, column = rows - 1, 1  # patch (row, column) is number row * columns + column, channels last within it
    expected = imgs[1, :, 4 * row:4 * row + 4, 4 * column:4 * column + 4].permute(1, 2, 0).reshape(-1)
    assert torch.equal(patches[1, row * columns + column], expected)
    assert torch.equal(model.unpatchify(patches), imgs)
    assert model.decoder_pred.out_features == 16 * in_chans
    loss, pred, mask = model(torch.randn(2, in_chans, height, width), mask_ratio=0.75)
    assert pred.shape == (2, rows * columns, 16 * in_chans) and torch.isfinite(loss)
    loss.backward()
    assert model.patch_embed.proj.weight.grad.shape[1] == in_chans


def test_images_with_another_channel_count_or_size_are_refused_naming_both():
    model = models_mae.mae_vit_tiny_patch16(in_chans=4, **TINY_MAE)
    with pytest.raises(ValueError, match=r'must have 4 channels and sides divisible by 4, got \(3, 32, 32\)'):
        model.patchify(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r'must have 4 channels and sides divisible by 4, got \(4, 32, 30\)'):
        model.patchify(torch.zeros(1, 4, 32, 30))


@pytest.mark.parametrize('mask_ratio', [0.0, 0.5, 0.75, 0.9])
def test_masking_keeps_exactly_int_L_times_1_minus_ratio_patches(tiny_mae, mask_ratio):
    x = torch.randn(4, 64, 8)
    x_masked, mask, ids_restore = tiny_mae.random_masking(x, mask_ratio)
    len_keep = int(64 * (1 - mask_ratio))
    assert x_masked.shape == (4, len_keep, 8)
    assert (mask == 0).sum(dim=1).tolist() == [len_keep] * 4


def test_ids_restore_inverts_the_shuffle_and_visible_tokens_are_the_unmasked_ones(tiny_mae):
    x = torch.randn(2, 64, 8)
    noise = torch.rand(2, 64)
    x_masked, mask, ids_restore = tiny_mae.random_masking(x, 0.75, noise=noise)
    ids_shuffle = torch.argsort(noise, dim=1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(64).expand(2, 64))
    for n in range(2):
        kept = (mask[n] == 0).nonzero().flatten()
        assert torch.equal(torch.sort(ids_shuffle[n, :16]).values, kept)  # the 16 smallest noise values
        assert torch.equal(x_masked[n], x[n, ids_shuffle[n, :16]])


def test_mask_equals_the_official_scatter_construction(tiny_mae):
    noise = torch.rand(3, 64)
    _, mask, ids_restore = tiny_mae.random_masking(torch.randn(3, 64, 8), 0.75, noise=noise)
    official = torch.ones(3, 64)
    official[:, :16] = 0
    official = torch.gather(official, dim=1, index=ids_restore)
    assert torch.equal(mask, official)


def test_without_noise_the_mask_comes_from_the_first_torch_rand_after_seeding(tiny_mae, images):
    torch.manual_seed(123)
    _, mask, _ = tiny_mae.forward_encoder(images, 0.75)
    torch.manual_seed(123)
    noise = torch.rand(3, 64)
    _, expected, _ = tiny_mae.random_masking(torch.zeros(3, 64, 1), 0.75, noise=noise)
    assert torch.equal(mask, expected)


def test_explicit_noise_makes_the_mask_reproducible(tiny_mae, images):
    noise = torch.rand(3, 64)
    _, _, mask_a = tiny_mae(images, noise=noise)
    _, _, mask_b = tiny_mae(images, noise=noise)
    _, _, mask_c = tiny_mae(images, noise=torch.rand(3, 64))
    assert torch.equal(mask_a, mask_b) and not torch.equal(mask_a, mask_c)


def test_loss_counts_only_masked_patches(tiny_mae, images):
    tiny_mae.eval()
    noise = torch.rand(3, 64)
    _, pred, mask = tiny_mae(images, noise=noise)
    visible = (mask[0] == 0).nonzero()[0].item()
    masked = (mask[0] == 1).nonzero()[0].item()

    def loss_with_patch_changed(patch_index):
        patches = tiny_mae.patchify(images).clone()
        patches[0, patch_index] += 5.0
        return tiny_mae.forward_loss(tiny_mae.unpatchify(patches), pred, mask)

    base = tiny_mae.forward_loss(images, pred, mask)
    assert torch.equal(loss_with_patch_changed(visible), base)
    assert loss_with_patch_changed(masked) > base


def test_loss_is_mean_squared_error_over_masked_patches(tiny_mae, images):
    pred = torch.randn(3, 64, 48)
    mask = (torch.rand(3, 64) > 0.5).float()
    target = tiny_mae.patchify(images)
    per_patch = ((pred - target) ** 2).mean(-1)
    expected = per_patch[mask.bool()].mean()
    assert torch.allclose(tiny_mae.forward_loss(images, pred, mask), expected, atol=1e-6)


def test_norm_pix_loss_normalises_each_target_patch(images):
    model = models_mae.mae_vit_tiny_patch16(norm_pix_loss=True, **TINY_MAE)
    mask = torch.ones(3, 64)
    images = images * 3 + 2  # far from zero mean, unit variance
    target = model.patchify(images)
    mean, std = models_mae.per_patch_stats(target)
    normalised = (target - mean) / std
    assert torch.allclose(normalised.mean(-1), torch.zeros(3, 64), atol=1e-5)
    assert torch.allclose(normalised.std(-1), torch.ones(3, 64), atol=1e-3)
    # predicting the normalised patch exactly gives zero loss; predicting the raw pixels does not
    assert model.forward_loss(images, normalised, mask).item() < 1e-10
    assert model.forward_loss(images, target, mask).item() > 1.0
    # the std is sqrt(unbiased var + 1e-6), as the official loss computes it
    assert torch.equal(std, (target.var(-1, keepdim=True) + 1e-6) ** .5)


def test_position_embeddings_are_fixed_sincos_tables(tiny_mae):
    assert not tiny_mae.pos_embed.requires_grad and not tiny_mae.decoder_pos_embed.requires_grad
    expected = torch.from_numpy(get_2d_sincos_pos_embed(64, 8, cls_token=True)).float()
    assert torch.equal(tiny_mae.pos_embed[0], expected)
    expected_dec = torch.from_numpy(get_2d_sincos_pos_embed(32, 8, cls_token=True)).float()
    assert torch.equal(tiny_mae.decoder_pos_embed[0], expected_dec)


def test_initialisation_matches_the_official_statistics():
    torch.manual_seed(0)
    model = models_mae.mae_vit_base_patch16()
    # patch embedding: xavier_uniform on the [768, 3*16*16] view -> uniform(+-sqrt(6 / (768 + 768)))
    w = model.patch_embed.proj.weight
    bound = math.sqrt(6 / (768 + 768))
    assert w.abs().max() <= bound and w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    # Linear: xavier_uniform, zero bias
    qkv = model.blocks[0].attn.qkv
    assert qkv.weight.std().item() == pytest.approx(math.sqrt(6 / (768 + 2304)) / math.sqrt(3), rel=0.02)
    assert torch.count_nonzero(qkv.bias) == 0 and torch.count_nonzero(model.decoder_pred.bias) == 0
    # tokens: normal(std=.02)
    assert model.cls_token.std().item() == pytest.approx(0.02, rel=0.2)
    assert model.mask_token.std().item() == pytest.approx(0.02, rel=0.2)
    # LayerNorm: weight 1, bias 0, eps 1e-6
    assert torch.all(model.norm.weight == 1) and torch.all(model.decoder_norm.bias == 0)
    assert model.blocks[3].norm1.eps == 1e-6


def test_grad_flows_to_encoder_decoder_and_tokens_but_not_position_embeddings(tiny_mae, images):
    loss, _, _ = tiny_mae(images)
    loss.backward()
    assert tiny_mae.pos_embed.grad is None and tiny_mae.decoder_pos_embed.grad is None
    for name in ('cls_token', 'mask_token'):
        assert getattr(tiny_mae, name).grad.abs().sum() > 0
    assert tiny_mae.patch_embed.proj.weight.grad.abs().sum() > 0
    assert tiny_mae.decoder_pred.weight.grad.abs().sum() > 0


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ValueError, match='mae_vit_base_patch16'):
        models_mae.build_mae('mae_vit_gigantic')
