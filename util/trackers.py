"""Where a training run's numbers go besides log.txt (--report_to): TensorBoard (the default, in --log_dir),
Weights & Biases and MLflow. What is sent is decided here, the same for every tracker:
- each logging window's train loss and learning rate at the official TensorBoard step, epoch_1000x (EpochProgress
  calls add_scalar, as it called SummaryWriter's);
- each epoch, every number of its log.txt line (log_epoch): the test_* and knn_* ones as perf/<key> (the official
  TensorBoard names of the evaluation), the rest as epoch/<key>, at step `epoch` (W&B: its own step is
  epoch_1000x at the epoch's end, with `epoch` as the x-axis of these charts);
- the run's settings, every flag, as the tracker run's parameters (MLflow) or config (W&B), and the name of
  --output_dir as the run's name.
Rank 0 only, from host values the run already has: no extra synchronisation in a step. Each tracker reads its own
settings from its own environment variables (WANDB_PROJECT, WANDB_MODE, MLFLOW_TRACKING_URI,
MLFLOW_EXPERIMENT_NAME, ...).

A resumed run continues the same tracker run: the ids are kept in every checkpoint (checkpoint_state), with a
token of that save, which MLflow's run keeps too (tag mae.checkpoint). What the stopped run sent past the resumed
checkpoint is not sent twice: MLflow skips the steps its run holds, W&B the steps before the run's step, which its
server gives a resumed run (offline, W&B knows none: its resumed part is a second offline folder). A resume that
takes another path where MLflow holds values past the resume point (a checkpoint older than the run's newest, or
--allow_recipe_change) goes on in a new MLflow run holding the history before that point (MlflowTracker.fork):
MLflow cannot replace a value. W&B never replaces a logged step either: there, such a resume shows the earlier
values up to where the stopped run ended. A tracker that fails mid-run (network, quota, disk) warns once, is
ended as failed and left out: log.txt and the checkpoints never depend on one.
"""
import atexit
import contextlib
import importlib.util
import os
import sys
import threading
import time
import uuid
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch

from util import distributed, preemption

TRACKERS = ('tensorboard', 'wandb', 'mlflow')
PACKAGES = {'wandb': 'wandb', 'mlflow': 'mlflow'}  # what to pip install (mlflow-skinny also provides `mlflow`)
STEPS_PER_EPOCH = 1000  # the official TensorBoard step, epoch_1000x: W&B's one step axis too
PARAM_LENGTH = 500  # characters of a parameter's value that MLflow servers before 2.x accept (later: 6000)
# flags that say how a run was started, not what it trains: a resumed run's new values are not parameter changes
RUN_CONTROL_FLAGS = ('resume', 'start_epoch', 'auto_resume', 'overwrite', 'allow_recipe_change', 'dist_url',
                     'dist_timeout', 'local_rank')
CLOSE_WAIT = 10  # seconds a failed tracker gets to end its run before the training goes on without waiting


OPEN: List['Trackers'] = []  # the trackers of the runs in this process, for failures_end_runs


@contextlib.contextmanager
def failures_end_runs():
    """Around a script's main(): an error (not a stop signal or Ctrl-C, after which the run continues) ends the
    tracker runs still open as failed, not merely stopped."""
    try:
        yield
    except BaseException as e:
        if not isinstance(e, (preemption.TrainingInterrupted, KeyboardInterrupt)):
            for trackers in list(OPEN):
                trackers.close(failed=True)
        raise


class TrackerError(RuntimeError):
    """A tracker asked for could not start its run; one line naming the tracker, its error and what to do."""


def check_report_to(report_to: List[str], errors: List[str]):
    """--report_to before any work: 'none' alone, and every tracker's package installed."""
    if 'none' in report_to and len(report_to) > 1:
        errors.append(f'--report_to {" ".join(report_to)}: none means no tracker; give it alone')
    for name in dict.fromkeys(report_to):
        if name in PACKAGES and importlib.util.find_spec(name) is None:
            errors.append(f'--report_to {name}: the {name} package is not installed; pip install '
                          f'{PACKAGES[name]} (or drop {name} from --report_to)')


