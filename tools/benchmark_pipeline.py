"""The input-pipeline benchmark of `python -m tools.benchmark --pipeline`: images/s of each pretraining and
fine-tuning loader variant on the same folder of real JPEGs, against torchvision's ImageFolder."""
import time
from types import SimpleNamespace
from typing import Dict

from torch.utils.data import DataLoader

from util.datasets import DataError, build_image_folder
from util.images import decode_image_tensor
from util.transforms import (build_fast_pretrain_transform, build_finetune_transform, build_pretrain_transform,
                             normalize_batch)

BATCH = 64


def variants(args) -> Dict[str, tuple]:
    """name -> (dataset, ...) for each input pipeline worth comparing, on the same files."""
    from torchvision import datasets
    root = f'{args.data_path}/train'
    finetune_args = SimpleNamespace(input_size=args.input_size, color_jitter=None, aa='rand-m9-mstd0.5-inc1',
                                    reprob=0.25, remode='pixel', recount=1)
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
            build_image_folder(root, build_finetune_transform(finetune_args)),
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
            normalize_batch(samples, runtime.device)
        images += samples.shape[0]
    runtime.synchronize()
    rate = images / (time.perf_counter() - start)
    return {'images_per_sec': rate, 'images_per_sec_per_worker': rate / max(args.num_workers, 1),
            'num_workers': args.num_workers}
