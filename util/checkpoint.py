"""Checkpoints in the official format ({'model', 'optimizer', 'epoch', 'scaler', 'args'}): safe loading
(weights only, never code), atomic saving, resume / auto-resume, and loading pretrained encoders for fine-tuning.
"""
import argparse
import glob
import hashlib
import io
import os
import random
import re
import tempfile
import urllib.parse
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn as nn

from util import distributed, preemption
from util.distributed import print0
from util.pos_embed import interpolate_pos_embed

# The only non-tensor types our checkpoints and the released ones hold. Everything else is refused on load.
SAFE_GLOBALS = [argparse.Namespace]
LAST = 'checkpoint-last.pth'
BEST = 'checkpoint-best.pth'


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


# torch hub's naming convention for published files: name-<first hex digits of the file's sha256>.ext
HUB_HASH_NAME = re.compile(r'-([a-f0-9]{8,})\.')


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


def model_state_from(checkpoint: dict, path: str) -> Dict[str, torch.Tensor]:
    """The weights of a checkpoint: under 'model' (official and ours), under 'state_dict' (other trainers) or
    the dict itself (a bare state dict); a 'module.' prefix left by saving a DDP-wrapped model is dropped."""
    state = next((checkpoint[k] for k in ('model', 'state_dict') if k in checkpoint), checkpoint)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: no model weights found (expected a state dict under 'model')")
    if all(k.startswith('module.') for k in state):
        state = {k[len('module.'):]: v for k, v in state.items()}
    return state


def describe_mismatch(model: nn.Module, state: Dict[str, torch.Tensor], limit: int = 6) -> str:
    """One line naming the missing, unexpected and wrongly-shaped keys of `state` for `model`."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f'{k} {tuple(state[k].shape)} vs {tuple(v.shape)}' for k, v in expected.items()
              if k in state and state[k].shape != v.shape]

    def show(keys):
        return ', '.join(keys[:limit]) + (f' (+{len(keys) - limit} more)' if len(keys) > limit else '')
    parts = []
    if missing:
        parts.append(f'missing {len(missing)}: {show(missing)}')
    if unexpected:
        parts.append(f'unexpected {len(unexpected)}: {show(unexpected)}')
    if shapes:
        parts.append(f'shape mismatch (checkpoint vs model) {len(shapes)}: {show(shapes)}')
    return '; '.join(parts)


def describe_architecture(state: Dict[str, torch.Tensor]) -> str:
    """'embed dim 384, 12 blocks, patch 16' read off a ViT / MAE state dict ('' if it is not one)."""
    kernel = state.get('patch_embed.proj.weight')
    if kernel is None or kernel.ndim != 4:
        return ''
    depth = len({k.split('.')[1] for k in state if k.startswith('blocks.')})
    return f'embed dim {kernel.shape[0]}, {depth} blocks, patch {kernel.shape[-1]}'


def load_state_strict(model: nn.Module, state: Dict[str, torch.Tensor], path: str, model_name: str = ''):
    """load_state_dict(strict=True), with a one-line error naming the mismatched keys instead of a traceback."""
    mismatch = describe_mismatch(model, state)
    if mismatch:
        theirs, ours = describe_architecture(state), describe_architecture(model.state_dict())
        hint = f' (checkpoint: {theirs}; model: {ours})' if theirs and ours and theirs != ours else ''
        raise CheckpointError(f'{path} does not fit --model {model_name or type(model).__name__}{hint}: '
                              f'{mismatch}')
    model.load_state_dict(state, strict=True)


# --- pretrained encoders for fine-tuning and linear probing --------------------------------------------------

def load_pretrained_encoder(model: nn.Module, path: str) -> List[str]:
    """Load an encoder-only or full MAE checkpoint (released or ours) into a ViT classifier for --finetune.

    Drops a head of another shape, interpolates the position embeddings to the model's grid, and checks that
    only the expected keys are missing (the head and, with global pooling, fc_norm). Returns the ignored keys.
    """
    state = dict(model_state_from(load_checkpoint(path), path))
    own = model.state_dict()
    for k in ('head.weight', 'head.bias'):
        if k in state and state[k].shape != own[k].shape:
            print0(f'Removing key {k} from pretrained checkpoint (shape {tuple(state[k].shape)} vs '
                   f'{tuple(own[k].shape)})')
            del state[k]
    fit_pos_embed(model, state, path)
    shapes = [k for k in own if k in state and state[k].shape != own[k].shape]
    if shapes:
        raise CheckpointError(f'{path} does not fit --model: shape mismatch {describe_mismatch(model, state)}')
    msg = model.load_state_dict(state, strict=False)
    allowed = {'head.weight', 'head.bias', 'fc_norm.weight', 'fc_norm.bias'}
    unexpected_missing = sorted(set(msg.missing_keys) - allowed)
    if unexpected_missing:
        raise CheckpointError(f'{path} is not a checkpoint of this encoder: missing {len(unexpected_missing)} '
                              f'keys ({", ".join(unexpected_missing[:6])}); check --model')
    print0(f'Loaded pre-trained checkpoint from {path}: missing {sorted(msg.missing_keys)} (initialised fresh), '
           f'ignored {len(msg.unexpected_keys)} keys not used by the classifier '
           f'({summarize_keys(msg.unexpected_keys)})')
    return list(msg.unexpected_keys)


def fit_pos_embed(model: nn.Module, state: Dict[str, torch.Tensor], path: str):
    """Interpolate state's position embeddings (in place) to the model's patch grid, or say in one line why not.
    For --finetune and --eval; resuming a training run keeps the strict check."""
    try:
        interpolate_pos_embed(model, state)
    except RuntimeError as e:
        raise CheckpointError(f'{path}: position embeddings cannot be resized ({e})') from None


def summarize_keys(keys: List[str]) -> str:
    """'decoder_blocks.* (96), norm.* (2)': key prefixes with counts, for short log lines."""
    counts: Dict[str, int] = {}
    for k in keys:
        prefix = k.split('.')[0]
        counts[prefix] = counts.get(prefix, 0) + 1
    return ', '.join(f'{p}{".*" if n > 1 or "." in p else ""} ({n})' for p, n in counts.items()) or 'none'


# --- saving -------------------------------------------------------------------------------------------------

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


def rng_state(runtime) -> dict:
    """This process's RNG states as tensors and lists, so the checkpoint loads with weights_only=True."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {'torch': torch.get_rng_state(), 'device': runtime.get_rng_state(),
            'numpy': [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                      int(np_state[3]), float(np_state[4])],
            'python': [py_state[0], list(py_state[1]), py_state[2]]}