def note_evaluation_only(args):
    """An --eval run reports to no tracker: said when one outside TensorBoard was asked for."""
    external = [name for name in args.report_to if name in PACKAGES]
    if external:
        distributed.print0(f'--eval: nothing is sent to {" or ".join(external)} (--report_to is for training runs; '
                           'the evaluation is printed)')


def epoch_scalar_name(key: str) -> str:
    """A log.txt key -> the name its value has in every tracker: perf/test_acc1, perf/knn_top1, epoch/train_loss."""
    return f'perf/{key}' if key.startswith(('test_', 'knn_')) else f'epoch/{key}'


def epoch_scalars(stats: dict) -> Dict[str, float]:
    """The numbers of a log.txt line (not the epoch itself, strings or flags) under their tracker names."""
    return {epoch_scalar_name(k): float(v) for k, v in stats.items()
            if k != 'epoch' and isinstance(v, (int, float)) and not isinstance(v, bool)}


def resume_step(start, args, world_size: int) -> int:
    """The run's first training step (epoch_1000x, as EpochProgress writes it): 0 for a start from scratch.
    `start`: the ResumeState (util/checkpointer.py)."""
    if not start.path:
        return 0
    if start.trained_stats is not None:  # only the epoch's evaluation is left: training goes on at the next epoch
        return (start.epoch + 1) * STEPS_PER_EPOCH
    fraction = 0.0
    if start.iteration and start.epoch_images:  # the images done over the epoch's: iteration / iterations per epoch
        fraction = start.iteration * args.batch_size * world_size / start.epoch_images
    return int((fraction + start.epoch) * STEPS_PER_EPOCH)


def is_epoch_scalar(name: str) -> bool:
    return name.startswith(('perf/', 'epoch/'))


def epoch_end_step(epoch: int) -> int:
    """The training step an epoch's numbers belong to on a one-axis tracker (W&B): after every step of the epoch
    (int((i / n + epoch) * 1000) < (epoch + 1) * 1000) and before the next epoch's first."""
    return (epoch + 1) * STEPS_PER_EPOCH - 1


def position(name: str, step: int) -> Tuple[int, int]:
    """Where a scalar falls in the run's order of logging: a training scalar at its step, an epoch's numbers
    after the epoch's last step."""
    return (epoch_end_step(step), 1) if is_epoch_scalar(name) else (step, 0)


class Resume(NamedTuple):
    """Where a run starts, for its trackers: `step`, its first training step (epoch_1000x; 0 from scratch), and
    `checkpoint`, the token of the resumed checkpoint's save ('' for none or an older checkpoint)."""
    step: int = 0
    checkpoint: str = ''


def run_name(args) -> Optional[str]:
    return os.path.basename(os.path.normpath(os.path.abspath(args.output_dir))) if args.output_dir else None


def settings(args) -> Dict[str, str]:
    """Every flag as text, the parameters a tracker run shows."""
    return {name: str(value) for name, value in sorted(vars(args).items())}


