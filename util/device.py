"""The one place that knows the accelerator backends: CUDA, Ascend NPU (torch_npu), Tecorigin SDAA (torch_sdaa),
Apple MPS and CPU. Everything else asks a `Runtime` for its device, autocast, gradient scaler, synchronisation,
peak memory and collective backend, so no `torch.cuda` call lives outside this file.
"""
import contextlib
import importlib
import importlib.util
import re
import resource
import sys
from dataclasses import dataclass
from typing import Optional

import torch

DEVICE_CHOICES = ('auto', 'cuda', 'npu', 'sdaa', 'mps', 'cpu')
AMP_CHOICES = ('fp16', 'bf16', 'off')
AUTO_ORDER = ('npu', 'sdaa', 'cuda', 'mps')  # plugins first: their CUDA shims can make torch.cuda answer for them


@dataclass(frozen=True)
class Plugin:
    """A vendor's torch extension: the module, how to install it, and what fixes an installed one that cannot
    load (the usual cause: the vendor's runtime libraries are not on the library path)."""
    module: str
    install: str
    fix: str


PLUGINS = {
    'npu': Plugin('torch_npu', 'pip install torch-npu matching your torch and CANN versions',
                  'source the CANN environment (e.g. source /usr/local/Ascend/ascend-toolkit/set_env.sh), or install '
                  'the torch-npu built for your CANN version'),
    'sdaa': Plugin('torch_sdaa', "install Tecorigin's torch_sdaa wheel matching your torch and SDAA driver versions",
                   "source the environment script of Tecorigin's SDAA toolkit, or install the torch_sdaa built for "
                   'your driver'),
}
MISSING_LIBRARY = re.compile(r'([\w.+-]+\.so[\w.]*): cannot open shared object file')
DIST_BACKENDS = {'cuda': 'nccl', 'npu': 'hccl', 'sdaa': 'tccl', 'mps': 'gloo', 'cpu': 'gloo'}
VISIBLE_DEVICES_VAR = {'cuda': 'CUDA_VISIBLE_DEVICES', 'npu': 'ASCEND_RT_VISIBLE_DEVICES',
                       'sdaa': 'SDAA_VISIBLE_DEVICES'}
AMP_DTYPES = {'fp16': torch.float16, 'bf16': torch.bfloat16}


_notes_given = set()


def note_once(text: str):
    if text not in _notes_given:
        _notes_given.add(text)
        print(text, file=sys.stderr, flush=True)


class DeviceError(RuntimeError):
    """A requested backend or precision is not usable here; the message is one line for the user."""


def load_plugin(device_type: str):
    """Import torch_npu / torch_sdaa if installed. Returns (module or None, reason it is unusable or '').

    torch would import registered plugins itself at `import torch`, and fail there for every device when one
    cannot load; util/__init__.py turns that off, so the plugin is imported here, only for its own device."""
    plugin = PLUGINS[device_type]
    if plugin.module in sys.modules:
        return sys.modules[plugin.module], ''
    if not plugin_installed(device_type):
        return None, f'{plugin.module} is not installed ({plugin.install})'
    try:
        return importlib.import_module(plugin.module), ''
    except Exception as e:  # a broken plugin (missing driver libraries, version skew) must not stop other work
        return None, load_failure(plugin, e)


def plugin_installed(device_type: str) -> bool:
    name = PLUGINS[device_type].module
    return name in sys.modules or importlib.util.find_spec(name) is not None


def load_failure(plugin: Plugin, error: Exception) -> str:
    """'torch_npu is installed but cannot load: library libhccl.so is missing; source the CANN ...'."""
    text = str(error).strip()
    missing = MISSING_LIBRARY.search(text)
    cause = (f'library {missing.group(1)} is missing' if missing
             else f'{type(error).__name__}: {text.splitlines()[0] if text else "no message"}')
    return f'{plugin.module} is installed but cannot load: {cause}; {plugin.fix}'


def unavailable_reason(device_type: str) -> str:
    """'' when `device_type` can be used in this process, else why not (one line)."""
    if device_type == 'cpu':
        return ''
    if device_type == 'mps':
        if torch.backends.mps.is_available():
            return ''
        return 'MPS is not available (it needs Apple silicon, macOS 12.3+ and an MPS-enabled torch build)'
    if device_type in PLUGINS:
        plugin, reason = load_plugin(device_type)
        if plugin is None:
            return reason
    module = getattr(torch, device_type, None)
    if module is not None and module.is_available():
        return ''
    return (f'no {device_type.upper()} device is visible (check the driver and '
            f'{VISIBLE_DEVICES_VAR[device_type]})')


def resolve_device_type(requested: str = 'auto') -> str:
    """'auto' -> npu, else sdaa, else cuda, else mps, else cpu. An explicit choice must be usable."""
    if requested not in DEVICE_CHOICES:
        raise DeviceError(f'--device {requested}: unknown device; choose from {", ".join(DEVICE_CHOICES)}')
    if requested == 'auto':
        for device_type in AUTO_ORDER:
            reason = unavailable_reason(device_type)
            if not reason:
                return device_type
            if device_type in PLUGINS and plugin_installed(device_type):  # installed, so presumably wanted
                note_once(f'Note: --device auto skipped {device_type}: {reason}')
        return 'cpu'

    reason = unavailable_reason(requested)
    if reason:
        raise DeviceError(f'--device {requested}: {reason}')
    return requested


