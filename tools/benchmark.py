"""Benchmarks users can run: the training step on synthetic tensors (images/s, peak memory, FLOP/s against a
matrix-multiply peak measured in the same run), optionally beside the eager (official) attention; a scaling
table over mask ratio and model size; the input pipeline on a folder of real JPEGs (and on the same JPEGs as shards
and Parquet); and the memory per process with DDP and with --fsdp.

python -m tools.benchmark --model mae_vit_base_patch16 --batch_size 8 --device cpu --compare
python -m tools.benchmark --model vit_base_patch16 --batch_size 64 --amp bf16 --compile --compare
python -m tools.benchmark --scaling --batch_size 8
python -m tools.benchmark --pipeline --data_path /datasets/imagenet --num_workers 8
python -m tools.benchmark --layouts --data_path /tmp/jpegs --num_workers 2   # folders / shards / Parquet
python -m tools.benchmark --memory --model mae_vit_base_patch16 --device cpu --memory_processes 1 2 4
python -m tools.benchmark --knn --batch_size 16 --device cpu     # the k-NN monitor's and main_knn.py's costs
python -m tools.benchmark --rollback --batch_size 8 --device cpu   # what --on_nonfinite rollback costs a step
Prints a table; --json FILE also writes every number.
"""
import argparse
import json
import sys
from typing import Dict, List

import torch

import main_pretrain
import models_mae
import models_vit
from util import flags as cli
from util import checks
from tools import benchmark_memory as memory
from tools import benchmark_pipeline as pipeline
from tools import benchmark_knn, benchmark_layouts, benchmark_snapshot
from tools import benchmark_step as step
from util import knn, knn_monitor
from util.datasets import DataError
from util.device import AMP_CHOICES, DEVICE_CHOICES, DeviceError, setup_runtime

SCALING_MODELS = ('mae_vit_tiny_patch16', 'mae_vit_small_patch16', 'mae_vit_base_patch16', 'mae_vit_large_patch16')
SCALING_MASK_RATIOS = (0.5, 0.75, 0.9)


def get_args_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser('python -m tools.benchmark', 'MAE benchmarks')
    parser.add_argument('--model', default='mae_vit_base_patch16',
                        help='mae_vit_* (pretraining step) or vit_* (fine-tuning step)')
    parser.add_argument('--batch_size', default=8, type=int, check=cli.POSITIVE_INT, help='images per step')
    parser.add_argument('--input_size', default=224, type=int, check=cli.POSITIVE_INT, help='image side in pixels')
    parser.add_argument('--patch_size', default=None, type=int, check=cli.POSITIVE_INT,
                        help="patch side in pixels (default: the model's own)")
    parser.add_argument('--mask_ratio', default=0.75, type=float, check=cli.within(0, 1, '[)'),
                        help='MAE: fraction of patches hidden')
    parser.add_argument('--device', default='auto', choices=DEVICE_CHOICES, help='backend')
    parser.add_argument('--amp', default=None, choices=AMP_CHOICES,
                        help='mixed precision (default: fp16 on cuda/npu/sdaa, off on cpu/mps)')
    parser.add_argument('--compile', action='store_true', help='torch.compile the model (ours, not the baseline)')
    parser.add_argument('--grad_checkpointing', action='store_true', help='recompute activations in backward')
    parser.add_argument('--adamw_impl', default='auto', choices=cli.ADAMW_IMPLS, help='AdamW kernel')
    parser.add_argument('--compare', action='store_true', help='also time the eager (official) attention formula')
    parser.add_argument('--official', action='store_true',
                        help="also time the official implementation's step: eager attention, fp16 autocast with a "
                             'gradient scaler, a host sync every step')
    parser.add_argument('--scaling', action='store_true', help='step cost over mask ratios and model sizes')
    parser.add_argument('--pipeline', action='store_true', help='input-pipeline throughput on real JPEGs')
    parser.add_argument('--layouts', action='store_true',
                        help='the same JPEGs (--data_path) as folders, WebDataset shards and Parquet: images/s per '
                             'worker over an epoch, files opened, epoch start-up')
    parser.add_argument('--memory', action='store_true',
                        help='bytes per process of parameters, gradients and AdamW state with DDP and with --fsdp, '
                             'one torchrun launch per process count')
    parser.add_argument('--memory_processes', type=int, nargs='+', default=[1, 2, 4],
                        help='for --memory: the process counts')
    parser.add_argument('--end_to_end', action='store_true',
                        help='also time the pretraining step fed by the real loader on --data_path (default decode '
                             'and --fast_decode), beside the synthetic step')
    parser.add_argument('--data_path', default=None,
                        help='for --pipeline / --end_to_end / --layouts: a folder holding train/<class>/*.jpg')
    parser.add_argument('--num_workers', default=2, type=int, check=cli.at_least(0),
                        help='for --pipeline / --end_to_end / --layouts: DataLoader workers')
    parser.add_argument('--pipeline_batches', default=60, type=int, check=cli.at_least(1),
                        help=f'for --pipeline: batches of {pipeline.BATCH} timed per variant')
    parser.add_argument('--warmup', default=3, type=int, check=cli.at_least(0), help='untimed steps first')
    parser.add_argument('--steps', default=5, type=int, check=cli.at_least(1), help='steps per timed window')
    parser.add_argument('--windows', default=3, type=int, check=cli.at_least(1),
                        help='timed windows; the median is reported')
    parser.add_argument('--knn', action='store_true',
                        help="the k-NN costs: --model's encoder forward per image beside its training step, and the "
                             'chunked similarity against a bank, with the arithmetic for ImageNet')
    parser.add_argument('--knn_bank', default=benchmark_knn.IMAGENET_TRAIN, type=int,
                        help='for --knn: bank images (random unit features)')
    parser.add_argument('--knn_queries', default=knn.QUERY_CHUNK, type=int, help='for --knn: queries timed')
    parser.add_argument('--knn_k', default=knn.DEFAULT_K, type=int, help='for --knn: neighbours')
    parser.add_argument('--knn_train_per_class', default=knn_monitor.MONITOR_TRAIN_PER_CLASS, type=int,
                        help="for --knn: the monitor's bank images per class")
    parser.add_argument('--knn_val_per_class', default=knn_monitor.MONITOR_VAL_PER_CLASS, type=int,
                        help="for --knn: the monitor's queries per class")
    parser.add_argument('--rollback', action='store_true',
                        help='what --on_nonfinite rollback costs: the gradient check per step, a snapshot, a restore')
    parser.add_argument('--rollback_models', nargs='+', default=['mae_vit_tiny_patch16', 'mae_vit_small_patch16'],
                        choices=list(models_mae.MODELS), metavar='MODEL', help='for --rollback: the models timed')
    parser.add_argument('--json', default=None, help='also write every number to this JSON file')
    return parser


