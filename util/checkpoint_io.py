"""Reading and writing checkpoint files: weights-only loading (a file can never run code), checkpoint URLs
cached once in the torch hub cache, and atomic saving (a crash leaves the old file or the new one, never a torn
one). The official format is {'model', 'optimizer', 'epoch', 'scaler', 'args'}."""
import argparse
import hashlib
import os
import re
import tempfile
import urllib.parse
from typing import Dict, Optional

import torch

from util.distributed import print0

# The only non-tensor types our checkpoints and the released ones hold. Everything else is refused on load.
SAFE_GLOBALS = [argparse.Namespace]
# torch hub's naming convention for published files: name-<first hex digits of the file's sha256>.ext
HUB_HASH_NAME = re.compile(r'-([a-f0-9]{8,})\.')


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message is one line for the user."""


def is_url(path: str) -> bool:
    return '://' in path


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint file or URL (downloaded once into the torch hub cache) onto the CPU, weights only."""
    local = download_checkpoint(path) if is_url(path) else path
    check_looks_like_checkpoint(local)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            checkpoint = torch.load(local, map_location='cpu', weights_only=True)
    except Exception as e:  # any parse failure means the file is unusable; say which and why
        raise CheckpointError(explain_load_failure(path, e)) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'{path}: expected a dict of weights, found {type(checkpoint).__name__}')
    return checkpoint


def model_state_from(checkpoint: dict, path: str) -> Dict[str, torch.Tensor]:
    """The weights of a checkpoint: under 'model' (official and ours), under 'state_dict' (other trainers) or
    the dict itself (a bare state dict); a 'module.' prefix left by saving a DDP-wrapped model is dropped."""
    state = next((checkpoint[k] for k in ('model', 'state_dict') if k in checkpoint), checkpoint)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: no model weights found (expected a state dict under 'model')")
    if all(k.startswith('module.') for k in state):
        state = {k[len('module.'):]: v for k, v in state.items()}
    return dict(state)


def url_cache_path(url: str) -> str:
    """Where `url` is cached: a folder per URL (its query string, e.g. a pre-signed token, left out) under the
    hub cache, so that two runs' checkpoint-best.pth never share a cached copy; the file keeps its name."""
    parts = urllib.parse.urlparse(url)
    url_key = hashlib.sha256(f'{parts.scheme}://{parts.netloc}{parts.path}'.encode()).hexdigest()[:16]
    return os.path.join(torch.hub.get_dir(), 'checkpoints', url_key, url_file_name(url))


def url_file_name(url: str) -> str:
    return os.path.basename(urllib.parse.urlparse(url).path) or 'checkpoint.pth'


def named_hash_prefix(name: str) -> Optional[str]:
    """The sha256 prefix a hub-style name carries; a date or an epoch number (all digits) is not one."""
    match = HUB_HASH_NAME.search(name)
    return match.group(1) if match and not match.group(1).isdigit() else None


def download_checkpoint(url: str) -> str:
    """The local copy of `url`: the cached one, or one downloaded now (atomically, so an interrupted download
    is not mistaken for a checkpoint). A file that torch.hub (or a person, on an offline cluster) put in the
    hub cache under the URL's file name is used as it is."""
    path = url_cache_path(url)
    if os.path.isfile(path):
        return path
    shared = os.path.join(torch.hub.get_dir(), 'checkpoints', url_file_name(url))
    if os.path.isfile(shared):
        print0(f'Using the cached {shared} for {url} (delete it to download again)')
        return shared
    os.makedirs(os.path.dirname(path), exist_ok=True)
    print0(f'Downloading {url} to {path}')
    try:
        torch.hub.download_url_to_file(url, path, hash_prefix=named_hash_prefix(os.path.basename(path)))
    except Exception as e:  # network, HTTP and hash errors alike: one line saying which
        detail = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f'{url}: download failed ({detail})') from None
    return path


def check_looks_like_checkpoint(path: str):
    """torch.save writes a zip archive (or, before torch 1.6, a pickle): anything else is not a checkpoint."""
    if not os.path.isfile(path):
        raise CheckpointError(f'{path}: no such file')
    with open(path, 'rb') as f:
        head = f.read(4)
    if not (head.startswith(b'PK\x03\x04') or head.startswith(b'\x80')):
        raise CheckpointError(f'{path}: not a readable PyTorch checkpoint (it is not a file written by torch.save; '
                              f'it starts with {head!r})')


def explain_load_failure(path: str, error: Exception) -> str:
    text = str(error).strip()
    if 'Weights only load failed' in text:
        unsafe = re.search(r'(unsupported GLOBAL [\w.]+|Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+)',
                           text)
        detail = unsafe.group(1) if unsafe else 'objects other than tensors'
        return (f'{path}: refused to load, it holds code or objects other than weights ({detail}); '
                'only a checkpoint of weights can be loaded safely')
    first_line = text.splitlines()[0].split('. ')[0] if text else 'file is truncated'
    return f'{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {first_line})'


def save_atomic(obj, path: str):
    """Write to a temporary file in the same folder, fsync, then rename over `path`: a crash at any moment
    leaves either the old file or the new one, never a torn one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.tmp-' + os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
