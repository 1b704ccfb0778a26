"""The k-NN monitor of pretraining (main_pretrain.py --knn_data_path): util/knn.py's evaluation every
--knn_every epochs and after the last, on a capped bank and query set, logged to log.txt and TensorBoard, without
touching the training numerics (every RNG stream is restored)."""
import os
import time
from typing import List, Optional

import torch

from util import flags as cli
from util import fsdp
from util.checks import UsageError, check_data_path
from util.distributed import print0
from util.knn import (DEFAULT_FEATURE, DEFAULT_K, DEFAULT_TEMPERATURE, FEATURES, KnnData, describe_counts, evaluate,
                      k_too_large, read_knn_data)
from util.pixels import normalization_of
from util.rng import rng_state, set_rng_state

# the default cap, images per class: 0.6-1.4% of a ViT-B ImageNet epoch (README; python -m tools.benchmark --knn)
MONITOR_TRAIN_PER_CLASS = 20
MONITOR_VAL_PER_CLASS = 10
# the monitor's flags and their defaults: the parser's, and what check_args compares against
DEFAULTS = {'knn_every': 10, 'knn_train_per_class': MONITOR_TRAIN_PER_CLASS,
            'knn_val_per_class': MONITOR_VAL_PER_CLASS, 'knn_k': DEFAULT_K, 'knn_temperature': DEFAULT_TEMPERATURE,
            'knn_feature': DEFAULT_FEATURE}
EVERY_IMAGE_AT_0 = cli.at_least(0, ' (0: every image)')


def add_args(parser):
    """main_pretrain.py's flags of the k-NN monitor (off without --knn_data_path)."""
    parser.add_argument('--knn_data_path', default=None,
                        help='k-NN monitor: a folder holding train/ (the memory bank) and val/ (the queries), one '
                             'sub-folder per class; k-NN accuracy is logged every --knn_every epochs and after the '
                             'last (off without it)')
    parser.add_argument('--knn_every', default=DEFAULTS['knn_every'], type=int,
                        check=cli.at_least(1, ' (epochs between k-NN evaluations)'),
                        help='k-NN monitor: run it every N epochs')
    parser.add_argument('--knn_train_per_class', default=DEFAULTS['knn_train_per_class'], type=int,
                        check=EVERY_IMAGE_AT_0,
                        help='k-NN monitor: bank images per class, the first in sorted file order (0: all); the '
                             'default costs 0.6%% (by time) to 1.4%% (by FLOPs) of a ViT-B ImageNet epoch')
    parser.add_argument('--knn_val_per_class', default=DEFAULTS['knn_val_per_class'], type=int, check=EVERY_IMAGE_AT_0,
                        help='k-NN monitor: query images per class, the first in sorted file order (0: all)')
    parser.add_argument('--knn_k', default=DEFAULTS['knn_k'], type=int, check=cli.at_least(1),
                        help='k-NN monitor: neighbours that vote')
    parser.add_argument('--knn_temperature', default=DEFAULTS['knn_temperature'], type=float, check=cli.TEMPERATURE,
                        help='k-NN monitor: T in the vote weight exp(similarity / T)')
    parser.add_argument('--knn_feature', default=DEFAULTS['knn_feature'], choices=FEATURES,
                        help='k-NN monitor: the class token or the mean of the patch tokens, after the final norm')


def check_args(args, errors: List[str]):
    """With the other checks of main_pretrain.py, before any work: the monitor's folder, and no monitor flag
    given without it (the monitor would silently not run)."""
    if args.knn_data_path is not None:
        check_data_path(args.knn_data_path, ['train', 'val'], errors, flag='--knn_data_path')
        return
    for name, default in DEFAULTS.items():
        if getattr(args, name) != default:
            errors.append(f'--{name} {getattr(args, name)}: the k-NN monitor is off without --knn_data_path; add '
                          '--knn_data_path DIR (a folder holding train/ and val/) or drop the flag')


def read_data(args) -> Optional[KnnData]:
    """The monitor's bank and queries, read before any work like the training set (None without the monitor)."""
    if args.knn_data_path is None:
        return None
    data = read_knn_data(args.knn_data_path, args.input_size, args.knn_train_per_class, args.knn_val_per_class,
                         args.max_image_pixels, normalization_of(args))
    where = os.path.join(args.knn_data_path, 'train')
    if args.knn_train_per_class:
        where += f', at most {args.knn_train_per_class} per class'
    refusal = k_too_large('--knn_k', [args.knn_k], data, where)
    if refusal:
        raise UsageError(refusal)
    return data


def due(epoch: int, args) -> bool:
    return (epoch + 1) % args.knn_every == 0 or epoch + 1 == args.epochs


def run(data: Optional[KnnData], model: torch.nn.Module, epoch: int, runtime, args) -> dict:
    """The k-NN monitor after a pretraining epoch: {'knn_top1', 'knn_top5', 'knn_time_sec'} when it is due
    (every --knn_every epochs and after the last), else {}. Call it on every rank (collectives); rank 0 prints
    one line (the trackers get the values with the epoch's log line). It draws no random number a training step
    would see: every RNG stream is restored afterwards and its loaders have their own generator, so training
    continues bit-identically."""
    if data is None or not due(epoch, args):
        return {}
    start = time.perf_counter()
    saved = rng_state(runtime)
    try:
        with fsdp.root_unsharded(model):
            results = evaluate(model, data, args, runtime, args.knn_feature, [args.knn_k], args.knn_temperature)
    finally:
        set_rng_state(saved, runtime)
    top1, top5 = results[args.knn_k]['top1'], results[args.knn_k]['top5']
    elapsed = time.perf_counter() - start
    print0(f'k-NN monitor, epoch {epoch}: top-1 {top1:.3f} top-5 {top5:.3f} (k={args.knn_k}, '
           f'T={args.knn_temperature:g}, {args.knn_feature}, {describe_counts(data, results[args.knn_k])}) in '
           f'{elapsed:.1f} s')
    return {'knn_top1': top1, 'knn_top5': top5, 'knn_time_sec': elapsed}

