"""Benchmarks users can run: the training step on synthetic tensors (images/s, peak memory, FLOP/s against a
matrix-multiply peak measured in the same run), optionally beside the eager (official) attention; a scaling
table over mask ratio and model size; and the input pipeline on a folder of real JPEGs.

python -m util.benchmark --model mae_vit_base_patch16 --batch_size 8 --device cpu --compare
python -m util.benchmark --model vit_base_patch16 --batch_size 64 --amp bf16 --compile --compare
python -m util.benchmark --scaling --batch_size 8
python -m util.benchmark --pipeline --data_path /datasets/imagenet --num_workers 8
Prints a table and writes every number to --json (default benchmark.json).
"""
import argparse
import json
import statistics
import time
from types import SimpleNamespace
from typing import Dict, List

import torch
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

import models_mae
import models_vit
from util.amp import LossScaler
from util.args import ADAMW_IMPLS
from util.datasets import (build_finetune_train_transform, build_image_folder, build_pretrain_transform,
                           normalize_batch)
from util.device import AMP_CHOICES, DEVICE_CHOICES, setup_runtime
from util.fast_decode import build_fast_pretrain_transform, decode_rgb_tensor
from util.lr_decay import param_groups_lrd, param_groups_weight_decay
from util.training import make_adamw

SCALING_MODELS = ('mae_vit_tiny_patch16', 'mae_vit_small_patch16', 'mae_vit_base_patch16', 'mae_vit_large_patch16')
SCALING_MASK_RATIOS = (0.5, 0.75, 0.9)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('MAE benchmarks', add_help=True)
    parser.add_argument('--model', default='mae_vit_base_patch16',
                        help='mae_vit_* (pretraining step) or vit_* (fine-tuning step)')
    parser.add_argument('--batch_size', default=8, type=int)
    parser.add_argument('--input_size', default=224, type=int)
    parser.add_argument('--patch_size', default=None, type=int, help="default: the model's own")
    parser.add_argument('--mask_ratio', default=0.75, type=float)
    parser.add_argument('--device', default='auto', choices=DEVICE_CHOICES)
    parser.add_argument('--amp', default=None, choices=AMP_CHOICES)
    parser.add_argument('--compile', action='store_true', help='torch.compile the model (ours, not the baseline)')
    parser.add_argument('--grad_checkpointing', action='store_true')
    parser.add_argument('--adamw_impl', default='auto', choices=ADAMW_IMPLS)
    parser.add_argument('--compare', action='store_true', help='also time the eager (official) attention')
    parser.add_argument('--scaling', action='store_true', help='step cost over mask ratios and model sizes')
    parser.add_argument('--pipeline', action='store_true', help='input-pipeline throughput on real JPEGs')
    parser.add_argument('--data_path', default=None, help='for --pipeline: a folder holding train/<class>/*.jpg')
    parser.add_argument('--num_workers', default=2, type=int, help='for --pipeline')
    parser.add_argument('--pipeline_batches', default=60, type=int,
                        help='for --pipeline: batches of 64 timed per variant')
    parser.add_argument('--warmup', default=3, type=int, help='untimed steps first')
    parser.add_argument('--steps', default=5, type=int, help='steps per timed window')
    parser.add_argument('--windows', default=3, type=int, help='timed windows; the median is reported')
    parser.add_argument('--json', default='benchmark.json', help='where to write the results')
    return parser


# --- peak and FLOPs ----------------------------------------------------------------------------------------

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
    kwargs = dict(img_size=args.input_size, attn_impl=attn_impl)
    if args.patch_size:
        kwargs['patch_size'] = args.patch_size
    if name in models_mae.MODELS:
        return models_mae.build_mae(name, **kwargs)
    return models_vit.build_classifier(name, drop_path_rate=0.1, **kwargs)


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


