"""A training run's checkpoints and where it resumes from. `checkpoint-last.pth` after every epoch (and every
--save_every_iters iterations), numbered checkpoints in the official format, `checkpoint-best.pth` for
classifiers; resuming restores model, optimizer, scaler, epoch, iteration and every rank's RNG streams, and
returns the position as a ResumeState that the caller passes on. Finding, loading and writing a run's
checkpoints share one file naming and one state layout, so they are kept together."""
import argparse
import contextlib
import glob
import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from util import distributed, preemption, shards
from util import fsdp as util_fsdp
from util.bad_images import BadImageBudgetError
from util.checkpoint_files import CheckpointError, save_atomic
from util.distributed import print0
from util.output_dir import BEST, LAST, Resumable, checkpoint_epoch_name, holds_training_state
from util.progress import NonFiniteLossError, any_non_finite, local_part
from util.rng import gather_rng_states, restore_rng_states
from util.weights import load_weights

TRAINING_ONLY = ('rollbacks', 'trackers')  # extra state of the run's checkpoints, not of checkpoint-best


@dataclass
class ResumeState:
    """Where a run starts: the first epoch, the first iteration within it (a mid-epoch checkpoint), the checkpoint
    it came from ('' for a fresh start), that partial epoch's running sums per rank, extra state such as
    max_accuracy, and for a run stopped during an epoch's evaluation that epoch's training stats (its training is
    done; the evaluation is not)."""
    epoch: int = 0
    iteration: int = 0
    path: str = ''
    meters: Optional[list] = None
    extra: dict = field(default_factory=dict)
    trained_stats: Optional[dict] = None
    epoch_images: Optional[int] = None  # the images the stopped run's epoch took (its division), for the lr

    def epoch_images_in(self, epoch: int) -> Optional[int]:
        return self.epoch_images if epoch == self.epoch and self.iteration else None

    def training_done(self, epoch: int) -> Optional[dict]:
        """The stats of `epoch`'s training if it finished before the stop (evaluation pending), else None."""
        return self.trained_stats if epoch == self.epoch else None

    def iteration_in(self, epoch: int) -> int:
        """Iterations of `epoch` already done before the resume."""
        return self.iteration if epoch == self.epoch else 0

    def meters_in(self, epoch: int) -> Optional[list]:
        return self.meters if epoch == self.epoch and self.iteration else None


def first_epoch(resumable: Optional[Resumable], start_epoch: int) -> int:
    """The epoch a run would start at: after the checkpoint's last finished epoch, or --start_epoch."""
    if not holds_training_state(resumable):
        return start_epoch
    checkpoint = resumable.checkpoint
    in_progress = checkpoint.get('epoch_in_progress') or checkpoint.get('evaluation_pending')
    return in_progress['epoch'] if in_progress else checkpoint['epoch'] + 1


