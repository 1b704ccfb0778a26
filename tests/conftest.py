"""Shared fixtures: tiny models and small generated images, so the suite runs on a 2-core CPU."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import models_mae  # noqa: E402
import models_vit  # noqa: E402
from util.synthetic import CLASSES, make_image_folder  # noqa: E402

# 32-px images cut into 4-px patches: an 8x8 grid of 64 patches
TINY = dict(img_size=32, patch_size=4)
TINY_MAE = dict(TINY, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=1,
                decoder_num_heads=4)
TINY_VIT = dict(TINY, embed_dim=64, depth=2, num_heads=4)


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


# command-line flags for tiny runs of the scripts on 32-px images
TINY_PRETRAIN_ARGS = ['--model', 'mae_vit_tiny_patch16', '--input_size', '32', '--patch_size', '4',
                      '--num_workers', '0', '--batch_size', '16', '--print_freq', '4']
TINY_CLASSIFIER_ARGS = ['--model', 'vit_tiny_patch16', '--input_size', '32', '--patch_size', '4',
                        '--num_workers', '0', '--batch_size', '16', '--print_freq', '4', '--nb_classes', '4']


@pytest.fixture(scope='session')
def texture_data(tmp_path_factory):
    """4 texture classes in their own colour families, 32 px: 32 train and 16 val images per class."""
    root = tmp_path_factory.mktemp('textures')
    return make_image_folder(str(root), {'train': 32, 'val': 16}, size=32, classes=CLASSES[:4],
                             class_colours=True)


def free_port() -> int:
    """A TCP port nobody listens on now, for a test's torch.distributed rendezvous."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_script(script, *args, timeout=600, env=None, check=False):
    """Run one of the repository's scripts as a user would; returns the CompletedProcess (text output)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED='1', **(env or {}))
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'SLURM_PROCID', 'SLURM_NTASKS'):
        if not env or name not in env:
            full_env.pop(name, None)
    command = [sys.executable, *([script] if script != '-m' else ['-m']), *map(str, args)]
    proc = subprocess.run(command, cwd=ROOT, env=full_env, text=True,
                          capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'{script} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return proc


def read_json_log(output_dir):
    with open(os.path.join(output_dir, 'log.txt')) as f:
        return [json.loads(line) for line in f]
