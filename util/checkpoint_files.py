"""Reading and writing checkpoint files: weights-only loading (a file can never run code) of torch.save files,
safetensors files and Hugging Face ViTMAE folders, checkpoint URLs cached once in the torch hub cache, and atomic
saving (a crash leaves the old file or the new one, never a torn one). The official format is
{'model', 'optimizer', 'epoch', 'scaler', 'args'}."""
import argparse
import hashlib
import os
import re
import tempfile
import urllib.parse
from typing import Optional

import safetensors.torch
import torch

from util import hf_layout
from util.distributed import print0


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message is one line for the user."""


SHARDED_CAUSE = ("it holds one process's shards of the weights (FSDP's DTensor / ShardedTensor), not the full "
                 'weights; save the full state dict instead (torch.distributed.checkpoint.state_dict.'
                 'get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))')
# The only non-tensor types our checkpoints and the released ones hold. Everything else is refused on load.
SAFE_GLOBALS = [argparse.Namespace]
# torch hub's naming convention for published files: name-<first hex digits of the file's sha256>.ext
HUB_HASH_NAME = re.compile(r'-([a-f0-9]{8,})\.')


def is_url(path: str) -> bool:
    return '://' in path


def load_checkpoint(path: str) -> dict:
    """A checkpoint as a dict with the weights under 'model' in our (the official) keys, read onto the CPU without
    running any code. `path` is a local path or a URL (downloaded once into the torch hub cache) of:
    - a file written by torch.save (ours, the official ones, a pytorch_model.bin), loaded weights-only;
    - a .safetensors file;
    - weights in the Hugging Face ViTMAE layout: a folder holding config.json and model.safetensors (or
      pytorch_model.bin), or one of those files with its config.json beside it (for a URL: at the same address),
      converted to our keys (util/hf_layout.py) with the config's settings: 'args' (norm_pix_loss, mask_ratio),
      'attention_heads' and 'hf_config'.
    A safetensors file in our layout with a timm config.json beside it (tools/export.py --to timm) also gives the
    class names as 'classes'. Raises CheckpointError, one line."""
    weights_path = local_weights(path)
    weights = read_weights(weights_path, path)
    if hf_layout.is_hf_layout(weights):
        return hf_checkpoint(weights, local_config(path, weights_path), path)
    if is_safetensors(weights_path):
        return {'model': weights, **timm_classes(os.path.join(os.path.dirname(weights_path), hf_layout.CONFIG_NAME))}
    return weights


def local_weights(path: str) -> str:
    """The local file holding the weights of `path`: itself, its downloaded copy, or a model folder's weights file."""
    if is_url(path):
        if '.' not in os.path.basename(urllib.parse.urlparse(path).path):
            raise CheckpointError(f'{path}: a URL of a folder cannot be read; pass the URL of its model.safetensors '
                                  '(its config.json is fetched from beside it), or download the folder')
        return download_checkpoint(path)
    if not os.path.isdir(path):
        return path
    if os.path.isfile(os.path.join(path, hf_layout.SHARDED_INDEX)):
        raise CheckpointError(f'{path}: weights sharded over several files ({hf_layout.SHARDED_INDEX}) are not '
                              'read; save them as one file (save_pretrained(..., max_shard_size="100GB"))')
    for name in hf_layout.WEIGHT_NAMES:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    raise CheckpointError(f'{path}: a folder without {" or ".join(hf_layout.WEIGHT_NAMES)}; pass a checkpoint file '
                          'or a Hugging Face model folder')


def read_weights(local: str, path: str) -> dict:
    """What a torch.save or safetensors file holds, weights only; `path` names it in errors."""
    if is_safetensors(local):
        try:
            return safetensors.torch.load_file(local, device='cpu')
        except Exception as e:  # a torn or malformed file: say which and why
            detail = str(e).strip().splitlines()[0] if str(e).strip() else 'file is truncated'
            raise CheckpointError(f'{path}: not a readable safetensors file ({type(e).__name__}: {detail})') from None
    check_looks_like_checkpoint(local)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            checkpoint = torch.load(local, map_location='cpu', weights_only=True)
    except Exception as e:  # any parse failure means the file is unusable; say which and why
        raise CheckpointError(explain_load_failure(path, e)) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f'{path}: expected a dict of weights, found {type(checkpoint).__name__}')
    return checkpoint


