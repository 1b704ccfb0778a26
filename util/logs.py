"""Run outputs on rank 0: TensorBoard scalars and log.txt, one JSON object per epoch (the official format)."""
import json
import os
from typing import Optional

from util import distributed


def make_log_writer(log_dir: Optional[str]):
    """A TensorBoard SummaryWriter on rank 0 when log_dir is set, else None."""
    if not log_dir or not distributed.is_main_process():
        return None
    from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is slow to import
    os.makedirs(log_dir, exist_ok=True)
    return SummaryWriter(log_dir=log_dir)


def append_log(output_dir: str, stats: dict, log_writer=None):
    """Append one epoch's stats to output_dir/log.txt (rank 0), flushing TensorBoard first."""
    if not output_dir or not distributed.is_main_process():
        return
    if log_writer is not None:
        log_writer.flush()
    with open(os.path.join(output_dir, 'log.txt'), mode='a', encoding='utf-8') as f:
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


def read_log(path: str) -> list:
    """The JSON objects of a log.txt, one per epoch."""
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f if line.strip()]
