"""The training scripts as users run them (subprocesses, tiny models, generated images)."""
import argparse
import os
import stat

import pytest
import torch
from conftest import TINY_CLASSIFIER_ARGS, TINY_PRETRAIN_ARGS, read_json_log, run_script, run_torchrun

import models_mae
import models_vit

OFFICIAL_CHECKPOINT_KEYS = {'model', 'optimizer', 'epoch', 'scaler', 'args'}


def load(path):
    from util.checkpoint_files import load_checkpoint
    return load_checkpoint(str(path))


def pretrain(data, out, *extra):
    return run_script('main_pretrain.py', '--data_path', data, '--output_dir', out, *TINY_PRETRAIN_ARGS, *extra,
                      check=True)


@pytest.fixture(scope='module')
def pretrained(texture_data, tmp_path_factory):
    """One epoch of tiny pretraining, shared by the tests that start from it."""
    out = tmp_path_factory.mktemp('pretrain')
    proc = pretrain(texture_data, out, '--epochs', '1')
    return out, proc


@pytest.mark.slow
def test_pretrain_writes_official_format_checkpoints_log_and_tensorboard(pretrained):
    out, proc = pretrained
    assert {'checkpoint-0.pth', 'checkpoint-last.pth', 'log.txt'} <= set(os.listdir(out))
    assert any(name.startswith('events.out.tfevents') for name in os.listdir(out))
    checkpoint = load(out / 'checkpoint-0.pth')
    assert OFFICIAL_CHECKPOINT_KEYS <= set(checkpoint) and checkpoint['epoch'] == 0
    assert checkpoint['args'].model == 'mae_vit_tiny_patch16'
    expected_keys = set(models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=4).state_dict())
    assert set(checkpoint['model']) == expected_keys
    (entry,) = read_json_log(out)
    assert entry['epoch'] == 0 and entry['train_loss'] > 0 and entry['train_lr'] > 0
    assert entry['train_images_per_sec'] > 0 and 'train_peak_mem_gib' in entry
    # lr = blr * effective batch / 256 with the official default blr 1e-3
    assert 'effective batch size: 16' in proc.stdout and 'actual lr: 6.25e-05' in proc.stdout
    assert 'img/s' in proc.stdout and 'done in' in proc.stdout


@pytest.mark.slow
def test_pretrain_finetune_eval_linprobe_chain(pretrained, texture_data, tmp_path):
    pre_out, _ = pretrained
    ft_out = tmp_path / 'finetune'
    proc = run_script('main_finetune.py', '--data_path', texture_data, '--output_dir', ft_out,
                      '--finetune', pre_out / 'checkpoint-0.pth', '--epochs', '1', '--mixup', '0.8', '--cutmix', '1.0',
                      *TINY_CLASSIFIER_ARGS, check=True)
    assert "missing ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']" in proc.stdout
    assert {'checkpoint-0.pth', 'checkpoint-last.pth', 'checkpoint-best.pth', 'log.txt'} <= set(os.listdir(ft_out))
    (entry,) = read_json_log(ft_out)
    assert {'train_loss', 'test_acc1', 'test_acc5', 'test_loss', 'max_accuracy', 'n_parameters'} <= set(entry)

    proc = run_script('main_finetune.py', '--eval', '--resume', ft_out / 'checkpoint-0.pth', '--data_path',
                      texture_data, *TINY_CLASSIFIER_ARGS, check=True)
    assert f"* Acc@1 {entry['test_acc1']:.3f}" in proc.stdout  # the same weights give the same accuracy
    assert 'Accuracy of the network on the 64 test images' in proc.stdout

    lp_out = tmp_path / 'linprobe'
    run_script('main_linprobe.py', '--data_path', texture_data, '--output_dir', lp_out, '--finetune',
               pre_out / 'checkpoint-0.pth', '--epochs', '1', *TINY_CLASSIFIER_ARGS, check=True)
    checkpoint = load(lp_out / 'checkpoint-0.pth')
    assert {'head.0.running_mean', 'head.0.running_var', 'head.1.weight', 'head.1.bias'} <= set(checkpoint['model'])
    assert 'norm.weight' in checkpoint['model'] and 'fc_norm.weight' not in checkpoint['model']  # class token
    proc = run_script('main_linprobe.py', '--eval', '--resume', lp_out / 'checkpoint-0.pth', '--data_path',
                      texture_data, *TINY_CLASSIFIER_ARGS, check=True)
    assert '* Acc@1' in proc.stdout


