"""Device plugins as they really are: the real torch-npu wheel (the Ascend plugin matching our torch), installed
where CANN is not. torch would load it at `import torch` and fail for every device; the scripts must run on the
CPU, answer --help, and say in one line what --device npu is missing. The wheel lives in its own folder
(.ci/torch-npu, installed there from the registry if missing), put on PYTHONPATH for these subprocesses only."""
import os
import subprocess
import sys

import pytest
from conftest import PHOTO, ROOT, TINY_PRETRAIN_ARGS, run_script

TARGET = os.path.join(ROOT, '.ci', 'torch-npu')
PIN = open(os.path.join(ROOT, '.ci', 'torch-npu.txt')).read().strip()
FIX = 'source the CANN environment (e.g. source /usr/local/Ascend/ascend-toolkit/set_env.sh)'


@pytest.fixture(scope='session')
def broken_npu():
    """env for a subprocess that sees the real torch_npu and no CANN libraries."""
    if not os.path.isdir(os.path.join(TARGET, 'torch_npu')):
        subprocess.run([sys.executable, '-m', 'pip', 'install', '--quiet', '--no-deps', '--target', TARGET, PIN],
                       check=True, timeout=900)
    return {'PYTHONPATH': os.pathsep.join([TARGET, os.environ.get('PYTHONPATH', '')]).rstrip(os.pathsep)}


def test_without_cann_the_real_wheel_breaks_a_plain_import_torch(broken_npu):
    """The situation the scripts must survive (if torch stops auto-loading plugins, this test says so)."""
    proc = run_script('-c', 'import torch', env={**broken_npu, 'TORCH_DEVICE_BACKEND_AUTOLOAD': '1'})
    assert proc.returncode != 0 and 'Failed to load the backend extension: torch_npu' in proc.stderr


def test_a_users_own_autoload_setting_is_kept():
    proc = run_script('-c', 'import util, os; print(os.environ["TORCH_DEVICE_BACKEND_AUTOLOAD"])',
                      env={'TORCH_DEVICE_BACKEND_AUTOLOAD': '1'})
    assert proc.stdout.strip() == '1'


@pytest.mark.slow
@pytest.mark.parametrize('script', ['main_pretrain.py', 'main_finetune.py', 'main_linprobe.py', 'main_infer.py',
                                    '-m tools.benchmark', '-m tools.compare_logs', '-m tools.gpu_check'])
def test_help_works_with_the_broken_plugin(broken_npu, script):
    proc = run_script(*script.split(), '--help', env=broken_npu)
    assert proc.returncode == 0 and proc.stdout.startswith('usage:'), proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize('command', [
    ['main_pretrain.py', '--data_path', '{data}', *TINY_PRETRAIN_ARGS],
    ['main_infer.py', '--model', 'vit_tiny_patch16', '--resume', '{weights}', '--img_path', PHOTO],
    ['-m', 'tools.benchmark', '--model', 'mae_vit_tiny_patch16', '--input_size', '32', '--patch_size', '4'],
], ids=['pretrain', 'infer', 'benchmark'])
def test_device_npu_is_one_line_naming_the_missing_library_and_the_fix(broken_npu, command, texture_data, tmp_path):
    import torch

    import models_vit
    torch.save({'model': models_vit.vit_tiny_patch16(img_size=32, patch_size=4).state_dict()}, tmp_path / 'w.pth')
    argv = [a.format(data=texture_data, weights=tmp_path / 'w.pth') for a in command]
    proc = run_script(*argv, '--device', 'npu', env=broken_npu)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith('error: --device npu: torch_npu is installed but cannot load: library libhccl.so is '
                               'missing; ' + FIX)


@pytest.mark.slow
def test_cpu_and_auto_runs_work_with_the_broken_plugin_and_auto_says_once_why_npu_was_skipped(broken_npu,
                                                                                               texture_data, tmp_path):
    auto = run_script('main_pretrain.py', '--data_path', texture_data, '--output_dir', tmp_path / 'auto', '--epochs',
                      '1', *TINY_PRETRAIN_ARGS, env=broken_npu, check=True)
    assert auto.stderr.count('Note: --device auto skipped npu: torch_npu is installed but cannot load: library '
                             'libhccl.so is missing') == 1
    assert 'device: cpu' in auto.stdout
    demo = run_script('main_pretrain.py', '--demo', '--epochs', '1', '--demo_images', '8', '--output_dir',
                      tmp_path / 'demo', '--data_path', tmp_path / 'demo' / 'data', env=broken_npu, check=True)
    assert 'Demo finished' in demo.stdout
    bench = run_script('-m', 'tools.benchmark', '--model', 'mae_vit_tiny_patch16', '--input_size', '32',
                       '--patch_size', '4', '--batch_size', '2', '--warmup', '0', '--steps', '1', '--windows', '1',
                       '--device', 'cpu', env=broken_npu, check=True)
    assert 'img/s' in bench.stdout and 'skipped npu' not in bench.stderr  # an explicit cpu says nothing of npu