def resumed_iteration(checkpoint: dict, path: str, args, world_size: int) -> int:
    """The iteration a mid-epoch checkpoint continues at, in this run's division of the epoch (--batch_size per
    process x processes x --accum_iter): the images the stopped run took from the epoch's shuffled order, counted in
    this run's iterations. Whatever the division, optimizer step s takes the images at positions [s x E, (s + 1) x
    E) of the epoch's order (E the effective batch; ResumableSampler), so with the same E the steps are the same
    images and a changed E starts its steps where the stopped run left off. Raises CheckpointError when those
    images are not a whole number of this run's optimizer steps, and for shards and Parquet (each process reads
    a consecutive share of the order) when the processes or --batch_size changed."""
    in_progress, saved = checkpoint['epoch_in_progress'], checkpoint.get('args')
    if saved is None:
        return in_progress['iteration']
    saved_world_size = checkpoint.get('world_size', 1)
    if (saved_world_size, saved.batch_size) != (world_size, args.batch_size) and reads_shards(args):
        raise CheckpointError(
            f'{path} stopped epoch {in_progress["epoch"]} part-way through shards read by {saved_world_size} '
            f'process{"es" if saved_world_size > 1 else ""} x --batch_size {saved.batch_size}; each process reads its '
            f'own consecutive share of the epoch (its own shards), so the epoch continues only in that division '
            f'(this run: {world_size} x {args.batch_size}): finish the epoch with it, then change')
    images = in_progress['iteration'] * saved.batch_size * saved_world_size
    per_iteration, per_step = args.batch_size * world_size, args.batch_size * world_size * args.accum_iter
    if images % per_step:
        processes = f'{world_size} process{"es" if world_size > 1 else ""}'
        raise CheckpointError(
            f'{path} stopped epoch {in_progress["epoch"]} after {images:,} of its images; this run takes {per_step:,} '
            f'per optimizer step (--batch_size {args.batch_size} x {processes} x --accum_iter {args.accum_iter}), '
            f'which does not divide {images:,}, so the epoch cannot continue at a step boundary: finish it with an '
            f'effective batch that divides {images:,} (the run\'s own was '
            f'{saved.batch_size * saved_world_size * saved.accum_iter})')
    return images // per_iteration


def reads_shards(args) -> bool:
    """Whether the run's training split is WebDataset shards or Parquet (ResumableSampler: consecutive shares)."""
    data_path = getattr(args, 'data_path', None)
    return bool(data_path) and shards.layout_of_split(os.path.join(data_path, 'train'))[0] in ('wds', 'parquet')


def load_resumable(resumable: Resumable, model: nn.Module, model_name: str, fit_grid: bool = False):
    """The checkpoint's weights into `model` (util/weights.load_weights: strict; with fit_grid the position
    embeddings are first interpolated to the model's grid, evaluating a 224-px model at 384 px). A misfit found in
    --output_dir says so."""
    try:
        load_weights(model, resumable.checkpoint, resumable.path, model_name, fit_grid=fit_grid)
    except CheckpointError as e:
        if not resumable.auto:
            raise
        raise CheckpointError(f'{e}; it was found in --output_dir {os.path.dirname(resumable.path)} (auto-resume): '
                              'use another --output_dir for a different run') from None
    print0(f'Resume checkpoint {resumable.path}')


