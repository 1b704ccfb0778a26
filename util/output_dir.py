"""A run's --output_dir and the checkpoint a run continues from: which files make a folder a run, the checkpoint
read up front (--resume, or the folder's own: auto-resume), and the tidying before the first epoch (called from
each script's main(): stale temporary files, log entries of epochs to redo, and the previous run when starting
over)."""
import glob
import os
import re
from dataclasses import dataclass
from typing import List, Optional

from util import distributed
from util.checkpoint_files import CheckpointError, load_checkpoint
from util.distributed import print0
from util.logs import DETAILS, truncate_log
from util.weights import check_heads_up_front

LAST = 'checkpoint-last.pth'
BEST = 'checkpoint-best.pth'


def checkpoint_epoch_name(path: str) -> Optional[int]:
    match = re.search(r'checkpoint-(\d+)\.pth$', path)
    return int(match.group(1)) if match else None


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


def prepare_output_dir(args, start_epoch: int, start_over: Optional[bool] = None):
    """Before the first epoch, called from main() on every rank: create output_dir on rank 0 and tidy it: remove
    temporary files of a save that was killed, drop log entries of epochs the run will redo, and when starting over
    (--no_auto_resume --overwrite, or `start_over`, the demo's decision) clear the previous run."""
    if start_over is None:
        start_over = not args.auto_resume and args.overwrite
    if args.output_dir and distributed.is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
        stale = glob.glob(os.path.join(glob.escape(args.output_dir), '.tmp-*'))
        if start_over:  # the previous run's files, TensorBoard's included
            for pattern in ('checkpoint-*.pth', 'events.out.tfevents.*'):
                stale += glob.glob(os.path.join(glob.escape(args.output_dir), pattern))
            stale += [os.path.join(args.output_dir, n) for n in ('log.txt', 'bad_images.txt', DETAILS)]
        for path in stale:
            if os.path.isfile(path):
                os.remove(path)
        truncate_log(args.output_dir, start_epoch)
    distributed.barrier()


@dataclass
class Resumable:
    """A checkpoint to continue from (or evaluate), read before any work so that a bad file stops the run first."""
    path: str
    checkpoint: dict
    auto: bool  # found in --output_dir (auto-resume), not given as --resume

    @property
    def classes(self) -> Optional[List[str]]:
        return self.checkpoint.get('classes')


def find_resumable(args, auto_resume: Optional[bool] = None) -> Optional[Resumable]:
    """--resume if given; else, with auto-resume (`auto_resume`, default --no_auto_resume's opposite), the output
    dir's checkpoint; loaded now (weights only)."""
    auto_resume = args.auto_resume if auto_resume is None else auto_resume
    if args.resume:
        resumable = Resumable(args.resume, load_checkpoint(args.resume), auto=False)
        check_heads_up_front(resumable.checkpoint, resumable.path, args.model)
        return resumable
    path = resumable_checkpoint_in(args.output_dir) if auto_resume and args.output_dir else ''
    if path:
        resumable = Resumable(path, load_checkpoint(path), auto=True)
        check_same_run(resumable, args.model)
        return resumable
    started_before = args.output_dir and (holds_a_run(args.output_dir)
                                          or os.path.isfile(os.path.join(args.output_dir, DETAILS)))
    if auto_resume and started_before:
        # killed before its first checkpoint (or even its first log line): no weights survive, so starting over
        # loses nothing
        print0(f'{args.output_dir} holds no checkpoint to continue from: starting from scratch (log.txt '
               'entries of epochs to redo are replaced, and TensorBoard hides what that run wrote)')
    return None


def check_same_run(resumable: Resumable, model_name: str):
    """Refuse to continue another model's run that happens to sit in the same output dir."""
    saved_model = getattr(resumable.checkpoint.get('args'), 'model', None)
    if saved_model and saved_model != model_name:
        raise CheckpointError(f'{resumable.path} is a run of --model {saved_model}, not {model_name}: choose '
                              'another --output_dir, or pass --no_auto_resume --overwrite to start over there')


def holds_training_state(resumable: Optional[Resumable]) -> bool:
    """A checkpoint to continue training from (ours, the official *_full.pth ones), not weights alone."""
    return resumable is not None and 'optimizer' in resumable.checkpoint and 'epoch' in resumable.checkpoint