def check_args(args):
    errors = []
    if args.knn and args.model not in models_mae.MODELS:
        errors.append(f'--model {args.model}: --knn times an MAE training step; choose from '
                      f'{", ".join(models_mae.MODELS)}')
    models = {**models_mae.MODELS, **models_vit.MODELS}
    if args.model not in models:
        errors.append(f'--model {args.model}: unknown model; choose from {", ".join(models)}')
    else:
        patch = args.patch_size or models_vit.default_patch_size(models[args.model])
        checks.check_patch_grid(args.input_size, patch, errors)
        if args.model in models_mae.MODELS and not args.scaling:
            main_pretrain.check_mask_ratio(args.mask_ratio, args.input_size, patch, errors)
    if args.pipeline or args.end_to_end or args.layouts:
        checks.check_data_path(args.data_path, ['train'], errors)
    if args.json and not checks.writable_file(args.json):
        errors.append(f'--json {args.json}: cannot write this file (is its folder there and writable?)')
    checks.raise_if_errors(errors)


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


STEP_COLUMNS = [('model', 'model', 22, ''), ('variant', 'variant', 8, ''), ('attention', 'attention', 9, ''),
                ('amp', 'amp', 4, ''), ('compile', 'compile', 7, ''),
                ('mask', 'mask_ratio', 5, ''), ('batch', 'batch_size', 5, 'd'), ('step ms', 'step_ms', 9, '.1f'),
                ('img/s', 'images_per_sec', 9, '.1f'), ('GFLOP/img', 'gflops_per_image', 9, '.1f'),
                ('TFLOP/s', 'achieved_tflops', 8, '.3f'), ('of peak', 'fraction_of_matmul_peak', 7, '.1%'),
                ('peak GiB', 'peak_mem_gib', 8, '.2f')]


def memory_table(args, runtime) -> List[Dict]:
    """Per-process bytes with DDP and FSDP at each --memory_processes (see tools/benchmark_memory.py)."""
    rows = [memory.launch_one(args.model, runtime.type, args.input_size, args.patch_size, processes, fsdp)
            for fsdp in (False, True) for processes in args.memory_processes]
    for row in rows:
        row.update({key.replace('_bytes', '_gib'): row[key] / 2 ** 30 for key in list(row) if key.endswith('_bytes')})
    print_table(f'Memory per process after one AdamW step, {args.model} (activations not included)', rows,
                [('sharding', 'sharding', 8, ''), ('processes', 'processes', 9, 'd'),
                 ('params GiB', 'parameters_gib', 10, '.3f'), ('grads GiB', 'gradients_gib', 9, '.3f'),
                 ('AdamW GiB', 'optimizer_state_gib', 9, '.3f'), ('total GiB', 'total_gib', 9, '.3f'),
                 ('bytes/param', 'bytes_per_parameter', 11, '.2f')])
    return rows


