"""A resume takes effect exactly as announced, or is refused before any work: changed settings reach the optimizer
(the saved parameter groups do not bring back the old ones), a new division of the epoch (processes, --batch_size,
--accum_iter) continues with the same images in each optimizer step, and what cannot take effect (another seed, an
explicit --start_epoch, a step boundary the stopped run never reached) is refused in one line."""
import argparse
import os
import shutil
import signal

import pytest
import torch
from conftest import (
    TINY_CLASSIFIER_ARGS,
    TINY_PRETRAIN_ARGS,
    colour_folder,
    descendants,
    read_json_log,
    run_in_process,
    run_script,
    start_process,
    torchrun_command,
    wait_for_line,
)

import main_pretrain
import models_vit
from util import preemption
from util.checkpoint_files import CheckpointError, load_checkpoint
from util.checkpointer import resumed_iteration
from util.datasets import ResumableSampler
from util.device import Runtime
from util.lr_decay import param_groups_lrd
from util.lr_sched import lr_at
from util.progress import EpochProgress


def finetune(data, out, *extra):
    return run_script('main_finetune.py', '--data_path', data, '--output_dir', out, *TINY_CLASSIFIER_ARGS, *extra)


def wrong_groups(groups: list, expected: list, key: str) -> int:
    """Parameter tensors whose group has another `key` than the freshly built groups give them."""
    return sum(len(saved['params']) for saved, fresh in zip(groups, expected) if saved[key] != fresh[key])


@pytest.mark.slow
def test_layer_and_weight_decay_and_the_adamw_kernel_changed_on_resume_reach_every_parameter_group(texture_data,
                                                                                                 tmp_path):
    """The issue's instance: the change was printed, then the restored optimizer state brought back the old
    lr_scale and weight_decay of every group (148 and 50 tensors of ViT-B); --adamw_impl, which may change freely,
    came back from the file the same way (the saved groups' foreach / fused flags)."""
    out = tmp_path / 'run'
    assert finetune(texture_data, out, '--epochs', '1', '--adamw_impl', 'loop').returncode == 0
    proc = finetune(texture_data, out, '--epochs', '2', '--allow_recipe_change', '--layer_decay', '0.5',
                    '--weight_decay', '0.1', '--adamw_impl', 'fused')
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '--weight_decay 0.05 (now 0.1); --layer_decay 0.75 (now 0.5)' in proc.stdout
    groups = load_checkpoint(str(out / 'checkpoint-last.pth'))['optimizer']['param_groups']
    model = models_vit.vit_tiny_patch16(img_size=32, patch_size=4, num_classes=4)
    expected = param_groups_lrd(model, 0.1, model.no_weight_decay(), layer_decay=0.5)
    assert len(groups) == len(expected)
    assert wrong_groups(groups, expected, 'lr_scale') == 0 and wrong_groups(groups, expected, 'weight_decay') == 0
    assert all(group['fused'] for group in groups)


# --- the division of an epoch ------------------------------------------------------------------------------

