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

A resumed run continues the same tracker run: the ids are kept in every checkpoint (`ids`), and what the stopped
run sent past its checkpoint is not sent twice (a resumed run is bit-identical, so those values are the same):
MLflow skips the steps the run's history already holds; W&B the steps before the run's step, which its server
gives a resumed run. A tracker that fails mid-run (network, quota, disk) warns once and is left out: log.txt and
the checkpoints never depend on one.
"""
import atexit
import contextlib
import importlib.util
import os
import sys
import time
from typing import Dict, List, Optional

from util import distributed, preemption

TRACKERS = ('tensorboard', 'wandb', 'mlflow')
PACKAGES = {'wandb': 'wandb', 'mlflow': 'mlflow'}  # what to pip install (mlflow-skinny also provides `mlflow`)
WANDB_STEPS_PER_EPOCH = 1000  # W&B's one step axis is epoch_1000x, TensorBoard's training step
PARAM_LENGTH = 500  # characters of a parameter's value that MLflow servers before 2.x accept (later: 6000)


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


def epoch_scalar_name(key: str) -> str:
    """A log.txt key -> the name its value has in every tracker: perf/test_acc1, perf/knn_top1, epoch/train_loss."""
    return f'perf/{key}' if key.startswith(('test_', 'knn_')) else f'epoch/{key}'


def epoch_scalars(stats: dict) -> Dict[str, float]:
    """The numbers of a log.txt line (not the epoch itself, strings or flags) under their tracker names."""
    return {epoch_scalar_name(k): float(v) for k, v in stats.items()
            if k != 'epoch' and isinstance(v, (int, float)) and not isinstance(v, bool)}


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
        atexit.register(self.close)  # a run that stops before its last epoch: its tracker runs end as stopped

    @classmethod
    def start(cls, args, saved_ids: Optional[dict] = None) -> 'Trackers':
        """Open the W&B and MLflow runs of --report_to, continuing the runs of `saved_ids` (a resumed checkpoint's
        `trackers`). Raises TrackerError when one cannot start."""
        if not distributed.is_main_process():
            return cls()
        trackers = cls(saved_ids=saved_ids)
        for name, backend in (('wandb', WandbTracker), ('mlflow', MlflowTracker)):
            if name in args.report_to:
                try:
                    trackers.backends.append(backend(args, trackers.saved_ids.get(name)))
                except Exception as e:  # each library raises its own types
                    trackers.close(failed=True)  # the ones started already
                    raise TrackerError(f'--report_to {name}: could not start its run ({type(e).__name__}: '
                                       f'{first_line(e)}); {backend.OFFLINE}') from None
        return trackers

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

    def add_scalar(self, name: str, value: float, step: int):
        """A training-step scalar (train loss, lr) at TensorBoard's step, epoch_1000x."""
        self.each('add_scalar', name, value, step)

    def log_epoch(self, epoch: int, stats: dict):
        """Every number of an epoch's log.txt line, at step `epoch`."""
        scalars = epoch_scalars(stats)
        if scalars:
            self.each('log_epoch', epoch, scalars)

    def flush(self):
        self.each('flush')

    def close(self, finished: bool = False, failed: bool = False):
        """End every tracker's run: finished (the last epoch is logged), failed (the run stopped on an error), or
        else stopped (a signal, a kill); a resumed run reopens it."""
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
                print(f'warning: --report_to {backend.NAME} failed ({type(e).__name__}: {first_line(e)}); the run '
                      f'goes on without it (log.txt and the checkpoints do not depend on it)', file=sys.stderr,
                      flush=True)


def first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [''])[0][:300]


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

    def flush(self):
        self.writer.flush()

    def close(self, how: str):
        self.writer.close()


class WandbTracker:
    """A W&B run: WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE (offline for clusters without internet), WANDB_DIR
    (default ./wandb) and the rest of W&B's environment choose where it goes."""
    NAME = 'wandb'
    OFFLINE = 'log in with `wandb login`, or set WANDB_MODE=offline and `wandb sync` later'

    def __init__(self, args, run_id: Optional[str]):
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
        step = (epoch + 1) * WANDB_STEPS_PER_EPOCH  # the epoch's end: no earlier than any step of the epoch
        if step >= self.first_step:
            self.run.log({**scalars, 'epoch': epoch}, step=step)

    def flush(self):
        pass  # W&B sends in the background

    def close(self, how: str):
        self.run.finish(exit_code=0 if how == 'finished' else 1)


