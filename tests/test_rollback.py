"""--on_nonfinite rollback: a NaN met in training rolls every rank back to a snapshot in host memory, skips the bad
step's batch and goes on (util/rollback.py). Faults are injected by tests/nan_injection.py."""
import hashlib
import json
import os
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    ROOT,
    TINY_CLASSIFIER_ARGS,
    TINY_PRETRAIN_ARGS,
    read_json_log,
    run_in_process,
    run_script,
    run_torchrun,
)

import main_pretrain
import models_mae
from util.checkpoint_files import load_checkpoint
from util.loss_scaler import LossScaler
from util.progress import NonFiniteLossError
from util.checkpointer import Checkpointer, ResumeState
from util.rollback import Position, Rollbacks, Snapshot

INJECT = os.path.join(ROOT, 'tests', 'nan_injection.py')
# 2 epochs of 8 optimizer steps on the 128 texture images; a snapshot every 2 steps, a checkpoint every 2
RUN = ['--epochs', '2', '--blr', '1.6e-2', '--warmup_epochs', '1', '--seed', '3', '--save_every_iters', '2',
       *TINY_PRETRAIN_ARGS]
ROLLBACK = ['--on_nonfinite', 'rollback', '--snapshot_every', '2']


def pretrain(data, out, *extra, env=None, check=True):
    return run_script(INJECT, 'main_pretrain.py', '--data_path', data, '--output_dir', out, *RUN, *extra, env=env,
                      check=check)


def final_model(out) -> dict:
    return load_checkpoint(str(out / 'checkpoint-last.pth'))['model']


def assert_bit_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


def rollback_lines(out, timed: bool = True) -> list:
    """The rollback records in log.txt; not `timed`: without their 'seconds' (a measurement of that run)."""
    return [{k: v for k, v in entry['rollback'].items() if timed or k != 'seconds'}
            for entry in read_json_log(out) if 'rollback' in entry]


def epoch_lines(out) -> list:
    return [(e['epoch'], e['train_loss'], e['train_lr']) for e in read_json_log(out) if 'rollback' not in e]


@pytest.fixture(scope='module')
def two_faults(texture_data, tmp_path_factory):
    """A run that meets a NaN loss once at epoch 0, iteration 3 and once at epoch 1, iteration 5 (the snapshots
    before them: iterations 2 and 4)."""
    out = tmp_path_factory.mktemp('faults')
    proc = pretrain(texture_data, out, *ROLLBACK, env={'NAN_AT': '0:3,1:5'})
    return out, proc


def tensorboard_points(out, tag: str) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


@pytest.mark.slow
def test_without_a_fault_rollback_mode_trains_the_very_same_weights(texture_data, tmp_path):
    pretrain(texture_data, tmp_path / 'stop')
    pretrain(texture_data, tmp_path / 'rollback', *ROLLBACK)
    assert_bit_identical(final_model(tmp_path / 'stop'), final_model(tmp_path / 'rollback'))
    assert epoch_lines(tmp_path / 'stop') == epoch_lines(tmp_path / 'rollback')


