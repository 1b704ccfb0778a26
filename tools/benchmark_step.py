"""The training-step benchmark of `python -m tools.benchmark`: a pretraining or fine-tuning step on synthetic
tensors, timed in windows after warm-up (device synchronised at window edges), its FLOPs counted by
torch.utils.flop_counter and held against a matrix-multiply peak measured in the same run."""
import dataclasses
import statistics
import time
from typing import Dict, List

import torch
from torch.utils.flop_counter import FlopCounterMode

import main_finetune
import main_pretrain
import models_mae
import models_vit
from util.loss_scaler import LossScaler


def matmul_peak_flops(runtime, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matrix product on this device and dtype: the ceiling the step is held to."""
    n = 2048 if runtime.type == 'cpu' else 8192
    a = torch.randn(n, n, device=runtime.device, dtype=dtype)
    b = torch.randn(n, n, device=runtime.device, dtype=dtype)
    times = []
    for i in range(5):
        runtime.synchronize()
        start = time.perf_counter()
        (a @ b).sum().item() if i == 0 else a @ b  # the first product also warms up the library
        runtime.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times[1:])


def step_flops(model: torch.nn.Module, images: torch.Tensor, forward) -> float:
    """Forward + backward FLOPs of one step, counted on the eager attention (every product is a plain matmul)."""
    impls = [m.impl for m in model.modules() if isinstance(m, models_vit.Attention)]
    models_vit.set_attention_impl(model, 'eager')
    counter = FlopCounterMode(display=False)
    with counter:
        forward(model, images).backward()
    model.zero_grad(set_to_none=True)
    for m, impl in zip([m for m in model.modules() if isinstance(m, models_vit.Attention)], impls):
        m.impl = impl
    return float(counter.get_total_flops())


# --- the training step -------------------------------------------------------------------------------------

def build(name: str, args, attn_impl: str) -> torch.nn.Module:
    if name in models_mae.MODELS:
        return models_mae.build_mae(name, patch_size=args.patch_size, img_size=args.input_size, attn_impl=attn_impl)
    return models_vit.build_classifier(name, patch_size=args.patch_size, img_size=args.input_size,
                                       attn_impl=attn_impl, drop_path_rate=0.1)


def make_forward(name: str, args, runtime):
    """loss = forward(model, images), as the pretraining or fine-tuning engine computes it."""
    if name in models_mae.MODELS:
        def forward(model, images):
            with runtime.autocast():
                return model(images, mask_ratio=args.mask_ratio)[0]
        return forward
    labels = torch.randint(0, 1000, (args.batch_size,), device=runtime.device)

    def forward(model, images):
        with runtime.autocast():
            return torch.nn.functional.cross_entropy(model(images), labels)
    return forward


def time_windows(fn, runtime, warmup: int, windows: int, steps: int) -> List[float]:
    """Seconds per call of fn for each of `windows` windows of `steps` calls, after `warmup` calls; the device is
    synchronised at window edges only."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(windows):
        runtime.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        runtime.synchronize()
        times.append((time.perf_counter() - start) / steps)
    return times


def time_steps(model, images, forward, optimizer, loss_scaler, runtime, args, sync_every_step: bool = False
               ) -> List[float]:
    """Seconds per step for each timed window (device synchronised at window edges only, unless sync_every_step:
    the official loop reads the loss on the host and synchronises after every step)."""
    def step():
        loss = forward(model, images)
        loss_scaler(loss, optimizer, parameters=model.parameters())
        optimizer.zero_grad(set_to_none=True)
        if sync_every_step:
            loss.item()
            runtime.synchronize()
    return time_windows(step, runtime, args.warmup, args.windows, args.steps)


def measure(name: str, args, runtime, attn_impl: str = 'sdpa', compile_model: bool = False, peak: float = 0.0,
            official: bool = False) -> Dict[str, float]:
    """One step configuration's row. official: the official implementation's step (eager attention, fp16
    autocast with a gradient scaler, a host sync every step), whatever --amp says."""
    if official:
        runtime, attn_impl = dataclasses.replace(runtime, amp='fp16'), 'eager'
    torch.manual_seed(0)
    model = build(name, args, attn_impl).to(runtime.device)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=runtime.device)
    forward = make_forward(name, args, runtime)
    flops = step_flops(model, images, forward)
    optimizer = build_optimizer(name, model, args.adamw_impl, runtime)
    runner = torch.compile(model) if compile_model else model
    runtime.reset_peak_memory_stats()
    windows = time_steps(runner, images, forward, optimizer, LossScaler(runtime.grad_scaler()), runtime, args,
                         sync_every_step=official)
    step_time = statistics.median(windows)
    achieved = flops / step_time
    return {'model': name, 'variant': 'official' if official else 'ours', 'attention': attn_impl, 'amp': runtime.amp,
            'compile': compile_model, 'batch_size': args.batch_size,
            'mask_ratio': args.mask_ratio if name in models_mae.MODELS else None,
            'step_ms': 1000 * step_time, 'images_per_sec': args.batch_size / step_time,
            'window_ms': [1000 * w for w in windows], 'gflops_per_image': flops / args.batch_size / 1e9,
            'achieved_tflops': achieved / 1e12, 'fraction_of_matmul_peak': achieved / peak if peak else None,
            'peak_mem_gib': runtime.max_memory_allocated() / 2 ** 30}


def build_optimizer(name: str, model: torch.nn.Module, adamw_impl: str, runtime) -> torch.optim.Optimizer:
    """The optimizer the recipe's script builds (main_pretrain.build_optimizer for an MAE, main_finetune's for a
    classifier), with that script's default flags and this --adamw_impl."""
    script = main_pretrain if name in models_mae.MODELS else main_finetune
    recipe = script.get_args_parser().parse_args(['--adamw_impl', adamw_impl])
    return script.build_optimizer(recipe, model, 1e-4, runtime.type)