class MlflowTracker:
    """An MLflow run: MLFLOW_TRACKING_URI (a server, or a local store: sqlite:///mlflow.db; file:./mlruns, which
    MLflow 3 accepts only with MLFLOW_ALLOW_FILE_STORE=true), MLFLOW_EXPERIMENT_NAME and the rest of MLflow's
    environment choose where it goes."""
    NAME = 'mlflow'
    OFFLINE = ('set MLFLOW_TRACKING_URI to a reachable server, or to a local store (sqlite:///mlflow.db, or '
               'file:./mlruns with MLFLOW_ALLOW_FILE_STORE=true)')

    def __init__(self, args, run_id: Optional[str]):
        import mlflow
        from mlflow.tracking import MlflowClient
        self.mlflow, self.client = mlflow, MlflowClient()
        run_id = run_id or os.environ.get('MLFLOW_RUN_ID')  # MLflow's own way to name the run to continue
        if run_id:
            self.run_id = self.client.get_run(run_id).info.run_id
            self.client.update_run(run_id, status='RUNNING')
        else:
            self.run_id = self.client.create_run(self.experiment_id(), run_name=run_name(args)).info.run_id
        self.logged = self.logged_steps()
        self.log_settings(settings(args))

    def log_settings(self, values: Dict[str, str]):
        """The flags as parameters. MLflow sets a parameter once: a resumed run whose flags changed (--epochs
        raised) keeps the first values and records each new one as a tag, param_changed.<flag>, and says so."""
        values = {k: v[:PARAM_LENGTH] for k, v in values.items()}
        held = self.client.get_run(self.run_id).data.params
        params = [self.mlflow.entities.Param(k, v) for k, v in values.items() if k not in held]
        changed = {k: v for k, v in values.items() if k in held and held[k] != v}
        tags = [self.mlflow.entities.RunTag(f'param_changed.{k}', v) for k, v in changed.items()]
        for start in range(0, max(len(params), len(tags)), 100):  # at most 100 of each per call
            self.client.log_batch(self.run_id, params=params[start:start + 100], tags=tags[start:start + 100])
        if changed:
            listed = ', '.join(f'{k} {held[k]} -> {v}' for k, v in changed.items())
            distributed.print0(f'MLflow run {self.run_id}: parameters are set once; changed since it started, kept as '
                               f'tags param_changed.<flag>: {listed}')

    def experiment_id(self) -> str:
        """MLFLOW_EXPERIMENT_ID, else MLFLOW_EXPERIMENT_NAME's experiment (made if new), else MLflow's Default."""
        if os.environ.get('MLFLOW_EXPERIMENT_ID'):
            return os.environ['MLFLOW_EXPERIMENT_ID']
        name = os.environ.get('MLFLOW_EXPERIMENT_NAME') or 'Default'
        experiment = self.client.get_experiment_by_name(name)
        return experiment.experiment_id if experiment else self.client.create_experiment(name)

    def describe(self, args) -> str:
        return f'MLflow run {self.run_id} ({self.mlflow.get_tracking_uri()})'

    def logged_steps(self) -> Dict[str, set]:
        """The steps of every metric the run already holds (a resumed run's stopped part)."""
        keys = self.client.get_run(self.run_id).data.metrics.keys()
        return {key: {m.step for m in self.client.get_metric_history(self.run_id, key)} for key in keys}

    def log(self, scalars: Dict[str, float], step: int):
        metrics = [self.mlflow.entities.Metric(name, value, int(time.time() * 1000), step)
                   for name, value in scalars.items() if step not in self.logged.get(name, ())]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def add_scalar(self, name: str, value: float, step: int):
        self.log({name: value}, step)

    def log_epoch(self, epoch: int, scalars: Dict[str, float]):
        self.log(scalars, epoch)

    def flush(self):
        pass  # every call is written when made

    def close(self, how: str):
        self.client.set_terminated(self.run_id, status={'finished': 'FINISHED', 'failed': 'FAILED'}.get(how, 'KILLED'))