class Trackers:
    """The trackers of --report_to on rank 0 (none elsewhere), with SummaryWriter's add_scalar. start() opens the
    external ones (W&B, MLflow) before the run writes anything, so that one that cannot start is refused first;
    open_tensorboard() opens TensorBoard once the output folder is prepared. `ids` are the external runs' ids, for
    the checkpoint."""

    def __init__(self, backends: Optional[list] = None, saved_ids: Optional[dict] = None):
        self.backends = backends or []
        self.saved_ids = saved_ids or {}  # kept for a tracker left out of this part of the run
        OPEN.append(self)

    @classmethod
    def start(cls, args, start, world_size: int) -> 'Trackers':
        """Open the W&B and MLflow runs of --report_to on rank 0, continuing those of the resumed checkpoint
        (`start`, the ResumeState: its extra['trackers']). Raises TrackerError, on every rank, when one cannot
        start."""
        saved = dict(start.extra.get('trackers') or {}) if distributed.is_main_process() else {}
        resume = Resume(resume_step(start, args, world_size), saved.pop('checkpoint', ''))
        trackers, error = cls(saved_ids=saved), None
        if distributed.is_main_process():
            error = trackers.start_external(args, resume)
        if any(name in PACKAGES for name in args.report_to):  # the other ranks learn of rank 0's failure
            failed = distributed.all_reduce_sum(torch.tensor([int(error is not None)])).item()
            error = error or (TrackerError('--report_to: rank 0 could not start a tracker run (its error is '
                                           'above)') if failed else None)
        if error:
            raise error
        # registered after W&B has registered its own exit step, so that this one runs first (atexit runs the
        # last registered first): a run that stops before its last epoch ends its tracker runs as stopped
        atexit.register(trackers.close)
        return trackers

    def start_external(self, args, resume: Resume) -> Optional[TrackerError]:
        """Start the W&B and MLflow runs of --report_to; the error of the first that cannot start, after ending
        the ones started (as failed)."""
        for name, backend in (('wandb', WandbTracker), ('mlflow', MlflowTracker)):
            if name in args.report_to:
                try:
                    self.backends.append(backend(args, self.saved_ids.get(name), resume))
                except Exception as e:  # each library raises its own types
                    self.close(failed=True)
                    return TrackerError(f'--report_to {name}: could not start its run ({type(e).__name__}: '
                                        f'{first_line(e)}); {backend.OFFLINE}')
        return None

    def open_tensorboard(self, args, purge_step: int):
        """TensorBoard in --log_dir (--report_to tensorboard), purging what a stopped run wrote from purge_step."""
        if 'tensorboard' in args.report_to and args.log_dir and distributed.is_main_process():
            self.backends.insert(0, TensorBoardTracker(args.log_dir, purge_step))

    def describe(self, args) -> str:
        """For the run's header: where each tracker's run is, or 'none'."""
        return ', '.join(b.describe(args) for b in self.backends) or 'none'

    @property
    def ids(self) -> dict:
        return {**self.saved_ids, **{b.NAME: b.run_id for b in self.backends if getattr(b, 'run_id', None)}}

    def checkpoint_state(self) -> dict:
        """What a checkpoint keeps of the trackers: the run ids and a new token of this save, which MLflow's run
        keeps too, so that a resume can tell the run's newest checkpoint from an older one."""
        ids = self.ids
        if not ids:
            return {}
        token = uuid.uuid4().hex  # from os.urandom: no RNG of the run is drawn
        self.each('note_checkpoint', token)
        return {**ids, 'checkpoint': token}

    def add_scalar(self, name: str, value: float, step: int):
        """A training-step scalar (train loss, lr) at TensorBoard's step, epoch_1000x."""
        self.each('add_scalar', name, value, step)

    def log_epoch(self, epoch: int, stats: dict):
        """Every number of an epoch's log.txt line, at step `epoch`."""
        scalars = epoch_scalars(stats)
        if scalars:
            self.each('log_epoch', epoch, scalars)

    def end_window(self):
        """After a logging window's add_scalar calls (EpochProgress): what a tracker batches goes out now."""
        self.each('end_window')

    def flush(self):
        self.each('flush')

    def close(self, finished: bool = False, failed: bool = False):
        """End every tracker's run: finished (after the last epoch's checkpoint: RunLog.finish), failed (the run
        stopped on an error), or else stopped (a stop signal; at exit); a resumed run reopens it."""
        self.each('close', 'finished' if finished else 'failed' if failed else 'stopped')
        self.backends = []
        if self in OPEN:
            OPEN.remove(self)

    def each(self, method: str, *values):
        for backend in list(self.backends):
            try:
                getattr(backend, method)(*values)
            except Exception as e:  # a tracker's failure never stops training
                self.backends.remove(backend)
                if getattr(backend, 'run_id', None):
                    self.saved_ids[backend.NAME] = backend.run_id  # a resumed run continues it
                print(f'warning: --report_to {backend.NAME} failed ({type(e).__name__}: {first_line(e)}); the run '
                      f'goes on without it (log.txt and the checkpoints do not depend on it)', file=sys.stderr,
                      flush=True)
                if method != 'close':
                    end_failed(backend)


