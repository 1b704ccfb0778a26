"""Every stop signal a scheduler sends reaches a save: sent to the whole process group (DataLoader workers
included), during training, during an epoch's evaluation and during the k-NN monitor; the rerun continues as if
uninterrupted. Evaluation-only runs stop in one line. (torchrun: tests/test_resume.py.)"""
import os
import signal

import pytest
from conftest import TINY_CLASSIFIER_ARGS, TINY_PRETRAIN_ARGS, read_json_log, run_script, start_process, wait_for_line

from tools.synthetic import CLASSES, make_image_folder
from util import preemption
from util.checkpoint_files import load_checkpoint


@pytest.fixture(scope='module')
def long_val(tmp_path_factory):
    """4 classes of 8 training and 32 validation images: an evaluation long enough to be interrupted."""
    return make_image_folder(str(tmp_path_factory.mktemp('long_val')), {'train': 8, 'val': 32}, size=32,
                             classes=CLASSES[:4], class_colours=True)


def stop_when(command: list, line: str, sig: int, log) -> str:
    """Run `command` in a process group of its own, send `sig` to the whole group once `line` is printed; returns
    the output after asserting the exit code 128 + sig."""
    proc = start_process(command, log, own_group=True)
    wait_for_line(log, line, proc)
    os.killpg(proc.pid, sig)
    code = proc.wait(timeout=120)
    output = open(log).read()
    assert code == 128 + sig, output[-3000:]
    assert 'killed by signal' not in output and 'Traceback' not in output, output[-3000:]
    return output


def same_weights(a, b) -> bool:
    a, b = (load_checkpoint(str(p / 'checkpoint-last.pth'))['model'] for p in (a, b))
    return a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def without_times(entries: list) -> list:
    return [{k: v for k, v in e.items() if not any(w in k for w in ('time', 'per_sec', 'wait', 'mem'))}
            for e in entries]


@pytest.mark.slow
@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2], ids=lambda s: s.name)
def test_a_stop_signal_to_the_process_group_with_workers_saves_and_the_rerun_continues(sig, texture_data,
                                                                                        tmp_path):
    """The issue's instance: SIGTERM to the group with --num_workers 2 killed the workers first, and the run failed
    with 'DataLoader worker ... killed by signal: Terminated', exit 1, no checkpoint."""
    command = ['python', 'main_pretrain.py', '--data_path', texture_data, '--output_dir', tmp_path / 'run',
               '--epochs', '2', *TINY_PRETRAIN_ARGS, '--num_workers', '2']
    output = stop_when(command, 'Epoch: [0]  [4/8]', sig, tmp_path / 'first.log')
    assert f'stopped by {sig.name}; checkpoint saved to' in output
    assert load_checkpoint(str(tmp_path / 'run' / 'checkpoint-last.pth'))['epoch_in_progress']['epoch'] == 0
    if sig != signal.SIGTERM:
        return  # the rerun is the same for every signal
    relaunch = run_script(*command[1:])
    assert relaunch.returncode == 0 and 'Continuing at epoch 0, iteration' in relaunch.stdout, relaunch.stderr


@pytest.mark.slow
def test_a_stop_during_an_epochs_evaluation_saves_it_trained_and_the_rerun_ends_as_uninterrupted(long_val,
                                                                                                tmp_path):
    flags = ['--data_path', long_val, *TINY_CLASSIFIER_ARGS, '--batch_size', '4', '--print_freq', '2',
             '--epochs', '2', '--num_workers', '2']
    reference = run_script('main_finetune.py', *flags, '--output_dir', tmp_path / 'reference')
    assert reference.returncode == 0, reference.stderr[-2000:]
    command = ['python', 'main_finetune.py', *flags, '--output_dir', tmp_path / 'run']
    output = stop_when(command, 'Test:  [2/32]', signal.SIGTERM, tmp_path / 'first.log')
    assert 'stopped by SIGTERM; checkpoint saved to' in output and 'Test:  [32/32]' not in output
    checkpoint = load_checkpoint(str(tmp_path / 'run' / 'checkpoint-last.pth'))
    assert checkpoint['epoch'] == 0 and checkpoint['evaluation_pending']['epoch'] == 0
    relaunch = run_script(*command[1:])
    assert relaunch.returncode == 0, relaunch.stderr[-2000:]
    assert 'Continuing at epoch 0 with its evaluation (its training was done)' in relaunch.stdout
    assert same_weights(tmp_path / 'run', tmp_path / 'reference')
    assert without_times(read_json_log(tmp_path / 'run')) == without_times(read_json_log(tmp_path / 'reference'))
    # TensorBoard keeps epoch 0's training steps: the rerun starts writing at epoch 1 (it purged them from step 0)
    assert tensorboard_steps(tmp_path / 'run', 'loss') == tensorboard_steps(tmp_path / 'reference', 'loss')