def with_this_runs_settings(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A saved optimizer state whose parameter groups carry this run's settings (each group's lr_scale from
    --layer_decay, weight_decay, betas, the AdamW kernel, ...) around the saved moments. torch's load_state_dict
    takes every group setting from the file, so a change a resume accepts (--allow_recipe_change, --adamw_impl)
    would be announced and then trained without. The groups correspond one to one (the same model and recipe
    build them in the same order); when their number differs the file is left as it is, and loading it names
    the mismatch."""
    if len(saved.get('param_groups', [])) != len(optimizer.param_groups):
        return saved
    groups = [{**{k: v for k, v in ours.items() if k != 'params'}, 'params': theirs['params']}
              for ours, theirs in zip(optimizer.param_groups, saved['param_groups'])]
    return {**saved, 'param_groups': groups}


def resume_training(resumable: Optional[Resumable], model: nn.Module, optimizer, loss_scaler, runtime,
                    args) -> ResumeState:
    """Restore model, optimizer, scaler and RNG states; return where the run continues. A checkpoint with
    weights only (a released file, a safetensors file or a Hugging Face folder given as --resume) loads the weights
    and starts at --start_epoch, and says so."""
    if resumable is None:
        return ResumeState(epoch=args.start_epoch)
    checkpoint = resumable.checkpoint
    load_resumable(resumable, model, args.model)
    extra = {'max_accuracy': checkpoint.get('max_accuracy', 0.0)}
    if not holds_training_state(resumable):
        print0(f'{resumable.path} holds weights only (no optimizer state or epoch; only our .pth checkpoints hold '
               f'them): training starts from these weights at epoch {args.start_epoch} (--start_epoch)')
        return ResumeState(epoch=args.start_epoch, extra=extra)
    saved_optimizer = with_this_runs_settings(checkpoint['optimizer'], optimizer)
    try:
        if util_fsdp.is_sharded(model):
            util_fsdp.load_optimizer_state(model, optimizer, saved_optimizer)
        else:
            optimizer.load_state_dict(saved_optimizer)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f'{resumable.path}: optimizer state does not fit this run ({e})') from None
    loss_scaler.load_state_dict(checkpoint.get('scaler') or {})
    # the optimizer steps rollbacks skipped (util/rollback.py): part of the run, honoured by the resumed run
    extra['rollbacks'] = checkpoint.get('rollbacks', [])
    extra['trackers'] = checkpoint.get('trackers', {})  # the tracker runs this run continues
    restore_rng_states(checkpoint.get('rng_states'), checkpoint.get('world_size', 1), runtime)
    in_progress, pending = checkpoint.get('epoch_in_progress'), checkpoint.get('evaluation_pending')
    if in_progress:
        iteration = resumed_iteration(checkpoint, resumable.path, args, distributed.get_world_size())
        start = ResumeState(in_progress['epoch'], iteration, resumable.path, in_progress.get('meters') or None, extra,
                            epoch_images=in_progress.get('epoch_images'))
    elif pending:
        start = ResumeState(pending['epoch'], 0, resumable.path, None, extra, trained_stats=pending['train_stats'])
    else:
        start = ResumeState(checkpoint['epoch'] + 1, 0, resumable.path, None, extra)
    print0(f'With optim & sched! Continuing at epoch {start.epoch}'
           + (f', iteration {start.iteration}' if start.iteration else '')
           + (f" (iteration {in_progress['iteration']} of the stopped run's division of the epoch: the same images)"
              if in_progress and start.iteration != in_progress['iteration'] else '')
           + (' with its evaluation (its training was done)' if pending else ''))
    return start


class Checkpointer:
    """Saves training state in the official format plus what exact resuming needs, in --output_dir (which main()
    has prepared: prepare_output_dir). `model` is the module whose state is saved: the bare model, not its DDP or
    torch.compile wrapper (under --fsdp, the sharded module). Call save() on every rank (it gathers RNG states and,
    under --fsdp, the shards); rank 0 writes."""

    def __init__(self, args, model: nn.Module, optimizer, loss_scaler, runtime, start: ResumeState,
                 train_images: int, run_values: dict, classes: Optional[List[str]] = None,
                 trackers=None):
        self.args = args
        # the checkpoint's 'args' are the run's settings as the official format has them: the flags as typed with
        # the values the run worked out (`run_values`: the lr, a classifier's sizes) filled in; `args` stays as typed
        self.saved_args = argparse.Namespace(**{**vars(args), **run_values})
        self.model = model
        self.optimizer = optimizer
        self.loss_scaler = loss_scaler
        self.runtime = runtime
        # the size of the training set, which a resumed run must see unchanged (training_plan.check_same_data);
        # classifier runs also keep their class list and best top-1 in every checkpoint
        self.extra_state = {'train_images': train_images}
        self.trackers = trackers  # util/trackers.Trackers: the W&B and MLflow runs a resumed run continues
        if classes is not None:
            self.extra_state.update(classes=list(classes), max_accuracy=start.extra.get('max_accuracy', 0.0))
        self.last_saved: Optional[tuple] = None  # (path, epoch, next_iteration)
        if start.path:
            finished_epoch = start.epoch - 1 if start.iteration == 0 and start.trained_stats is None else start.epoch
            self.last_saved = (start.path, finished_epoch, start.iteration)

    @property
    def last_path(self) -> str:
        """checkpoint-last.pth in --output_dir ('' when nothing is saved)."""
        return os.path.join(self.args.output_dir, LAST) if self.args.output_dir else ''

    def model_and_optimizer_state(self) -> Tuple[dict, dict]:
        """The model's and the optimizer's state dicts to save: gathered from the shards under --fsdp (a
        collective: every rank calls it, rank 0 gets them), else the module's and the optimizer's own."""
        if util_fsdp.is_sharded(self.model):
            return (util_fsdp.full_model_state(self.model),
                    util_fsdp.full_optimizer_state(self.model, self.optimizer))
        return self.model.state_dict(), self.optimizer.state_dict()

    def state(self, epoch: int, next_iteration: int, rng_states: List[torch.Tensor], partial: dict, model_state: dict,
              optimizer_state: dict, pending_stats: Optional[dict] = None) -> dict:
        # 'epoch' is the last finished epoch, as in the official format; a mid-epoch save says where to go on, a
        # save during the evaluation keeps the epoch's training stats for the evaluation still to be done
        state = {'model': model_state, 'optimizer': optimizer_state,
                 'epoch': epoch if next_iteration == 0 else epoch - 1,
                 'scaler': self.loss_scaler.state_dict(), 'args': self.saved_args, 'rng_states': rng_states,
                 'world_size': distributed.get_world_size()}
        if next_iteration:
            state['epoch_in_progress'] = {'epoch': epoch, 'iteration': next_iteration, **partial}
        if pending_stats is not None:
            state['evaluation_pending'] = {'epoch': epoch, 'train_stats': pending_stats}
        state.update(self.extra_state)
        trackers = self.trackers.checkpoint_state() if self.trackers is not None else {}
        if trackers:  # the tracker runs' ids and this save's token (util/trackers.py)
            state['trackers'] = trackers
        return state

    def save(self, epoch: int, next_iteration: int = 0, numbered: bool = True, progress=None,
             pending_stats: Optional[dict] = None) -> Optional[str]:
        """Save after `next_iteration` iterations of `epoch` (0: the epoch is finished). Mid-epoch, `progress`
        (the EpochProgress) adds the epoch's running averages; `pending_stats`, the stats of an epoch whose
        evaluation was stopped (it is done on resume). Returns the path (on every rank; None without
        --output_dir)."""
        if not self.args.output_dir:
            return None
        partial = {'meters': [], 'epoch_images': None}  # the epoch so far, for a mid-epoch save
        if progress is not None and next_iteration:  # checks the window's losses first: a NaN loss is named as one
            partial = {'meters': progress.partial_state(), 'epoch_images': progress.images_per_epoch}
        self.check_weights(epoch, next_iteration)
        rng_states = gather_rng_states(self.runtime)
        model_state, optimizer_state = self.model_and_optimizer_state()
        numbered = numbered and next_iteration == 0
        path = os.path.join(self.args.output_dir, f'checkpoint-{epoch}.pth') if numbered else self.last_path
        if distributed.is_main_process():
            state = self.state(epoch, next_iteration, rng_states, partial, model_state, optimizer_state,
                               pending_stats)
            if numbered:
                save_atomic(state, path)
                self.prune()
            save_atomic(state, self.last_path)
        distributed.barrier()
        self.last_saved = (self.last_path, epoch, next_iteration)
        return path

    def check_weights(self, epoch: int, next_iteration: int):
        """Before a save: NonFiniteLossError, and nothing written, when a weight is NaN or infinite on some rank.
        The losses are checked, but a step's NaN gradients under a finite loss (bf16, fp32: no loss scaler skips
        them) leave NaN weights the next loss would show only after this save had overwritten the last good
        checkpoint. One fused norm on the device and one all-reduce (a collective, as save is)."""
        tensors = [*self.model.parameters(), *(b for b in self.model.buffers() if b.is_floating_point())]
        fault = any_non_finite(tensors)
        if fault is not None and fault.item():  # the fused norm also overflows for huge finite weights: look closer
            fault = torch.tensor(not all(torch.isfinite(local_part(t)).all() for t in tensors))
        if distributed.all_reduce_sum(torch.zeros(()) if fault is None else fault.float()).item():
            where = f'after epoch {epoch}, iteration {next_iteration}' if next_iteration else f'after epoch {epoch}'
            raise NonFiniteLossError(epoch, next_iteration, 'NaN or infinite', self.describe_last_good(),
                                     what='Weights', where=where, detail=' (a step\'s gradients were, under a finite '
                                     'loss), so they were not saved')

    def save_if_due(self, epoch: int, next_iteration: int, progress):
        """After an optimizer step: update checkpoint-last.pth every --save_every_iters iterations (mid-epoch)."""
        every = self.args.save_every_iters
        if every and next_iteration % every == 0 and next_iteration < progress.iters_per_epoch:
            self.save(epoch, next_iteration, numbered=False, progress=progress)

    def interrupt(self, epoch: int, next_iteration: int, progress) -> preemption.TrainingInterrupted:
        """A stop signal was agreed on by every rank: save where the run is and return the exception to raise."""
        path = self.save(epoch, next_iteration, numbered=False, progress=progress)
        return preemption.TrainingInterrupted(preemption.received_signal(), path)

    @contextlib.contextmanager
    def saving_if_stopped(self, epoch: int, train_stats: dict):
        """Around an epoch's evaluation or k-NN monitor, after its training: whatever stops it there saves the
        trained epoch with its evaluation still to do, which a resumed run does first. A stop signal agreed on
        (EvaluationInterrupted; the evaluation is not waited for, a scheduler's grace time is short) raises
        TrainingInterrupted; more unreadable images than --max_bad_images re-raise BadImageBudgetError, which now
        says where the trained epoch is."""
        try:
            yield
        except preemption.EvaluationInterrupted:
            path = self.save(epoch, numbered=False, pending_stats=train_stats)
            raise preemption.TrainingInterrupted(preemption.received_signal(), path) from None
        except BadImageBudgetError as e:
            path = self.save(epoch, numbered=False, pending_stats=train_stats)
            if path is None:
                raise
            raise BadImageBudgetError(f'{e}; epoch {epoch} is trained and saved in {path}: once the files are '
                                      'repaired or removed (or with a higher --max_bad_images), rerunning continues '
                                      'from it with its evaluation') from None

    def keep_best(self, epoch: int, test_stats: dict) -> float:
        """checkpoint-best.pth when this epoch's top-1 beats the best so far; returns the best top-1 (printed)."""
        if test_stats['acc1'] > self.extra_state['max_accuracy']:  # the same on every rank: evaluation is reduced
            self.extra_state['max_accuracy'] = test_stats['acc1']
            self.check_weights(epoch, 0)
            model_state = (util_fsdp.full_model_state(self.model) if util_fsdp.is_sharded(self.model)
                           else self.model.state_dict())
            if self.args.output_dir and distributed.is_main_process():
                save_atomic({'model': model_state, 'epoch': epoch, 'args': self.saved_args,
                             'acc1': test_stats['acc1'], 'acc5': test_stats['acc5'],
                             **{k: v for k, v in self.extra_state.items() if k not in TRAINING_ONLY}},
                            os.path.join(self.args.output_dir, BEST))
        print0(f"Max accuracy: {self.extra_state['max_accuracy']:.3f}%")  # as Acc@1: one number, one format
        return self.extra_state['max_accuracy']

    def describe_last_good(self) -> str:
        if self.last_saved is None:
            return 'No checkpoint was saved before it.'
        path, epoch, iteration = self.last_saved
        where = f'epoch {epoch}, iteration {iteration}' if iteration else f'end of epoch {epoch}'
        return f'Last good checkpoint, left untouched: {path} ({where}).'

    def prune(self):
        if self.args.keep_last <= 0:
            return
        numbered = sorted((p for p in glob.glob(os.path.join(glob.escape(self.args.output_dir), 'checkpoint-*.pth'))
                           if checkpoint_epoch_name(p) is not None), key=checkpoint_epoch_name)
        for old in numbered[:-self.args.keep_last]:
            os.remove(old)