@pytest.mark.slow
def test_each_nan_is_rolled_back_skipped_recorded_and_the_run_finishes(two_faults, texture_data):
    out, proc = two_faults
    lines = [line for line in proc.stdout.splitlines() if 'Rollback ' in line]
    assert len(lines) == 2 and (
        f'] Rollback 2 of at most 5: loss nan at epoch 1, iteration 5; back to the snapshot of iteration 4, replaying '
        f'to the step and skipping iteration 5 (16 samples: {texture_data}/train/') in lines[1], lines
    records = rollback_lines(out)
    assert [(r['epoch'], r['iteration'], r['iterations'], r['snapshot_iteration']) for r in records] == \
        [(0, 3, [3, 3], 2), (1, 5, [5, 5], 4)]
    assert all((r['cause'], r['value']) == ('loss', 'nan') and r['seconds'] > 0 for r in records)
    assert all(len(r['samples']) == 16 and all(os.path.isfile(path) for path in r['samples']) for r in records)
    checkpoint = load_checkpoint(str(out / 'checkpoint-last.pth'))
    assert checkpoint['epoch'] == 1 and checkpoint['rollbacks'] == records
    assert all(torch.isfinite(tensor).all() for tensor in checkpoint['model'].values())
    assert [epoch for epoch, _, _ in epoch_lines(out)] == [0, 1]
    # an epoch's time counts its rollback too (its clock runs on from the first pass)
    assert [e['train_epoch_time_sec'] > r['seconds'] for e, r in zip(
        [e for e in read_json_log(out) if 'rollback' not in e], records)] == [True, True]
    # TensorBoard: every step once (the replays do not write them again), none of them NaN, the skipped ones absent
    points = tensorboard_points(out, 'train_loss')
    steps = [step for step, _ in points]
    assert len(steps) == len(set(steps)) == 2 * 8 - 2 and all(torch.isfinite(torch.tensor(v)) for _, v in points)
    assert 375 not in steps and 1625 not in steps  # epoch_1000x of epoch 0 iteration 3, epoch 1 iteration 5


@pytest.mark.slow
def test_killed_after_rollbacks_and_resumed_the_run_skips_the_same_batches_and_ends_bit_identical(
        two_faults, texture_data, tmp_path):
    """Killed at epoch 1, iteration 7, after both rollbacks: the newest checkpoint is the one the second rollback
    wrote at its snapshot (iteration 4), and the relaunched run meets no NaN (the faults were transient), so only
    the records in the checkpoint make it skip iteration 5. The first part repeats the fixture's run: the same
    on every repeat."""
    reference, _ = two_faults
    out = tmp_path / 'run'
    killed = pretrain(texture_data, out, *ROLLBACK, check=False,
                      env={'NAN_AT': '0:3,1:5', 'KILL_AT': '1:7', 'KILL_MARKER': str(tmp_path / 'killed')})
    assert killed.returncode == -9 and 'Rollback 2 of at most 5' in killed.stdout
    assert load_checkpoint(str(out / 'checkpoint-last.pth'))['epoch_in_progress']['iteration'] == 4
    relaunched = pretrain(texture_data, out, *ROLLBACK)
    assert 'Continuing at epoch 1, iteration 4' in relaunched.stdout and 'Rollback' not in relaunched.stdout
    assert_bit_identical(final_model(out), final_model(reference))
    assert rollback_lines(out, timed=False) == rollback_lines(reference, timed=False)  # each once
    assert epoch_lines(out) == epoch_lines(reference)
    # TensorBoard: what the killed run wrote past its checkpoint is purged, so every step shows once
    assert tensorboard_points(out, 'train_loss') == tensorboard_points(reference, 'train_loss')


@pytest.mark.slow
def test_a_nan_anywhere_in_an_accumulation_cycle_skips_the_whole_cycle_and_nothing_of_it_leaks(texture_data,
                                                                                              tmp_path):
    """--accum_iter 2, no loss scaler on the CPU (the gradients are checked at each optimizer step): NaN gradients
    from iteration 2, the first of a cycle, under a finite loss; and a NaN loss at iteration 3, its last. Either
    way both iterations are skipped, and the two runs end bit-identical: no gradient of the cycle leaks on."""
    flags = [*ROLLBACK, '--accum_iter', '2', '--batch_size', '8', '--epochs', '1', '--save_every_iters', '4']
    gradients = pretrain(texture_data, tmp_path / 'gradients', *flags, env={'NAN_AT': '0:2', 'NAN_MODE': 'gradients'})
    pretrain(texture_data, tmp_path / 'loss', *flags, env={'NAN_AT': '0:3'})
    for name, cause, at in (('gradients', 'gradients', 3), ('loss', 'loss', 3)):
        [record] = rollback_lines(tmp_path / name)
        assert (record['iterations'], record['cause'], record['iteration']) == ([2, 3], cause, at)
        assert len(record['samples']) == 16
    assert ('gradients not finite at epoch 0, iteration 3; back to the snapshot of iteration 0, replaying to the step '
            'and '
            'skipping iterations 2-3 (16 samples: ') in gradients.stdout
    assert_bit_identical(final_model(tmp_path / 'gradients'), final_model(tmp_path / 'loss'))
    assert all(torch.isfinite(tensor).all() for tensor in final_model(tmp_path / 'loss').values())