def step_images(num_images: int, epoch: int, batch: int, world: int, accum: int, skip_iterations: int = 0) -> list:
    """The images each optimizer step of an epoch takes over all ranks (sets of dataset indices), from the real
    sampler as the training loader uses it (each rank its shuffled share, last partial batch dropped)."""
    shares = []
    for rank in range(world):
        sampler = ResumableSampler(range(num_images), world, rank, shuffle=True, seed=0)
        sampler.set_epoch(epoch)
        sampler.skip(skip_iterations * batch)
        order = list(sampler)
        shares.append([order[i:i + batch] for i in range(0, len(order) - batch + 1, batch)])
    iterations = len(shares[0])
    return [set().union(*(b for batches in shares for b in batches[s * accum:(s + 1) * accum]))
            for s in range(iterations // accum)]


def stopped_after(steps: int, batch: int, world: int, accum: int) -> dict:
    """A mid-epoch checkpoint of epoch 2 taken after `steps` optimizer steps of that division."""
    return {'epoch_in_progress': {'epoch': 2, 'iteration': steps * accum, 'meters': []}, 'world_size': world,
            'args': argparse.Namespace(batch_size=batch, accum_iter=accum)}


DIVISIONS = [(16, 1, 1), (8, 2, 1), (8, 1, 2), (4, 2, 2), (2, 4, 2), (16, 2, 1)]  # (batch, processes, accum)


@pytest.mark.parametrize('before', DIVISIONS[:4], ids=lambda d: 'b%d_w%d_a%d' % d)
@pytest.mark.parametrize('after', DIVISIONS[:5], ids=lambda d: 'b%d_w%d_a%d' % d)
def test_a_new_division_of_the_same_effective_batch_continues_with_the_same_images_in_every_step(before, after):
    num_images = 1000
    uninterrupted = step_images(num_images, 2, *before)
    iteration = resumed_iteration(stopped_after(5, *before), 'last.pth', argparse.Namespace(
        batch_size=after[0], accum_iter=after[2]), after[1])
    resumed = step_images(num_images, 2, *after, skip_iterations=iteration)
    assert iteration % after[2] == 0  # at the start of an accumulation cycle
    common = min(len(resumed), len(uninterrupted) - 5)  # the epochs' tails may differ by the padding of a share
    assert common >= len(uninterrupted) - 6 and resumed[:common] == uninterrupted[5:5 + common]


def test_a_larger_effective_batch_starts_its_steps_where_the_stopped_run_left_off():
    before, after = (8, 1, 1), (16, 2, 1)  # 8 images per step, then 32 (with --allow_recipe_change)
    done = set().union(*step_images(1000, 2, *before)[:12])  # 96 images
    iteration = resumed_iteration(stopped_after(12, *before), 'last.pth', argparse.Namespace(
        batch_size=16, accum_iter=1), 2)
    rest = set().union(*step_images(1000, 2, *after, skip_iterations=iteration))
    assert iteration == 3 and not done & rest and len(done | rest) == 96 + len(rest)


def test_a_division_whose_steps_do_not_meet_the_images_taken_is_refused_naming_the_numbers():
    with pytest.raises(CheckpointError, match=r'last.pth stopped epoch 2 after 40 of its images; this run takes 32 '
                                              r"per optimizer step .*the run's own was 8"):
        resumed_iteration(stopped_after(5, 8, 1, 1), 'last.pth', argparse.Namespace(batch_size=16, accum_iter=1), 2)


def test_a_part_done_epoch_on_shards_continues_only_in_its_own_division(tmp_path):
    """Shards are read in consecutive shares (each process its own shards), so the step-to-images rule above does
    not hold across divisions: another process count or batch is refused in one line; the same one continues."""
    from tools.synthetic import make_image_folder
    from tools import make_shards
    folder = make_image_folder(str(tmp_path / 'images'), {'train': 4}, size=8)
    assert make_shards.main([folder, str(tmp_path / 'wds')]) == 0
    args = argparse.Namespace(batch_size=16, accum_iter=1, data_path=str(tmp_path / 'wds'))
    with pytest.raises(CheckpointError, match=r'^last.pth stopped epoch 2 part-way through shards read by 2 processes '
                                              r'x --batch_size 8; .*\(this run: 1 x 16\): finish the epoch with it'):
        resumed_iteration(stopped_after(5, 8, 2, 1), 'last.pth', args, 1)
    assert resumed_iteration(stopped_after(5, 8, 2, 1), 'last.pth', argparse.Namespace(**{**vars(args),
                                                                                          'batch_size': 8}), 2) == 5


def test_each_step_of_a_resumed_epoch_gets_the_stopped_runs_learning_rate_at_any_division():
    """The reviewer's instance: 1000 images, stopped at --batch_size 8 --accum_iter 2 (125 iterations), resumed at
    --batch_size 16 --accum_iter 1 (62): step s must sit at 2s / 125 of the epoch, not s / 62."""
    runtime = Runtime('cpu')
    stopped = EpochProgress(runtime, 3, iters_per_epoch=125, images_per_iteration=8)
    resumed = EpochProgress(runtime, 3, iters_per_epoch=62, start_iter=20, images_per_iteration=16,
                            images_per_epoch=stopped.images_per_epoch)
    assert all(resumed.epoch_fraction(s) == stopped.epoch_fraction(2 * s) for s in range(20, 62))
    assert any(resumed.epoch_fraction(s) != s / 62 for s in range(20, 62))
    # an unchanged division: the official it / iterations_per_epoch, the same float
    same = EpochProgress(runtime, 3, iters_per_epoch=1251, images_per_iteration=1024)
    assert all(same.epoch_fraction(it) == it / 1251 for it in range(1251))


def test_a_stop_at_the_epochs_last_iteration_lets_the_epoch_end():
    """A mid-epoch checkpoint of a finished epoch would count the ranks' padding among the images taken."""
    progress = EpochProgress(Runtime('cpu'), 0, iters_per_epoch=8)
    preemption._received.append(signal.SIGTERM)
    try:
        assert progress.stops_before(7) and not progress.stops_before(8)
    finally:
        preemption._received.clear()
    sampler = ResumableSampler(range(15), 2, 1, shuffle=True, seed=0)
    sampler.set_epoch(0)
    sampler.skip(16)  # more than its share: nothing left, never a negative length
    assert len(sampler) == 0 and list(sampler) == []


# --- what a resume refuses ---------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def finished_epoch(texture_data, tmp_path_factory):
    out = tmp_path_factory.mktemp('finished') / 'run'
    proc = run_script('main_pretrain.py', '--data_path', texture_data, '--output_dir', out, '--epochs', '1',
                      *TINY_PRETRAIN_ARGS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.mark.parametrize('flags, expected', [
    (['--seed', '5', '--allow_recipe_change'], '--seed 5: {out}/checkpoint-last.pth is a run with --seed 0, and a '
                                               'resumed run continues its random streams'),
    (['--start_epoch', '1'], '--start_epoch 1: {out}/checkpoint-last.pth continues at epoch 1, where it stopped'),
])
def test_what_a_resume_cannot_take_on_is_refused_before_any_work(finished_epoch, texture_data, flags, expected,
                                                                  capsys):
    before = sorted(os.listdir(finished_epoch))
    code, out, err = run_in_process(main_pretrain, ['--data_path', texture_data, '--output_dir', finished_epoch,
                                                    '--epochs', '2', *TINY_PRETRAIN_ARGS, *flags], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith('error: ' + expected.format(out=finished_epoch)), err
    assert sorted(os.listdir(finished_epoch)) == before and 'device:' not in out


@pytest.mark.slow
def test_a_training_set_that_grew_is_a_recipe_change(tmp_path):
    """New images reshuffle every epoch: the rest of a stopped epoch would see some images twice, others never."""
    from tools.synthetic import CLASSES, make_image_folder
    data = make_image_folder(str(tmp_path / 'data'), {'train': 8}, size=32, classes=CLASSES[:2])
    command = ['--data_path', data, '--output_dir', tmp_path / 'run', *TINY_PRETRAIN_ARGS, '--batch_size', '4']
    assert run_script('main_pretrain.py', *command, '--epochs', '1').returncode == 0
    shutil.copy(os.path.join(data, 'train', CLASSES[0], '00000.jpg'), os.path.join(data, 'train', CLASSES[0], 'x.jpg'))
    refused = run_script('main_pretrain.py', *command, '--epochs', '2')
    assert refused.returncode == 2 and f"is a run on other data: {os.path.join(data, 'train')} holds 17 images, " \
                                      'the run had 16' in refused.stderr, refused.stderr
    allowed = run_script('main_pretrain.py', *command, '--epochs', '2', '--allow_recipe_change')
    assert allowed.returncode == 0 and 'on other data (--allow_recipe_change)' in allowed.stdout


@pytest.mark.slow
def test_sigterm_to_every_process_of_torchrun_with_workers_saves_and_one_process_continues_step_for_step(
        texture_data, tmp_path):
    """A scheduler's SIGTERM to every process (torchrun, both ranks, their DataLoader workers); the relaunch on
    one process with twice the --accum_iter takes the same images per step at the same learning rates: each
    epoch's mean lr equals the schedule's, every epoch is logged once."""
    out = tmp_path / 'run'
    common = ['--data_path', texture_data, '--output_dir', out, '--epochs', '2', '--warmup_epochs', '1',
              *TINY_PRETRAIN_ARGS, '--batch_size', '8', '--num_workers', '2', '--print_freq', '1']
    proc = start_process(torchrun_command('main_pretrain.py', *common), tmp_path / 'first.log')
    wait_for_line(tmp_path / 'first.log', 'Epoch: [0]  [3/8]', proc)
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    proc.wait(timeout=120)
    log = open(tmp_path / 'first.log').read()
    assert 'stopped by SIGTERM; checkpoint saved to' in log and 'killed by signal' not in log, log[-3000:]
    stopped = load_checkpoint(str(out / 'checkpoint-last.pth'))['epoch_in_progress']
    relaunch = run_script('main_pretrain.py', *common, '--accum_iter', '2')
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert f"Continuing at epoch 0, iteration {2 * stopped['iteration']}" in relaunch.stdout
    entries = read_json_log(out)
    assert [e['epoch'] for e in entries] == [0, 1]
    for entry in entries:  # 16 iterations of one process = 8 steps of two: lr at (step / 8) of the epoch
        lrs = [lr_at(entry['epoch'] + (it // 2 * 2) / 16, 1e-3 * 16 / 256, 0., 1, 2) for it in range(16)]
        assert entry['train_lr'] == pytest.approx(sum(lrs) / len(lrs), rel=1e-9)
    assert torch.isfinite(load_checkpoint(str(out / 'checkpoint-last.pth'))['model']['cls_token']).all()


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


@pytest.mark.slow
def test_a_checkpoint_records_the_runs_values_and_an_official_format_one_resumes(tmp_path):
    """The checkpoint's args are the official format's: the flags with the lr and the classifier's sizes the run
    worked out (args itself stays as typed). A checkpoint whose args lack our flags (the official scripts have no
    --patch_size or --attn) continues."""
    out, data = tmp_path / 'run', colour_folder(tmp_path / 'data', {'train': dict.fromkeys('abcd', 4), 'val': {'a': 1}})
    assert TINY_CLASSIFIER_ARGS[-2:] == ['--nb_classes', '4']  # left out: 1000 classes, and global pooling, by default
    flags = [*TINY_CLASSIFIER_ARGS[:-2], '--data_path', data, '--output_dir', out, '--warmup_epochs', '0']
    run_script('main_finetune.py', *flags, '--epochs', '1', check=True)
    checkpoint = torch.load(out / 'checkpoint-0.pth', weights_only=False)
    saved = checkpoint['args']
    assert (saved.lr, saved.input_size, saved.nb_classes, saved.global_pool) == (1e-3 * 16 / 256, 32, 1000, True)
    del saved.patch_size, saved.attn  # as the official main_finetune.py saves its args
    torch.save(checkpoint, out / 'checkpoint-0.pth')
    (out / 'checkpoint-last.pth').unlink()
    proc = run_script('main_finetune.py', *flags, '--epochs', '2', check=True)
    assert 'With optim & sched! Continuing at epoch 1' in proc.stdout