def local_config(path: str, weights_path: str) -> str:
    """The config.json saved with Hugging Face weights: beside the local file, or downloaded from beside the URL."""
    needs = f'{path}: weights in the Hugging Face ViTMAE layout need the config.json saved with them'
    if is_url(path):
        parts = urllib.parse.urlparse(path)
        folder = parts.path.rsplit('/', 1)[0]
        url = urllib.parse.urlunparse(parts._replace(path=f'{folder}/{hf_layout.CONFIG_NAME}', query=''))
        try:
            return download_checkpoint(url, shared_cache=False)
        except CheckpointError as e:
            raise CheckpointError(f'{needs}, and {str(e).replace(": download failed", " cannot be downloaded")}') \
                from None
    config = os.path.join(os.path.dirname(weights_path), hf_layout.CONFIG_NAME)
    if not os.path.isfile(config):
        raise CheckpointError(f'{needs}, and there is none beside the file')
    return config


def hf_checkpoint(weights: dict, config_path: str, path: str) -> dict:
    """ViTMAE weights and their config.json -> our checkpoint, or one line saying what has no equivalent here."""
    try:
        checkpoint = hf_layout.checkpoint_from_hf(weights, hf_layout.read_config(config_path))
    except hf_layout.ConversionError as e:
        raise CheckpointError(f'{path}: {e}') from None
    note = hf_layout.eps_note(checkpoint['hf_config'])
    if note:
        print0(f'Note: {path}: {note}')
    return checkpoint


def timm_classes(config_path: str) -> dict:
    """What a timm config.json (ours, from tools/export.py) adds to its weights: {'classes': [...]} from its label
    names, and 'args' with the image size, channels and normalisation of its pretrained_cfg (input_size [C, H, W],
    mean, std), as a checkpoint of ours keeps them; {} without one."""
    if not os.path.isfile(config_path):
        return {}
    try:
        config = hf_layout.read_config(config_path)
    except hf_layout.ConversionError:
        return {}  # the names are an extra; the weights stand on their own
    pretrained_cfg = config.get('pretrained_cfg') if isinstance(config.get('pretrained_cfg'), dict) else {}
    names = config.get('label_names') or pretrained_cfg.get('label_names')
    extras = {'classes': list(names)} if isinstance(names, list) else {}
    size, mean, std = (pretrained_cfg.get(k) for k in ('input_size', 'mean', 'std'))
    if isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) for v in size):
        args = argparse.Namespace(in_chans=size[0], input_size=size[1] if size[1] == size[2] else tuple(size[1:]))
        if isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == size[0]:
            args.mean, args.std = list(mean), list(std)
        extras['args'] = args
    return extras


def is_safetensors(path: str) -> bool:
    """A safetensors file starts with the length of its JSON header (8 bytes, little-endian), then the header."""
    if not os.path.isfile(path):
        return False
    with open(path, 'rb') as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b'{' and int.from_bytes(head[:8], 'little') < os.path.getsize(path)


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


def download_checkpoint(url: str, shared_cache: bool = True) -> str:
    """The local copy of `url`: the cached one, or one downloaded now (atomically, so an interrupted download
    is not mistaken for a checkpoint). With shared_cache, a file that torch.hub (or a person, on an offline cluster)
    put in the hub cache under the URL's file name is used as it is (not for config.json: too common a name)."""
    path = url_cache_path(url)
    if os.path.isfile(path):
        return path
    shared = os.path.join(torch.hub.get_dir(), 'checkpoints', url_file_name(url))
    if shared_cache and os.path.isfile(shared):
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
        raise CheckpointError(f'{path}: not a readable checkpoint (it is neither a file written by torch.save nor a '
                              f'safetensors file; it starts with {head!r})')


def explain_load_failure(path: str, error: Exception) -> str:
    text = str(error).strip()
    if 'DTensor' in text or 'ShardedTensor' in text:
        return f'{path}: {SHARDED_CAUSE}'
    if 'Weights only load failed' in text:
        unsafe = re.search(r'(unsupported GLOBAL [\w.]+|Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+)',
                           text)
        detail = unsafe.group(1) if unsafe else 'objects other than tensors'
        return (f'{path}: refused to load, it holds code or objects other than weights ({detail}); '
                'only a checkpoint of weights can be loaded safely')
    first_line = text.splitlines()[0].split('. ')[0] if text else 'file is truncated'
    return f'{path}: not a readable PyTorch checkpoint ({type(error).__name__}: {first_line})'


def current_umask() -> int:
    """The process' umask: from /proc/self/status where Linux shows it (since 4.7), else by setting it and back at
    once (which another thread creating a file in between would see)."""
    try:
        with open('/proc/self/status', encoding='ascii', errors='replace') as f:  # the process name may be any
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_atomic(obj, path: str):
    """Write to a temporary file in the same folder, fsync, then rename over `path`: a crash at any moment
    leaves either the old file or the new one, never a torn one. The file's mode is what open() would give it
    under the user's umask (0644 under 022)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix='.tmp-' + os.path.basename(path), dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would hide it from teammates: as open() makes it
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
