"""Long runs that survive faults: kill -9 and SIGTERM mid-run, torn saves, bad images, NaN, malicious pickles."""
import hashlib
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import (
    ROOT,
    TINY_CLASSIFIER_ARGS,
    TINY_PRETRAIN_ARGS,
    kill_tree,
    read_json_log,
    run_script,
    start_process,
    subprocess_env,
    torchrun_command,
    wait_for_line,
)
from PIL import Image

from tools.synthetic import CLASSES, make_image_folder
from util.checkpoint_files import CheckpointError, load_checkpoint, save_atomic

# 3 epochs of 8 iterations, a checkpoint every 2 iterations: kills land mid-epoch or at epoch ends
RESUMABLE_RUN = ['--epochs', '3', '--save_every_iters', '2', '--blr', '1.6e-2', '--warmup_epochs', '1',
                 '--seed', '3', *TINY_PRETRAIN_ARGS]


def pretrain_cmd(data, out, *extra):
    return [sys.executable, 'main_pretrain.py', '--data_path', str(data), '--output_dir', str(out), *RESUMABLE_RUN,
            *extra]


def final_weights(out):
    return load_checkpoint(str(out / 'checkpoint-last.pth'))['model']


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, f'max abs difference {worst}'


def assert_same_epoch_averages(out, reference):
    """log.txt of the resumed run: each epoch's loss and lr averaged over all its iterations, as uninterrupted."""
    ours, theirs = read_json_log(out), read_json_log(reference)
    assert [e['epoch'] for e in ours] == [e['epoch'] for e in theirs]
    for a, b in zip(ours, theirs):
        assert a['train_loss'] == pytest.approx(b['train_loss'], rel=1e-5), a['epoch']
        assert a['train_lr'] == pytest.approx(b['train_lr'], rel=1e-9), a['epoch']