def set_rng_state(state: dict, runtime):
    torch.set_rng_state(state['torch'])
    if state.get('device') is not None:
        runtime.set_rng_state(state['device'])
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state['python']
    random.setstate((version, tuple(internal), gauss_next))


def gather_rng_states(runtime) -> List[bytes]:
    """Every rank's RNG state, serialised, gathered on all ranks (a collective: call it on every rank)."""
    buffer = io.BytesIO()
    torch.save(rng_state(runtime), buffer)
    return distributed.all_gather_bytes(buffer.getvalue())


def checkpoint_epoch_name(path: str) -> Optional[int]:
    match = re.search(r'checkpoint-(\d+)\.pth$', path)
    return int(match.group(1)) if match else None


class Checkpointer:
    """Saves training state: numbered checkpoints, `checkpoint-last.pth` every epoch (and every
    --save_every_iters iterations), `--keep_last` pruning. Call save() on every rank; rank 0 writes."""

    def __init__(self, args, model_without_ddp: nn.Module, optimizer, loss_scaler, runtime,
                 iters_per_epoch: int):
        self.args = args
        self.model = model_without_ddp
        self.optimizer = optimizer
        self.loss_scaler = loss_scaler
        self.runtime = runtime
        self.iters_per_epoch = iters_per_epoch
        self.extra_state: Dict[str, object] = {}  # e.g. max_accuracy for fine-tuning
        self.last_saved: Optional[tuple] = None  # (path, epoch, next_iteration)
        resumed_from = getattr(args, 'resumed_from', '')
        if resumed_from:
            finished = args.start_iter == 0
            self.last_saved = (resumed_from, args.start_epoch - 1 if finished else args.start_epoch, args.start_iter)

    @property
    def last_path(self) -> str:
        return os.path.join(self.args.output_dir, LAST)

    def state(self, epoch: int, next_iteration: int, rng_states: List[bytes],
              partial_meters: Optional[list] = None) -> dict:
        # 'epoch' is the last finished epoch, as in the official format; a mid-epoch save says where to go on
        state = {'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(),
                 'epoch': epoch if next_iteration == 0 else epoch - 1,
                 'scaler': self.loss_scaler.state_dict(), 'args': self.args,
                 'rng_states': [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in rng_states],
                 'world_size': distributed.get_world_size()}
        if next_iteration:
            state['epoch_in_progress'] = {'epoch': epoch, 'iteration': next_iteration, 'meters': partial_meters or []}
        state.update(self.extra_state)
        return state

    def save(self, epoch: int, next_iteration: int = 0, numbered: bool = True, progress=None) -> Optional[str]:
        """Save after `next_iteration` iterations of `epoch` (0: the epoch is finished). Mid-epoch, `progress`
        (the EpochProgress) adds the epoch's running averages. Returns the path."""
        if not self.args.output_dir:
            return None
        rng_states = gather_rng_states(self.runtime)
        partial_meters = progress.partial_state() if progress is not None and next_iteration else None
        path = None
        if distributed.is_main_process():
            state = self.state(epoch, next_iteration, rng_states, partial_meters)
            if numbered and next_iteration == 0:
                path = os.path.join(self.args.output_dir, f'checkpoint-{epoch}.pth')
                save_atomic(state, path)
                self.prune()
            save_atomic(state, self.last_path)
            path = path or self.last_path
        distributed.barrier()
        self.last_saved = (self.last_path, epoch, next_iteration)
        return path

    def after_step(self, epoch: int, next_iteration: int, progress):
        """Called after each optimizer step with the epoch's EpochProgress: save every --save_every_iters
        iterations; on a stop signal save and raise TrainingInterrupted."""
        every = getattr(self.args, 'save_every_iters', 0)
        if progress.stop_agreed:
            self.save(epoch, next_iteration, numbered=False, progress=progress)
            raise preemption.TrainingInterrupted(preemption.received_signal(), self.last_path)
        if every and next_iteration % every == 0 and next_iteration < self.iters_per_epoch:
            self.save(epoch, next_iteration, numbered=False, progress=progress)

    def resume_progress(self, progress, epoch: int, start_iter: int):
        """Give a resumed partial epoch the running averages saved with it (once)."""
        saved = getattr(self.args, 'resumed_partial_epoch', None)
        if saved and start_iter and saved['epoch'] == epoch and saved['iteration'] == start_iter:
            if saved.get('meters'):
                progress.restore(saved['meters'])
            self.args.resumed_partial_epoch = None

    def describe_last_good(self) -> str:
        if self.last_saved is None:
            return 'No checkpoint was saved before it.'
        path, epoch, iteration = self.last_saved
        where = f'epoch {epoch}, iteration {iteration}' if iteration else f'end of epoch {epoch}'
        return f'Last good checkpoint, left untouched: {path} ({where}).'

    def save_best(self, epoch: int, metrics: dict):
        if self.args.output_dir and distributed.is_main_process():
            save_atomic({'model': self.model.state_dict(), 'epoch': epoch, 'args': self.args, **metrics},
                        os.path.join(self.args.output_dir, BEST))

    def prune(self):
        keep = getattr(self.args, 'keep_last', 0)
        if keep <= 0:
            return
        numbered = sorted((p for p in glob.glob(os.path.join(self.args.output_dir, 'checkpoint-*.pth'))
                           if checkpoint_epoch_name(p) is not None), key=checkpoint_epoch_name)
        for old in numbered[:-keep]:
            os.remove(old)


