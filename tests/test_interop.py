"""Weights from and to other libraries: safetensors files, Hugging Face transformers' ViTMAE layout (read and
written) and timm's VisionTransformer (written), proved equal without a network: the transformers and timm models
are built from configs with random weights, converted both ways and run on the same images and masking noise."""
import argparse
import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from conftest import PHOTO, ROOT, TINY, TINY_CLASSIFIER_ARGS, TINY_MAE, TINY_PRETRAIN_ARGS, run_script
from safetensors.torch import load_file, save_file

import hubconf
import main_infer
import models_mae
import models_vit
from tools import export
from util import hf_layout
from util.checkpoint_files import CheckpointError, load_checkpoint

transformers = pytest.importorskip('transformers', reason='pip install -r requirements-dev.txt')
transformers.utils.logging.disable_progress_bar()

TOLERANCE = 1e-5  # fp32
# our tiny MAE (tests/conftest.py) as a ViTMAEConfig: hidden 64, 2 layers, patch 4, image 32, decoder 32 x 1
SMALL_HF = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, image_size=32,
                patch_size=4, decoder_hidden_size=32, decoder_num_hidden_layers=1, decoder_num_attention_heads=4,
                decoder_intermediate_size=128, layer_norm_eps=1e-6)
BASE_HF = dict(layer_norm_eps=1e-6)  # ViTMAEConfig's defaults are ViT-B/16 with the official 512-d x 8 decoder
CONFIGS = [pytest.param(SMALL_HF, TINY_MAE, id='small'),
           pytest.param(BASE_HF, {}, id='base', marks=pytest.mark.slow)]


def our_mae(sizes: dict, norm_pix_loss: bool) -> models_mae.MaskedAutoencoderViT:
    torch.manual_seed(0)
    return models_mae.mae_vit_base_patch16(norm_pix_loss=norm_pix_loss, **sizes).eval()


def random_hf_mae(hf_sizes: dict, norm_pix_loss: bool):
    """ViTMAEForPreTraining from a config, every tensor random (position tables, cls and mask tokens included: a
    fresh model keeps them at zero, which would hide a table read from the wrong place)."""
    config = transformers.ViTMAEConfig(norm_pix_loss=norm_pix_loss, mask_ratio=0.75, **hf_sizes)
    model = transformers.ViTMAEForPreTraining(config).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1 + (tensor == 1).float())
    return model


def inputs(size: int, num_patches: int, batch: int = 2):
    generator = torch.Generator().manual_seed(2)
    return (torch.randn(batch, 3, size, size, generator=generator),
            torch.rand(batch, num_patches, generator=generator))


@torch.no_grad()
def differences(ours, theirs, size: int) -> dict:
    """Max |ours - theirs| of loss, predictions and mask with the same images and masking noise."""
    x, noise = inputs(size, ours.patch_embed.num_patches)
    loss, pred, mask = ours(x, mask_ratio=0.75, noise=noise)
    out = theirs(pixel_values=x, noise=noise)
    assert pred.shape == out.logits.shape  # [N, L, p*p*3]
    return {'loss': (loss - out.loss).abs().item(), 'pred': (pred - out.logits).abs().max().item(),
            'mask': (mask - out.mask).abs().max().item()}


def export_cli(*argv) -> int:
    return export.main([str(a) for a in argv])