def time_steps(model, images, forward, optimizer, loss_scaler, runtime, args) -> List[float]:
    """Seconds per step for each timed window (device synchronised at window edges only)."""
    def step():
        loss_scaler(forward(model, images), optimizer, parameters=model.parameters())
        optimizer.zero_grad(set_to_none=True)
    for _ in range(args.warmup):
        step()
    windows = []
    for _ in range(args.windows):
        runtime.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        runtime.synchronize()
        windows.append((time.perf_counter() - start) / args.steps)
    return windows


def bench_step(name: str, args, runtime, attn_impl: str = 'sdpa', compile_model: bool = False,
               peak: float = 0.0) -> Dict[str, float]:
    torch.manual_seed(0)
    model = build(name, args, attn_impl).to(runtime.device)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=runtime.device)
    forward = make_forward(name, args, runtime)
    flops = step_flops(model, images, forward)
    if name in models_mae.MODELS:
        groups = param_groups_weight_decay(model, 0.05)
    else:
        groups = param_groups_lrd(model, 0.05, model.no_weight_decay(), 0.75)
    optimizer = make_adamw(groups, SimpleNamespace(lr=1e-4, adamw_impl=args.adamw_impl), runtime,
                           betas=(0.9, 0.95) if name in models_mae.MODELS else (0.9, 0.999))
    runner = torch.compile(model) if compile_model else model
    runtime.reset_peak_memory_stats()
    windows = time_steps(runner, images, forward, optimizer, LossScaler(runtime.grad_scaler()), runtime, args)
    step_time = statistics.median(windows)
    achieved = flops / step_time
    return {'model': name, 'attention': attn_impl, 'compile': compile_model, 'batch_size': args.batch_size,
            'mask_ratio': args.mask_ratio if name in models_mae.MODELS else None,
            'step_ms': 1000 * step_time, 'images_per_sec': args.batch_size / step_time,
            'window_ms': [1000 * w for w in windows], 'gflops_per_image': flops / args.batch_size / 1e9,
            'achieved_tflops': achieved / 1e12, 'fraction_of_matmul_peak': achieved / peak if peak else None,
            'peak_mem_gib': runtime.max_memory_allocated() / 2 ** 30}


# --- input pipeline ------------------------------------------------------------------------------------------

def pipeline_variants(args) -> Dict[str, tuple]:
    """name -> (dataset, ...) for each input pipeline worth comparing, on the same files."""
    from torchvision import datasets
    root = f'{args.data_path}/train'
    finetune_args = SimpleNamespace(input_size=args.input_size, color_jitter=None, aa='rand-m9-mstd0.5-inc1',
                                    reprob=0.25, remode='pixel', recount=1)
    return {
        'torchvision ImageFolder + RandomResizedCrop (baseline)':
            datasets.ImageFolder(root, build_pretrain_transform(args.input_size)),
        'pretrain, uint8 out + device normalise (default)':
            build_image_folder(root, build_pretrain_transform(args.input_size, uint8_output=True)),
        'pretrain, --fast_decode':
            build_image_folder(root, build_fast_pretrain_transform(args.input_size), decode=decode_rgb_tensor),
        'fine-tune transform (RandAugment, random erasing)':
            build_image_folder(root, build_finetune_train_transform(finetune_args)),
    }


def bench_pipeline(dataset, args, runtime) -> Dict[str, float]:
    loader = DataLoader(dataset, batch_size=64, shuffle=True, num_workers=args.num_workers, drop_last=True,
                        persistent_workers=args.num_workers > 0, pin_memory=runtime.pin_memory_supported)

    def batches():
        while True:
            yield from loader
    stream = batches()
    for _ in range(2):  # workers started and queues filled
        next(stream)
    start = time.perf_counter()
    images = 0
    for _ in range(args.pipeline_batches):
        samples, _ = next(stream)
        if runtime.type != 'cpu':  # on an accelerator, finishing uint8 batches there is part of the pipeline
            normalize_batch(samples, runtime.device)
        images += samples.shape[0]
    runtime.synchronize()
    rate = images / (time.perf_counter() - start)
    return {'images_per_sec': rate, 'images_per_sec_per_worker': rate / max(args.num_workers, 1),
            'num_workers': args.num_workers}