def end_failed(backend):
    """End a failed tracker's run as failed where it still can, within CLOSE_WAIT seconds: an unreachable server
    retries for minutes, while the other ranks wait for this one at the next collective."""
    def close():
        with contextlib.suppress(Exception):
            backend.close('failed')
    closing = threading.Thread(target=close, daemon=True)
    closing.start()
    closing.join(CLOSE_WAIT)


def first_line(error: Exception, length: int = 400) -> str:
    """An error's first line, cut at a word boundary when longer than `length`."""
    line = (str(error).strip().splitlines() or [''])[0]
    if len(line) <= length:
        return line
    cut = line.rfind(' ', 0, length)
    return line[:cut if cut > 0 else length] + ' ...'


class TensorBoardTracker:
    NAME = 'tensorboard'

    def __init__(self, log_dir: str, purge_step: int):
        from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is slow to import
        os.makedirs(log_dir, exist_ok=True)
        self.writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def describe(self, args) -> str:
        return f'TensorBoard in {args.log_dir}'

    def add_scalar(self, name: str, value: float, step: int):
        self.writer.add_scalar(name, value, step)

    def log_epoch(self, epoch: int, scalars: Dict[str, float]):
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, epoch)

    def end_window(self):
        pass  # the writer sends its events in the background

    def note_checkpoint(self, token: str):
        pass  # a resumed run's writer purges from its first step

    def flush(self):
        self.writer.flush()

    def close(self, how: str):
        self.writer.close()


class WandbTracker:
    """A W&B run: WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE (offline for clusters without internet), WANDB_DIR
    (default ./wandb) and the rest of W&B's environment choose where it goes."""
    NAME = 'wandb'
    OFFLINE = 'log in with `wandb login`, or set WANDB_MODE=offline and `wandb sync` later'

    def __init__(self, args, run_id: Optional[str], resume: Resume):
        """run_id: the run a resumed checkpoint continues. `resume` is not needed: W&B's server gives a resumed run
        the step it is at (run.step), and what it holds past the resume point stays (it replaces no step)."""
        import wandb
        self.wandb = wandb
        self.run = wandb.init(id=run_id, resume='allow' if run_id else None, name=run_name(args),
                              config=settings(args))
        self.run_id = self.run.id
        self.run.define_metric('epoch', hidden=True)
        for prefix in ('perf/*', 'epoch/*'):
            self.run.define_metric(prefix, step_metric='epoch')
        self.first_step = int(self.run.step or 0)  # a resumed run's next step, as the server holds it

    def describe(self, args) -> str:
        where = f'offline, in {os.path.dirname(self.run.dir)}' if self.run.offline else self.run.url
        return f'W&B run {self.run_id} ({where})'

    def add_scalar(self, name: str, value: float, step: int):
        if step >= self.first_step:
            self.run.log({name: value}, step=step)

    def log_epoch(self, epoch: int, scalars: Dict[str, float]):
        step = epoch_end_step(epoch)  # before the next epoch's first step, which a resumed run may start with
        if step >= self.first_step:
            self.run.log({**scalars, 'epoch': epoch}, step=step)

    def end_window(self):
        pass  # W&B sends in the background

    def note_checkpoint(self, token: str):
        pass

    def flush(self):
        pass

    def close(self, how: str):
        self.run.finish(exit_code=0 if how == 'finished' else 1)