@pytest.mark.parametrize('hf_sizes, sizes', CONFIGS)
@pytest.mark.parametrize('norm_pix_loss', [False, True], ids=['pixels', 'norm_pix'])
def test_ours_exported_for_transformers_gives_the_same_loss_predictions_and_mask(hf_sizes, sizes, norm_pix_loss,
                                                                                  tmp_path, capsys):
    ours = our_mae(sizes, norm_pix_loss)
    torch.save({'model': ours.state_dict(), 'args': argparse.Namespace(model='mae_vit_base_patch16',
                                                                       norm_pix_loss=norm_pix_loss)},
               tmp_path / 'mae.pth')
    assert export_cli('--to', 'hf', tmp_path / 'mae.pth', tmp_path / 'hf', '--num_heads', ours.blocks[0].attn.num_heads,
                      '--decoder_num_heads', ours.decoder_blocks[0].attn.num_heads) == 0
    theirs, info = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / 'hf', output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys'] and not info['mismatched_keys']
    assert theirs.config.norm_pix_loss == norm_pix_loss and theirs.config.layer_norm_eps == 1e-6
    assert max(differences(ours, theirs.eval(), ours.patch_embed.img_size[0]).values()) <= TOLERANCE


@pytest.mark.parametrize('hf_sizes, sizes', CONFIGS)
@pytest.mark.parametrize('norm_pix_loss', [False, True], ids=['pixels', 'norm_pix'])
def test_a_transformers_mae_read_here_gives_the_same_loss_predictions_and_mask(hf_sizes, sizes, norm_pix_loss,
                                                                                tmp_path):
    theirs = random_hf_mae(hf_sizes, norm_pix_loss)
    theirs.save_pretrained(tmp_path / 'hf')
    checkpoint = load_checkpoint(str(tmp_path / 'hf'))
    assert checkpoint['args'].norm_pix_loss == norm_pix_loss
    ours = our_mae(sizes, norm_pix_loss)
    ours.load_state_dict(checkpoint['model'], strict=True)
    assert max(differences(ours, theirs, ours.patch_embed.img_size[0]).values()) <= TOLERANCE


@pytest.mark.parametrize('decoder_layers', [hf_layout.HUB_DECODER_LAYERS, hf_layout.SAVED_DECODER_LAYERS],
                         ids=['hub_files', 'save_pretrained'])
def test_both_file_layouts_of_the_decoder_read_to_the_same_weights(decoder_layers, tmp_path):
    theirs = random_hf_mae(SMALL_HF, False)
    theirs.save_pretrained(tmp_path / 'saved')  # transformers 5 writes decoder.decoder_encoder.layer.N
    weights = load_file(tmp_path / 'saved' / 'model.safetensors')
    renamed = {k.replace(hf_layout.SAVED_DECODER_LAYERS, decoder_layers): v for k, v in weights.items()}
    (tmp_path / 'hf').mkdir()
    save_file(renamed, tmp_path / 'hf' / 'model.safetensors')
    (tmp_path / 'hf' / 'config.json').write_text((tmp_path / 'saved' / 'config.json').read_text())
    state = load_checkpoint(str(tmp_path / 'hf'))['model']
    reference = load_checkpoint(str(tmp_path / 'saved'))['model']
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    assert torch.equal(state['decoder_pos_embed'], theirs.decoder.decoder_pos_embed)  # read, not regenerated


@pytest.mark.parametrize('hf_sizes, sizes', CONFIGS)
def test_ours_to_transformers_and_back_is_bit_identical(hf_sizes, sizes, tmp_path):
    ours = our_mae(sizes, True)
    state = ours.state_dict()
    torch.save({'model': state}, tmp_path / 'mae.pth')
    heads = ['--num_heads', ours.blocks[0].attn.num_heads, '--decoder_num_heads', ours.decoder_blocks[0].attn.num_heads]
    assert export_cli('--to', 'hf', tmp_path / 'mae.pth', tmp_path / 'hf', *heads) == 0
    theirs = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / 'hf')
    theirs.save_pretrained(tmp_path / 'resaved')  # through transformers' own loading and saving
    for folder in ('hf', 'resaved'):
        back = load_checkpoint(str(tmp_path / folder))['model']
        assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state), folder


