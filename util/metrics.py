"""Running metrics (windowed and global averages) that reduce across ranks on any backend, and top-k hits."""
from collections import defaultdict, deque
from typing import Dict, List, Sequence

import torch

from util import distributed


class SmoothedValue:
    """A series of values: median / avg over a recent window, and the global average since creation."""

    def __init__(self, window_size: int = 20, fmt: str = '{median:.4f} ({global_avg:.4f})'):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value: float, n: int = 1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self):
        """Sum count and total over ranks (the window stays local)."""
        if distributed.get_world_size() == 1:
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=distributed.comm_device())
        t = distributed.all_reduce_sum(t).tolist()
        self.count = int(t[0])
        self.total = t[1]

    @property
    def median(self) -> float:
        return float(torch.tensor(list(self.deque)).median().item()) if self.deque else 0.0

    @property
    def avg(self) -> float:
        return sum(self.deque) / len(self.deque) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def max(self) -> float:
        return max(self.deque) if self.deque else 0.0

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max,
                               value=self.value)


class MetricLogger:
    """Named SmoothedValues: update(loss=..., lr=...), then str() for a log line or global averages."""

    def __init__(self, delimiter: str = '  '):
        self.meters: Dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def add_meter(self, name: str, meter: SmoothedValue):
        self.meters[name] = meter

    def update(self, n: int = 1, **kwargs):
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            self.meters[name].update(float(value), n=n)

    def __str__(self):
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def global_averages(self) -> Dict[str, float]:
        return {name: meter.global_avg for name, meter in self.meters.items()}


def topk_hits(output: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1,)) -> List[torch.Tensor]:
    """For each k, how many rows of `output` [N, classes] have `target` [N] among their k highest scores, as a
    0-d tensor on the output's device (no host sync). k above the class count counts every row."""
    maxk = min(max(ks), output.shape[1])
    _, pred = output.topk(maxk, dim=1)
    correct = pred.eq(target.reshape(-1, 1))  # [N, maxk], at most one True per row
    return [correct[:, :min(k, maxk)].sum() for k in ks]