class MlflowTracker:
    """An MLflow run: MLFLOW_TRACKING_URI (a server, or a local store: sqlite:///mlflow.db; file:./mlruns, which
    MLflow 3 accepts only with MLFLOW_ALLOW_FILE_STORE=true), MLFLOW_EXPERIMENT_NAME and the rest of MLflow's
    environment choose where it goes. A logging window's training scalars go in one call, at its end."""
    NAME = 'mlflow'
    OFFLINE = ('set MLFLOW_TRACKING_URI to a reachable server, or to a local store (sqlite:///mlflow.db, or '
               'file:./mlruns with MLFLOW_ALLOW_FILE_STORE=true)')

    def __init__(self, args, run_id: Optional[str], resume: Resume):
        """run_id: the run a resumed checkpoint continues; `resume`: where this run starts (see fork_if_another_path).
        """
        import mlflow
        from mlflow.tracking import MlflowClient
        self.mlflow, self.client = mlflow, MlflowClient()
        self.pending: List[Tuple[int, Dict[str, float]]] = []  # the logging window's (step, training scalars)
        self.run_id = self.continued_run(run_id) or self.client.create_run(self.experiment_id(),
                                                                           run_name=run_name(args)).info.run_id
        history = self.metric_history()
        self.held = {key: {m.step for m in metrics} for key, metrics in history.items()}
        self.fork_if_another_path(history, resume, args.allow_recipe_change)
        self.log_settings(settings(args))  # on the run this one goes to

    def continued_run(self, saved_id: Optional[str]) -> Optional[str]:
        """The run to continue, set running again: the checkpoint's, else MLFLOW_RUN_ID (MLflow's own way to name
        one). A checkpoint's run that this store does not hold (another MLFLOW_TRACKING_URI, a deleted run) is
        said and replaced by a new run; MLFLOW_RUN_ID's is an error."""
        run_id = saved_id or os.environ.get('MLFLOW_RUN_ID')
        if not run_id:
            return None
        try:
            run = self.client.get_run(run_id)
        except self.mlflow.exceptions.MlflowException as e:
            if not saved_id or e.error_code != 'RESOURCE_DOES_NOT_EXIST':
                raise
            distributed.print0(f'MLflow run {run_id} (of the resumed checkpoint) is not in '
                               f'{self.mlflow.get_tracking_uri()}: this run goes to a new MLflow run')
            return None
        if run.info.lifecycle_stage == 'deleted':
            distributed.print0(f'MLflow run {run_id} (of the resumed checkpoint) is deleted: this run goes to a new '
                               'MLflow run')
            return None
        self.client.update_run(run_id, status='RUNNING')
        return run.info.run_id

    def log_settings(self, values: Dict[str, str]):
        """The flags as parameters. MLflow sets a parameter once: a resumed run whose flags changed (--epochs
        raised) keeps the first values and records each new one as a tag, param_changed.<flag>, and says so. The
        flags that only say how the run was started (RUN_CONTROL_FLAGS) are not changes."""
        values = {k: v[:PARAM_LENGTH] for k, v in values.items()}
        held = self.client.get_run(self.run_id).data.params
        params = [self.mlflow.entities.Param(k, v) for k, v in values.items() if k not in held]
        changed = {k: v for k, v in values.items() if k in held and held[k] != v and k not in RUN_CONTROL_FLAGS}
        tags = [self.mlflow.entities.RunTag(f'param_changed.{k}', v) for k, v in changed.items()]
        self.log_batch(params=params, tags=tags)
        if changed:
            listed = ', '.join(f'{k} {held[k]} -> {v}' for k, v in changed.items())
            distributed.print0(f'MLflow run {self.run_id}: parameters are set once; changed since it started, kept as '
                               f'tags param_changed.<flag>: {listed}')

    def log_batch(self, metrics=(), params=(), tags=()):
        """In calls within MLflow's limits (1,000 entities a call; of them at most 100 parameters and 100 tags)."""
        params, tags, metrics = list(params), list(tags), list(metrics)
        while params or tags:
            self.client.log_batch(self.run_id, params=params[:100], tags=tags[:100])
            params, tags = params[100:], tags[100:]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def experiment_id(self) -> str:
        """MLFLOW_EXPERIMENT_ID, else MLFLOW_EXPERIMENT_NAME's experiment (made if new), else MLflow's Default."""
        if os.environ.get('MLFLOW_EXPERIMENT_ID'):
            return os.environ['MLFLOW_EXPERIMENT_ID']
        name = os.environ.get('MLFLOW_EXPERIMENT_NAME') or 'Default'
        experiment = self.client.get_experiment_by_name(name)
        return experiment.experiment_id if experiment else self.client.create_experiment(name)

    def describe(self, args) -> str:
        return f'MLflow run {self.run_id} ({self.mlflow.get_tracking_uri()})'

    def metric_history(self) -> dict:
        """{metric: [Metric]} of everything the run holds (a resumed run's stopped part)."""
        keys = self.client.get_run(self.run_id).data.metrics.keys()
        return {key: self.client.get_metric_history(self.run_id, key) for key in keys}

    def fork_if_another_path(self, history: dict, resume: Resume, recipe_changed: bool):
        """When the run holds values past the resume point and this run takes another path from there (the resumed
        checkpoint is not the run's newest: its token is not the run's mae.checkpoint; or --allow_recipe_change),
        fork: the held values there are not this run's. Otherwise they are the stopped run's, which this run does
        not send again (the same numbers: an exact resume, up to workers' re-seeded augmentation and the device's
        own rounding)."""
        start = (resume.step, 0)
        if not any(position(key, m.step) >= start for key, metrics in history.items() for m in metrics):
            return
        newest = self.client.get_run(self.run_id).data.tags.get('mae.checkpoint', '')
        if resume.checkpoint == newest and not recipe_changed:
            return
        why = '--allow_recipe_change' if recipe_changed else 'the resumed checkpoint is older than its newest'
        self.fork(history, resume.step, why)

    def fork(self, history: dict, step: int, why: str):
        """Go on in a new run of the same name, parameters and tags, holding the stopped run's values before training
        step `step` (position()), tagged mae.continues with the stopped run's id; the stopped run is ended as killed."""
        old = self.client.get_run(self.run_id)
        tags = {**{k: v for k, v in old.data.tags.items() if not k.startswith('mlflow.')},
                'mae.continues': old.info.run_id}
        run = self.client.create_run(old.info.experiment_id, run_name=old.info.run_name, tags=tags)
        self.client.set_terminated(old.info.run_id, status='KILLED')
        self.run_id = run.info.run_id
        kept = [m for key, metrics in history.items() for m in metrics if position(key, m.step) < (step, 0)]
        self.log_batch(metrics=kept, params=[self.mlflow.entities.Param(k, v) for k, v in old.data.params.items()])
        self.held = {}
        distributed.print0(f'MLflow run {old.info.run_id} holds values from step {step} on that this run replaces '
                           f'({why}): it is ended as killed, and this run goes on in MLflow run {self.run_id}, which '
                           'holds its values before that point')

    def unsent(self, scalars: Dict[str, float], step: int) -> list:
        """The Metrics of what the run does not hold yet (a resumed run's stopped part holds some)."""
        now = int(time.time() * 1000)
        return [self.mlflow.entities.Metric(name, value, now, step) for name, value in scalars.items()
                if step not in self.held.get(name, ())]

    def add_scalar(self, name: str, value: float, step: int):
        if not self.pending or self.pending[-1][0] != step:
            self.pending.append((step, {}))
        self.pending[-1][1][name] = value

    def end_window(self):
        """Send the logging window's training scalars in one call."""
        pending, self.pending = self.pending, []
        self.log_batch(metrics=[metric for step, scalars in pending for metric in self.unsent(scalars, step)])

    def log_epoch(self, epoch: int, scalars: Dict[str, float]):
        self.end_window()
        self.log_batch(metrics=self.unsent(scalars, epoch))

    def flush(self):
        self.end_window()

    def note_checkpoint(self, token: str):
        self.client.set_tag(self.run_id, 'mae.checkpoint', token)

    def close(self, how: str):
        try:
            self.end_window()
        finally:
            self.client.set_terminated(self.run_id,
                                       status={'finished': 'FINISHED', 'failed': 'FAILED'}.get(how, 'KILLED'))