@pytest.mark.slow
def test_rerunning_continues_at_the_next_epoch_with_the_saved_optimizer_state(texture_data, tmp_path):
    out = tmp_path / 'run'
    pretrain(texture_data, out, '--epochs', '1')
    after_one = load(out / 'checkpoint-last.pth')
    proc = pretrain(texture_data, out, '--epochs', '2')  # same command, one more epoch: auto-resume
    assert 'Continuing at epoch 1' in proc.stdout
    assert [e['epoch'] for e in read_json_log(out)] == [0, 1]
    after_two = load(out / 'checkpoint-last.pth')
    steps = lambda ckpt: [s['step'].item() for s in ckpt['optimizer']['state'].values()][0]  # noqa: E731
    assert steps(after_one) == 8 and steps(after_two) == 16  # 128 images / 16 per step, per epoch

    explicit = tmp_path / 'explicit'
    proc = pretrain(texture_data, explicit, '--epochs', '2', '--resume', out / 'checkpoint-0.pth')
    assert [e['epoch'] for e in read_json_log(explicit)] == [1]


@pytest.mark.slow
def test_without_checkpoint_last_the_newest_numbered_checkpoint_is_resumed_and_a_torn_log_line_dropped(
        texture_data, tmp_path):
    out = tmp_path / 'run'
    pretrain(texture_data, out, '--epochs', '2')
    (out / 'checkpoint-last.pth').unlink()  # the official layout: numbered checkpoints only
    (out / 'checkpoint-1.pth').unlink()
    with open(out / 'log.txt', 'a') as f:
        f.write('{"train_loss": 0.5, "epo')  # a write cut short by a kill or a full disk
    proc = pretrain(texture_data, out, '--epochs', '3')
    assert 'Resume checkpoint ' + str(out / 'checkpoint-0.pth') in proc.stdout
    assert [e['epoch'] for e in read_json_log(out)] == [0, 1, 2]


