"""Clean stops. The signals schedulers send before they kill or requeue a job (SIGTERM: SLURM, Kubernetes, PBS,
HTCondor, torchrun passing it on; SIGUSR1 / SIGUSR2: SLURM's --signal, SGE's -notify, LSF's warning action) and a
first Ctrl-C (SIGINT) only set a flag: every rank stops at the same point, a training run saves
checkpoint-last.pth, and the process exits with 128 + signal (130 for Ctrl-C). A second Ctrl-C stops at once,
without saving. DataLoader workers ignore all of them (the signal reaches a whole process group, workers included,
and a worker it killed would end the run before the save); they end with the main process."""
import atexit
import contextlib
import multiprocessing
import os
import signal
import sys
from typing import List, Optional

import torch

from util import distributed

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
_received = []


class TrainingInterrupted(Exception):
    """Raised out of the training loop after the stop checkpoint was written."""

    def __init__(self, signum: int, checkpoint_path: Optional[str]):
        self.signum = signum
        self.checkpoint_path = checkpoint_path
        saved = (f'checkpoint saved to {checkpoint_path}' if checkpoint_path else
                 'nothing was saved (--output_dir is empty)')
        super().__init__(f'stopped by {signal_name(signum)}; {saved}')

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    return 'Ctrl-C (SIGINT)' if signum == signal.SIGINT else signal.Signals(signum).name


class EvaluationInterrupted(Exception):
    """Raised on every rank out of an evaluation (or the k-NN monitor) when a stop signal was agreed on there."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f'stopped by {signal_name(signum)} during evaluation')

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _handler(signum, _frame):
    if signum == signal.SIGINT:
        if signal.SIGINT in _received:  # the second Ctrl-C: out now, wherever the run is (a save in progress
            # leaves only a temporary file, removed at the next start; the previous checkpoint is intact)
            print('Interrupted again (Ctrl-C): stopped at once without saving; rerunning the same command continues '
                  'from the last checkpoint', file=sys.stderr, flush=True)
            os._exit(128 + signal.SIGINT)
        print('Ctrl-C: stopping at the next optimizer step to save a checkpoint (press Ctrl-C again to quit at '
              'once, without saving)', file=sys.stderr, flush=True)
    _received.append(signum)


def install_handlers(training: bool):
    """Stop signals set a flag that the training loop checks. Evaluation-only runs keep Ctrl-C's default (they
    have nothing to save): launch.run_main turns the KeyboardInterrupt into one line."""
    for sig in STOP_SIGNALS:
        if sig != signal.SIGINT or training:
            signal.signal(sig, _handler)


def ignore_stop_signals_in_workers(_worker_id: int):
    """worker_init_fn of the DataLoaders: a stop signal sent to the process group (Ctrl-C, `kill -- -PGID`, SLURM,
    torchrun passing SIGTERM on to each rank's group) reaches the workers too, and a worker it killed would end
    the epoch with 'DataLoader worker ... killed by signal' before the main process can save. They ignore them
    and end with the main process (torch's workers watch it). The signals were blocked while the worker started
    (iterate): now ignored, they are unblocked, and one that arrived meanwhile is dropped."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def stop_workers_at_exit():
    """Register (once, in the main process) the exit step that kills the DataLoader workers still alive. At exit
    multiprocessing terminates its daemon children (SIGTERM) and then joins them; ours ignore SIGTERM and only end
    when the main process has, so a run that stopped on an error raised while its loader ran (a DataError from a
    worker, a non-finite loss) waited for them forever. atexit runs this before multiprocessing's own step."""
    global _WORKERS_STOPPED_AT_EXIT
    if not _WORKERS_STOPPED_AT_EXIT:
        atexit.register(kill_daemon_children)
        _WORKERS_STOPPED_AT_EXIT = True


_WORKERS_STOPPED_AT_EXIT = False


def kill_daemon_children():
    for child in multiprocessing.active_children():
        if child.daemon:  # DataLoader workers (non-daemon children are someone else's, joined as usual)
            child.kill()
            child.join()


@contextlib.contextmanager
def stop_signals_blocked():
    """Hold the stop signals back (they stay pending and arrive when the block ends): a worker process started
    meanwhile inherits the block, so no signal can kill it before ignore_stop_signals_in_workers runs."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def iterate(loader):
    """Iterate a DataLoader with its workers started while the stop signals are held back (see above)."""
    stop_workers_at_exit()
    with stop_signals_blocked():
        batches = iter(loader)
    yield from batches


def signals_torchrun_drops(environ=os.environ) -> List[str]:
    """The stop signals that kill torchrun itself (and the run with it, unsaved) instead of being passed on to the
    ranks: those not in its --signals-to-handle, which it hands its workers as TORCHELASTIC_SIGNALS_TO_HANDLE
    (default SIGTERM, SIGINT, SIGHUP, SIGQUIT: SLURM's --signal=USR1 is not among them). [] outside torchrun."""
    handled = environ.get('TORCHELASTIC_SIGNALS_TO_HANDLE')
    if handled is None:
        return []
    names = {name.strip() for name in handled.split(',')}
    return [signal.Signals(sig).name for sig in STOP_SIGNALS if signal.Signals(sig).name not in names]


def note_dropped_signals(environ=os.environ):
    """Inside a SLURM job under torchrun, say which stop signals torchrun would not pass on (once, rank 0)."""
    dropped = signals_torchrun_drops(environ)
    if dropped and 'SLURM_JOB_ID' in environ:
        distributed.print0(f'Note: torchrun passes {", ".join(dropped)} on to no process: they would end it, and '
                           'this run with it, without a checkpoint (SLURM sends SIGUSR1 with --signal=USR1@...); '
                           'start torchrun with --signals-to-handle=SIGTERM,SIGINT,SIGUSR1,SIGUSR2')


def stop_requested() -> bool:
    return bool(_received)


def received_signal() -> int:
    return _received[0] if _received else signal.SIGTERM


def stop_if_signalled(epoch: int, epochs: int, checkpoint_path: str):
    """After an epoch's checkpoint: if any rank received a stop signal, every rank raises TrainingInterrupted
    (a collective; after the last epoch there is nothing left to stop)."""
    flag = torch.tensor([float(stop_requested())], device=distributed.comm_device())
    if distributed.all_reduce_sum(flag).item() > 0 and epoch + 1 < epochs:
        raise TrainingInterrupted(received_signal(), checkpoint_path)