def tensorboard_steps(folder, tag: str) -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    return sorted(event.step for event in EventAccumulator(str(folder)).Reload().Scalars(tag))


@pytest.mark.slow
def test_a_stop_during_the_knn_monitor_saves_and_the_rerun_logs_each_epoch_once_as_uninterrupted(long_val,
                                                                                                  tmp_path):
    flags = ['--data_path', long_val, *TINY_PRETRAIN_ARGS, '--batch_size', '4', '--print_freq', '2', '--epochs', '2',
             '--knn_data_path', long_val, '--knn_every', '1', '--knn_train_per_class', '0', '--knn_val_per_class',
             '0', '--num_workers', '2']
    reference = run_script('main_pretrain.py', *flags, '--output_dir', tmp_path / 'reference')
    assert reference.returncode == 0, reference.stderr[-2000:]
    command = ['python', 'main_pretrain.py', *flags, '--output_dir', tmp_path / 'run']
    output = stop_when(command, f'k-NN features of {long_val}/val: [2/', signal.SIGTERM, tmp_path / 'first.log')
    assert 'stopped by SIGTERM; checkpoint saved to' in output and 'k-NN monitor, epoch 0' not in output
    relaunch = run_script(*command[1:])
    assert relaunch.returncode == 0, relaunch.stderr[-2000:]
    assert same_weights(tmp_path / 'run', tmp_path / 'reference')
    assert without_times(read_json_log(tmp_path / 'run')) == without_times(read_json_log(tmp_path / 'reference'))


@pytest.mark.slow
def test_an_evaluation_only_run_stops_in_one_line(long_val, tmp_path):
    trained = run_script('main_finetune.py', '--data_path', long_val, *TINY_CLASSIFIER_ARGS, '--epochs', '1',
                         '--output_dir', tmp_path / 'trained')
    assert trained.returncode == 0, trained.stderr[-2000:]
    command = ['python', 'main_finetune.py', '--eval', '--resume', tmp_path / 'trained' / 'checkpoint-last.pth',
               '--data_path', long_val, '--model', 'vit_tiny_patch16', '--batch_size', '4', '--print_freq', '2',
               '--num_workers', '2']
    output = stop_when(command, 'Test:  [2/32]', signal.SIGTERM, tmp_path / 'eval.log')
    assert 'stopped by SIGTERM during evaluation; nothing was saved' in output and '* Acc@1' not in output


def test_torchrun_names_the_stop_signals_it_would_die_of_instead_of_passing_them_on(capsys):
    default = {'TORCHELASTIC_SIGNALS_TO_HANDLE': 'SIGTERM,SIGINT,SIGHUP,SIGQUIT', 'SLURM_JOB_ID': '7'}
    assert preemption.signals_torchrun_drops(default) == ['SIGUSR1', 'SIGUSR2']
    forwarded = {'TORCHELASTIC_SIGNALS_TO_HANDLE': 'SIGTERM, SIGINT,SIGUSR1,SIGUSR2'}
    assert preemption.signals_torchrun_drops(forwarded) == []
    assert preemption.signals_torchrun_drops({}) == []  # not under torchrun: each signal reaches this process
    preemption.note_dropped_signals(default)
    assert '--signals-to-handle=SIGTERM,SIGINT,SIGUSR1,SIGUSR2' in capsys.readouterr().out
    preemption.note_dropped_signals({'TORCHELASTIC_SIGNALS_TO_HANDLE': 'SIGTERM'})  # no SLURM job: no note
    assert capsys.readouterr().out == ''