# --- report ------------------------------------------------------------------------------------------------

def print_table(title: str, rows: List[Dict], columns: List[tuple]):
    print(f'\n{title}')
    header = '  '.join(f'{name:>{width}}' for name, _, width, _ in columns)
    print(header)
    print('-' * len(header))
    for row in rows:
        cells = []
        for _, key, width, fmt in columns:
            value = row.get(key)
            cells.append(f'{"-" if value is None else format(value, fmt):>{width}}')
        print('  '.join(cells))


STEP_COLUMNS = [('model', 'model', 22, ''), ('attention', 'attention', 9, ''), ('compile', 'compile', 7, ''),
                ('mask', 'mask_ratio', 5, ''), ('batch', 'batch_size', 5, 'd'), ('step ms', 'step_ms', 9, '.1f'),
                ('img/s', 'images_per_sec', 9, '.1f'), ('GFLOP/img', 'gflops_per_image', 9, '.1f'),
                ('TFLOP/s', 'achieved_tflops', 8, '.3f'), ('of peak', 'fraction_of_matmul_peak', 7, '.1%'),
                ('peak GiB', 'peak_mem_gib', 8, '.2f')]


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    runtime = setup_runtime(args.device, args.amp)
    dtype = runtime.amp_dtype or torch.float32
    results = {'device': runtime.describe(), 'torch': torch.__version__, 'threads': torch.get_num_threads(),
               'args': vars(args)}
    print(f'device: {runtime.describe()}, torch {torch.__version__}, {torch.get_num_threads()} threads')

    if args.pipeline:
        if not args.data_path:
            raise SystemExit('error: --pipeline needs --data_path (a folder holding train/<class>/*.jpg)')
        rows = []
        variants = pipeline_variants(args)
        for name, dataset in variants.items():
            rows.append({'pipeline': name, **bench_pipeline(dataset, args, runtime)})
        base = rows[0]['images_per_sec']
        for row in rows:
            row['vs_baseline'] = row['images_per_sec'] / base
        num_images = len(next(iter(variants.values())))
        where = ('uint8 batches normalised on the device' if runtime.type != 'cpu' else
                 'uint8 batches would be normalised on the accelerator, not counted on cpu')
        print_table(f'Input pipeline: {args.num_workers} workers, {args.input_size}px crops, {num_images} JPEGs '
                    f'({where})',
                    rows, [('pipeline', 'pipeline', 52, ''), ('img/s', 'images_per_sec', 8, '.1f'),
                           ('per worker', 'images_per_sec_per_worker', 10, '.1f'),
                           ('vs baseline', 'vs_baseline', 11, '.2f')])
        results['pipeline'] = rows
    else:
        peak = matmul_peak_flops(runtime, dtype)
        results['matmul_peak_tflops'] = peak / 1e12
        print(f'matrix-multiply peak ({str(dtype).replace("torch.", "")}): {peak / 1e12:.3f} TFLOP/s')
        rows = []
        if args.scaling:
            for name in SCALING_MODELS:
                for ratio in SCALING_MASK_RATIOS:
                    args.mask_ratio = ratio
                    rows.append(bench_step(name, args, runtime, peak=peak))
            print_table('Step cost against mask ratio and model size', rows, STEP_COLUMNS)
        else:
            rows.append(bench_step(args.model, args, runtime, compile_model=args.compile, peak=peak))
            if args.compare:
                rows.append(bench_step(args.model, args, runtime, attn_impl='eager', peak=peak))
                rows[0]['speedup_vs_eager'] = rows[0]['images_per_sec'] / rows[1]['images_per_sec']
            print_table('Training step (synthetic images)', rows, STEP_COLUMNS)
            if args.compare:
                print(f"ours / eager attention: {rows[0]['speedup_vs_eager']:.2f}x images/s")
        results['steps'] = rows
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=2)
        print(f'\nresults written to {args.json}')


if __name__ == '__main__':
    main()
