"""The training plan, checked once the data and the process count are known (before any work): every epoch
takes an optimizer step and the schedule decays; and what rerunning a command on its --output_dir does: continue,
say there is nothing left to do, or refuse a run whose recipe changed."""
import math
import os
from dataclasses import asdict
from typing import Callable, List, Optional

from util.checkpointer import first_epoch, resumed_iteration
from util.output_dir import holds_training_state
from util import flags as cli
from util.checks import UsageError
from util.distributed import print0
from util.lr_sched import effective_batch, effective_lr


def check_training_plan(num_images: int, root: str, args, world_size: int, resumable=None):
    """Before any work, with the data and the process count known: refuse (UsageError) a run whose epochs would
    take no optimizer step, or whose learning rate would rise where the schedule should decay, and a resumed run
    whose training set changed (unless --allow_recipe_change)."""
    check_steps_per_epoch(num_images, root, args, world_size)
    check_schedule(args, world_size)
    if holds_training_state(resumable):
        check_same_data(resumable, num_images, root, args)


def check_same_data(resumable, num_images: int, root: str, args):
    """The training set of a resumed run must have the size it had (a new image reshuffles every epoch, and the
    rest of a stopped epoch would see some images twice and others never); --allow_recipe_change continues with
    the new set, from the same position of the new epoch order, and says so."""
    saved = resumable.checkpoint.get('train_images')
    if saved is None or saved == num_images:
        return
    change = f'{root} holds {num_images:,} images, the run had {saved:,}'
    if not args.allow_recipe_change:
        raise UsageError(f'{resumable.path} is a run on other data: {change}; continue it with these anyway with '
                         '--allow_recipe_change, or choose another --output_dir')
    print0(f'Note: continuing {resumable.path} on other data (--allow_recipe_change): {change}')


def check_schedule(args, world_size: int):
    lr = effective_lr(args, world_size)
    source = ('--lr' if args.lr is not None
              else f'blr {args.blr:g} x effective batch {effective_batch(args, world_size)} / 256')
    if args.min_lr > lr:
        raise UsageError(f'--min_lr {args.min_lr:g}: above the peak learning rate {lr:.3g} ({source}), so the cosine '
                         f'"decay" would raise it; lower --min_lr or raise the learning rate')
    if args.warmup_epochs >= args.epochs:
        print0(f'Note: --warmup_epochs {args.warmup_epochs} >= --epochs {args.epochs}: the learning rate rises for '
               f'the whole run and never reaches {lr:.3g}')


