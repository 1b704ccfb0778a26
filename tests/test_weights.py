"""Weights saved by other people's training code: every wrapper their model may have had when it was saved (DDP,
torch.compile, FSDP, activation checkpointing, EMA copies, a Lightning module) leaves the same weights here, made
with the real wrappers where this machine can run them; what cannot be read is refused naming the real cause."""
import argparse
import os

import pytest
import timm.utils
import torch
import torch.distributed as dist
from conftest import (
    EVAL_FLAGS,
    TINY_CLASSIFIER_ARGS,
    TINY_VIT,
    colour_classifier,
    colour_folder,
    free_port,
    run_in_process,
    run_script,
    save_classifier,
)
from torch.optim.swa_utils import AveragedModel

import main_finetune
import models_mae
import models_vit
from util.checkpoint_files import CheckpointError, load_checkpoint
from util.weights import load_state_strict, model_state_from


def tiny_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return models_vit.vit_tiny_patch16(num_classes=4, **TINY_VIT)


@pytest.fixture(scope='module')
def gloo():
    """A one-process gloo group, for the real DDP wrapper."""
    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(free_port()))
        dist.init_process_group('gloo', rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def renamed(state: dict, insert: str) -> dict:
    """Keys as a per-block wrapper leaves them: 'blocks.0.<insert>.attn...'."""
    return {(k.replace('blocks.0.', f'blocks.0.{insert}.') if k.startswith('blocks.0.') else k): v
            for k, v in state.items()}


def saved_by(wrapper: str, model: torch.nn.Module) -> dict:
    """What `wrapper`'s users torch.save: a checkpoint dict around the wrapped model's state dict."""
    if wrapper == 'compile':
        return {'model': torch.compile(model).state_dict()}  # no compilation happens before the first call
    if wrapper == 'ddp':
        return {'model': torch.nn.parallel.DistributedDataParallel(model).state_dict()}
    if wrapper == 'ddp_of_compiled':
        return {'model': torch.nn.parallel.DistributedDataParallel(torch.compile(model)).state_dict()}
    if wrapper == 'compiled_ddp':
        return {'model': torch.compile(torch.nn.parallel.DistributedDataParallel(model)).state_dict()}
    if wrapper == 'timm_ema':  # timm's train.py: the EMA copy beside the weights
        return {'state_dict_ema': timm.utils.ModelEmaV3(model).state_dict()}
    if wrapper == 'swa':  # torch.optim.swa_utils: 'module.' keys and a counter
        return {'state_dict': AveragedModel(model).state_dict()}
    if wrapper == 'deit_ema':  # DeiT / ConvNeXt-style checkpoints of the EMA weights alone
        return {'model_ema': model.state_dict(), 'epoch': 3}
    if wrapper == 'deepspeed':
        return {'module': model.state_dict()}
    if wrapper == 'fsdp_per_block':
        return {'model': renamed(model.state_dict(), '_fsdp_wrapped_module')}
    if wrapper == 'checkpointed_blocks':
        return {'model': renamed(model.state_dict(), '_checkpoint_wrapped_module')}
    if wrapper == 'lightning':
        return {'state_dict': {f'model.{k}': v for k, v in model.state_dict().items()}, 'epoch': 1}
    raise ValueError(wrapper)


WRAPPERS = ['compile', 'ddp', 'ddp_of_compiled', 'compiled_ddp', 'timm_ema', 'swa', 'deit_ema', 'deepspeed',
            'fsdp_per_block', 'checkpointed_blocks', 'lightning']


@pytest.mark.parametrize('wrapper', WRAPPERS)
def test_weights_saved_from_a_wrapped_model_load_strictly_as_the_bare_model(wrapper, gloo, tmp_path):
    model = tiny_classifier()
    torch.save(saved_by(wrapper, model), tmp_path / 'wrapped.pth')
    state = model_state_from(load_checkpoint(str(tmp_path / 'wrapped.pth')), 'wrapped.pth')
    assert state.keys() == model.state_dict().keys()
    fresh = models_vit.vit_tiny_patch16(num_classes=4, **TINY_VIT)
    load_state_strict(fresh, state, 'wrapped.pth', 'vit_tiny_patch16')
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_the_issues_compiled_checkpoint_is_evaluated_by_main_knn(tmp_path):
    """The issue's instance: `_orig_mod.` keys were refused ('holds no ViT weights ... missing 148 keys')."""
    from tools.synthetic import CLASSES, make_image_folder
    data = make_image_folder(str(tmp_path / 'data'), {'train': 2, 'val': 1}, size=32, classes=CLASSES[:2])
    torch.manual_seed(0)
    model = models_vit.vit_tiny_patch16(img_size=32, patch_size=4, num_classes=2)  # --model vit_tiny_patch16
    torch.save(saved_by('compile', model), tmp_path / 'compiled.pth')
    proc = run_script('main_knn.py', '--resume', tmp_path / 'compiled.pth', '--data_path', data, '--model',
                      'vit_tiny_patch16', '--input_size', '32', '--patch_size', '4', '--num_workers', '0',
                      '--nb_knn', '1')
    assert proc.returncode == 0 and '* k-NN k=1' in proc.stdout, proc.stderr


def test_a_vit_beside_other_weights_is_refused_naming_where_it_is(tmp_path):
    """A DINO-style model: the ViT under 'backbone.' beside a projection head; not a ViT checkpoint by itself."""
    state = {f'backbone.{k}': v for k, v in tiny_classifier().state_dict().items() if not k.startswith('head')}
    state['head.mlp.0.weight'] = torch.zeros(8, 64)
    torch.save({'teacher': state}, tmp_path / 'dino.pth')
    checkpoint = load_checkpoint(str(tmp_path / 'dino.pth'))
    with pytest.raises(CheckpointError, match="it holds weights under 'teacher' \\(another trainer's layout\\)"):
        model_state_from(checkpoint, 'dino.pth')  # weights under a key no trainer of MAEs uses
    with pytest.raises(CheckpointError) as error:
        load_state_strict(tiny_classifier(), model_state_from(checkpoint['teacher'], 'dino.pth'), 'dino.pth',
                          'vit_tiny_patch16')
    assert "its ViT weights are under 'backbone.' (" in str(error.value)


def test_one_processs_shards_of_an_fsdp_model_are_refused_as_shards(gloo, tmp_path):
    """FSDP2's state_dict() holds DTensors: one rank's shard of each weight, not the model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    model = fully_shard(tiny_classifier(), mesh=init_device_mesh('cpu', (1,)))
    torch.save({'model': model.state_dict()}, tmp_path / 'sharded.pth')
    with pytest.raises(CheckpointError, match=r"one process's shards of the weights \(FSDP's DTensor"):
        model_state_from(load_checkpoint(str(tmp_path / 'sharded.pth')), 'sharded.pth')


def test_a_patch_size_mismatch_in_eval_resizes_nothing_and_names_the_patch(tmp_path, capsys):
    data = colour_folder(tmp_path / 'data', {'val': {'a': 1, 'b': 1, 'c': 1, 'd': 1}})
    weights = save_classifier(tmp_path / 'w.pth', colour_classifier(), classes='abcd')  # 32 px, 4-px patches
    flags = [*EVAL_FLAGS, '--patch_size', '8', '--input_size', '64']
    code, out, err = run_in_process(main_finetune, ['--eval', '--resume', weights, '--data_path', data, *flags],
                                    capsys)
    assert code == 2 and len(err) == 1 and 'Position interpolate' not in out
    assert 'patch 4 px in the checkpoint, 8 px in the model (pass --patch_size 4)' in err[0]


def test_a_patch_size_mismatch_in_finetune_leads_with_the_cause_and_names_the_model(texture_data, tmp_path, capsys):
    mae = models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=8)
    torch.save({'model': mae.state_dict(), 'args': argparse.Namespace(model='mae_vit_tiny_patch16')},
               tmp_path / 'mae8.pth')
    code, out, err = run_in_process(main_finetune, ['--data_path', texture_data, '--output_dir', tmp_path / 'out',
                                                    *TINY_CLASSIFIER_ARGS, '--finetune', tmp_path / 'mae8.pth'], capsys)
    assert code == 2 and len(err) == 1 and 'Position interpolate' not in out  # no table resized for another patch
    assert err[0].startswith(f"error: {tmp_path / 'mae8.pth'} is not an encoder of --model vit_tiny_patch16: patch 8 "
                             'px in the checkpoint, 4 px in the model (pass --patch_size 8)')


def test_a_global_pool_classifier_given_to_a_class_token_probe_names_the_pooling():
    from util.checkpoint_files import CheckpointError
    from util.weights import load_weights
    source = models_vit.vit_tiny_patch16(img_size=32, patch_size=4, num_classes=10, global_pool=True)
    target = models_vit.vit_tiny_patch16(img_size=32, patch_size=4, num_classes=4, global_pool=False)
    with pytest.raises(CheckpointError, match=r'w\.pth is not an encoder of --model vit_tiny_patch16: it was '
                                              r'fine-tuned with global pooling \(fc_norm\.\*, no norm\.\*\): pass '
                                              r'--global_pool; missing 2 encoder keys: norm\.bias, norm\.weight'):
        load_weights(target, {'model': source.state_dict()}, 'w.pth', 'vit_tiny_patch16', pretrained=True)


@pytest.mark.parametrize('in_chans', [1, 4, 13])
def test_an_rgb_mae_fine_tunes_on_another_channel_count_adapted_as_timm_adapts_it(in_chans, capsys):
    """--finetune of an RGB checkpoint into a model reading N channels: the patch embedding summed (N = 1) or
    repeated and scaled by 3/N, equal to timm's own adapt_input_conv, said in one line; the rest loads strictly."""
    from timm.models._manipulate import adapt_input_conv

    from util.weights import load_weights
    torch.manual_seed(0)
    rgb = models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=4)
    model = models_vit.vit_tiny_patch16(img_size=32, patch_size=4, in_chans=in_chans, num_classes=2)
    load_weights(model, {'model': rgb.state_dict()}, 'rgb.pth', 'vit_tiny_patch16', pretrained=True)
    weight = rgb.patch_embed.proj.weight.detach()
    assert torch.allclose(model.patch_embed.proj.weight, adapt_input_conv(in_chans, weight.clone()))
    assert torch.equal(model.blocks[0].attn.qkv.weight, rgb.blocks[0].attn.qkv.weight)
    assert f'rgb.pth: its patch embedding reads 3 channels; adapted to {in_chans}' in capsys.readouterr().out
