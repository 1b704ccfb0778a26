"""A run's --output_dir: which files make it a run, which checkpoint a rerun continues from, and the tidying before
the first epoch (called from each script's main(): stale temporary files, log entries of epochs to redo, and the
previous run when starting over)."""
import glob
import os
import re
from typing import Optional

from util import distributed
from util.logs import DETAILS, truncate_log

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
