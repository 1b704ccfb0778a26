"""Clean stops of training runs. SIGTERM / SIGUSR1 (SLURM pre-emption and requeue, `scancel`, Kubernetes) and a
first Ctrl-C (SIGINT) only set a flag: every rank stops at the same optimizer step, saves checkpoint-last.pth and
exits with 128 + signal (130 for Ctrl-C). A second Ctrl-C stops at once, without saving."""
import os
import signal
import sys

import torch

from util import distributed

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
_received = []


class TrainingInterrupted(Exception):
    """Raised out of the training loop after the stop checkpoint was written."""

    def __init__(self, signum: int, checkpoint_path: str):
        self.signum = signum
        self.checkpoint_path = checkpoint_path
        super().__init__(f'stopped by {signal_name(signum)}; checkpoint saved to {checkpoint_path}')

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    return 'Ctrl-C (SIGINT)' if signum == signal.SIGINT else signal.Signals(signum).name


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


def ignore_ctrl_c_in_workers(_worker_id: int):
    """worker_init_fn of the DataLoaders: Ctrl-C reaches every process of the terminal's group, and a worker it
    killed would end the epoch with 'DataLoader worker exited unexpectedly' before the main process can save."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
