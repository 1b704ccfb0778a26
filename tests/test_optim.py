"""LR schedule, layer-wise LR decay, pretraining weight-decay groups and LARS."""
from types import SimpleNamespace

import pytest
import torch

import models_mae
import models_vit
from util.lars import LARS
from util.lr_decay import param_groups_lrd, param_groups_weight_decay
from util.lr_sched import adjust_learning_rate

SCHEDULE = SimpleNamespace(lr=1e-3, min_lr=1e-6, warmup_epochs=5, epochs=105)


def lr_after_adjusting(epoch, lr_scale=None):
    group = {'params': [torch.zeros(1, requires_grad=True)]}
    if lr_scale is not None:
        group['lr_scale'] = lr_scale
    optimizer = torch.optim.SGD([group], lr=0.0)
    returned = adjust_learning_rate(optimizer, epoch, SCHEDULE)
    return returned, optimizer.param_groups[0]['lr']


def test_lr_is_zero_at_warmup_start_and_peak_at_warmup_end():
    assert lr_after_adjusting(0.0) == (0.0, 0.0)
    assert lr_after_adjusting(2.5)[1] == pytest.approx(0.5e-3)
    assert lr_after_adjusting(5.0)[1] == pytest.approx(1e-3)


def test_lr_is_halfway_at_mid_cosine_and_min_lr_at_the_end():
    assert lr_after_adjusting(55.0)[1] == pytest.approx((1e-3 + 1e-6) / 2)
    assert lr_after_adjusting(105.0)[1] == pytest.approx(1e-6)
    assert lr_after_adjusting(30.0)[1] == pytest.approx(1e-6 + (1e-3 - 1e-6) * 0.5 * (1 + 0.7071067811865476))


def test_lr_honours_the_group_lr_scale():
    lr, group_lr = lr_after_adjusting(5.0, lr_scale=0.25)
    assert lr == pytest.approx(1e-3) and group_lr == pytest.approx(0.25e-3)


def scale_and_decay_of(groups, param):
    for g in groups:
        if any(p is param for p in g['params']):
            return g['lr_scale'], g['weight_decay']
    raise AssertionError('parameter not in any group')


def test_layer_decay_scales_for_vit_base_with_0_65():
    model = models_vit.vit_base_patch16()
    groups = param_groups_lrd(model, 0.05, model.no_weight_decay(), layer_decay=0.65)
    for embed in (model.patch_embed.proj.weight, model.cls_token, model.pos_embed):
        assert scale_and_decay_of(groups, embed)[0] == pytest.approx(0.65 ** 13)
    for i in (0, 5, 11):
        assert scale_and_decay_of(groups, model.blocks[i].attn.qkv.weight)[0] == pytest.approx(0.65 ** (12 - i))
    assert scale_and_decay_of(groups, model.head.weight)[0] == 1.0
    assert scale_and_decay_of(groups, model.fc_norm.weight)[0] == 1.0
    assert len(groups) == 2 * 14  # (13 layers + head) x (decay, no decay)


def test_layer_decay_puts_biases_norms_and_tokens_in_no_weight_decay_groups():
    model = models_vit.vit_base_patch16()
    groups = param_groups_lrd(model, 0.05, model.no_weight_decay(), layer_decay=0.65)
    no_decay = [model.blocks[0].attn.qkv.bias, model.blocks[0].norm1.weight, model.fc_norm.bias,
                model.head.bias, model.cls_token, model.pos_embed]
    for p in no_decay:
        assert scale_and_decay_of(groups, p)[1] == 0.0
    for p in (model.blocks[0].attn.qkv.weight, model.head.weight, model.patch_embed.proj.weight):
        assert scale_and_decay_of(groups, p)[1] == 0.05


def test_layer_decay_skips_frozen_parameters():
    model = models_vit.vit_tiny_patch16(depth=2)
    for p in model.blocks.parameters():
        p.requires_grad = False
    groups = param_groups_lrd(model, 0.05, layer_decay=0.75)
    assert sum(len(g['params']) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_pretraining_groups_decay_matrices_and_tokens_but_not_biases_norms_or_fixed_pos_embed():
    model = models_mae.mae_vit_tiny_patch16(depth=1, decoder_depth=1)
    no_decay, decay = param_groups_weight_decay(model, 0.05)
    assert no_decay['weight_decay'] == 0.0 and decay['weight_decay'] == 0.05
    ids = lambda group: {id(p) for p in group['params']}  # noqa: E731
    assert id(model.blocks[0].attn.qkv.bias) in ids(no_decay) and id(model.norm.weight) in ids(no_decay)
    assert id(model.blocks[0].attn.qkv.weight) in ids(decay)
    assert id(model.cls_token) in ids(decay) and id(model.mask_token) in ids(decay)  # 3-D, as official
    assert id(model.pos_embed) not in ids(decay) | ids(no_decay)


def test_lars_scales_the_update_to_the_trust_ratio_and_keeps_momentum():
    w = torch.nn.Parameter(torch.full((2, 2), 2.0))
    b = torch.nn.Parameter(torch.ones(2))
    opt = LARS([w, b], lr=0.1, weight_decay=0.0, momentum=0.9)
    w.grad = torch.full((2, 2), 0.5)
    b.grad = torch.full((2,), 0.5)
    opt.step()
    # |w| = 4, |g| = 1: update = 0.001 * 4 / 1 * g = 0.002 per element; biases are not rescaled
    assert torch.allclose(w, torch.full((2, 2), 2.0 - 0.1 * 0.002))
    assert torch.allclose(b, torch.full((2,), 1.0 - 0.1 * 0.5))
    opt.step()
    assert torch.allclose(opt.state[b]['mu'], torch.full((2,), 0.5 * 0.9 + 0.5))


def test_lars_adds_weight_decay_before_the_trust_ratio():
    w = torch.nn.Parameter(torch.full((1, 4), 1.0))
    opt = LARS([w], lr=1.0, weight_decay=1.0, momentum=0.0, trust_coefficient=0.5)
    w.grad = torch.zeros(1, 4)
    opt.step()
    # update = g + wd * w = w; trust = 0.5 * |w| / |w| = 0.5 -> w - 0.5 w
    assert torch.allclose(w, torch.full((1, 4), 0.5))


def test_the_scripts_schedule_equals_the_official_adjust_learning_rate_bit_for_bit():
    """LrSchedule.of(args, world_size) (args left as typed: --lr unset) sets the lrs the official
    adjust_learning_rate sets from the args.lr its caller computed: blr x effective batch / 256."""
    from util.lr_sched import LrSchedule
    typed = SimpleNamespace(lr=None, blr=1.5e-4, batch_size=64, accum_iter=2, min_lr=0.0, warmup_epochs=40,
                            epochs=800)
    official = SimpleNamespace(**{**vars(typed), 'lr': 1.5e-4 * 64 * 2 * 8 / 256})
    schedule = LrSchedule.of(typed, world_size=8)
    assert schedule.lr == official.lr and typed.lr is None
    for epoch in (0.0, 0.37, 39.99, 40.0, 123.456, 799.9):
        ours, theirs = (torch.optim.SGD([{'params': [torch.zeros(1)], 'lr_scale': 0.65}], lr=0.0) for _ in range(2))
        schedule.apply(ours, epoch)
        adjust_learning_rate(theirs, epoch, official)
        assert ours.param_groups[0]['lr'] == theirs.param_groups[0]['lr']