def default_amp(device_type: str) -> str:
    """fp16 with a gradient scaler on accelerators (the official recipe), full precision on cpu and mps."""
    return 'fp16' if device_type in ('cuda', 'npu', 'sdaa') else 'off'


@dataclass
class Runtime:
    """The chosen backend for this process: device, precision and the backend-specific calls."""
    type: str
    index: Optional[int] = None
    amp: str = 'off'

    @property
    def device_str(self) -> str:
        return f'{self.type}:{self.index}' if self.index is not None else self.type

    @property
    def device(self) -> torch.device:
        return torch.device(self.device_str)

    @property
    def module(self):
        """torch.cuda / torch.npu / torch.sdaa / torch.mps, or None on cpu."""
        return getattr(torch, self.type, None) if self.type != 'cpu' else None

    @property
    def dist_backend(self) -> str:
        return DIST_BACKENDS[self.type]

    @property
    def amp_dtype(self) -> Optional[torch.dtype]:
        return AMP_DTYPES.get(self.amp)

    @property
    def sum_dtype(self) -> torch.dtype:
        """For sums kept on the device (evaluation totals): float64, except on MPS, which has none."""
        return torch.float32 if self.type == 'mps' else torch.float64

    @property
    def pin_memory_supported(self) -> bool:
        return self.type in ('cuda', 'npu', 'sdaa')

    def autocast(self):
        """Mixed-precision context for forward passes; a no-op when amp is off."""
        if self.amp == 'off':
            return contextlib.nullcontext()
        return torch.amp.autocast(device_type=self.type, dtype=self.amp_dtype)

    def grad_scaler(self):
        """A gradient scaler for fp16, else None (bf16 and fp32 need none). Plugins' own scalers come first:
        torch.amp.GradScaler('npu') is reported to fail in update() on some CANN versions."""
        if self.amp != 'fp16':
            return None
        plugin_amp = getattr(self.module, 'amp', None) if self.type in PLUGINS else None
        if plugin_amp is not None and hasattr(plugin_amp, 'GradScaler'):
            return plugin_amp.GradScaler()
        return torch.amp.GradScaler(self.type)

    def synchronize(self):
        if self.module is not None and hasattr(self.module, 'synchronize'):
            self.module.synchronize()

    def max_memory_allocated(self) -> int:
        """Peak bytes allocated on the device since the last reset (cpu: the process's peak resident memory;
        mps: memory currently held by the driver, MPS keeps no peak)."""
        if self.type == 'cpu':
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if self.type == 'mps':
            return self.module.driver_allocated_memory()
        return self.module.max_memory_allocated(self.index)

    def reset_peak_memory_stats(self):
        if self.type in ('cuda', 'npu', 'sdaa') and hasattr(self.module, 'reset_peak_memory_stats'):
            self.module.reset_peak_memory_stats(self.index)

    def get_rng_state(self) -> Optional[torch.Tensor]:
        """The device generator's state (masking noise is drawn there); None on cpu, which torch's covers."""
        if self.type == 'cpu' or not hasattr(self.module, 'get_rng_state'):
            return None
        return self.module.get_rng_state() if self.type == 'mps' else self.module.get_rng_state(self.index)

    def set_rng_state(self, state: torch.Tensor):
        if self.type == 'mps':
            self.module.set_rng_state(state)
        elif self.type != 'cpu' and hasattr(self.module, 'set_rng_state'):
            self.module.set_rng_state(state, self.index)

    def set_device(self):
        """Make `index` this process's current device; hccl and tccl require it before init_process_group."""
        if self.index is not None and self.type in ('cuda', 'npu', 'sdaa'):
            self.module.set_device(self.index)

    def describe(self) -> str:
        name = self.device_str
        if self.type in ('cuda', 'npu', 'sdaa') and hasattr(self.module, 'get_device_name'):
            name += f' ({self.module.get_device_name(self.index)})'
        return f'{name}, amp {self.amp}'


def check_amp_supported(device_type: str, amp: str):
    if amp == 'bf16' and device_type in ('cuda', 'npu', 'sdaa'):
        module = getattr(torch, device_type)
        if hasattr(module, 'is_bf16_supported') and not module.is_bf16_supported():
            raise DeviceError(f'--amp bf16: this {device_type.upper()} has no bfloat16 support '
                              '(e.g. Ascend 910A, pre-Ampere GPUs); use --amp fp16')


def setup_runtime(device: str = 'auto', amp: Optional[str] = None, local_rank: int = 0) -> Runtime:
    """Resolve --device and --amp, and make local_rank this process's current device."""
    device_type = resolve_device_type(device)
    amp = amp or default_amp(device_type)
    if amp not in AMP_CHOICES:
        raise DeviceError(f'--amp {amp}: choose from {", ".join(AMP_CHOICES)}')
    check_amp_supported(device_type, amp)
    index = local_rank if device_type in ('cuda', 'npu', 'sdaa') else None
    runtime = Runtime(device_type, index, amp)
    runtime.set_device()
    if device_type == 'cuda':
        torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick the fastest conv kernel
    return runtime