@pytest.fixture(scope='module')
def uninterrupted(texture_data, tmp_path_factory):
    out = tmp_path_factory.mktemp('uninterrupted')
    proc = subprocess.run(pretrain_cmd(texture_data, out), cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=subprocess_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize('kill_after', ['Epoch: [0]  [4/8]', 'Epoch: [1]  [8/8]'])
def test_kill_9_mid_epoch_then_relaunch_ends_with_the_uninterrupted_weights(texture_data, uninterrupted, tmp_path,
                                                                            kill_after):
    out = tmp_path / 'run'
    proc = start_process(pretrain_cmd(texture_data, out), tmp_path / 'first.log')
    wait_for_line(tmp_path / 'first.log', kill_after, proc)
    proc.kill()  # SIGKILL: no handler runs, whatever was being written is cut off
    proc.wait()
    relaunch = subprocess.run(pretrain_cmd(texture_data, out), cwd=ROOT, capture_output=True, text=True,
                              timeout=600, env=subprocess_env())
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert 'Continuing at epoch' in relaunch.stdout
    assert_same_weights(final_weights(out), final_weights(uninterrupted))
    assert_same_epoch_averages(out, uninterrupted)


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_exits_143_and_the_rerun_matches(texture_data, uninterrupted, tmp_path):
    out = tmp_path / 'run'
    proc = start_process(pretrain_cmd(texture_data, out), tmp_path / 'first.log')
    wait_for_line(tmp_path / 'first.log', 'Epoch: [1]  [4/8]', proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    log = open(tmp_path / 'first.log').read()
    assert 'stopped by SIGTERM; checkpoint saved to' in log and 'rerun the same command to continue' in log
    in_progress = load_checkpoint(str(out / 'checkpoint-last.pth'))['epoch_in_progress']
    assert in_progress['epoch'] == 1 and 0 < in_progress['iteration'] < 8
    relaunch = subprocess.run(pretrain_cmd(texture_data, out), cwd=ROOT, capture_output=True, text=True,
                              timeout=600, env=subprocess_env())
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert f"Continuing at epoch 1, iteration {in_progress['iteration']}" in relaunch.stdout
    assert_same_weights(final_weights(out), final_weights(uninterrupted))
    assert_same_epoch_averages(out, uninterrupted)


@pytest.mark.slow
def test_ctrl_c_saves_at_the_next_step_exits_130_in_one_line_and_the_rerun_matches(texture_data, uninterrupted,
                                                                                   tmp_path):
    """Ctrl-C as a terminal sends it: SIGINT to the whole process group, DataLoader workers included."""
    out = tmp_path / 'run'
    proc = start_process(pretrain_cmd(texture_data, out), tmp_path / 'first.log', own_group=True)
    wait_for_line(tmp_path / 'first.log', 'Epoch: [1]  [4/8]', proc)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 128 + signal.SIGINT
    log = open(tmp_path / 'first.log').read()
    assert 'Traceback' not in log and 'KeyboardInterrupt' not in log
    assert 'stopped by Ctrl-C (SIGINT); checkpoint saved to' in log and 'rerun the same command to continue' in log
    assert load_checkpoint(str(out / 'checkpoint-last.pth'))['epoch_in_progress']['epoch'] == 1
    relaunch = subprocess.run(pretrain_cmd(texture_data, out), cwd=ROOT, capture_output=True, text=True,
                              timeout=600, env=subprocess_env())
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert_same_weights(final_weights(out), final_weights(uninterrupted))
    assert_same_epoch_averages(out, uninterrupted)


@pytest.mark.slow
def test_ctrl_c_with_dataloader_workers_saves_and_the_rerun_continues(texture_data, tmp_path):
    """The workers get the terminal's SIGINT too: they must not die and end the epoch before the save."""
    command = pretrain_cmd(texture_data, tmp_path / 'run', '--num_workers', '2')
    proc = start_process(command, tmp_path / 'first.log', own_group=True)
    wait_for_line(tmp_path / 'first.log', 'Epoch: [0]  [4/8]', proc)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 128 + signal.SIGINT
    log = open(tmp_path / 'first.log').read()
    assert 'stopped by Ctrl-C (SIGINT)' in log and 'exited unexpectedly' not in log and 'Traceback' not in log
    relaunch = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert relaunch.returncode == 0 and 'Continuing at epoch 0, iteration' in relaunch.stdout


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_in_one_line(texture_data, tmp_path):
    proc = start_process(pretrain_cmd(texture_data, tmp_path / 'run'), tmp_path / 'first.log', own_group=True)
    wait_for_line(tmp_path / 'first.log', 'Epoch: [0]  [4/8]', proc)
    os.killpg(proc.pid, signal.SIGINT)
    wait_for_line(tmp_path / 'first.log', 'Ctrl-C: stopping at the next optimizer step', proc)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 128 + signal.SIGINT
    log = open(tmp_path / 'first.log').read()
    assert 'Traceback' not in log
    assert 'Interrupted again (Ctrl-C): stopped at once' in log or 'stopped by Ctrl-C (SIGINT)' in log  # may win


@pytest.mark.slow
def test_torchrun_relaunch_after_kill_has_no_lost_or_repeated_epoch(texture_data, tmp_path):
    out = tmp_path / 'ddp'

    def torchrun():
        return torchrun_command('main_pretrain.py', '--data_path', texture_data, '--output_dir', out, '--epochs', '8',
                                *TINY_PRETRAIN_ARGS)
    proc = start_process(torchrun(), tmp_path / 'first.log')
    wait_for_line(tmp_path / 'first.log', 'Epoch: [1]  [4/4]', proc)
    kill_tree(proc)  # the launcher and both workers, SIGKILL: nothing is cleaned up
    relaunch = start_process(torchrun(), tmp_path / 'second.log')
    assert relaunch.wait(timeout=600) == 0, open(tmp_path / 'second.log').read()[-3000:]
    assert 'Continuing at epoch' in open(tmp_path / 'second.log').read()
    assert [e['epoch'] for e in read_json_log(out)] == list(range(8))


# --- atomic saving ------------------------------------------------------------------------------------------

class ExplodesWhilePickled:
    def __reduce__(self):
        raise KeyboardInterrupt('simulated crash in the middle of torch.save')


def test_an_interrupted_save_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / 'checkpoint-last.pth'
    save_atomic({'model': {'w': torch.ones(3)}, 'epoch': 4}, str(path))
    before = path.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        save_atomic({'model': {'w': torch.zeros(1000)}, 'late': ExplodesWhilePickled()}, str(path))
    assert path.read_bytes() == before and load_checkpoint(str(path))['epoch'] == 4
    assert os.listdir(tmp_path) == ['checkpoint-last.pth']  # no temporary file left behind


SAVE_LOOP = '''
import sys, torch
sys.path.insert(0, {root!r})
from util.checkpoint_files import save_atomic
big = torch.randn(8_000_000)
i = 0
print('saving', flush=True)
while True:
    save_atomic({{'model': {{'w': big}}, 'epoch': i}}, {path!r})
    i += 1
'''


@pytest.mark.slow
def test_kill_9_during_repeated_saves_always_leaves_a_loadable_checkpoint(tmp_path):
    path = str(tmp_path / 'checkpoint-last.pth')
    save_atomic({'model': {'w': torch.zeros(8_000_000)}, 'epoch': -1}, path)  # the run's previous checkpoint
    torn_writes = 0
    for delay in (0.05, 0.13, 0.31, 0.47):
        proc = subprocess.Popen([sys.executable, '-c', SAVE_LOOP.format(root=ROOT, path=path)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == 'saving'
        time.sleep(delay)  # the loop spends nearly all its time inside a 32 MB write
        proc.kill()
        proc.wait()
        leftovers = [n for n in os.listdir(tmp_path) if n.startswith('.tmp-')]
        torn_writes += bool(leftovers)
        for name in leftovers:
            os.remove(tmp_path / name)
        checkpoint = load_checkpoint(path)  # the previous complete checkpoint, whatever the kill cut off
        assert checkpoint['model']['w'].numel() == 8_000_000 and checkpoint['epoch'] >= -1
    assert torn_writes >= 2, 'the kills should have landed inside writes'


@pytest.mark.slow
def test_stale_temporary_files_of_a_killed_save_are_removed_on_the_next_start(texture_data, tmp_path):
    out = tmp_path / 'run'
    out.mkdir()
    (out / '.tmp-checkpoint-last.pthab12cd').write_bytes(b'half a checkpoint')
    run_script('main_pretrain.py', '--data_path', texture_data, '--output_dir', out, '--epochs', '1',
               *TINY_PRETRAIN_ARGS, check=True)
    assert not any(name.startswith('.tmp-') for name in os.listdir(out))


# --- keep_last --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_keep_last_bounds_the_numbered_checkpoints(texture_data, tmp_path):
    out = tmp_path / 'run'
    run_script('main_pretrain.py', '--data_path', texture_data, '--output_dir', out, '--epochs', '3',
               '--save_freq', '1', '--keep_last', '2', *TINY_PRETRAIN_ARGS, check=True)
    names = sorted(n for n in os.listdir(out) if n.endswith('.pth'))
    assert names == ['checkpoint-1.pth', 'checkpoint-2.pth', 'checkpoint-last.pth']


# --- bad images ---------------------------------------------------------------------------------------------

def dataset_with_bad_files(root):
    make_image_folder(str(root), {'train': 16}, size=32, classes=CLASSES[:2], class_colours=True)
    good = root / 'train' / CLASSES[0] / '00000.jpg'
    (root / 'train' / CLASSES[0] / 'truncated.jpg').write_bytes(good.read_bytes()[:400])
    (root / 'train' / CLASSES[1] / 'empty.png').write_bytes(b'')
    return root


@pytest.mark.slow
def test_truncated_jpeg_and_zero_byte_png_are_replaced_logged_once_and_counted(tmp_path):
    data = dataset_with_bad_files(tmp_path / 'data')
    proc = run_script('main_pretrain.py', '--data_path', data, '--output_dir', tmp_path / 'out', '--epochs', '2',
                      '--max_bad_images', '0.1', *TINY_PRETRAIN_ARGS, check=True)
    for name in ('truncated.jpg', 'empty.png'):
        assert proc.stdout.count(f'{name} (') == 1, proc.stdout  # logged with its path, once
    assert [e['train_bad_images'] for e in read_json_log(tmp_path / 'out')] == [2, 2]


@pytest.mark.slow
def test_too_many_bad_images_stop_the_run_with_the_list_of_files(tmp_path):
    data = dataset_with_bad_files(tmp_path / 'data')
    proc = run_script('main_pretrain.py', '--data_path', data, '--output_dir', tmp_path / 'out', '--epochs', '2',
                      '--max_bad_images', '1', *TINY_PRETRAIN_ARGS)
    assert proc.returncode == 2
    assert 'error: 2 unreadable images, more than --max_bad_images allows (1)' in proc.stderr
    listing = (tmp_path / 'out' / 'bad_images.txt').read_text()
    assert 'truncated.jpg' in listing and 'empty.png' in listing


def test_bad_images_are_replaced_by_the_next_readable_sample_with_its_label(tmp_path):
    from util.datasets import ImageFolderDataset
    data = dataset_with_bad_files(tmp_path / 'data')
    dataset = ImageFolderDataset(str(data / 'train'))
    bad_index = [i for i, (p, _) in enumerate(dataset.samples) if p.endswith('empty.png')][0]
    img, target = dataset[bad_index]
    assert isinstance(img, Image.Image) and dataset.samples[(bad_index + 1) % len(dataset)][1] == target
    dataset.bad_images.collect()
    assert [os.path.basename(p) for p in dataset.bad_images.files] == ['empty.png']


def png_with_a_truncated_gamma_chunk() -> bytes:
    """A PNG Pillow rejects with ValueError rather than OSError (a malformed chunk, common in scraped data)."""
    import io
    import struct
    import zlib
    buffer = io.BytesIO()
    Image.new('RGB', (8, 8)).save(buffer, 'PNG')
    png = buffer.getvalue()
    chunk = b'gAMA\x00\x01'  # 2 bytes where the format says 4
    return png[:33] + struct.pack('>I', 2) + chunk + struct.pack('>I', zlib.crc32(chunk)) + png[33:]


def test_a_png_with_a_malformed_chunk_is_replaced_like_any_unreadable_image(tmp_path):
    from util.datasets import ImageFolderDataset
    folder = tmp_path / 'data' / CLASSES[0]
    folder.mkdir(parents=True)
    (folder / 'a_bad_gamma.png').write_bytes(png_with_a_truncated_gamma_chunk())
    Image.new('RGB', (8, 8)).save(folder / 'b_good.png')
    dataset = ImageFolderDataset(str(tmp_path / 'data'))
    assert dataset[0][0].size == (8, 8)
    dataset.bad_images.collect()
    assert [os.path.basename(p) for p in dataset.bad_images.files] == ['a_bad_gamma.png']


def test_report_files_of_killed_processes_are_swept_and_live_ones_kept(tmp_path, monkeypatch):
    import tempfile

    from util.bad_images import BadImageLog, report_file_prefix
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
    finished = subprocess.Popen([sys.executable, '-c', 'pass'])
    finished.wait()  # its pid is free now, as after a SIGKILL
    dead = tmp_path / f'{report_file_prefix()}{finished.pid}-x1y2.jsonl'
    live = tmp_path / f'{report_file_prefix()}{os.getpid()}-z3w4.jsonl'
    dead.touch()
    live.touch()
    log = BadImageLog()
    assert not dead.exists() and live.exists() and os.path.dirname(log._path) == str(tmp_path)


LOAD_EVERY_SAMPLE = """
import sys, torch
from util.datasets import ImageFolderDataset
for num_workers in (0, 2):
    dataset = ImageFolderDataset(sys.argv[1], transform=lambda img: torch.zeros(1))
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, num_workers=num_workers)
    print(num_workers, sum(len(y) for _, y in loader), len(dataset.bad_images.collect()))
"""


def test_hundreds_of_bad_images_in_one_epoch_do_not_block_the_loader(tmp_path):
    # ~100 KiB of reports: more than a pipe holds, so reports must not travel through one
    folder = tmp_path / 'data' / CLASSES[0]
    folder.mkdir(parents=True)
    for i in range(700):
        Image.new('RGB', (4, 4)).save(folder / f'{i:04d}_good.png')
        (folder / f'{i:04d}_unreadable_file_with_a_long_name_as_in_real_datasets.JPEG').write_bytes(b'junk')
    proc = subprocess.run([sys.executable, '-c', LOAD_EVERY_SAMPLE, str(tmp_path / 'data')], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    counts = [line for line in proc.stdout.splitlines() if not line.startswith('Image replaced by another sample')]
    assert counts == ['0 1400 700', '2 1400 700']  # every sample delivered, every bad file reported


# --- non-finite loss --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_non_finite_loss_names_epoch_iteration_and_leaves_the_last_checkpoint_untouched(texture_data, tmp_path):
    out = tmp_path / 'run'
    run_script('main_pretrain.py', '--data_path', texture_data, '--output_dir', out, '--epochs', '1',
               *TINY_PRETRAIN_ARGS, check=True)
    digest = hashlib.sha256((out / 'checkpoint-last.pth').read_bytes()).hexdigest()
    proc = run_script('main_pretrain.py', '--data_path', texture_data, '--output_dir', out, '--epochs', '3',
                      '--lr', '1e30', '--allow_recipe_change', *TINY_PRETRAIN_ARGS)
    assert proc.returncode == 1
    assert 'error: Loss is nan at epoch 1, iteration' in proc.stderr
    assert f'Last good checkpoint, left untouched: {out / "checkpoint-last.pth"} (end of epoch 0)' in proc.stderr
    assert hashlib.sha256((out / 'checkpoint-last.pth').read_bytes()).hexdigest() == digest


# --- untrusted checkpoints ----------------------------------------------------------------------------------

class RunsCodeOnLoad:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))


@pytest.mark.filterwarnings('ignore:Detected pickle protocol')
@pytest.mark.parametrize('writer', ['torch.save', 'pickle'])
def test_a_checkpoint_crafted_to_run_code_is_refused_and_runs_nothing(tmp_path, writer):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    payload = {'model': {'w': torch.zeros(1)}, 'args': RunsCodeOnLoad(marker)}
    if writer == 'torch.save':
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match='refused to load, it holds code or objects other than weights'):
        load_checkpoint(str(path))
    assert not marker.exists()


@pytest.mark.slow
def test_scripts_refuse_a_malicious_checkpoint_with_one_line(texture_data, tmp_path):
    marker = tmp_path / 'pwned'
    torch.save({'model': {}, 'x': RunsCodeOnLoad(marker)}, tmp_path / 'evil.pth')
    proc = run_script('main_finetune.py', '--eval', '--resume', tmp_path / 'evil.pth', '--data_path', texture_data,
                      *TINY_CLASSIFIER_ARGS)
    assert proc.returncode == 2 and not marker.exists()
    assert proc.stderr.strip().count('\n') == 0 and 'refused to load' in proc.stderr


def test_our_checkpoints_with_args_namespace_and_rng_states_load_weights_only(tmp_path):
    import argparse

    from util.device import Runtime
    from util.rng import rng_state, set_rng_state
    runtime = Runtime('cpu')
    state = rng_state(runtime)
    save_atomic({'model': {'w': torch.ones(2)}, 'args': argparse.Namespace(model='m', lr=0.1), 'rng': state},
                str(tmp_path / 'c.pth'))
    loaded = load_checkpoint(str(tmp_path / 'c.pth'))
    assert loaded['args'].model == 'm'
    expected = (torch.rand(3), np.random.rand())
    set_rng_state(loaded['rng'], runtime)
    assert torch.equal(torch.rand(3), expected[0]) and np.random.rand() == expected[1]


def test_a_checkpoint_url_is_downloaded_into_the_hub_cache_and_loaded_weights_only(tmp_path, monkeypatch):
    """--resume https://... goes through torch.hub's downloader; a file:// URL takes the same path offline."""
    source = tmp_path / 'mae_finetuned_vit_tiny.pth'
    torch.save({'model': {'w': torch.arange(3.0)}}, source)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'hub'))
    checkpoint = load_checkpoint(source.as_uri())
    assert torch.equal(checkpoint['model']['w'], torch.arange(3.0))
    assert len(list((tmp_path / 'hub' / 'hub' / 'checkpoints').glob(f'*/{source.name}'))) == 1  # cached