def test_an_encoder_alone_goes_to_vitmaemodel_and_back(tmp_path):
    ours = our_mae(TINY_MAE, False)
    encoder = {k: v for k, v in ours.state_dict().items() if not k.startswith('decoder') and k != 'mask_token'}
    torch.save({'model': encoder}, tmp_path / 'encoder.pth')
    assert export_cli('--to', 'hf', tmp_path / 'encoder.pth', tmp_path / 'hf', '--num_heads', 4) == 0
    assert json.loads((tmp_path / 'hf' / 'config.json').read_text())['architectures'] == ['ViTMAEModel']
    theirs, info = transformers.ViTMAEModel.from_pretrained(tmp_path / 'hf', output_loading_info=True)
    assert not info['missing_keys'] and not info['unexpected_keys']
    x, noise = inputs(32, 64)
    with torch.no_grad():
        latent, mask, _ = ours.forward_encoder(x, 0.75, noise)
        out = theirs.eval()(pixel_values=x, noise=noise)
    assert (latent - out.last_hidden_state).abs().max() <= TOLERANCE and torch.equal(mask, out.mask)
    back = load_checkpoint(str(tmp_path / 'hf'))
    assert all(torch.equal(back['model'][k], v) for k, v in encoder.items()) and back['model'].keys() == encoder.keys()


def test_the_heads_of_a_model_of_this_repository_are_found_without_flags(tmp_path):
    torch.manual_seed(0)
    mae = models_mae.mae_vit_tiny_patch16(**TINY)  # no 'args' in the file: the sizes name the model
    torch.save({'model': mae.state_dict()}, tmp_path / 'mae.pth')
    assert export_cli('--to', 'hf', tmp_path / 'mae.pth', tmp_path / 'hf') == 0
    config = json.loads((tmp_path / 'hf' / 'config.json').read_text())
    assert (config['num_attention_heads'], config['decoder_num_attention_heads']) == (3, 4)
    assert (config['patch_size'], config['image_size'], config['layer_norm_eps']) == (4, 32, 1e-6)


# --- timm ---------------------------------------------------------------------------------------------------------

VIT_CONFIGS = [pytest.param('vit_tiny_patch16', TINY, id='small'),
               pytest.param('vit_base_patch16', {}, id='base', marks=pytest.mark.slow)]


@pytest.mark.parametrize('name, sizes', VIT_CONFIGS)
@pytest.mark.parametrize('global_pool', [True, False], ids=['avg', 'token'])
def test_a_classifier_exported_for_timm_gives_the_same_logits(name, sizes, global_pool, tmp_path):
    torch.manual_seed(0)
    ours = models_vit.build_classifier(name, num_classes=7, global_pool=global_pool, **sizes).eval()
    classes = [f'class_{i}' for i in range(7)]
    torch.save({'model': ours.state_dict(), 'args': argparse.Namespace(model=name), 'classes': classes},
               tmp_path / 'vit.pth')
    assert export_cli('--to', 'timm', tmp_path / 'vit.pth', tmp_path / 'timm') == 0
    theirs = timm.create_model(f'local-dir:{tmp_path / "timm"}', pretrained=True).eval()
    assert theirs.global_pool == ('avg' if global_pool else 'token') and theirs.num_classes == 7
    assert isinstance(theirs.fc_norm, torch.nn.LayerNorm) == global_pool
    assert theirs.pretrained_cfg['label_names'] == classes
    size = ours.patch_embed.img_size[0]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() <= TOLERANCE


def test_a_timm_export_reads_back_here_with_its_class_names(tmp_path, capsys):
    torch.manual_seed(0)
    ours = models_vit.vit_tiny_patch16(num_classes=3, **TINY).eval()
    torch.save({'model': ours.state_dict(), 'classes': ['cat', 'dog', 'owl']}, tmp_path / 'vit.pth')
    assert export_cli('--to', 'timm', tmp_path / 'vit.pth', tmp_path / 'timm') == 0
    for path in (tmp_path / 'timm', tmp_path / 'timm' / 'model.safetensors'):
        checkpoint = load_checkpoint(str(path))
        assert checkpoint['classes'] == ['cat', 'dog', 'owl']
        assert all(torch.equal(checkpoint['model'][k], v) for k, v in ours.state_dict().items())
    code = main_infer.main(['--model', 'vit_tiny_patch16', '--resume', str(tmp_path / 'timm' / 'model.safetensors'),
                            '--img_path', PHOTO, '--topk', '3'])
    out = capsys.readouterr().out
    assert code == 0 and all(name in out for name in ('cat', 'dog', 'owl'))


