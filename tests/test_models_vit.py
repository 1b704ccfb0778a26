"""ViT classifier: official fine-tuned checkpoint keys, equality with timm's ViT, SDPA against the eager formula."""
import pytest
import timm
import torch
from conftest import TINY_VIT
from test_models_mae import BLOCK_KEYS

import models_vit


def official_finetuned_vit_base_keys():
    keys = ['cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias']
    keys += [f'blocks.{i}.{k}' for i in range(12) for k in BLOCK_KEYS]
    keys += ['fc_norm.weight', 'fc_norm.bias', 'head.weight', 'head.bias']
    return keys


def test_global_pool_vit_base_has_exactly_the_official_finetuned_keys():
    sd = models_vit.vit_base_patch16(global_pool=True).state_dict()
    assert sorted(sd) == sorted(official_finetuned_vit_base_keys())
    assert len(sd) == 152
    assert sd['head.weight'].shape == (1000, 768) and sd['pos_embed'].shape == (1, 197, 768)


def test_class_token_vit_has_norm_and_no_fc_norm():
    sd = models_vit.vit_base_patch16(global_pool=False).state_dict()
    assert {'norm.weight', 'norm.bias'} <= set(sd)
    assert not any(k.startswith('fc_norm') for k in sd)


def test_global_pool_is_the_default_as_in_official_fine_tuning():
    assert models_vit.vit_base_patch16().global_pool


@pytest.mark.parametrize('factory, dims', [
    ('vit_base_patch16', (768, 12, 12, 16)),
    ('vit_large_patch16', (1024, 24, 16, 16)),
    ('vit_huge_patch14', (1280, 32, 16, 14)),
])
def test_factories_use_the_official_configs(factory, dims):
    embed_dim, depth, heads, patch = dims
    with torch.device('meta'):  # shapes only, no memory or init time
        model = getattr(models_vit, factory)()
    assert model.patch_embed.proj.weight.shape == (embed_dim, 3, patch, patch)
    assert len(model.blocks) == depth and model.blocks[0].attn.num_heads == heads
    assert model.fc_norm.eps == 1e-6 and model.head.weight.shape == (1000, embed_dim)


@pytest.mark.parametrize('global_pool, timm_pool', [(True, 'avg'), (False, 'token')])
def test_logits_equal_timm_vision_transformer_with_the_same_weights(global_pool, timm_pool, images):
    torch.manual_seed(0)
    ours = models_vit.vit_tiny_patch16(num_classes=10, global_pool=global_pool, **TINY_VIT).eval()
    with torch.no_grad():
        for p in ours.parameters():  # non-trivial norms and biases
            p.add_(torch.randn_like(p) * 0.1)
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, num_classes=10, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4,
        qkv_bias=True, global_pool=timm_pool, fc_norm=global_pool,
        norm_layer=torch.nn.LayerNorm).eval()
    for m in reference.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-6
    reference.load_state_dict(ours.state_dict(), strict=True)
    with torch.no_grad():
        assert (ours(images) - reference(images)).abs().max() <= 1e-5


def test_sdpa_attention_equals_the_eager_softmax_formula(images):
    torch.manual_seed(0)
    model = models_vit.vit_tiny_patch16(num_classes=10, **TINY_VIT).eval()
    with torch.no_grad():
        fused = model(images)
        models_vit.set_attention_impl(model, 'eager')
        eager = model(images)
    assert model.blocks[0].attn.impl == 'eager'
    assert (fused - eager).abs().max() <= 1e-5


def test_sdpa_and_eager_gradients_agree(images):
    grads = {}
    for impl in models_vit.ATTENTION_IMPLS:
        torch.manual_seed(0)
        model = models_vit.vit_tiny_patch16(num_classes=10, attn_impl=impl, **TINY_VIT)
        model(images).square().sum().backward()
        grads[impl] = model.blocks[0].attn.qkv.weight.grad
    assert torch.allclose(grads['sdpa'], grads['eager'], atol=1e-5, rtol=1e-4)


def test_drop_path_rate_grows_linearly_over_depth():
    model = models_vit.vit_base_patch16(drop_path_rate=0.1, num_classes=0)
    rates = [getattr(b.drop_path, 'drop_prob', 0.0) for b in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    assert rates[6] == pytest.approx(0.1 * 6 / 11)


def test_initialisation_follows_the_official_classifier():
    torch.manual_seed(0)
    model = models_vit.vit_base_patch16()
    assert model.pos_embed.requires_grad  # learnable when fine-tuning, unlike in the MAE
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(model.head.bias) == 0
    assert model.no_weight_decay() == {'pos_embed', 'cls_token'}


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ValueError, match='vit_base_patch16'):
        models_vit.build_classifier('vit_gigantic')
