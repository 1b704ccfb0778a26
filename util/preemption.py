"""Clean stops on SIGTERM / SIGUSR1 (SLURM pre-emption and requeue, `scancel`, Kubernetes): the handler only
sets a flag; the training loop saves a checkpoint at the next optimizer step and exits with 128 + signal."""
import signal

import torch

from util import distributed

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_received = []


class TrainingInterrupted(Exception):
    """Raised out of the training loop after the stop checkpoint was written."""

    def __init__(self, signum: int, checkpoint_path: str):
        self.signum = signum
        self.checkpoint_path = checkpoint_path
        super().__init__(f'stopped by {signal.Signals(signum).name}; checkpoint saved to {checkpoint_path}')

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _handler(signum, _frame):
    _received.append(signum)


def install_handlers():
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)


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
