"""ImageNet where it lives today, beside image folders: WebDataset tar shards (`NAME-train-NNNN.tar`, samples
`KEY.jpg` + `KEY.cls` [+ `KEY.json`], the layout of timm/imagenet-1k-wds) and Parquet files (`data/train-*.parquet`,
an `image` column of {bytes, path}, a `label` column and the class names as a ClassLabel, the layout the `datasets`
library writes, as ILSVRC/imagenet-1k). Each split is read through an index of where every sample's bytes are (a
tar member's offset, a Parquet row group and row), so the datasets are map-style: the samplers of image folders
(exact resume, each evaluation image counted once, every worker its own samples) apply unchanged, and a worker reads
each shard or row group front to back (util/datasets.py: shard_aware_order).

The tar index is built once per shard (its headers only) and kept in the user's cache ($XDG_CACHE_HOME or
~/.cache, mae-pytorch/shard-index/), keyed by the shard's path, size and modification time.
"""
import collections
import contextlib
import fcntl
import functools
import glob
import hashlib
import io
import json
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from util.imagenet import imagenet_synset_of

# a sample's image member, the first of these it has: photos before arrays (util/arrays.py), so that a .npy kept
# beside each .jpg (a depth map, features) never stands in for the photo
IMAGE_SUFFIXES = ('jpg', 'jpeg', 'png', 'webp', 'tif', 'tiff', 'npy')
SPLIT_NAMES = {'train': ('train',), 'val': ('validation', 'val')}  # our split -> the names files use for it
SHARD_NAME = re.compile(r'^(?P<name>.+)-(?P<split>train|validation|val)-(?P<number>\d+)\.tar$')
PARQUET_NAME = re.compile(r'^(?P<split>train|validation|val)-.*\.parquet$')
INDEX_VERSION = 3  # 2: the class index beside the name; 3: the image member's suffix
SHAPES_VERSION = 1  # of the image shapes kept beside the index (image_shapes): raised when the header reading changes
SHARDS_MIXED = 16  # groups (shards, row groups) whose samples one stretch of an epoch interleaves


class LayoutError(ValueError):
    """A dataset in shards or Parquet cannot be read; the message is one line naming the file."""


@dataclass(frozen=True)
class Sample:
    """Where one sample's image bytes are, and its class: by name where the files name it, else by index."""
    source: str  # the shard or Parquet file
    key: str  # the tar key, or 'row N' of a Parquet file
    offset: int  # the tar member's data offset, or the Parquet row group
    size: int  # the tar member's size, or the row within its group
    label: str  # the class name, or the index standing in for it
    index: int = -1  # the class index the files give (.cls, a Parquet label), -1 if none
    suffix: str = ''  # a tar sample's image member suffix ('jpg', 'npy', ...); '' for Parquet


def cache_folder() -> str:
    return os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'mae-pytorch',
                        'shard-index')


def split_files(folder: str, split: str) -> Tuple[str, List[str]]:
    """('wds' or 'parquet', the split's files in order) for `split` ('train' or 'val'), or ('', []) when the
    folder holds neither for it."""
    names = SPLIT_NAMES[split]
    tars = glob.glob(os.path.join(glob.escape(folder), '*.tar'))
    shards = sorted((m.group('name'), int(m.group('number')), path) for path in tars
                    if (m := SHARD_NAME.match(os.path.basename(path))) and m.group('split') in names)
    if shards:
        return 'wds', [path for _, _, path in shards]
    parquet = [p for p in glob.glob(os.path.join(glob.escape(folder), 'data', '*.parquet'))
               if (m := PARQUET_NAME.match(os.path.basename(p))) and m.group('split') in names]
    return ('parquet', sorted(parquet)) if parquet else ('', [])


def layout_of_split(root: str) -> Tuple[str, List[str]]:
    """How `root` (DATA_PATH/train or DATA_PATH/val) is stored: ('folder', []) for a folder of class folders, ('wds',
    shards) or ('parquet', files) read from DATA_PATH, or ('', []) when there is none of them."""
    if os.path.isdir(root):
        return 'folder', []
    folder, split = os.path.split(os.path.normpath(root))
    if split not in SPLIT_NAMES or not os.path.isdir(folder):
        return '', []
    return split_files(folder, split)


