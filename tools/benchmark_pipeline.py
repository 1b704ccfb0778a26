"""The input-pipeline benchmarks of `python -m tools.benchmark`: --pipeline, images/s of each pretraining and
fine-tuning loader variant on the same folder of real JPEGs against torchvision's ImageFolder; --end_to_end, the
pretraining step fed by the real loader."""
import time
from types import SimpleNamespace
from typing import Dict

import torch
from torch.utils.data import DataLoader

import main_finetune
import main_pretrain
from util.datasets import DataError, build_image_folder, build_transform
from util.images import DEFAULT_MAX_PIXELS, decode_image_tensor
from util.transforms import build_fast_pretrain_transform, build_pretrain_transform, to_device_normalized

BATCH = 64


def variants(args) -> Dict[str, tuple]:
    """name -> (dataset, ...) for each input pipeline worth comparing, on the same files."""
    from torchvision import datasets
    root = f'{args.data_path}/train'
    finetune_args = main_finetune.get_args_parser().parse_args([])  # the fine-tuning recipe's defaults
    baseline = build_image_folder(root, None)
    if len(baseline) < BATCH:  # the timed loop would wait forever for a first full batch
        raise DataError(f'--data_path {args.data_path}: {len(baseline)} images in train/, fewer than one batch of '
                        f'{BATCH}; point it at a larger folder')
    return {
        'torchvision ImageFolder + RandomResizedCrop (baseline)':
            datasets.ImageFolder(root, build_pretrain_transform(args.input_size)),
        'pretrain, uint8 out + device normalise (default)':
            build_image_folder(root, build_pretrain_transform(args.input_size, uint8_output=True)),
        'pretrain, --fast_decode':
            build_image_folder(root, build_fast_pretrain_transform(args.input_size), decode=decode_image_tensor),
        'fine-tune transform (RandAugment, random erasing)':
            build_image_folder(root, build_transform(True, finetune_args, args.input_size)),
    }


def measure(dataset, args, runtime) -> Dict[str, float]:
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=args.num_workers, drop_last=True,
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
            to_device_normalized(samples, runtime.device)
        images += samples.shape[0]
    runtime.synchronize()
    rate = images / (time.perf_counter() - start)
    return {'images_per_sec': rate, 'images_per_sec_per_worker': rate / max(args.num_workers, 1),
            'num_workers': args.num_workers}


def measure_end_to_end(args, runtime, fast_decode: bool) -> Dict[str, float]:
    """images/s of the pretraining step fed by the real loader (--num_workers workers, uint8 batches normalised
    on the device): what a run gets, data loading included."""
    import models_mae
    from tools.benchmark_step import build, build_optimizer
    from util.loss_scaler import LossScaler
    dataset = main_pretrain.build_pretraining_dataset(
        SimpleNamespace(data_path=args.data_path, input_size=args.input_size, fast_decode=fast_decode,
                        max_image_pixels=DEFAULT_MAX_PIXELS, in_chans=3, mean=None, std=None))
    if len(dataset) < args.batch_size:
        raise DataError(f'--data_path {args.data_path}: {len(dataset)} images in train/, fewer than one batch of '
                        f'{args.batch_size}')
    if args.model not in models_mae.MODELS:
        raise DataError(f'--end_to_end times the pretraining step: pass an mae_* --model, not {args.model}')
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                        drop_last=True, persistent_workers=args.num_workers > 0,
                        pin_memory=runtime.pin_memory_supported)
    torch.manual_seed(0)
    model = build(args.model, args, 'sdpa').to(runtime.device)
    optimizer = build_optimizer(args.model, model, args.adamw_impl, runtime)
    loss_scaler = LossScaler(runtime.grad_scaler())

    def batches():
        while True:
            yield from loader
    stream = batches()

    def step():
        samples = to_device_normalized(next(stream)[0], runtime.device)
        with runtime.autocast():
            loss = model(samples, mask_ratio=args.mask_ratio)[0]
        loss_scaler(loss, optimizer, parameters=model.parameters())
        optimizer.zero_grad(set_to_none=True)
    for _ in range(max(args.warmup, 2)):  # workers started, queues filled
        step()
    runtime.synchronize()
    start = time.perf_counter()
    steps = args.steps * args.windows
    for _ in range(steps):
        step()
    runtime.synchronize()
    rate = steps * args.batch_size / (time.perf_counter() - start)
    return {'pipeline': f'pretraining step on real JPEGs ({"--fast_decode" if fast_decode else "default decode"})',
            'images_per_sec': rate, 'num_workers': args.num_workers, 'num_images': len(dataset)}