# --- safetensors and Hugging Face folders everywhere a checkpoint is read --------------------------------------

@pytest.fixture
def hf_folder(tmp_path):
    """A transformers ViTMAEForPreTraining of our tiny MAE's sizes, saved with save_pretrained, norm-pix targets."""
    folder = tmp_path / 'hf_mae'
    random_hf_mae(SMALL_HF, True).save_pretrained(folder)
    return folder


def test_a_transformers_folder_and_its_files_read_alike(hf_folder, tmp_path):
    whole = load_checkpoint(str(hf_folder))
    single = load_checkpoint(str(hf_folder / 'model.safetensors'))  # its config.json beside it
    assert whole['args'].norm_pix_loss and whole['attention_heads'] == {'encoder': 4, 'decoder': 4}
    bin_folder = tmp_path / 'bin'
    bin_folder.mkdir()
    torch.save(load_file(hf_folder / 'model.safetensors'), bin_folder / 'pytorch_model.bin')
    (bin_folder / 'config.json').write_text((hf_folder / 'config.json').read_text())
    as_bin = load_checkpoint(str(bin_folder))
    for other in (single, as_bin):
        assert all(torch.equal(other['model'][k], v) for k, v in whole['model'].items())


def test_a_url_of_transformers_weights_fetches_its_config_from_beside_it(hf_folder, tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'hub'))
    checkpoint = load_checkpoint((hf_folder / 'model.safetensors').as_uri())  # file:// takes the download path
    assert checkpoint['attention_heads'] == {'encoder': 4, 'decoder': 4}
    assert len(list((tmp_path / 'hub').rglob('config.json'))) == 1
    with pytest.raises(CheckpointError, match='a URL of a folder cannot be read; pass the URL of its model'):
        load_checkpoint(hf_folder.as_uri())


def test_our_weights_in_a_safetensors_file_load_like_the_pth(tmp_path):
    torch.manual_seed(0)
    mae = models_mae.mae_vit_tiny_patch16(**TINY)
    save_file(mae.state_dict(), tmp_path / 'mae.safetensors')
    model = hubconf.mae_vit_tiny_patch16(checkpoint=str(tmp_path / 'mae.safetensors'))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in mae.state_dict().items())