def read_split(kind: str, files: List[str]) -> Tuple[Sample, ...]:
    """Every sample of a split, read once per process while its files are unchanged (the class list and each
    dataset of a run ask again)."""
    versions = tuple((path, (stat := os.stat(path)).st_size, stat.st_mtime_ns) for path in files)
    info = info_file(os.path.dirname(files[0])) if kind == 'wds' and files else None
    info_version = (info, (stat := os.stat(info)).st_size, stat.st_mtime_ns) if info else None
    return read_split_once(kind, versions, info_version)


@functools.lru_cache(maxsize=8)
def read_split_once(kind: str, versions: Tuple[Tuple[str, int, int], ...],
                    info_version: Optional[Tuple[str, int, int]] = None) -> Tuple[Sample, ...]:
    """read_split's work, for one version of the files and of the shards' _info.json."""
    read = shard_samples if kind == 'wds' else parquet_samples
    samples = tuple(sample for path, _, _ in versions for sample in read(path))
    if info_version:
        check_listed_shards([path for path, _, _ in versions], samples, info_version[0])
    return by_imagenet_synset(samples)


def by_imagenet_synset(samples: Tuple[Sample, ...]) -> Tuple[Sample, ...]:
    """The samples labelled by synset when every class name is the readable name of the ImageNet-1k class of its
    index, as in the hub's ILSVRC/imagenet-1k (ClassLabel 'tench, Tinca tinca' for label 0): then the split has the
    classes, and the class order, of ImageNet in folders, and a checkpoint trained on either scores on the other.
    Otherwise unchanged."""
    synset = {(s.label, s.index): imagenet_synset_of(s.label, s.index) for s in samples}
    if not synset or None in synset.values():
        return samples
    return tuple(Sample(s.source, s.key, s.offset, s.size, synset[(s.label, s.index)], s.index, s.suffix)
                 for s in samples)


INFO_FILES = ('_info.json', 'info.json')  # what timm's WebDataset reader reads beside the shards


def info_file(folder: str) -> Optional[str]:
    return next((p for name in INFO_FILES if os.path.isfile(p := os.path.join(folder, name))), None)


def check_listed_shards(files: List[str], samples: Tuple[Sample, ...], path: str):
    """With the shards' _info.json at `path` (timm/imagenet-1k-wds has one: per split its `filenames` and
    `shard_lengths`; read_split finds it), the split it lists must be all here, each shard with its number of
    samples: a partial download or a shard replaced is refused (LayoutError) rather than trained on short. A
    description of another shape (a plain info.json of something else) is not ours to judge and is left alone."""
    folder = os.path.dirname(files[0])
    try:
        with open(path, encoding='utf-8') as f:
            info = json.load(f)
    except (OSError, ValueError) as e:
        raise LayoutError(f'{path}: not readable as JSON ({type(e).__name__}: {e}); fix or remove it') from None
    splits = info.get('splits') if isinstance(info, dict) else None
    here, name = {os.path.basename(f) for f in files}, os.path.basename(path)
    counts = collections.Counter(os.path.basename(s.source) for s in samples)
    for split, entry in (splits.items() if isinstance(splits, dict) else ()):
        listed = entry.get('filenames') if isinstance(entry, dict) else None
        if not isinstance(listed, list) or not all(isinstance(f, str) for f in listed) or not here & set(listed):
            continue
        missing = sorted(set(listed) - here)
        if missing:
            raise LayoutError(f'{folder}: {len(missing)} of the {len(listed)} {split} shards that {name} lists are '
                              f'missing ({", ".join(missing[:3])}{" ..." if len(missing) > 3 else ""}): download '
                              f'them again, or remove {name} to use the shards that are here')
        lengths = entry.get('shard_lengths')
        if isinstance(lengths, list) and len(lengths) == len(listed):
            for shard, length in zip(listed, lengths):
                if counts[shard] != length:
                    raise LayoutError(f'{os.path.join(folder, shard)}: {counts[shard]} samples, {length} by '
                                      f'{name}: download it again')


def class_names(samples: List[Sample]) -> List[str]:
    """The split's classes in the order image folders give theirs: sorted names (class indices standing in for
    names sort as numbers)."""
    names = {s.label for s in samples}
    return sorted(names, key=lambda n: (0, int(n), '') if n.isdecimal() and n.isascii() else (1, 0, n))


def describe_layout(kind: str, files: List[str]) -> str:
    unit = 'shard' if kind == 'wds' else 'Parquet file'
    return f'{len(files)} {unit}{"s" if len(files) != 1 else ""}'


