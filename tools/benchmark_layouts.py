"""--layouts of `python -m tools.benchmark`: the same JPEGs read as image folders, WebDataset shards and Parquet
(the last two written by tools.make_shards into a scratch folder), each through the real pretraining transform and
the training sampler (ResumableSampler: the shard-aware order for shards and Parquet), by one loader worker and by
--num_workers: images/s over one whole epoch, the files opened in it (and Parquet row groups read), and the time to
start an epoch per 100,000 samples (a first run's index build, a later run's, and the epoch's order).
"""
import os
import tempfile
import time
from collections import defaultdict
from typing import Dict, List

from torch.utils.data import DataLoader, Dataset, get_worker_info

from tools import make_shards
from util import shards
from util.datasets import IndexedImageDataset, ResumableSampler, build_image_folder
from util.transforms import build_pretrain_transform

BATCH = 64
SHARD_SIZE = 1251  # samples per shard and per Parquet file: timm/imagenet-1k-wds has 1,281,167 in 1024 shards
PER_100K = 100_000


class CountingDataset(Dataset):
    """The dataset's items, each with what this worker has opened so far: (files, row groups, worker id). An
    image folder opens one file per item; shards and Parquet count in their readers (util/shards.py: OpenedLast)."""

    def __init__(self, dataset):
        self.dataset, self.items = dataset, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        image, target = self.dataset[index]
        self.items += 1
        reader = getattr(self.dataset, 'reader', None)
        if reader is None:
            files, groups = self.items, 0
        elif isinstance(reader, shards.TarReader):
            files, groups = reader.files.opened, 0
        else:
            files, groups = reader.files.opened, reader.groups.opened
        worker = get_worker_info()
        return image, target, files, groups, worker.id if worker is not None else -1


def convert(data_path: str, scratch: str) -> Dict[str, str]:
    """{layout: its --data_path}: data_path itself, and its images as shards and as Parquet under scratch."""
    paths = {'folders': data_path, 'shards': os.path.join(scratch, 'wds'), 'parquet': os.path.join(scratch, 'pq')}
    for layout, extra in (('shards', []), ('parquet', ['--parquet'])):
        if make_shards.main([data_path, paths[layout], '--shard_size', str(SHARD_SIZE), *extra]) != 0:
            raise RuntimeError(f'tools.make_shards could not convert {data_path}')
    return paths


def start_up(root: str) -> Dict[str, float]:
    """Seconds to build the split's dataset without and with the shard index cached (the same for folders: a
    directory scan), and to compute one epoch's order; each per 100,000 samples."""
    timings = {}
    for when in ('first_run', 'later_run'):
        shards.read_split_once.cache_clear()  # a fresh process's view; the on-disk index stays after the first
        start = time.perf_counter()
        dataset = build_image_folder(root, None)
        timings[when] = time.perf_counter() - start
    sampler = ResumableSampler(dataset, 1, 0, shuffle=True, seed=0)
    sampler.set_epoch(1)
    start = time.perf_counter()
    order = list(sampler)
    timings['epoch_order'] = time.perf_counter() - start
    return {key: seconds * PER_100K / len(order) for key, seconds in timings.items()}


def one_epoch(root: str, input_size: int, num_workers: int) -> Dict[str, float]:
    """images/s through the pretraining transform over one epoch (from its first batch, so the workers' start
    is not counted), and what the epoch opened, summed over the workers."""
    dataset = build_image_folder(root, build_pretrain_transform(input_size, uint8_output=True))
    sampler = ResumableSampler(dataset, 1, 0, shuffle=True, seed=0)
    sampler.set_epoch(0)
    loader = DataLoader(CountingDataset(dataset), batch_size=BATCH, sampler=sampler, num_workers=num_workers,
                        drop_last=False)
    opened: Dict[int, List[int]] = defaultdict(lambda: [0, 0])
    images, start = 0, None
    for _, _, files, groups, workers in loader:
        if start is None:
            start, first = time.perf_counter(), len(files)
        else:
            images += len(files)
        for worker, f, g in zip(workers.tolist(), files.tolist(), groups.tolist()):
            opened[worker] = [max(opened[worker][0], f), max(opened[worker][1], g)]
    seconds = time.perf_counter() - start
    return {'images': images + first, 'images_per_sec': images / seconds,
            'images_per_sec_per_worker': images / seconds / max(num_workers, 1),
            'files_opened': sum(f for f, _ in opened.values()),
            'row_groups_read': sum(g for _, g in opened.values()) if isinstance(dataset, IndexedImageDataset)
            and dataset.kind == 'parquet' else None}


def report(args) -> List[Dict]:
    """One row per layout and worker count (1, and --num_workers when it is another)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix='mae-layouts-') as scratch:
        cache = os.environ.get('XDG_CACHE_HOME')
        os.environ['XDG_CACHE_HOME'] = os.path.join(scratch, 'cache')  # a first run really builds the index
        try:
            paths = convert(args.data_path, scratch)
            for layout, path in paths.items():
                root = os.path.join(path, 'train')
                timings = start_up(root)
                for workers in sorted({1, max(args.num_workers, 1)}):
                    rows.append({'layout': layout, 'num_workers': workers,
                                 **one_epoch(root, args.input_size, workers), **timings})
                    print_row(rows[-1])
        finally:
            if cache is None:
                os.environ.pop('XDG_CACHE_HOME')
            else:
                os.environ['XDG_CACHE_HOME'] = cache
    return rows


def print_row(row: Dict):
    files = f'{row["files_opened"]:,} file{"s" if row["files_opened"] != 1 else ""} opened'
    if row['row_groups_read'] is not None:
        files += f', {row["row_groups_read"]:,} row groups read'
    print(f'{row["layout"]:>8}, {row["num_workers"]} worker{"s" if row["num_workers"] > 1 else ""}: '
          f'{row["images_per_sec"]:.1f} img/s ({row["images_per_sec_per_worker"]:.1f} per worker), '
          f'{row["images"]:,} images, {files}; per 100k samples: index {row["first_run"]:.2f} s first run, '
          f'{row["later_run"]:.2f} s later, epoch order {row["epoch_order"]:.3f} s', flush=True)
