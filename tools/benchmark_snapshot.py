"""--rollback of `python -m tools.benchmark`: what --on_nonfinite rollback costs a training step (util/rollback.py).

Two costs: the per-step gradient check (one fused norm of the gradients on the device; only without an fp16 loss
scaler) and a snapshot every --snapshot_every steps (its parameters and AdamW state copied into host memory). For
each --rollback_models model, measured in one run: the step, the check after a step's backward (timed on its own,
the device synchronised around it), a snapshot and a restore; the overhead at K steps is (check + snapshot / K) /
step. For every MAE size, the snapshot's host memory follows from the parameter count:
4 bytes of weights and 8 of AdamW moments per trained parameter, and its time at a copy bandwidth."""
import statistics
import time
from typing import Dict, List

import torch

import models_mae
from tools import benchmark_step as step
from util.loss_scaler import LossScaler
from util.progress import gradient_fault
from util.rollback import SNAPSHOT_EVERY, Position, Snapshot

BYTES_PER_TRAINED_PARAMETER = 12  # float32 weights, AdamW's exp_avg and exp_avg_sq


def trained_parameters(name: str) -> int:
    """The trained parameters of an MAE (the fixed sin-cos position tables excluded), built without memory."""
    with torch.device('meta'):
        model = models_mae.build_mae(name)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def timed_each(fn, runtime, repeats: int = 5) -> float:
    """Median seconds of fn, the device synchronised around each call."""
    times = []
    for _ in range(repeats):
        runtime.synchronize()
        start = time.perf_counter()
        fn()
        runtime.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, args, runtime) -> Dict[str, float]:
    """One model's row: step, checked step, snapshot and restore times, host bytes, overhead at SNAPSHOT_EVERY."""
    torch.manual_seed(0)
    model = step.build(name, args, 'sdpa').to(runtime.device)
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=runtime.device)
    forward = step.make_forward(name, args, runtime)
    optimizer = step.build_optimizer(name, model, args.adamw_impl, runtime)
    loss_scaler = LossScaler(runtime.grad_scaler())
    trained = [p for p in model.parameters() if p.requires_grad]
    checks = not loss_scaler.scales_loss
    check_times = []

    def train_step():
        loss_scaler(forward(model, images), optimizer, parameters=trained)
        optimizer.zero_grad(set_to_none=True)

    def checked_step():  # the check timed on its own, the device synchronised around it
        loss_scaler(forward(model, images), optimizer, parameters=trained)
        check_times.append(timed_each(lambda: gradient_fault(trained), runtime, repeats=1))
        optimizer.zero_grad(set_to_none=True)
    step_s = statistics.median(step.time_windows(train_step, runtime, args.warmup, args.windows, args.steps))
    for _ in range(args.steps):
        checked_step()
    check_s = statistics.median(check_times) if checks else 0.0
    snapshot = Snapshot(model, optimizer, loss_scaler, runtime)
    take = timed_each(lambda: snapshot.take(Position(0, 0, {}, 0, 0.0)), runtime)
    restore = timed_each(snapshot.restore, runtime)
    host = snapshot.copies.bytes()
    return {'model': name, 'batch_size': args.batch_size, 'step_ms': 1000 * step_s,
            'check_ms': 1000 * check_s if checks else None, 'snapshot_ms': 1000 * take, 'restore_ms': 1000 * restore,
            'host_bytes': host, 'host_mib': host / 2 ** 20, 'copy_gb_per_s': host / take / 1e9,
            'overhead': (check_s + take / SNAPSHOT_EVERY) / step_s}


def sizes_table(copy_gb_per_s: float) -> List[Dict[str, float]]:
    """Host memory and snapshot time of every MAE size, from its trained parameters, at `copy_gb_per_s`."""
    rows = []
    for name in models_mae.MODELS:
        count = trained_parameters(name)
        size = count * BYTES_PER_TRAINED_PARAMETER
        rows.append({'model': name, 'trained_parameters_m': count / 1e6, 'host_gib': size / 2 ** 30,
                     'snapshot_s': size / (copy_gb_per_s * 1e9)})
    return rows


def report(args, runtime) -> Dict[str, object]:
    rows = [measure(name, args, runtime) for name in args.rollback_models]
    bandwidth = statistics.median(row['copy_gb_per_s'] for row in rows)
    return {'measured': rows, 'copy_gb_per_s': bandwidth, 'sizes': sizes_table(bandwidth)}
