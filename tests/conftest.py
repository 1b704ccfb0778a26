"""Shared fixtures and helpers: tiny models, small generated images, and the scripts run as users run them
(subprocesses, torchrun), so the suite runs on a 2-core CPU."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from PIL import Image

# as the user's shell has it: importing util below sets it for this process, and subprocesses must show that
# every script sets it itself
USER_AUTOLOAD = os.environ.get('TORCH_DEVICE_BACKEND_AUTOLOAD')

import torch  # noqa: E402

# Under pytest-xdist (the README runs `-n auto`, one worker per core) each worker and the scripts it starts use one
# thread: torch's default of one thread per core in every worker oversubscribes the cores, and its spinning threads
# then slow every run several-fold. torchrun sets the same for its workers.
if os.environ.get('PYTEST_XDIST_WORKER'):
    os.environ.setdefault('OMP_NUM_THREADS', '1')
    torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import models_mae  # noqa: E402
import models_vit  # noqa: E402
from tools.synthetic import CLASSES, make_image_folder  # noqa: E402

PHOTO = os.path.join(ROOT, 'tests', 'data', 'circuit_board.jpg')

# 32-px images cut into 4-px patches: an 8x8 grid of 64 patches
TINY = dict(img_size=32, patch_size=4)
TINY_MAE = dict(TINY, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=1,
                decoder_num_heads=4)
TINY_VIT = dict(TINY, embed_dim=64, depth=2, num_heads=4)

# command-line flags for tiny runs of the scripts on 32-px images
TINY_PRETRAIN_ARGS = ['--model', 'mae_vit_tiny_patch16', '--input_size', '32', '--patch_size', '4',
                      '--num_workers', '0', '--batch_size', '16', '--print_freq', '4']
TINY_CLASSIFIER_ARGS = ['--model', 'vit_tiny_patch16', '--input_size', '32', '--patch_size', '4',
                        '--num_workers', '0', '--batch_size', '16', '--print_freq', '4', '--nb_classes', '4']
# the flags of an --eval of a tiny 4-class classifier
EVAL_FLAGS = ['--model', 'vit_tiny_patch16', '--input_size', '32', '--patch_size', '4', '--num_workers', '0',
              '--batch_size', '16', '--nb_classes', '4']
# variables of a launcher that a test's own subprocess must not inherit
LAUNCHER_VARIABLES = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT',
                      'SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_LOCALID', 'OMPI_COMM_WORLD_RANK')


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu run where CUDA is; elsewhere they are deselected, and the summary says so in one line
    (MAE_GPU_TESTS_DEVICE=cpu runs them on the CPU, to check test_gpu.py itself)."""
    if torch.cuda.is_available() or os.environ.get('MAE_GPU_TESTS_DEVICE', 'cuda') != 'cuda':
        return
    gpu = [item for item in items if item.get_closest_marker('gpu')]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker('gpu')]
        config._gpu_deselected = len(gpu)
        if hasattr(config, 'workeroutput'):  # an xdist worker: the controller, which prints the summary, is told
            config.workeroutput['gpu_deselected'] = len(gpu)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    """xdist's controller collects nothing itself: each worker says how many gpu tests it deselected (-n auto hid
    the line)."""
    count = getattr(node, 'workeroutput', {}).get('gpu_deselected', 0)
    node.config._gpu_deselected = max(getattr(node.config, '_gpu_deselected', 0), count)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    deselected = getattr(config, '_gpu_deselected', 0)
    if deselected:
        terminalreporter.write_line(f'{deselected} gpu tests deselected: no CUDA device here (on a GPU machine they '
                                    'run; python -m tools.gpu_check runs them with the benchmarks)')


@pytest.fixture
def tiny_mae():
    torch.manual_seed(0)
    return models_mae.mae_vit_tiny_patch16(**TINY_MAE)


@pytest.fixture
def tiny_vit():
    torch.manual_seed(0)
    return models_vit.vit_tiny_patch16(num_classes=10, **TINY_VIT)


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 32, 32, generator=g)


@pytest.fixture(scope='session')
def texture_data(tmp_path_factory):
    """4 texture classes in their own colour families, 32 px: 32 train and 16 val images per class."""
    root = tmp_path_factory.mktemp('textures')
    return make_image_folder(str(root), {'train': 32, 'val': 16}, size=32, classes=CLASSES[:4],
                             class_colours=True)