def check_steps_per_epoch(num_images: int, root: str, args, world_size: int):
    """Refuse (UsageError) a run whose epochs would take no optimizer step: the train loader drops the last
    partial batch of each process, and one step takes --accum_iter iterations."""
    per_process = -(-num_images // world_size)
    iterations = per_process // args.batch_size
    processes = f'{world_size} process{"es" if world_size > 1 else ""}'
    if iterations == 0:
        share = f'the {num_images} images' if world_size == 1 else \
            f'the {num_images} images ({per_process} per process, {processes})'
        raise UsageError(f'--batch_size {args.batch_size}: {share} in {root} make no full batch, so an epoch would '
                         f'take no optimizer step; use --batch_size {per_process} or less')
    if iterations < args.accum_iter:
        raise UsageError(f'--accum_iter {args.accum_iter}: an epoch has {iterations} iteration'
                         f'{"s" if iterations > 1 else ""} of {args.batch_size} images per process ({num_images} '
                         f'images in {root}, {processes}) and one optimizer step takes {args.accum_iter}; use '
                         f'--accum_iter {iterations} or less, or a smaller --batch_size')


def check_rerun(resumable, args, world_size: int, resolve: Optional[Callable] = None) -> bool:
    """What rerunning a training command does with the checkpoint it found (before any work): a run that continues
    is refused (UsageError) when the resume cannot take this command on (check_resumable_here) or its recipe
    changed (unless --allow_recipe_change; `resolve`, see recipe_changes, fills in values the flags leave to the
    script); an empty schedule (--start_epoch >= --epochs) is refused. Returns True, after one line saying so, when
    the run being resumed already finished --epochs (rerunning a finished job is not an error)."""
    if holds_training_state(resumable):
        check_resumable_here(resumable, args, world_size)
        check_same_recipe(resumable, args, world_size, resolve)
    first = first_epoch(resumable, args.start_epoch)
    if first < args.epochs:
        return False
    if not holds_training_state(resumable):
        raise UsageError(f'--start_epoch {args.start_epoch}: leaves no epoch to train with --epochs {args.epochs}')
    print0(f'Nothing to do: {resumable.path} holds the run after epoch {first - 1}, the last of --epochs '
           f'{args.epochs}; raise --epochs to train further, or pass another --output_dir for a new run')
    return True


def check_resumable_here(resumable, args, world_size: int):
    """What a resume cannot take on even with --allow_recipe_change, refused before any work: another seed (the run
    continues the random streams and the epoch order its checkpoint holds), an explicit --start_epoch (the run
    continues where it stopped), and a mid-epoch checkpoint whose images taken so far are not a whole number of
    this run's optimizer steps (resumed_iteration)."""
    checkpoint = resumable.checkpoint
    saved = checkpoint.get('args')
    if saved is not None and getattr(saved, 'seed', args.seed) != args.seed:
        raise UsageError(f'--seed {args.seed}: {resumable.path} is a run with --seed {saved.seed}, and a resumed run '
                         'continues its random streams and shuffled order, so another seed cannot take effect; '
                         'drop --seed, or start a new run in another --output_dir')
    if args.start_epoch:
        raise UsageError(f'--start_epoch {args.start_epoch}: {resumable.path} continues at epoch '
                         f'{first_epoch(resumable, 0)}, where it stopped; --start_epoch only sets where a run that '
                         'starts from weights alone begins: drop it')
    if checkpoint.get('epoch_in_progress'):
        resumed_iteration(checkpoint, resumable.path, args, world_size)


def recipe_changes(saved, args, saved_world_size: int, world_size: int, resolve: Optional[Callable] = None
                   ) -> List[str]:
    """'--blr 0.001 (now 0.008)', ... for each recipe flag (declared with recipe=True, util/flags.py) that differs
    from the run's saved args, and the effective batch and learning rate, which also follow from the process
    count. `resolve(args)` (a dataclass) gives the values a flag left unset resolves to (a classifier's sizes: the
    run's saved args hold them resolved when an older version of this code wrote them, or unset), which are
    compared instead."""
    changes = []
    saved_values, values = vars(saved), vars(args)
    if resolve is not None:
        saved_values, values = ({**vars(run), **asdict(resolve(run))} for run in (saved, args))
    for name in cli.RECIPE:
        if not hasattr(saved, name) or not hasattr(args, name):  # a flag the run's code did not have: unknown
            continue
        before, now = saved_values[name], values[name]
        if name == 'data_path' and before and now:
            before, now = os.path.realpath(before), os.path.realpath(now)
        if before != now:
            changes.append(f'--{name} {saved_values[name]} (now {values[name]})')
    eff_before, eff_now = effective_batch(saved, saved_world_size), effective_batch(args, world_size)
    if eff_before != eff_now:
        changes.append(f'effective batch {eff_before} (now {eff_now}: {args.batch_size} per process x '
                       f'{args.accum_iter} accumulated x {world_size} processes)')
    # checkpoints of the official code (and ours before) hold the lr they computed in args.lr
    lr_before, lr_now = effective_lr(saved, saved_world_size), effective_lr(args, world_size)
    if not math.isclose(lr_before, lr_now, rel_tol=1e-9):
        changes.append(f'lr {lr_before:.3g} (now {lr_now:.3g})')
    return changes


def check_same_recipe(resumable, args, world_size: int, resolve: Optional[Callable] = None):
    saved = resumable.checkpoint.get('args')
    if saved is None:
        return
    changes = recipe_changes(saved, args, resumable.checkpoint.get('world_size', 1), world_size, resolve)
    if changes and not args.allow_recipe_change:
        raise UsageError(f'{resumable.path} is a run with other settings: {"; ".join(changes)}; continue it with '
                         'these anyway with --allow_recipe_change, or choose another --output_dir')
    if changes:
        print0(f'Note: continuing {resumable.path} with changed settings (--allow_recipe_change): {"; ".join(changes)}')
    if getattr(saved, 'epochs', args.epochs) != args.epochs:
        print0(f'Note: --epochs {args.epochs} (the run was started with {saved.epochs}): the cosine schedule is '
               'stretched from here')
