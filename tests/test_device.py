"""Backend selection with fake torch_npu / torch_sdaa plugins, clear errors, and no torch.cuda outside the layer."""
import contextlib
import os
import re
import sys
import types

import pytest
import torch
from conftest import ROOT

from util import device
from util.device import DeviceError, Runtime, resolve_device_type, setup_runtime


class FakeScaler:
    def __init__(self):
        self.created = True


def fake_backend_module(available=True, bf16=True):
    calls = []
    module = types.SimpleNamespace(
        is_available=lambda: available, is_bf16_supported=lambda: bf16,
        set_device=lambda i: calls.append(('set_device', i)),
        synchronize=lambda: calls.append(('synchronize',)),
        max_memory_allocated=lambda dev=None: 1234,
        reset_peak_memory_stats=lambda dev=None: calls.append(('reset',)),
        amp=types.SimpleNamespace(GradScaler=FakeScaler), calls=calls)
    return module


@pytest.fixture
def fake_plugin(monkeypatch):
    """Install a fake plugin: fake_plugin('npu') puts torch_npu in sys.modules and torch.npu on torch."""
    def install(device_type, available=True, bf16=True):
        module = fake_backend_module(available, bf16)
        monkeypatch.setitem(sys.modules, device.PLUGINS[device_type].module, types.ModuleType('fake'))
        monkeypatch.setattr(torch, device_type, module, raising=False)
        return module
    return install


def test_auto_picks_cpu_on_this_machine():
    assert resolve_device_type('auto') == 'cpu'
    runtime = setup_runtime('auto')
    assert runtime.device == torch.device('cpu') and runtime.amp == 'off' and runtime.dist_backend == 'gloo'


def test_missing_plugins_are_reported_not_raised_here():
    assert 'torch_npu is not installed (pip install torch-npu' in device.unavailable_reason('npu')
    assert 'torch_sdaa is not installed' in device.unavailable_reason('sdaa')


def test_asking_for_a_missing_plugin_gives_one_clear_line():
    with pytest.raises(DeviceError) as err:
        resolve_device_type('npu')
    assert str(err.value) == ('--device npu: torch_npu is not installed '
                              '(pip install torch-npu matching your torch and CANN versions)')
    assert '\n' not in str(err.value)


def test_a_plugin_that_fails_to_import_is_tolerated(monkeypatch):
    monkeypatch.setattr(device.importlib.util, 'find_spec', lambda name: object())

    def broken_import(name):
        raise OSError('libascendcl.so: cannot open shared object file')
    monkeypatch.setattr(device.importlib, 'import_module', broken_import)
    assert resolve_device_type('auto') == 'cpu'
    with pytest.raises(DeviceError, match='torch_npu is installed but cannot load: library libascendcl.so is '
                                          'missing; source the CANN environment'):
        resolve_device_type('npu')


def test_unknown_device_lists_the_choices():
    with pytest.raises(DeviceError, match='auto, cuda, npu, sdaa, mps, cpu'):
        resolve_device_type('tpu')


def test_npu_comes_first_then_sdaa_then_cuda(fake_plugin, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: True)
    monkeypatch.setattr(torch, 'cuda', fake_backend_module(), raising=False)
    assert resolve_device_type('auto') == 'cuda'
    fake_plugin('sdaa')
    assert resolve_device_type('auto') == 'sdaa'
    fake_plugin('npu')
    assert resolve_device_type('auto') == 'npu'


def test_auto_falls_back_to_mps_before_cpu(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: True)
    assert resolve_device_type('auto') == 'mps'
    assert device.default_amp('mps') == 'off'


def test_a_plugin_without_a_visible_card_is_not_picked(fake_plugin):
    fake_plugin('npu', available=False)
    assert resolve_device_type('auto') == 'cpu'
    with pytest.raises(DeviceError, match='no NPU device is visible .*ASCEND_RT_VISIBLE_DEVICES'):
        resolve_device_type('npu')