# --- resuming -----------------------------------------------------------------------------------------------

def find_resume_checkpoint(args) -> str:
    """--resume if given; else, with auto-resume, the output dir's checkpoint to continue from."""
    if args.resume:
        return args.resume
    if getattr(args, 'auto_resume', False) and args.output_dir:
        return resumable_checkpoint_in(args.output_dir)
    return ''


def holds_a_run(output_dir: str) -> bool:
    if not os.path.isdir(output_dir):
        return False
    names = os.listdir(output_dir)
    return any(n == 'log.txt' or (n.startswith('checkpoint-') and n.endswith('.pth')) for n in names)


def resumable_checkpoint_in(output_dir: str) -> str:
    """checkpoint-last.pth; failing that (the official layout, or a deleted last), the highest checkpoint-N.pth."""
    last = os.path.join(output_dir, LAST)
    if os.path.isfile(last):
        return last
    numbered = [p for p in glob.glob(os.path.join(glob.escape(output_dir), 'checkpoint-*.pth'))
                if checkpoint_epoch_name(p) is not None]
    return max(numbered, key=checkpoint_epoch_name) if numbered else ''


def check_same_run(checkpoint: dict, args, path: str):
    """Refuse to continue another model's run that happens to sit in the same output dir."""
    saved = checkpoint.get('args')
    saved_model = getattr(saved, 'model', None)
    if saved_model and saved_model != args.model:
        raise CheckpointError(f'{path} is a run of --model {saved_model}, not {args.model}: choose another '
                              '--output_dir, or pass --no_auto_resume --overwrite to start over there')


