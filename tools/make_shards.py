"""Write an image-folder dataset (SRC/train/<class>/<image>, SRC/val/...) as WebDataset tar shards, and with
--parquet also as Parquet files, in the layouts every script reads from --data_path (util/shards.py):

python -m tools.make_shards $IMAGENET /data/imagenet-wds --shard_size 1250    # DST/imagenet-train-0000.tar ...
python -m tools.make_shards $IMAGENET /data/imagenet-pq --parquet             # DST/data/train-00000-of-00004...

Shards: samples KEY.<ext> (the file's own bytes, never re-encoded) + KEY.cls (the class index in the sorted class
list) + KEY.json ({"class_name": the folder name}), in a shuffled order (--seed): a reader that goes through a
shard front to back still sees the classes mixed. Parquet: an `image` column of {bytes, path}, a `label` column and
the class names as a ClassLabel in the schema metadata, as the `datasets` library writes them. Beside the shards,
_info.json lists each split's shards and their lengths, as timm/imagenet-1k-wds does: a partial copy is refused.
"""
import io
import json
import os
import random
import sys
import tarfile
import time
from typing import List, Tuple

from util import flags as cli
from util.classes import folder_classes
from util.arrays import holds_only_arrays
from util.folders import ARRAY_IMG_EXTENSIONS, IMG_EXTENSIONS, image_files

SPLITS = {'train': 'train', 'val': 'validation'}  # our folder -> the name the files use (timm/imagenet-1k-wds)


def get_args_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser('python -m tools.make_shards', 'image folders -> WebDataset shards (and Parquet)')
    parser.add_argument('src', help='a folder holding train/ and/or val/, one sub-folder of images per class')
    parser.add_argument('dst', help='the folder to write into (created; must not hold shards or Parquet files)')
    parser.add_argument('--name', default=None, help='the shards\' name prefix (default: the name of SRC)')
    parser.add_argument('--shard_size', default=1000, type=int, check=cli.at_least(1), help='samples per shard')
    parser.add_argument('--parquet', action='store_true', help='write Parquet files instead of tar shards')
    parser.add_argument('--row_group_size', default=100, type=int, check=cli.at_least(1),
                        help='Parquet: rows per row group (the unit a reader loads; 100, as the `datasets` library '
                        'writes images: a worker keeps 16 in memory)')
    parser.add_argument('--seed', default=0, type=int, check=cli.SEED, help='the order samples are written in')
    return parser


def split_samples(src: str, split: str, seed: int) -> Tuple[List[str], List[Tuple[str, int]]]:
    """(the sorted class list, [(image path, class index)] in a shuffled order): the files a run reads from the
    folder: .npy arrays too in a split of arrays (util/arrays.py), not beside photos (a depth map is no sample)."""
    root = os.path.join(src, split)
    classes = folder_classes(root)
    extensions = ARRAY_IMG_EXTENSIONS if holds_only_arrays(root) else IMG_EXTENSIONS
    samples = [(path, i) for i, name in enumerate(classes)
               for path in image_files(os.path.join(root, name), extensions)[0]]
    random.Random(seed).shuffle(samples)
    return classes, samples


class Progress:
    def __init__(self, what: str, total: int):
        self.what, self.total, self.start, self.shown = what, total, time.time(), -1

    def update(self, done: int):
        percent = 100 * done // max(self.total, 1)
        if percent // 10 != self.shown // 10 or done == self.total:
            self.shown = percent
            print(f'{self.what}: {done:,}/{self.total:,} ({percent}%, {time.time() - self.start:.0f} s)', flush=True)