# --- WebDataset tar shards -------------------------------------------------------------------------------------

def shard_samples(path: str) -> List[Sample]:
    """The samples of one tar shard, from the cached index or by reading its headers (and its small .cls / .json
    members) once. Raises LayoutError naming the shard and the key for a sample without an image or a class, and
    for a truncated shard."""
    stat = os.stat(path)
    digest = hashlib.sha1(f'{INDEX_VERSION}:{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}'.encode())
    cached = os.path.join(cache_folder(), digest.hexdigest() + '.json')
    if os.path.isfile(cached):
        with open(cached, encoding='utf-8') as f:
            return [Sample(path, *entry) for entry in json.load(f)]
    samples = index_shard(path, stat.st_size)
    write_cache(cached, [[s.key, s.offset, s.size, s.label, s.index, s.suffix] for s in samples])
    return samples


def write_cache(path: str, entries: list):
    """Keep `entries` as JSON in the cache, written whole or not at all (processes index the same shard at once)."""
    os.makedirs(cache_folder(), exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(entries, f)
    os.replace(tmp, path)


def index_shard(path: str, file_size: int) -> List[Sample]:
    members: Dict[str, dict] = {}
    try:
        with tarfile.open(path, 'r:') as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, base = os.path.split(member.name)
                stem, _, suffix = base.partition('.')
                entry = members.setdefault(os.path.join(folder, stem), {})
                suffix = suffix.lower()
                if member.offset_data + member.size > file_size:
                    raise LayoutError(f'{path}: truncated (member {member.name} ends past the end of the file)')
                if suffix in IMAGE_SUFFIXES and IMAGE_SUFFIXES.index(suffix) < entry.get('rank', len(IMAGE_SUFFIXES)):
                    entry['image'], entry['rank'] = (member.offset_data, member.size), IMAGE_SUFFIXES.index(suffix)
                elif suffix == 'cls':
                    entry['cls'] = tar.extractfile(member).read().decode().strip()
                elif suffix == 'json':
                    meta = json.loads(tar.extractfile(member).read())
                    name = meta.get('synset') or meta.get('class_name') if isinstance(meta, dict) else None
                    if name:
                        entry['name'] = str(name)
            end = tar.offset
    except (tarfile.TarError, EOFError, OSError, ValueError, UnicodeDecodeError) as e:
        if isinstance(e, LayoutError):
            raise
        raise LayoutError(f'{path}: not a readable tar shard ({type(e).__name__}: {e})') from None
    with open(path, 'rb') as f:  # a whole archive ends with two zero blocks; tarfile stops quietly at a cut
        f.seek(end)
        tail = f.read(2 * tarfile.BLOCKSIZE)
    if len(tail) < 2 * tarfile.BLOCKSIZE or tail.strip(b'\0'):
        raise LayoutError(f'{path}: truncated (it ends without the end-of-archive blocks, after {len(members)} '
                          'samples): copy or download it again')
    samples = []
    for key, entry in members.items():
        if 'image' not in entry:
            raise LayoutError(f'{path}: sample {key} has no image member (.{", .".join(IMAGE_SUFFIXES)})')
        label = entry.get('name') or entry.get('cls')
        if label is None:
            raise LayoutError(f'{path}: sample {key} has no class: no {key}.cls, and no class_name or synset in '
                              f'{key}.json')
        index = int(entry['cls']) if entry.get('cls', '').isdecimal() and entry['cls'].isascii() else -1
        samples.append(Sample(path, key, *entry['image'], label, index, IMAGE_SUFFIXES[entry['rank']]))
    return samples


class MemberWindow(io.RawIOBase):
    """A tar member's bytes as a seekable binary stream over its shard's open file (no copy), for readers that
    want a file: tifffile and Pillow read a header this way without reading the pixels."""

    def __init__(self, f, start: int, size: int):
        super().__init__()
        self.f, self.start, self.size, self.position = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer) -> int:
        count = max(0, min(len(buffer), self.size - self.position))
        self.f.seek(self.start + self.position)
        data = self.f.read(count)
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)


# --- Parquet ------------------------------------------------------------------------------------------------------

def import_pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LayoutError('reading Parquet needs pyarrow, which is not installed: pip install pyarrow') from None
    return pq