@pytest.mark.parametrize('device_type, backend', [('npu', 'hccl'), ('sdaa', 'tccl')])
def test_plugin_runtime_sets_device_backend_fp16_and_the_plugin_scaler(fake_plugin, device_type, backend):
    module = fake_plugin(device_type)
    runtime = setup_runtime(device_type, local_rank=3)
    assert runtime.device_str == f'{device_type}:3'
    assert module.calls[0] == ('set_device', 3)  # before any init_process_group
    assert runtime.dist_backend == backend and runtime.amp == 'fp16'
    assert isinstance(runtime.grad_scaler(), FakeScaler)
    assert runtime.max_memory_allocated() == 1234
    runtime.synchronize()
    assert ('synchronize',) in module.calls


def test_plugin_without_its_own_scaler_uses_the_generic_one(fake_plugin, monkeypatch):
    module = fake_plugin('npu')
    del module.amp
    made = []
    monkeypatch.setattr(torch.amp, 'GradScaler', lambda dev: made.append(dev) or 'generic')
    assert Runtime('npu', 0, 'fp16').grad_scaler() == 'generic' and made == ['npu']


@pytest.mark.parametrize('device_type', ['cuda', 'npu', 'sdaa', 'mps', 'cpu'])
def test_autocast_uses_the_generic_api_with_the_device_type(device_type, monkeypatch):
    seen = []
    monkeypatch.setattr(torch.amp, 'autocast',
                        lambda device_type, dtype: seen.append((device_type, dtype)) or contextlib.nullcontext())
    with Runtime(device_type, None, 'bf16').autocast():
        pass
    with Runtime(device_type, None, 'fp16').autocast():
        pass
    assert seen == [(device_type, torch.bfloat16), (device_type, torch.float16)]


def test_bf16_and_off_need_no_scaler_and_fp16_on_cpu_gets_a_real_one():
    assert Runtime('cpu', None, 'bf16').grad_scaler() is None
    assert Runtime('cpu', None, 'off').grad_scaler() is None
    assert isinstance(Runtime('cpu', None, 'fp16').grad_scaler(), torch.amp.GradScaler)


def test_default_amp_is_fp16_on_accelerators_and_off_on_cpu_and_mps():
    assert [device.default_amp(t) for t in ('cuda', 'npu', 'sdaa', 'mps', 'cpu')] == \
        ['fp16', 'fp16', 'fp16', 'off', 'off']


def test_bf16_on_a_card_without_it_is_refused(fake_plugin):
    fake_plugin('npu', bf16=False)
    with pytest.raises(DeviceError, match='--amp bf16: this NPU has no bfloat16 support'):
        setup_runtime('npu', 'bf16')


def test_bf16_autocast_runs_on_cpu():
    runtime = setup_runtime('cpu', 'bf16')
    with runtime.autocast():
        y = torch.nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16


def test_seed_everything_makes_torch_numpy_and_random_repeat():
    import random

    import numpy as np

    from util.rng import seed_everything
    seed_everything(7)
    first = (torch.rand(1).item(), np.random.rand(), random.random())
    seed_everything(7)
    assert (torch.rand(1).item(), np.random.rand(), random.random()) == first


def test_cpu_peak_memory_is_the_process_peak_resident_size():
    assert Runtime('cpu').max_memory_allocated() > 10 * 2 ** 20


def project_sources():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith('.') and d not in ('tests', '__pycache__')]
        for name in files:
            if name.endswith('.py'):
                yield os.path.join(folder, name)


def test_no_torch_cuda_call_outside_the_device_layer():
    offenders = []
    for path in project_sources():
        if os.path.relpath(path, ROOT) == os.path.join('util', 'device.py'):
            continue
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if re.search(r"torch\.cuda\b|device=['\"]cuda['\"]|\.cuda\(\)", line):
                    offenders.append(f'{os.path.relpath(path, ROOT)}:{lineno}: {line.strip()}')
    assert offenders == []
