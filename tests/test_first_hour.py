"""A new user's first hour (issue 18): a short header instead of pages of dumps, a word for every surprise (no
--finetune, nothing left to do, a changed recipe, someone else's folder), outputs where they are expected, and
sizes read off the checkpoint wherever one is given."""
import argparse
import os

import pytest
import torch

import main_pretrain
import models_vit
from conftest import TINY_CLASSIFIER_ARGS, TINY_PRETRAIN_ARGS, read_json_log, run_in_process, run_script


@pytest.mark.slow
def test_a_run_prints_a_short_header_and_writes_the_full_details_to_a_file(texture_data, tmp_path):
    out = tmp_path / 'run'
    proc = run_script('main_pretrain.py', '--data_path', texture_data, '--output_dir', out, '--epochs', '1',
                      *TINY_PRETRAIN_ARGS, check=True)
    before_training = proc.stdout.split('Epoch: [0]')[0].strip().splitlines()
    assert len(before_training) <= 9, before_training  # was 140-340 lines of Namespace, model and optimizer
    header = '\n'.join(before_training)
    for text in ('MAE pretraining: mae_vit_tiny_patch16, 32 px, patch 4', 'data: 128 images of 4 classes',
                 'effective batch size: 16', 'actual lr: 6.25e-05', 'device: cpu', f'output: {out}'):
        assert text in header
    details = (out / 'run_details.txt').read_text()
    assert 'MaskedAutoencoderViT(' in details and 'AdamW (' in details and 'mask_ratio: 0.75' in details
    verbose = run_script('main_pretrain.py', '--data_path', texture_data, '--output_dir', tmp_path / 'v', '--epochs',
                         '1', '--verbose', *TINY_PRETRAIN_ARGS, check=True)
    assert 'MaskedAutoencoderViT(' in verbose.stdout


@pytest.mark.slow
def test_reruns_say_what_happens_nothing_left_changed_recipe_refused_unless_asked(texture_data, tmp_path):
    out = tmp_path / 'run'
    first = run_script('main_finetune.py', '--data_path', texture_data, '--output_dir', out, '--epochs', '1',
                       *TINY_CLASSIFIER_ARGS, check=True)
    assert 'Note: no --finetune: the encoder starts from random weights' in first.stdout
    again = run_script('main_finetune.py', '--data_path', texture_data, '--output_dir', out, '--epochs', '1',
                       *TINY_CLASSIFIER_ARGS, check=True)
    assert 'Nothing to do:' in again.stdout and 'Epoch:' not in again.stdout and 'raise --epochs' in again.stdout
    changed = run_script('main_finetune.py', '--data_path', texture_data, '--output_dir', out, '--epochs', '2',
                         '--blr', '2e-3', *TINY_CLASSIFIER_ARGS)
    lines = changed.stderr.strip().splitlines()
    assert changed.returncode == 2 and len(lines) == 1
    assert '--blr 0.001 (now 0.002)' in lines[0] and 'lr 6.25e-05 (now 0.000125)' in lines[0]
    assert '--allow_recipe_change' in lines[0]
    allowed = run_script('main_finetune.py', '--data_path', texture_data, '--output_dir', out, '--epochs', '2',
                         '--blr', '2e-3', '--allow_recipe_change', *TINY_CLASSIFIER_ARGS, check=True)
    assert 'Note: continuing' in allowed.stdout and 'the cosine schedule is stretched' in allowed.stdout
    assert [e['epoch'] for e in read_json_log(out)] == [0, 1]


def test_a_resume_with_the_same_effective_batch_on_other_processes_is_not_a_recipe_change():
    from util.training_plan import recipe_changes
    saved = argparse.Namespace(batch_size=32, accum_iter=2, blr=1e-3, lr=1e-3 * 128 / 256, seed=0)
    now = argparse.Namespace(batch_size=32, accum_iter=1, blr=1e-3, lr=None, seed=0)
    assert recipe_changes(saved, now, saved_world_size=2, world_size=4) == []
    now.batch_size = 16
    assert recipe_changes(saved, now, 2, 4) == ['effective batch 128 (now 64: 16 per process x 1 accumulated x 4 '
                                                'processes)', 'lr 0.0005 (now 0.00025)']