def parquet_class_names(path: str, pq_file) -> Optional[List[str]]:
    """The ClassLabel names the `datasets` library keeps in the file's 'huggingface' schema metadata (None without
    one). Raises LayoutError when the metadata is there but not readable."""
    raw = (pq_file.schema_arrow.metadata or {}).get(b'huggingface')
    if not raw:
        return None
    try:
        label = json.loads(raw)['info']['features'].get('label')
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise LayoutError(f"{path}: its 'huggingface' metadata is not the `datasets` library's ({type(e).__name__}: "
                          f'{e})') from None
    names = label.get('names') if isinstance(label, dict) else None
    if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise LayoutError(f"{path}: its ClassLabel names are not a list of strings: {str(names)[:80]}")
    return names


def parquet_samples(path: str) -> List[Sample]:
    """One Sample per row: its row group and row, and its class name (the ClassLabel's, else the label index)."""
    pq = import_pyarrow()
    try:
        pq_file = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's errors are its own types
        raise LayoutError(f'{path}: not a readable Parquet file ({type(e).__name__}: {e})') from None
    columns = pq_file.schema_arrow.names
    for needed in ('image', 'label'):
        if needed not in columns:
            raise LayoutError(f'{path}: no {needed!r} column (it has {", ".join(columns)}); expected the layout the '
                              '`datasets` library writes: image {bytes, path}, label')
    names = parquet_class_names(path, pq_file)
    label_type = pq_file.schema_arrow.field('label').type
    if not str(label_type).startswith(('int', 'uint')):
        raise LayoutError(f"{path}: its 'label' column holds {label_type}, not class indices (integers)")
    samples, row_number = [], 0
    for group in range(pq_file.num_row_groups):
        labels = pq_file.read_row_group(group, columns=['label']).column('label').to_pylist()
        for row, index in enumerate(labels):
            if index is None or index < 0 or (names is not None and index >= len(names)):
                where = f'outside its {len(names)} class names' if names is not None else 'not a class index'
                raise LayoutError(f'{path}: row {row_number} has label {index}, {where}')
            samples.append(Sample(path, f'row {row_number}', group, row, names[index] if names else str(index),
                                  index))
            row_number += 1
    return samples


class OpenedLast:
    """The `capacity` most recently used of something opened or read (file handles, row groups), by key, and no
    more than `budget` bytes of them when `weigh` tells their size: the least recently used one is closed (`close`)
    when another comes. An epoch's order keeps SHARDS_MIXED groups in play at a time, so a worker holding that many
    opens each of them once, not once per sample."""

    def __init__(self, capacity: int, close=lambda value: None, budget: int = 0, weigh=lambda value: 0):
        self.capacity, self.close, self.budget, self.weigh = capacity, close, budget, weigh
        self.items: 'collections.OrderedDict' = collections.OrderedDict()
        self.weight = 0
        self.opened = 0  # how many times something had to be opened or read: the benchmark's files per epoch

    def get(self, key, open_it):
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        self.items[key] = value = open_it()
        self.opened += 1
        self.weight += self.weigh(value)
        while len(self.items) > self.capacity or (self.budget and self.weight > self.budget and len(self.items) > 1):
            oldest = self.items.popitem(last=False)[1]
            self.weight -= self.weigh(oldest)
            self.close(oldest)
        return value


ROW_GROUP_BUDGET = 512 * 2 ** 20  # bytes of row groups one reader keeps (see mixed_row_groups)


