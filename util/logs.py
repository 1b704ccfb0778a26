"""Run outputs on rank 0: TensorBoard scalars and log.txt, one JSON object per epoch (the official format)."""
import atexit
import json
import os
from typing import Optional

from util import distributed


class RunLog:
    """A run's outputs on rank 0: log.txt, one JSON line per epoch, and TensorBoard scalars in --log_dir (other
    ranks hold a RunLog that writes nothing). `tensorboard` is the SummaryWriter the engines add scalars to, or
    None. `constant` values (e.g. n_parameters) go into every line."""

    def __init__(self, output_dir: str, log_dir: Optional[str], **constant):
        self.output_dir = output_dir if distributed.is_main_process() else ''
        self.constant = constant
        self.tensorboard = None
        if log_dir and distributed.is_main_process():
            from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is slow to import
            os.makedirs(log_dir, exist_ok=True)
            self.tensorboard = SummaryWriter(log_dir=log_dir)
            atexit.register(self.tensorboard.close)

    def write(self, epoch: int, train: dict, test: Optional[dict] = None, **values):
        """Append one epoch's line: train_* and test_* stats, the epoch and `values`. TensorBoard gets the test
        figures and is flushed first. Written before the epoch's checkpoint (see truncate_log)."""
        if self.tensorboard is not None:
            for name in ('acc1', 'acc5', 'loss'):
                if test and name in test:
                    self.tensorboard.add_scalar(f'perf/test_{name}', test[name], epoch)
            self.tensorboard.flush()
        if not self.output_dir:
            return
        stats = {**{f'train_{k}': v for k, v in train.items()}, **{f'test_{k}': v for k, v in (test or {}).items()},
                 'epoch': epoch, **self.constant, **values}
        with open(os.path.join(self.output_dir, 'log.txt'), mode='a', encoding='utf-8') as f:
            f.write(json.dumps(stats) + '\n')


def truncate_log(output_dir: str, start_epoch: int):
    """Drop log.txt entries of epochs >= start_epoch: a resumed run redoes them, so none is lost or repeated
    (the log is written before each epoch's checkpoint). A line torn by a kill or a full disk is dropped too."""
    path = os.path.join(output_dir, 'log.txt')
    if not os.path.isfile(path):
        return
    with open(path, encoding='utf-8', errors='replace') as f:
        text = f.read()
    kept = []
    for number, line in enumerate(text.splitlines(), 1):
        entry = parse_log_line(line)
        if entry is None and line.strip():
            print(f'{path}: line {number} is not a JSON log entry (a torn write?); dropped: {line.strip()[:80]}')
        elif entry is not None and entry.get('epoch', -1) < start_epoch:
            kept.append(line + '\n')
    if ''.join(kept) == text:
        return
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        f.writelines(kept)
    os.replace(tmp, path)


def parse_log_line(line: str) -> Optional[dict]:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None