def resume_training(args, model_without_ddp: nn.Module, optimizer, loss_scaler, runtime) -> dict:
    """Restore model, optimizer, scaler, epoch, iteration and RNG states. Sets args.start_epoch and
    args.start_iter. Returns the checkpoint (for extra state such as max_accuracy), or {} if none."""
    path = find_resume_checkpoint(args)
    args.start_iter = 0
    args.resumed_from = ''
    args.resumed_partial_epoch = None
    if not path:
        if getattr(args, 'auto_resume', False) and args.output_dir and holds_a_run(args.output_dir):
            # killed before its first checkpoint: no weights survive, so starting over loses nothing
            print0(f'{args.output_dir} holds no checkpoint to continue from: starting from scratch (log.txt '
                   'entries of epochs to redo are replaced)')
        return {}
    checkpoint = load_checkpoint(path)
    auto_resumed = path != args.resume
    if auto_resumed:
        check_same_run(checkpoint, args, path)
    state = dict(model_state_from(checkpoint, path))
    if getattr(args, 'eval', False):  # evaluating at another --input_size, e.g. a 224-px model at 384
        fit_pos_embed(model_without_ddp, state, path)
    try:
        load_state_strict(model_without_ddp, state, path, args.model)
    except CheckpointError as e:
        if not auto_resumed:
            raise
        raise CheckpointError(f'{e}; it was found in --output_dir {args.output_dir} (auto-resume): use another '
                              '--output_dir for a different run') from None
    print0(f'Resume checkpoint {path}')
    if getattr(args, 'eval', False) or 'optimizer' not in checkpoint or 'epoch' not in checkpoint:
        return checkpoint
    try:
        optimizer.load_state_dict(checkpoint['optimizer'])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f'{path}: optimizer state does not fit this run ({e})') from None
    loss_scaler.load_state_dict(checkpoint.get('scaler') or {})
    in_progress = checkpoint.get('epoch_in_progress')
    if in_progress:
        args.start_epoch, args.start_iter = in_progress['epoch'], in_progress['iteration']
        args.resumed_partial_epoch = in_progress
    else:
        args.start_epoch = checkpoint['epoch'] + 1
    restore_rng(checkpoint, runtime)
    args.resumed_from = path
    print0(f'With optim & sched! Continuing at epoch {args.start_epoch}'
           + (f', iteration {args.start_iter}' if args.start_iter else ''))
    return checkpoint


def restore_rng(checkpoint: dict, runtime):
    states = checkpoint.get('rng_states')
    if not states:
        return
    if checkpoint.get('world_size', 1) != distributed.get_world_size():
        print0('World size changed since the checkpoint: RNG streams start afresh (training continues exactly '
               'otherwise)')
        return
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        state = torch.load(io.BytesIO(states[distributed.get_rank()].numpy().tobytes()), weights_only=True)
    set_rng_state(state, runtime)