def test_torch_hub_takes_transformers_folders_for_checkpoint_and_finetune(hf_folder):
    mae = hubconf.mae_vit_tiny_patch16(checkpoint=str(hf_folder), embed_dim=64, depth=2, num_heads=4,
                                       decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
    expected = load_checkpoint(str(hf_folder))['model']
    assert all(torch.equal(mae.state_dict()[k], v) for k, v in expected.items())
    vit = hubconf.vit_tiny_patch16(finetune=str(hf_folder), embed_dim=64, depth=2, num_heads=4, num_classes=5,
                                   **TINY)
    assert torch.equal(vit.blocks[1].attn.qkv.weight, expected['blocks.1.attn.qkv.weight'])
    with pytest.raises(CheckpointError, match='4 attention heads in the encoder of the checkpoint, 8 in the model'):
        hubconf.vit_tiny_patch16(finetune=str(hf_folder), embed_dim=64, depth=2, num_heads=8, **TINY)


def test_main_infer_names_the_sizes_a_transformers_folder_does_not_fit(hf_folder, tmp_path, capsys):
    code = main_infer.main(['--model', 'mae_vit_tiny_patch16', '--resume', str(hf_folder), '--img_path', PHOTO,
                            '--output_dir', str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert code == 2 and err.count('\n') == 1
    assert 'does not fit --model mae_vit_tiny_patch16: embed dim 64 and 2 blocks in the checkpoint, 192 and 12' in err


def test_main_infer_reads_norm_pix_loss_from_the_transformers_config(tmp_path, capsys):
    torch.manual_seed(0)
    mae = models_mae.mae_vit_tiny_patch16(**TINY)
    torch.save({'model': mae.state_dict(), 'args': argparse.Namespace(model='mae_vit_tiny_patch16',
                                                                      norm_pix_loss=True)}, tmp_path / 'mae.pth')
    assert export_cli('--to', 'hf', tmp_path / 'mae.pth', tmp_path / 'hf') == 0
    code = main_infer.main(['--model', 'mae_vit_tiny_patch16', '--resume', str(tmp_path / 'hf'), '--img_path', PHOTO,
                            '--output_dir', str(tmp_path / 'out'), '--json', str(tmp_path / 'r.json')])
    out = capsys.readouterr().out
    assert code == 0 and 'per-patch normalised pixels (norm_pix_loss)' in out
    assert json.loads((tmp_path / 'r.json').read_text())['norm_pix_loss'] is True
    assert (tmp_path / 'out' / 'circuit_board_mae.png').is_file()


def test_a_pytorch_model_bin_that_runs_code_is_refused_like_any_checkpoint(hf_folder, tmp_path):
    from test_fault_tolerance import RunsCodeOnLoad
    marker = tmp_path / 'pwned'
    folder = tmp_path / 'evil'
    folder.mkdir()
    (folder / 'config.json').write_text((hf_folder / 'config.json').read_text())
    torch.save({'vit.embeddings.cls_token': RunsCodeOnLoad(marker)}, folder / 'pytorch_model.bin')
    with pytest.raises(CheckpointError, match='refused to load'):
        load_checkpoint(str(folder))
    assert not marker.exists()


# --- what cannot be converted: one line naming it ---------------------------------------------------------------

def with_config(hf_folder, **changes):
    config = json.loads((hf_folder / 'config.json').read_text())
    config.update(changes)
    (hf_folder / 'config.json').write_text(json.dumps(config))
    return str(hf_folder)


@pytest.mark.parametrize('changes, message', [
    (dict(model_type='vit'), "config.json: model_type 'vit' is another architecture; only Hugging Face ViTMAE"),
    (dict(qkv_bias=False), 'config.json: qkv_bias false; the MAE here has biases on query, key and value'),
    (dict(layer_norm_eps=1e-5), 'config.json: layer_norm_eps 1e-05 makes another model; the MAE here normalises '
                                'with 1e-06'),
    (dict(patch_size=[4, 8]), 'config.json: patch_size [4, 8] is not square'),
    (dict(num_channels=1), 'config.json says num_channels 1, the weights have 3: they do not belong together'),
    (dict(hidden_act='gelu_new'), "config.json: hidden_act 'gelu_new'; the MAE here uses 'gelu'"),
    (dict(intermediate_size=128), 'config.json: intermediate_size 128 is not 4 x hidden_size 64'),
    (dict(patch_size=8), 'config.json says patch_size 8, the weights have 4: they do not belong together'),
], ids=['architecture', 'qkv_bias', 'eps', 'non_square', 'channels', 'activation', 'mlp', 'mismatch'])
def test_what_has_no_equivalent_here_is_refused_in_one_line(hf_folder, changes, message):
    with pytest.raises(CheckpointError) as error:
        load_checkpoint(with_config(hf_folder, **changes))
    assert str(error.value) == f'{hf_folder}: {message}' or str(error.value).startswith(f'{hf_folder}: {message}')
    assert '\n' not in str(error.value)


def test_the_default_epsilon_of_converted_official_weights_is_read_with_a_note(hf_folder, capsys):
    checkpoint = load_checkpoint(with_config(hf_folder, layer_norm_eps=1e-12))
    assert 'layer_norm_eps 1e-12 (transformers\' default' in capsys.readouterr().out
    assert checkpoint['hf_config']['layer_norm_eps'] == 1e-12


def test_transformers_weights_without_their_config_and_sharded_folders_are_refused(hf_folder, tmp_path):
    alone = tmp_path / 'alone'
    alone.mkdir()
    (alone / 'model.safetensors').write_bytes((hf_folder / 'model.safetensors').read_bytes())
    with pytest.raises(CheckpointError, match='need the config.json saved with them, and there is none beside'):
        load_checkpoint(str(alone / 'model.safetensors'))
    (hf_folder / 'model.safetensors.index.json').write_text('{}')
    with pytest.raises(CheckpointError, match='weights sharded over several files'):
        load_checkpoint(str(hf_folder))
    (alone / 'config.json').write_text((hf_folder / 'config.json').read_text())
    (alone / 'model.safetensors').unlink()
    with pytest.raises(CheckpointError, match='a folder without model.safetensors or pytorch_model.bin'):
        load_checkpoint(str(alone))


def test_weights_outside_the_layout_are_named(hf_folder):
    weights = load_file(hf_folder / 'model.safetensors')
    weights['vit.pooler.dense.weight'] = torch.zeros(2)
    del weights['vit.encoder.layer.1.attention.attention.key.bias']
    save_file(weights, hf_folder / 'model.safetensors')
    with pytest.raises(CheckpointError, match=r'1 weights are not in the ViTMAE file layout \(vit.pooler.dense.weight'):
        load_checkpoint(str(hf_folder))
    del weights['vit.pooler.dense.weight']
    save_file(weights, hf_folder / 'model.safetensors')
    with pytest.raises(CheckpointError, match='blocks.1.attn.qkv.bias cannot be assembled: the key projection is'):
        load_checkpoint(str(hf_folder))


@pytest.mark.parametrize('to, kind, message', [
    ('hf', 'classifier', 'it is a classifier (it has head.weight); --to hf writes an MAE or its encoder'),
    ('timm', 'mae', 'it is an MAE checkpoint (encoder and decoder), not a classifier; fine-tune it first'),
    ('timm', 'linear probe', "it is a linear-probe classifier (BatchNorm head: head.0.*, head.1.*), which timm's"),
    ('hf', 'odd sizes', 'the weights do not show how many attention heads the encoder and decoder have'),
])
def test_the_exporter_refuses_in_one_line(to, kind, message, tmp_path, capsys):
    torch.manual_seed(0)
    if kind == 'mae':
        state = models_mae.mae_vit_tiny_patch16(**TINY).state_dict()
    elif kind == 'odd sizes':
        state = models_mae.mae_vit_tiny_patch16(**TINY_MAE).state_dict()
    else:
        model = models_vit.vit_tiny_patch16(num_classes=3, **TINY)
        state = (models_vit.add_batchnorm_head(model) if kind == 'linear probe' else model).state_dict()
    torch.save({'model': state}, tmp_path / 'in.pth')
    assert export_cli('--to', to, tmp_path / 'in.pth', tmp_path / 'out') == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: {tmp_path / "in.pth"} cannot be written for {to}: {message}')
    assert err.count('\n') == 1
    assert not (tmp_path / 'out').exists()


def test_a_head_count_other_than_the_model_s_is_refused_before_any_work(texture_data, tmp_path, capsys):
    from conftest import run_in_process

    import main_pretrain
    # mae_vit_tiny_patch16's sizes at 32 px with patch 4, but 4 encoder heads where the tiny model has 3
    config = transformers.ViTMAEConfig(hidden_size=192, num_hidden_layers=12, num_attention_heads=4,
                                       intermediate_size=768, image_size=32, patch_size=4, decoder_hidden_size=128,
                                       decoder_num_hidden_layers=4, decoder_num_attention_heads=4,
                                       decoder_intermediate_size=512, layer_norm_eps=1e-6)
    transformers.ViTMAEForPreTraining(config).save_pretrained(tmp_path / 'tiny_4_heads')
    code, stdout, err = run_in_process(main_pretrain, ['--resume', tmp_path / 'tiny_4_heads', '--data_path',
                                                       texture_data, '--output_dir', tmp_path / 'out',
                                                       *TINY_PRETRAIN_ARGS], capsys)
    assert code == 2 and err == [f'error: {tmp_path / "tiny_4_heads"} does not fit --model mae_vit_tiny_patch16: 4 '
                                 'attention heads in the encoder of the checkpoint, 3 in the model (another --model)']


# --- the scripts, as users run them -------------------------------------------------------------------------------

@pytest.fixture
def tiny_hf_folder(tmp_path):
    """Our tiny MAE (mae_vit_tiny_patch16 at 32 px, patch 4) written for transformers by the exporter."""
    torch.manual_seed(0)
    mae = models_mae.mae_vit_tiny_patch16(**TINY)
    torch.save({'model': mae.state_dict(), 'args': argparse.Namespace(model='mae_vit_tiny_patch16')},
               tmp_path / 'mae.pth')
    assert export_cli('--to', 'hf', tmp_path / 'mae.pth', tmp_path / 'hf') == 0
    return tmp_path / 'hf'


@pytest.mark.slow
def test_finetune_from_a_transformers_folder_then_eval_from_its_timm_export(tiny_hf_folder, texture_data,
                                                                                 tmp_path):
    out = tmp_path / 'ft'
    proc = run_script('main_finetune.py', *TINY_CLASSIFIER_ARGS, '--data_path', texture_data, '--finetune',
                      tiny_hf_folder, '--epochs', '1', '--output_dir', out, check=True)
    assert f'Loaded pre-trained checkpoint from {tiny_hf_folder}' in proc.stdout
    assert export_cli('--to', 'timm', out / 'checkpoint-best.pth', tmp_path / 'timm') == 0
    weights = tmp_path / 'timm' / 'model.safetensors'
    evaluated = run_script('main_finetune.py', *TINY_CLASSIFIER_ARGS, '--data_path', texture_data, '--eval',
                           '--resume', weights, check=True)
    original = run_script('main_finetune.py', *TINY_CLASSIFIER_ARGS, '--data_path', texture_data, '--eval',
                          '--resume', out / 'checkpoint-best.pth', check=True)
    accuracy = [line.split('* Acc@1')[1] for line in original.stdout.splitlines() if '* Acc@1' in line]
    assert accuracy and accuracy == [line.split('* Acc@1')[1] for line in evaluated.stdout.splitlines()
                                     if '* Acc@1' in line]


@pytest.mark.slow
def test_pretraining_resumes_weights_from_safetensors_at_start_epoch(tiny_hf_folder, texture_data, tmp_path):
    proc = run_script('main_pretrain.py', *TINY_PRETRAIN_ARGS, '--data_path', texture_data, '--resume',
                      tiny_hf_folder / 'model.safetensors', '--start_epoch', '1', '--epochs', '2', '--output_dir',
                      tmp_path / 'out', check=True)
    assert 'holds weights only (no optimizer state or epoch' in proc.stdout
    assert 'training starts from these weights at epoch 1 (--start_epoch)' in proc.stdout
    assert [json.loads(line)['epoch'] for line in open(tmp_path / 'out' / 'log.txt')] == [1]


@pytest.mark.slow
def test_training_never_imports_transformers():
    code = ('import sys, main_pretrain, main_finetune, main_linprobe, main_infer, hubconf, tools.export, '
            'tools.compare_logs, tools.demo; print(sorted(m for m in ("transformers", "timm") if m in sys.modules))')
    proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0 and proc.stdout.strip() == "['timm']", proc.stderr