@pytest.mark.slow
def test_fp16_loss_scaler_overflow_skips_are_not_rollbacks(texture_data, tmp_path):
    """With --amp fp16 the GradScaler skips a step whose gradients overflow and lowers its scale: its own business,
    not a rollback (and not one of --max_rollbacks)."""
    out = tmp_path / 'run'
    proc = pretrain(texture_data, out, *ROLLBACK, '--amp', 'fp16', '--epochs', '1',
                    env={'NAN_AT': '0:2', 'NAN_MODE': 'gradients'})
    assert 'Rollback' not in proc.stdout and rollback_lines(out) == []
    checkpoint = load_checkpoint(str(out / 'checkpoint-last.pth'))
    assert checkpoint['scaler']['scale'] == 65536.0 / 2  # the one overflow halved the initial scale
    assert 'rollbacks' not in checkpoint


@pytest.mark.slow
def test_a_nan_at_every_step_stops_after_max_rollbacks_in_one_line_leaving_a_finite_checkpoint(texture_data,
                                                                                                tmp_path):
    out = tmp_path / 'run'
    proc = pretrain(texture_data, out, *ROLLBACK, '--max_rollbacks', '2', check=False,
                    env={'NAN_AT': '1:3', 'NAN_MODE': 'from'})
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
    assert errors == [line for line in proc.stderr.splitlines() if line.strip()], proc.stderr[-2000:]
    assert errors[0].startswith('error: Loss is nan at epoch 1, iteration 5, again after 2 rollbacks in this run '
                                '(--max_rollbacks 2; steps skipped at epoch:iteration 1:3, 1:4)')
    assert f'Last good checkpoint, left untouched: {out / "checkpoint-last.pth"} (epoch 1, iteration 2)' in errors[0]
    checkpoint = load_checkpoint(str(out / 'checkpoint-last.pth'))
    assert checkpoint['epoch_in_progress']['iteration'] == 2 and len(checkpoint['rollbacks']) == 2
    assert all(torch.isfinite(tensor).all() for tensor in checkpoint['model'].values())
    # the same command again: the skipped steps are the run's, and so is the budget: it stops, it does not
    # 'finish' an epoch of skipped steps
    again = pretrain(texture_data, out, *ROLLBACK, '--max_rollbacks', '2', check=False,
                     env={'NAN_AT': '1:3', 'NAN_MODE': 'from'})
    assert again.returncode == 1 and 'Skipping the 2 optimizer steps that rollbacks skipped before' in again.stdout
    assert 'again after 2 rollbacks in this run' in again.stderr and 'Epoch: [1] done' not in again.stdout