WEIGHTS = {'blocks.0.w': torch.ones(2), 'norm.b': torch.zeros(2)}


@pytest.mark.parametrize('checkpoint', [
    {'model': WEIGHTS, 'epoch': 3},                                     # official and ours
    {'state_dict': WEIGHTS},                                            # other trainers
    WEIGHTS,                                                            # a bare state dict
    {'state_dict': {f'module.{k}': v for k, v in WEIGHTS.items()}},     # saved from a DDP-wrapped model
], ids=['model', 'state_dict', 'bare', 'ddp_prefix'])
def test_weights_are_found_in_every_common_checkpoint_layout(checkpoint):
    from util.weights import model_state_from
    assert model_state_from(checkpoint, 'x.pth') == WEIGHTS


def test_two_urls_with_the_same_file_name_are_two_checkpoints(tmp_path, monkeypatch):
    """checkpoint-0.pth of two runs: each URL gets its own cached copy, and '-0.' is not read as a hash."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'hub'))
    for run, value in (('run_a', 1.0), ('run_b', 2.0)):
        (tmp_path / run).mkdir()
        torch.save({'model': {'w': torch.full((2,), value)}}, tmp_path / run / 'checkpoint-0.pth')
    for run, value in (('run_a', 1.0), ('run_b', 2.0), ('run_a', 1.0)):
        loaded = load_checkpoint((tmp_path / run / 'checkpoint-0.pth').as_uri())
        assert torch.equal(loaded['model']['w'], torch.full((2,), value))


def test_a_file_already_in_the_hub_cache_is_used_offline(tmp_path, monkeypatch):
    """An offline cluster with the released file put where torch.hub keeps it: no download is attempted."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'hub'))
    cached = tmp_path / 'hub' / 'hub' / 'checkpoints' / 'mae_pretrain_vit_tiny.pth'
    cached.parent.mkdir(parents=True)
    torch.save({'model': {'w': torch.ones(1)}}, cached)
    url = 'http://127.0.0.1:9/mae/pretrain/mae_pretrain_vit_tiny.pth'  # nothing listens there
    assert torch.equal(load_checkpoint(url)['model']['w'], torch.ones(1))


def test_dates_and_epoch_numbers_in_file_names_are_not_read_as_hashes():
    from util.checkpoint_files import named_hash_prefix
    assert named_hash_prefix('mae_vit_tiny-0123abcd.pth') == '0123abcd'
    assert named_hash_prefix('model-20231105.pth') is None and named_hash_prefix('checkpoint-79.pth') is None


def test_a_hub_style_hash_in_the_file_name_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'hub'))
    source = tmp_path / 'mae_vit_tiny-0123abcd.pth'  # claims a sha256 starting 0123abcd; it does not
    torch.save({'model': {'w': torch.zeros(1)}}, source)
    with pytest.raises(CheckpointError, match='download failed'):
        load_checkpoint(source.as_uri())
    assert not list((tmp_path / 'hub').rglob('*.pth'))  # nothing half-checked left in the cache


def test_a_malicious_checkpoint_behind_a_url_is_refused_too(tmp_path, monkeypatch):
    marker = tmp_path / 'pwned'
    evil = tmp_path / 'evil.pth'
    torch.save({'model': {}, 'x': RunsCodeOnLoad(marker)}, evil)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'hub'))
    with pytest.raises(CheckpointError, match='refused to load'):
        load_checkpoint(evil.as_uri())
    assert not marker.exists()