@pytest.mark.slow
def test_a_run_killed_before_its_first_log_line_starts_over_says_so_and_tensorboard_shows_each_step_once(
        texture_data, tmp_path):
    """Killed at epoch 0, iteration 5: no checkpoint, no log.txt, but run_details.txt and a TensorBoard file with
    its first steps. The rerun says it starts over, and TensorBoard hides the dead run's points."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / 'run'
    inject = os.path.join(os.path.dirname(__file__), 'nan_injection.py')
    killed = run_script(inject, 'main_pretrain.py', '--data_path', texture_data, '--output_dir', out, '--epochs', '1',
                        *TINY_PRETRAIN_ARGS, env={'KILL_AT': '0:5', 'KILL_MARKER': str(tmp_path / 'killed')})
    assert killed.returncode == -9 and not (out / 'log.txt').exists()
    proc = pretrain(texture_data, out, '--epochs', '1')
    assert 'holds no checkpoint to continue from: starting from scratch' in proc.stdout
    events = EventAccumulator(str(out))
    events.Reload()
    steps = [event.step for event in events.Scalars('train_loss')]
    assert steps == sorted(set(steps)) and len(steps) == 8


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_starts_over_and_says_so(texture_data, tmp_path):
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'log.txt').write_text('{"train_loss": 0.5, "epoch": 0}\n')  # logged, then killed before the save
    proc = pretrain(texture_data, out, '--epochs', '1')
    assert 'holds no checkpoint to continue from: starting from scratch' in proc.stdout
    assert [e['train_loss'] != 0.5 for e in read_json_log(out)] == [True]  # the epoch's new entry only


@pytest.mark.slow
def test_torchrun_two_process_pretraining_on_gloo(texture_data, tmp_path):
    out = tmp_path / 'ddp'
    proc = run_torchrun('main_pretrain.py', '--data_path', texture_data, '--output_dir', out, '--epochs', '1',
                        *TINY_PRETRAIN_ARGS, check=True)
    checkpoint = load(out / 'checkpoint-0.pth')
    assert OFFICIAL_CHECKPOINT_KEYS <= set(checkpoint) and len(checkpoint['rng_states']) == 2
    (entry,) = read_json_log(out)
    per_rank = entry['train_loss_per_rank']
    assert len(per_rank) == 2 and per_rank[0] != per_rank[1]  # each rank saw its own half of the data
    assert entry['train_loss'] == pytest.approx(sum(per_rank) / 2, rel=1e-6)
    assert 'effective batch size: 32' in proc.stdout  # 16 per process x 2 processes


@pytest.mark.slow
def test_torchrun_two_process_finetuning_and_linear_probing_with_dist_eval(pretrained, texture_data, tmp_path):
    pre_out, _ = pretrained
    ft = tmp_path / 'ft'
    proc = run_torchrun('main_finetune.py', '--data_path', texture_data, '--output_dir', ft, '--finetune',
                    pre_out / 'checkpoint-0.pth', '--epochs', '1', '--accum_iter', '2', '--mixup', '0.8',
                    '--cutmix', '1.0', '--dist_eval', *TINY_CLASSIFIER_ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'effective batch size: 64' in proc.stdout  # 16 per process x 2 accumulation steps x 2 processes
    (entry,) = read_json_log(ft)
    assert entry['test_num_images'] == 64 and len(entry['train_loss_per_rank']) == 2
    proc = run_torchrun('main_finetune.py', '--eval', '--resume', ft / 'checkpoint-0.pth', '--data_path', texture_data,
                    '--dist_eval', *TINY_CLASSIFIER_ARGS)
    assert proc.returncode == 0 and f"* Acc@1 {entry['test_acc1']:.3f}" in proc.stdout
    lp = tmp_path / 'lp'
    proc = run_torchrun('main_linprobe.py', '--data_path', texture_data, '--output_dir', lp, '--finetune',
                    pre_out / 'checkpoint-0.pth', '--epochs', '1', '--dist_eval', *TINY_CLASSIFIER_ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'test_acc1' in read_json_log(lp)[0]


@pytest.mark.slow
def test_released_format_finetuned_checkpoint_evaluates_with_eval_resume(texture_data, tmp_path):
    torch.manual_seed(0)
    model = models_vit.vit_tiny_patch16(img_size=32, patch_size=4, num_classes=4, global_pool=True)
    torch.save({'model': model.state_dict()}, tmp_path / 'finetuned.pth')  # what the released files hold
    proc = run_script('main_finetune.py', '--eval', '--resume', tmp_path / 'finetuned.pth', '--data_path',
                      texture_data, *TINY_CLASSIFIER_ARGS, check=True)
    assert '* Acc@1' in proc.stdout and 'Accuracy of the network on the 64 test images' in proc.stdout
    # at a higher resolution (384 px for a 224-px checkpoint): the position embeddings are interpolated
    bigger = [a if a != '32' else '48' for a in TINY_CLASSIFIER_ARGS]
    proc = run_script('main_finetune.py', '--eval', '--resume', tmp_path / 'finetuned.pth', '--data_path',
                      texture_data, *bigger, check=True)
    assert 'Position interpolate from 8x8 to 12x12' in proc.stdout and '* Acc@1' in proc.stdout


def test_a_linear_probe_in_a_fine_tuning_runs_folder_says_where_the_checkpoint_came_from(texture_data, tmp_path):
    out = tmp_path / 'finetune_run'
    out.mkdir()
    model = models_vit.vit_tiny_patch16(img_size=32, patch_size=4, num_classes=4)
    torch.save({'model': model.state_dict(), 'epoch': 0, 'args': argparse.Namespace(model='vit_tiny_patch16')},
               out / 'checkpoint-last.pth')
    proc = run_script('main_linprobe.py', '--data_path', texture_data, '--output_dir', out, *TINY_CLASSIFIER_ARGS)
    assert proc.returncode == 2 and 'does not fit --model vit_tiny_patch16' in proc.stderr
    assert f'it was found in --output_dir {out} (auto-resume): use another --output_dir' in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize('pooling, missing', [
    ([], "missing ['fc_norm.bias', 'fc_norm.weight', 'head.bias', 'head.weight']"),
    (['--cls_token'], "missing ['head.bias', 'head.weight']"),
])
def test_encoder_only_checkpoint_loads_with_only_the_expected_missing_keys(texture_data, tmp_path, pooling,
                                                                           missing):
    mae = models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=4)
    encoder = {k: v for k, v in mae.state_dict().items()
               if not k.startswith('decoder') and k != 'mask_token'}  # mae_pretrain_vit_*.pth layout
    torch.save({'model': encoder}, tmp_path / 'encoder.pth')
    proc = run_script('main_finetune.py', '--data_path', texture_data, '--output_dir', tmp_path / 'out',
                      '--finetune', tmp_path / 'encoder.pth', '--epochs', '1', *pooling, *TINY_CLASSIFIER_ARGS,
                      check=True)
    assert missing in proc.stdout


@pytest.mark.slow
def test_learning_works_pretraining_lowers_loss_and_fine_tuning_beats_chance(texture_data, tmp_path):
    pre = tmp_path / 'pre'
    pretrain(texture_data, pre, '--epochs', '4', '--warmup_epochs', '1', '--blr', '1.6e-2')  # lr 1e-3
    losses = [e['train_loss'] for e in read_json_log(pre)]
    assert losses[-1] < 0.6 * losses[0], losses
    ft = tmp_path / 'ft'
    run_script('main_finetune.py', '--data_path', texture_data, '--output_dir', ft, '--finetune',
               pre / 'checkpoint-3.pth', '--epochs', '4', '--warmup_epochs', '1', *TINY_CLASSIFIER_ARGS,
               check=True)
    best = max(e['test_acc1'] for e in read_json_log(ft))
    assert best >= 60, f'top-1 {best} with 4 classes (chance: 25)'


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
def test_the_linear_probe_header_counts_its_head_in_thousands(texture_data, tmp_path):
    import models_mae
    pre = tmp_path / 'pre.pth'
    torch.save({'model': models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=4).state_dict()}, pre)
    proc = run_script('main_linprobe.py', '--data_path', texture_data, '--output_dir', tmp_path / 'lp', '--epochs',
                      '1', '--finetune', pre, *TINY_CLASSIFIER_ARGS, check=True)
    assert 'parameters (772 trained)' in proc.stdout  # BatchNorm 192 + linear 192 x 4 + 4; not "0.00M"
    assert os.path.isfile(tmp_path / 'lp' / 'run_details.txt')


def test_every_file_a_run_writes_has_the_mode_the_umask_gives(tmp_path):
    """Checkpoints were written 0600 whatever the umask (mkstemp's mode, kept by the atomic rename): on shared
    storage a teammate could not read them. Under umask 022 a checkpoint is 0644 as open() makes it; under 027,
    0640."""
    from util.checkpoint_files import save_atomic
    for umask, mode in ((0o022, 0o644), (0o027, 0o640)):
        previous = os.umask(umask)
        try:
            save_atomic({'model': {}}, str(tmp_path / f'checkpoint-{umask:o}.pth'))
        finally:
            os.umask(previous)
        assert stat.S_IMODE(os.stat(tmp_path / f'checkpoint-{umask:o}.pth').st_mode) == mode


@pytest.mark.slow
def test_a_runs_outputs_are_readable_by_the_group_and_others_under_umask_022(pretrained):
    """Every file of a pretraining run (checkpoints, log.txt, run_details.txt, TensorBoard) under the umask the
    suite runs with: what open() gives (0644 under 022)."""
    out, _ = pretrained
    umask = os.umask(0o022)
    os.umask(umask)
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in out.iterdir() if path.is_file()}
    assert 'checkpoint-0.pth' in modes and set(modes.values()) == {0o666 & ~umask}, modes


@pytest.mark.slow
def test_a_linear_probe_keeps_its_newest_numbered_checkpoint_only(pretrained, texture_data, tmp_path):
    """Every checkpoint of a probe holds the frozen encoder again: the demo's probe kept seven of 21 MB for a head
    of 1.5K parameters. --keep_last 0 keeps them all, as the official script."""
    pre_out, _ = pretrained
    cases = (([], ['checkpoint-1.pth']), (['--keep_last', '0'], ['checkpoint-0.pth', 'checkpoint-1.pth']))
    for keep, expected in cases:
        out = tmp_path / f'probe{len(keep)}'
        run_script('main_linprobe.py', '--data_path', texture_data, '--output_dir', out, '--finetune',
                   pre_out / 'checkpoint-0.pth', '--epochs', '2', *TINY_CLASSIFIER_ARGS, *keep, check=True)
        numbered = sorted(n for n in os.listdir(out) if n[len('checkpoint-'):-len('.pth')].isdigit())
        assert numbered == expected
        assert (out / 'checkpoint-last.pth').is_file() and (out / 'checkpoint-best.pth').is_file()