@pytest.mark.slow
@pytest.mark.parametrize('script', ['main_finetune.py', 'main_linprobe.py'])
def test_fine_tuning_and_linear_probing_roll_back_a_nan_and_finish(script, texture_data, tmp_path):
    """Fine-tuning (mixup's numpy draws in the RNG snapshot) and linear probing (LARS, the head's BatchNorm
    running statistics: buffers, in the snapshot too)."""
    out = tmp_path / 'run'
    proc = run_script(INJECT, script, '--data_path', texture_data, '--output_dir', out, '--epochs', '1',
                      *TINY_CLASSIFIER_ARGS, '--on_nonfinite', 'rollback', env={'NAN_AT': '0:6'}, check=True)
    assert 'Rollback 1 of at most 5: loss nan at epoch 0, iteration 6; back to the snapshot of iteration 0' \
        in proc.stdout
    [record] = rollback_lines(out)
    assert record['iterations'] == [6, 6] and read_json_log(out)[-1]['test_acc1'] >= 0
    assert all(torch.isfinite(tensor).all() for tensor in final_model(out).values())
    # the skipped steps belong to the run's state, not to the weights a --resume or --finetune of best would take
    assert len(load_checkpoint(str(out / 'checkpoint-last.pth'))['rollbacks']) == 1
    assert 'rollbacks' not in load_checkpoint(str(out / 'checkpoint-best.pth'))


@pytest.fixture(scope='module')
def two_process_runs(texture_data, tmp_path_factory):
    """2 processes x 8 images x --accum_iter 2, logging windows of 3 iterations (they end on optimizer steps when
    watched), a snapshot every optimizer step: without a fault, with and without rollback; rank 1 alone meeting
    a NaN once at iteration 3 (the snapshot before it: iteration 2), under DDP and under --fsdp; and a NaN at every
    step from iteration 3 on. One epoch of 8 iterations each."""
    out = tmp_path_factory.mktemp('distributed')
    flags = ['--epochs', '1', '--blr', '1.6e-2', '--warmup_epochs', '0', '--seed', '1', '--model',
             'mae_vit_tiny_patch16', '--input_size', '32', '--patch_size', '4', '--num_workers', '0',
             '--batch_size', '8', '--accum_iter', '2', '--print_freq', '3', '--save_every_iters', '2']
    rollback = ['--on_nonfinite', 'rollback', '--snapshot_every', '1']
    once, every = {'NAN_AT': '0:3', 'NAN_RANK': '1'}, {'NAN_AT': '0:3', 'NAN_MODE': 'from'}
    runs = {}
    for name, extra, env in (('stop', [], None), ('rollback', rollback, None), ('ddp', rollback, once),
                             ('fsdp', [*rollback, '--fsdp'], once),
                             ('every', [*rollback, '--max_rollbacks', '1'], every)):
        runs[name] = run_torchrun(INJECT, 'main_pretrain.py', '--data_path', texture_data, '--output_dir', out / name,
                                  *flags, *extra, env=env, check=name != 'every')
    return out, runs


@pytest.mark.slow
def test_two_processes_without_a_fault_train_the_same_weights_with_and_without_rollback(two_process_runs):
    out, _ = two_process_runs
    assert_bit_identical(final_model(out / 'stop'), final_model(out / 'rollback'))
    assert epoch_lines(out / 'stop') == epoch_lines(out / 'rollback')


@pytest.mark.slow
def test_under_ddp_every_rank_rolls_back_when_one_meets_the_nan(two_process_runs):
    out, runs = two_process_runs
    [record] = rollback_lines(out / 'ddp')
    assert (record['epoch'], record['iterations'], record['snapshot_iteration']) == (0, [2, 3], 2)
    assert record['images'] == [32, 64] and len(record['samples']) == 32  # 2 iterations x 8 images x 2 ranks
    assert runs['ddp'].stdout.count('Rollback 1 of at most 5') == 1  # rank 0 reports it
    assert all(torch.isfinite(tensor).all() for tensor in final_model(out / 'ddp').values())


@pytest.mark.slow
def test_under_fsdp_each_rank_restores_its_own_shards_and_ends_with_the_ddp_weights(two_process_runs):
    out, _ = two_process_runs
    assert rollback_lines(out / 'fsdp', timed=False) == rollback_lines(out / 'ddp', timed=False)
    a, b = final_model(out / 'ddp'), final_model(out / 'fsdp')
    difference = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert difference <= 1e-5  # fp32 rounding only: a shard restored wrong would be off by the learning rate