# --- running the scripts -----------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port nobody listens on now, for a test's torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def subprocess_env(extra: dict = None) -> dict:
    """This environment without any launcher's variables (pytest itself may run under one), with the user's own
    TORCH_DEVICE_BACKEND_AUTOLOAD (if any), unbuffered; `extra` on top."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env.pop('TORCH_DEVICE_BACKEND_AUTOLOAD', None)
    if USER_AUTOLOAD is not None:
        env['TORCH_DEVICE_BACKEND_AUTOLOAD'] = USER_AUTOLOAD
    return dict(env, PYTHONUNBUFFERED='1', **(extra or {}))


def script_command(script, *args) -> list:
    """[python, script, args...]; script '-m' runs the first argument as a module."""
    return [sys.executable, *([script] if script != '-m' else ['-m']), *map(str, args)]


def torchrun_command(script, *args, nproc: int = 2) -> list:
    return script_command('-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', f'--master_port={free_port()}',
                          script, *args)


def run_script(script, *args, timeout=600, env=None, check=False):
    """Run one of the repository's scripts as a user would; returns the CompletedProcess (text output)."""
    proc = subprocess.run(script_command(script, *args), cwd=ROOT, env=subprocess_env(env), text=True,
                          capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'{script} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return proc


def run_torchrun(script, *args, nproc: int = 2, timeout=600, env=None, check=False):
    """Run a script under torchrun with `nproc` processes (gloo on the CPU); `env` adds variables."""
    proc = subprocess.run(torchrun_command(script, *args, nproc=nproc), cwd=ROOT, env=subprocess_env(env), text=True,
                          capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'torchrun {script} exited {proc.returncode}:\n{proc.stderr[-3000:]}')
    return proc


def start_process(command: list, log_path, own_group: bool = False, env=None) -> subprocess.Popen:
    """Start a command in the background, stdout and stderr into log_path (for kill and signal tests). With
    own_group it leads a process group of its own, so a signal can go to it and its workers, as a terminal's
    Ctrl-C does, without reaching the test."""
    log = open(log_path, 'w')
    return subprocess.Popen([str(c) for c in command], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env=subprocess_env(env), start_new_session=own_group)


def wait_for_line(log_path, text, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(log_path) and text in open(log_path).read():
            return
        if proc.poll() is not None:
            raise AssertionError(f'process ended before printing {text!r}:\n{open(log_path).read()[-3000:]}')
        time.sleep(0.05)
    raise AssertionError(f'timed out waiting for {text!r}')


def descendants(pid: int) -> list:
    """The pids of every process below `pid` (read from /proc), children first."""
    parents = {}
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    parents[int(entry)] = int(f.read().rsplit(')', 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def kill_tree(proc: subprocess.Popen):
    """SIGKILL a process and everything it started (torchrun's workers run in sessions of their own)."""
    for pid in [proc.pid, *descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def run_in_process(module, argv, capsys):
    """Run a training script's main() in this process as its command line would: (exit code, stdout, stderr
    lines). For failures that happen before any work (a successful run would train here)."""
    from util import flags as cli
    from util.launch import run_main
    with pytest.raises(SystemExit) as exit_info:
        run_main(module.main, cli.parse_with(module.get_args_parser(), [str(a) for a in argv]))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err.strip().splitlines()


def read_json_log(output_dir):
    with open(os.path.join(output_dir, 'log.txt')) as f:
        return [json.loads(line) for line in f]


COLOURS = {'a': (0, 200, 0), 'b': (230, 20, 20), 'c': (200, 200, 0), 'd': (20, 20, 230)}


def colour_folder(root, split_counts: dict):
    """root/<split>/<class>/<i>.png, each class one flat colour (COLOURS)."""
    for split, classes in split_counts.items():
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.new('RGB', (32, 32), COLOURS[name]).save(folder / f'{i}.png')
    return root


def colour_classifier(outputs=('a', 'b', 'c', 'd')) -> models_vit.VisionTransformer:
    """A tiny global-pool ViT that is right on the 'b' (red) and 'd' (blue) images by construction: each token
    carries the patch's mean colour, the blocks are identities, the head reads red for b and blue for d."""
    torch.manual_seed(0)
    model = models_vit.vit_tiny_patch16(num_classes=len(outputs), img_size=32, patch_size=4)
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}  # zero blocks: identities
    for channel in range(3):
        state['patch_embed.proj.weight'][channel, channel] = 1 / 16  # token dim c = mean of channel c
    state['fc_norm.weight'] = torch.ones_like(state['fc_norm.weight'])
    state['head.weight'][outputs.index('b'), 0] = 1.0  # red
    state['head.weight'][outputs.index('d'), 2] = 1.0  # blue
    model.load_state_dict(state)
    return model.eval()


def save_classifier(path, model, classes=None, **extra):
    checkpoint = {'model': model.state_dict(), **extra}
    if classes is not None:
        checkpoint['classes'] = list(classes)
    torch.save(checkpoint, path)
    return path


def accuracy_line(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if '* Acc@1' in line)