def write_shards(name: str, split: str, classes: List[str], samples: List[Tuple[str, int]], dst: str,
                 shard_size: int) -> dict:
    """The split's shards, and its entry of _info.json (timm's description of a WebDataset: its shards and their
    lengths, which util/shards.py checks a copy against)."""
    progress = Progress(f'{split} samples into shards', len(samples))
    count, lengths = 0, {}
    for number, first in enumerate(range(0, len(samples), shard_size)):
        path, chunk = os.path.join(dst, f'{name}-{SPLITS[split]}-{number:04d}.tar'), samples[first:first + shard_size]
        lengths[os.path.basename(path)] = len(chunk)
        with tarfile.open(path + '.tmp', 'w', format=tarfile.USTAR_FORMAT) as tar:
            for offset, (image, label) in enumerate(chunk):
                key = f'{split}_{first + offset:08d}'
                suffix = os.path.splitext(image)[1].lower().lstrip('.') or 'jpg'
                with open(image, 'rb') as f:
                    add_member(tar, f'{key}.{suffix}', f.read())
                add_member(tar, f'{key}.cls', str(label).encode())
                add_member(tar, f'{key}.json', json.dumps({'class_name': classes[label]}).encode())
                count += 1
                progress.update(count)
        os.replace(path + '.tmp', path)
    return {'name': SPLITS[split], 'num_samples': count, 'filenames': list(lengths),
            'shard_lengths': list(lengths.values())}


def add_member(tar: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 0
    tar.addfile(info, io.BytesIO(data))


def write_parquet(split: str, classes: List[str], samples: List[Tuple[str, int]], dst: str, shard_size: int,
                  row_group_size: int) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        sys.exit('error: --parquet needs pyarrow, which is not installed: pip install pyarrow')
    features = {'image': {'_type': 'Image'}, 'label': {'names': classes, '_type': 'ClassLabel'}}
    metadata = {b'huggingface': json.dumps({'info': {'features': features}}).encode()}
    image_type = pa.struct([('bytes', pa.binary()), ('path', pa.string())])
    os.makedirs(os.path.join(dst, 'data'), exist_ok=True)
    files = -(-len(samples) // shard_size)
    progress, count = Progress(f'{split} samples into Parquet', len(samples)), 0
    for number, first in enumerate(range(0, len(samples), shard_size)):
        rows = samples[first:first + shard_size]
        images = []
        for image, _ in rows:
            with open(image, 'rb') as f:
                images.append({'bytes': f.read(), 'path': os.path.basename(image)})
        table = pa.table({'image': pa.array(images, type=image_type),
                          'label': pa.array([label for _, label in rows], type=pa.int64())})
        table = table.replace_schema_metadata(metadata)
        path = os.path.join(dst, 'data', f'{SPLITS[split]}-{number:05d}-of-{files:05d}.parquet')
        pq.write_table(table, path + '.tmp', row_group_size=row_group_size)
        os.replace(path + '.tmp', path)
        count += len(rows)
        progress.update(count)
    return count


def main(argv=None) -> int:
    args = cli.parse_with(get_args_parser(), argv)
    splits = [split for split in SPLITS if os.path.isdir(os.path.join(args.src, split))]
    if not splits:
        print(f'error: {args.src}: has no train/ or val/ folder of class folders', file=sys.stderr)
        return 2
    found = {split: split_samples(args.src, split, args.seed) for split in splits}
    empty = [split for split, (_, samples) in found.items() if not samples]
    if empty:
        print(f'error: {os.path.join(args.src, empty[0])}: holds no image in class folders (files ending in '
              f'{", ".join(ARRAY_IMG_EXTENSIONS)})', file=sys.stderr)
        return 2
    os.makedirs(args.dst, exist_ok=True)
    if any(n.endswith('.tar') for n in os.listdir(args.dst)) or os.path.isdir(os.path.join(args.dst, 'data')):
        print(f'error: {args.dst}: already holds shards or Parquet files; choose an empty folder', file=sys.stderr)
        return 2
    name = args.name or os.path.basename(os.path.normpath(args.src))
    info = {'name': name, 'splits': {}}
    for split, (classes, samples) in found.items():
        if args.parquet:
            count = write_parquet(split, classes, samples, args.dst, args.shard_size, args.row_group_size)
        else:
            info['splits'][SPLITS[split]] = write_shards(name, split, classes, samples, args.dst, args.shard_size)
            count = info['splits'][SPLITS[split]]['num_samples']
        print(f'{split}: {count:,} samples of {len(classes)} classes written to {args.dst}', flush=True)
    if not args.parquet:
        with open(os.path.join(args.dst, '_info.json'), 'w', encoding='utf-8') as f:
            json.dump(info, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