@pytest.mark.slow
def test_two_processes_stop_after_max_rollbacks_with_one_line_and_a_finite_checkpoint(two_process_runs):
    out, runs = two_process_runs
    proc = runs['every']
    assert proc.returncode != 0
    assert ('error: Loss is nan at epoch 0, iteration 4, again after 1 rollback in this run (--max_rollbacks 1; '
            'steps skipped at epoch:iteration 0:2)') in proc.stderr
    checkpoint = load_checkpoint(str(out / 'every' / 'checkpoint-last.pth'))
    assert checkpoint['epoch_in_progress']['iteration'] == 2 and len(checkpoint['rollbacks']) == 1
    assert all(torch.isfinite(tensor).all() for tensor in checkpoint['model'].values())


@pytest.mark.slow
def test_without_rollback_nan_gradients_under_a_finite_loss_never_overwrite_the_last_good_checkpoint(texture_data,
                                                                                                   tmp_path):
    """--on_nonfinite stop, fp32: the last step of epoch 1 makes NaN gradients under a finite loss. Before, the
    epoch's checkpoint saved the NaN weights over the good one, and the next epoch's NaN loss pointed to it as
    the last good checkpoint. Now the save refuses them and the checkpoint of epoch 0 stays as it was."""
    out = tmp_path / 'run'
    pretrain(texture_data, out, '--epochs', '1', '--save_every_iters', '0')
    digest = hashlib.sha256((out / 'checkpoint-last.pth').read_bytes()).hexdigest()
    proc = pretrain(texture_data, out, '--epochs', '3', '--save_every_iters', '0', check=False,
                    env={'NAN_AT': '1:7', 'NAN_MODE': 'gradients'})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: Weights are NaN or infinite after epoch 1 (a step's gradients were, under a finite loss), so they "
        f"were not saved, stopping training. Last good checkpoint, left untouched: {out / 'checkpoint-last.pth'} "
        "(end of epoch 0). With fp16, try --amp bf16; else set --clip_grad, or lower --blr (rerunning with "
        "--allow_recipe_change continues from that checkpoint)."]
    assert hashlib.sha256((out / 'checkpoint-last.pth').read_bytes()).hexdigest() == digest
    assert not (out / 'checkpoint-1.pth').exists()


def test_the_rollback_benchmark_measures_a_snapshot_of_12_bytes_per_trained_parameter(tmp_path, capsys):
    from tools import benchmark
    report = tmp_path / 'rollback.json'
    assert benchmark.main(['--rollback', '--rollback_models', 'mae_vit_tiny_patch16', '--input_size', '32',
                           '--patch_size', '4', '--batch_size', '2', '--device', 'cpu', '--warmup', '0',
                           '--steps', '2', '--windows', '1', '--json', str(report)]) == 0
    result = json.loads(report.read_text())['rollback']
    [row] = result['measured']
    model = models_mae.build_mae('mae_vit_tiny_patch16', patch_size=4, img_size=32)
    trained = [p.numel() for p in model.parameters() if p.requires_grad]
    # float32 weights and two AdamW moments, and each tensor's float32 step count: nothing else
    assert row['host_bytes'] == 12 * sum(trained) + 4 * len(trained)
    assert row['step_ms'] > 0 and row['check_ms'] > 0 and row['snapshot_ms'] > 0 and 0 < row['overhead'] < 1
    sizes = {r['model']: r for r in result['sizes']}
    assert round(sizes['mae_vit_base_patch16']['trained_parameters_m'], 1) == 111.7
    assert '--on_nonfinite rollback, batch 2' in capsys.readouterr().out