def mixed_row_groups(files: List[str]) -> int:
    """How many row groups an epoch's order may interleave in these Parquet files: SHARDS_MIXED, or as many of the
    largest as fit ROW_GROUP_BUDGET (files written with one big row group each, pandas' and pyarrow's default,
    would otherwise make a worker re-read a group for nearly every sample)."""
    pq, largest = import_pyarrow(), 1
    for path in files:
        metadata = pq.ParquetFile(path).metadata
        largest = max([largest] + [metadata.row_group(g).total_byte_size for g in range(metadata.num_row_groups)])
    return max(1, min(SHARDS_MIXED, ROW_GROUP_BUDGET // largest))


def sample_reader(kind: str):
    """A reader of the samples' image bytes for a split of `kind` ('wds' or 'parquet'), with read(Sample) -> bytes;
    its files are this process's own."""
    return TarReader() if kind == 'wds' else RowGroupReader()


class RowGroupReader:
    """The image bytes of a Parquet row, reading each row group once while it is in play (OpenedLast, within
    ROW_GROUP_BUDGET): a worker that reads the rows of a group in order reads the group once. Memory: SHARDS_MIXED
    row groups per worker (100 rows each, about 11 MB of ImageNet JPEGs, in the `datasets` library's layout)."""

    def __init__(self):
        self.files = OpenedLast(SHARDS_MIXED)
        self.groups = OpenedLast(SHARDS_MIXED, budget=ROW_GROUP_BUDGET, weigh=lambda group: group[1])

    def read(self, sample: Sample) -> bytes:
        images, _ = self.groups.get((sample.source, sample.offset), lambda: self.read_group(sample))
        image = images[sample.size]
        return image['bytes'] if isinstance(image, dict) else image

    def read_group(self, sample: Sample) -> Tuple[list, int]:
        pq_file = self.files.get(sample.source, lambda: import_pyarrow().ParquetFile(sample.source))
        # one thread: a loader worker is already one of many processes (pyarrow's pool made 2 workers 6% slower)
        table = pq_file.read_row_group(sample.offset, columns=['image'], use_threads=False)
        return table.column('image').to_pylist(), table.nbytes


class TarReader:
    """The bytes of a tar member, its shard kept open while it is in play (OpenedLast; one set of handles per
    process: DataLoader workers open their own)."""

    def __init__(self):
        self.files = OpenedLast(2 * SHARDS_MIXED, close=lambda handle: handle.close())

    def read(self, sample: Sample) -> bytes:
        handle = self.files.get(sample.source, lambda: open(sample.source, 'rb'))
        handle.seek(sample.offset)
        data = handle.read(sample.size)
        if len(data) != sample.size:
            raise OSError(f'{sample.source}: member {sample.key} is truncated')
        return data


# --- what the images hold, from their headers ----------------------------------------------------------------------

def image_shapes(kind: str, path: str, samples: List[Sample], header_shape) -> List[Optional[tuple]]:
    """(H, W, C) of every sample of one shard or Parquet file, in `samples`' order, from the image headers
    (header_shape: a binary stream -> (H, W, C) or None when it cannot be told; util/arrays.py), read once per
    version of the file and kept in the index cache: a tar member's header is read where it lies, a Parquet row's
    needs its row group's image column read. The processes of a run that start at once (every rank checks its
    data before the process group exists) take turns on a lock file: the first reads, the others find its cache."""
    cached = shapes_cache(path)
    shapes = cached_shapes(cached, len(samples))
    if shapes is not None:
        return shapes
    os.makedirs(cache_folder(), exist_ok=True)
    with open(cached + '.lock', 'w') as lock:
        with contextlib.suppress(OSError):  # a file system without locks (Lustre mounted without flock): each reads
            fcntl.flock(lock, fcntl.LOCK_EX)
        shapes = cached_shapes(cached, len(samples))
        if shapes is None:
            shapes = read_image_shapes(kind, path, samples, header_shape)
            write_cache(cached, [list(shape) if shape else None for shape in shapes])
    return shapes


def cached_shapes(cached: str, count: int) -> Optional[List[Optional[tuple]]]:
    if not os.path.isfile(cached):
        return None
    with open(cached, encoding='utf-8') as f:
        shapes = json.load(f)
    return [tuple(shape) if shape else None for shape in shapes] if len(shapes) == count else None


def read_image_shapes(kind: str, path: str, samples: List[Sample], header_shape) -> List[Optional[tuple]]:
    if kind == 'wds':
        with open(path, 'rb') as f:
            return [header_shape(io.BufferedReader(MemberWindow(f, s.offset, s.size))) for s in samples]
    shapes, groups = [], {}
    pq_file = import_pyarrow().ParquetFile(path)
    for sample in samples:
        if sample.offset not in groups:
            groups = {sample.offset: pq_file.read_row_group(sample.offset, columns=['image']).column('image')}
        image = groups[sample.offset][sample.size].as_py()
        data = image['bytes'] if isinstance(image, dict) else image
        shapes.append(header_shape(io.BytesIO(data)) if isinstance(data, bytes) else None)
    return shapes


def shapes_cache(path: str) -> str:
    """Where image_shapes keeps a file's shapes: keyed by SHAPES_VERSION and the file's path, size and modification
    time."""
    stat = os.stat(path)
    digest = hashlib.sha1(f'shapes{SHAPES_VERSION}:{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}'.encode())
    return os.path.join(cache_folder(), digest.hexdigest() + '.json')


def image_shapes_cached(path: str) -> bool:
    return os.path.isfile(shapes_cache(path))