def rollback_tables(args, runtime) -> Dict:
    """--on_nonfinite rollback's costs measured on --rollback_models, and every MAE size's snapshot from its size
    (tools/benchmark_snapshot.py)."""
    result = benchmark_snapshot.report(args, runtime)
    every = benchmark_snapshot.SNAPSHOT_EVERY
    print_table(f'--on_nonfinite rollback, batch {args.batch_size}: the step, its gradient check, one snapshot and '
                f'restore, and the overhead at --snapshot_every {every}', result['measured'],
                [('model', 'model', 22, ''), ('step ms', 'step_ms', 9, '.1f'), ('check ms', 'check_ms', 9, '.2f'),
                 ('snapshot ms', 'snapshot_ms', 11, '.1f'), ('restore ms', 'restore_ms', 10, '.1f'),
                 ('host MiB', 'host_mib', 9, '.1f'), ('copy GB/s', 'copy_gb_per_s', 9, '.2f'),
                 ('overhead', 'overhead', 8, '.2%')])
    print_table(f"Snapshot of each MAE (12 bytes per trained parameter) at {result['copy_gb_per_s']:.2f} GB/s, the "
                'copy rate measured above', result['sizes'],
                [('model', 'model', 22, ''), ('trained M', 'trained_parameters_m', 9, '.1f'),
                 ('host GiB', 'host_gib', 8, '.2f'), ('snapshot s', 'snapshot_s', 10, '.2f')])
    return result


def end_to_end(args, runtime, synthetic: dict) -> List[Dict]:
    """The pretraining step fed by the real loader, both decoders, as a fraction of the synthetic step."""
    rows = [pipeline.measure_end_to_end(args, runtime, fast_decode) for fast_decode in (False, True)]
    for row in rows:
        row['vs_synthetic'] = row['images_per_sec'] / synthetic['images_per_sec']
    print_table(f'End to end: {args.num_workers} workers, batch {args.batch_size}', rows,
                [('pipeline', 'pipeline', 56, ''), ('img/s', 'images_per_sec', 9, '.1f'),
                 ('vs synthetic', 'vs_synthetic', 12, '.1%')])
    return rows


def main(argv=None) -> int:
    args = cli.parse_with(get_args_parser(), argv)
    try:
        check_args(args)
        run(args)
    except (checks.UsageError, DataError, DeviceError) as e:
        for line in str(e).splitlines():
            print(f'error: {line}', file=sys.stderr, flush=True)
        return 2
    return 0


def run(args):
    runtime = setup_runtime(args.device, args.amp)
    dtype = runtime.amp_dtype or torch.float32
    results = {'device': runtime.describe(), 'torch': torch.__version__, 'threads': torch.get_num_threads(),
               'args': vars(args)}
    print(f'device: {runtime.describe()}, torch {torch.__version__}, {torch.get_num_threads()} threads')

    if args.memory:
        results['memory'] = memory_table(args, runtime)
    elif args.knn:
        results['knn'] = benchmark_knn.report(args, runtime)
        benchmark_knn.print_report(results['knn'], args)
    elif args.layouts:
        results['layouts'] = benchmark_layouts.report(args)
    elif args.rollback:
        results['rollback'] = rollback_tables(args, runtime)
    elif args.pipeline:
        rows = []
        variants = pipeline.variants(args)
        for name, dataset in variants.items():
            rows.append({'pipeline': name, **pipeline.measure(dataset, args, runtime)})
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
        peak = step.matmul_peak_flops(runtime, dtype)
        results['matmul_peak_tflops'] = peak / 1e12
        print(f'matrix-multiply peak ({str(dtype).replace("torch.", "")}): {peak / 1e12:.3f} TFLOP/s')
        rows = []
        if args.scaling:
            for name in SCALING_MODELS:
                for ratio in SCALING_MASK_RATIOS:
                    rows.append(step.measure(name, argparse.Namespace(**{**vars(args), 'mask_ratio': ratio}), runtime,
                                             peak=peak))
            print_table('Step cost against mask ratio and model size', rows, STEP_COLUMNS)
        else:
            ours = step.measure(args.model, args, runtime, compile_model=args.compile, peak=peak)
            rows.append(ours)
            if args.compare:
                rows.append(step.measure(args.model, args, runtime, attn_impl='eager', peak=peak))
                ours['speedup_vs_eager'] = ours['images_per_sec'] / rows[-1]['images_per_sec']
            if args.official:
                rows.append(step.measure(args.model, args, runtime, peak=peak, official=True))
                ours['speedup_vs_official'] = ours['images_per_sec'] / rows[-1]['images_per_sec']
            print_table('Training step (synthetic images)', rows, STEP_COLUMNS)
            for key, label in (('speedup_vs_eager', 'eager attention'), ('speedup_vs_official', 'official step')):
                if key in ours:
                    print(f'ours / {label}: {ours[key]:.2f}x images/s')
            if args.end_to_end:
                results['end_to_end'] = end_to_end(args, runtime, ours)
        results['steps'] = rows
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(results, f, indent=2)
        print(f'\nresults written to {args.json}')


if __name__ == '__main__':
    sys.exit(main())