def test_the_save_check_refuses_nan_weights_but_not_huge_finite_ones(tiny_mae):
    """The fused norm overflows past 1e19; a weight of 1e30 is garbage but finite, and saved like any other."""
    checkpointer = Checkpointer(SimpleNamespace(output_dir=''), tiny_mae, None, None, None, ResumeState(), 0, {})
    with torch.no_grad():
        tiny_mae.blocks[0].mlp.fc1.weight.fill_(1e30)
    checkpointer.check_weights(0, 0)
    with torch.no_grad():
        tiny_mae.blocks[0].mlp.fc1.weight[0, 0] = float('nan')
    with pytest.raises(NonFiniteLossError, match='Weights are NaN or infinite after epoch 0 '):
        checkpointer.check_weights(0, 0)


def test_a_skipped_step_maps_onto_the_same_images_at_another_division_of_the_epoch():
    """Recorded at 16 images per iteration (iteration 5 of epoch 1: images 80 to 96 of its order), resumed at 8 per
    iteration with --accum_iter 2 (the same effective batch): iterations 10 and 11, the same optimizer step."""
    record = {'epoch': 1, 'iteration': 5, 'iterations': [5, 5], 'images': [80, 96]}
    args = SimpleNamespace(on_nonfinite='stop', snapshot_every=None, max_rollbacks=None, accum_iter=2, output_dir='')
    checkpointer = SimpleNamespace(extra_state={})
    for batch_size, expected in ((8, {10, 11}), (16, {5}), (4, {20, 21, 22, 23})):
        loader = SimpleNamespace(batch_size=batch_size)
        rollbacks = Rollbacks(args, checkpointer, loader, ResumeState(epoch=1, extra={'rollbacks': [record]}))
        assert rollbacks.skipped_in(1) == expected and rollbacks.skipped_in(0) == frozenset()
    assert checkpointer.extra_state['rollbacks'] == [record]


def test_the_rollback_numbers_belong_to_rollback_and_are_refused_without_it(texture_data, tmp_path, capsys):
    code, out, errors = run_in_process(main_pretrain, ['--data_path', texture_data, '--output_dir', tmp_path / 'o',
                                                       '--snapshot_every', '50', *TINY_PRETRAIN_ARGS], capsys)
    assert code == 2 and errors == ['error: --snapshot_every 50: belongs to --on_nonfinite rollback; add it, or '
                                    'drop --snapshot_every']
    assert not (tmp_path / 'o').exists()


def test_a_snapshot_restores_weights_optimizer_moments_scaler_and_rng_exactly(tiny_mae):
    """Taken before the first step (AdamW has no state yet) and again after two: each restore gives back the
    state of its moment bit for bit, and the first one leaves AdamW without state, as it was."""
    class CpuRuntime:
        pin_memory_supported = False

        def get_rng_state(self):
            return None

    model = tiny_mae
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler('cpu')
    snapshot = Snapshot(model, optimizer, LossScaler(scaler), CpuRuntime())

    def step():
        loss = model(torch.randn(2, 3, 32, 32), mask_ratio=0.75)[0]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update(scaler.get_scale() / 2)  # a scale the restore must take back
        optimizer.zero_grad()

    def state():
        return ({k: v.clone() for k, v in model.state_dict().items()},
                [{k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
                 for p in model.parameters() if p in optimizer.state],
                torch.get_rng_state(), scaler.get_scale())

    snapshot.take(Position(0, 0, {}, 0, 0.0))
    before = state()
    step()
    snapshot.restore()
    assert not optimizer.state and all(torch.equal(before[0][k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), before[2])
    step()
    step()
    snapshot.take(Position(0, 2, {}, 0, 0.0))
    middle = state()
    step()
    snapshot.restore()
    after = state()
    assert all(torch.equal(middle[0][k], after[0][k]) for k in middle[0])
    assert len(middle[1]) == len(after[1]) > 0
    for kept, restored in zip(middle[1], after[1]):
        assert kept.keys() == restored.keys() and all(torch.equal(kept[k], restored[k]) for k in kept)
    assert torch.equal(middle[2], after[2]) and middle[3] == after[3] == 65536.0 / 4