def test_a_plain_pretraining_run_does_not_take_over_the_demos_folder(texture_data, tmp_path, capsys):
    demo_out = tmp_path / 'demo_output'
    demo_out.mkdir()
    (demo_out / 'demo_run.json').write_text('{"demo": true}')
    (demo_out / 'log.txt').write_text('{"epoch": 0}\n')
    code, _, err = run_in_process(main_pretrain, ['--data_path', texture_data, '--output_dir', demo_out,
                                                  *TINY_PRETRAIN_ARGS], capsys)
    assert code == 2 and err == [f"error: --output_dir {demo_out}: holds the built-in demo's run; choose another "
                                 '--output_dir (or rerun the demo with --demo)']


@pytest.mark.slow
def test_eval_reads_image_size_patch_classes_and_pooling_off_the_checkpoint(texture_data, tmp_path):
    torch.manual_seed(0)
    model = models_vit.vit_tiny_patch16(img_size=32, patch_size=4, num_classes=4, global_pool=False)
    torch.save({'model': model.state_dict()}, tmp_path / 'cls_token_32px.pth')
    proc = run_script('main_finetune.py', '--eval', '--resume', tmp_path / 'cls_token_32px.pth', '--data_path',
                      texture_data, '--model', 'vit_tiny_patch16', '--num_workers', '0', check=True)
    assert 'Accuracy of the network on the 64 test images' in proc.stdout
    assert 'Position interpolate' not in proc.stdout  # evaluated at its own 32 px


@pytest.mark.slow
def test_the_linear_probe_header_counts_its_head_in_thousands(texture_data, tmp_path):
    import models_mae
    pre = tmp_path / 'pre.pth'
    torch.save({'model': models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=4).state_dict()}, pre)
    proc = run_script('main_linprobe.py', '--data_path', texture_data, '--output_dir', tmp_path / 'lp', '--epochs',
                      '1', '--finetune', pre, *TINY_CLASSIFIER_ARGS, check=True)
    assert 'parameters (772 trained)' in proc.stdout  # BatchNorm 192 + linear 192 x 4 + 4; not "0.00M"
    assert os.path.isfile(tmp_path / 'lp' / 'run_details.txt')


def test_inference_writes_its_figures_into_a_folder_named_for_them(tmp_path, monkeypatch, capsys):
    import main_infer
    import models_mae
    from conftest import PHOTO
    torch.save({'model': models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=4).state_dict()}, tmp_path / 'm.pth')
    monkeypatch.chdir(tmp_path)
    code = main_infer.main(['--model', 'mae_vit_tiny_patch16', '--resume', str(tmp_path / 'm.pth'), '--img_path',
                            PHOTO])
    assert code == 0 and os.listdir(tmp_path / 'reconstructions') == ['circuit_board_mae.png']
    assert 'reconstructions/circuit_board_mae.png' in capsys.readouterr().out


def test_a_global_pool_classifier_given_to_a_class_token_probe_names_the_pooling():
    from util.checkpoint_files import CheckpointError
    from util.weights import load_weights
    source = models_vit.vit_tiny_patch16(img_size=32, patch_size=4, num_classes=10, global_pool=True)
    target = models_vit.vit_tiny_patch16(img_size=32, patch_size=4, num_classes=4, global_pool=False)
    with pytest.raises(CheckpointError, match=r'w\.pth is not an encoder of --model vit_tiny_patch16: it was '
                                              r'fine-tuned with global pooling \(fc_norm\.\*, no norm\.\*\): pass '
                                              r'--global_pool; missing 2 encoder keys: norm\.bias, norm\.weight'):
        load_weights(target, {'model': source.state_dict()}, 'w.pth', 'vit_tiny_patch16', pretrained=True)
