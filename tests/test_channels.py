"""Images of any channel count and non-square sizes (issue 24): .npy, multi-band TIFF and 1-channel PNG read with
their own channels and range, the flags (--in_chans, --input_size H W, --mean/--std) in every script, and every
refusal one line with exit code 2 before any work."""
import argparse
import glob
import io
import os
import time
from functools import partial

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

import main_finetune
import main_infer
import main_pretrain
import models_mae
import models_vit
from conftest import read_json_log, run_in_process, run_script
from tools import data_stats, export, make_shards
from util.arrays import ArrayDecoder, ChannelMismatch, header_shape, read_array, stream_header_shape, to_tensor
from util.checkpoint_files import load_checkpoint
from util.datasets import build_image_folder
from util import shards
from util.pixels import Normalization
from util.shards import MemberWindow
from util.transforms import build_array_pretrain_transform, build_eval_transform
from util.weights import load_weights

FOUR = ['--in_chans', '4', '--mean', '0.3', '0.3', '0.3', '0.3', '--std', '0.2', '0.2', '0.2', '0.2']
RECT = ['--input_size', '16', '24', '--patch_size', '4']
SMALL = ['--num_workers', '0', '--batch_size', '8', '--print_freq', '4', '--device', 'cpu']


def npy_bytes(array: np.ndarray, version=None) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, array, version=version)
    return buffer.getvalue()


def tiff_bytes(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, photometric='minisblack', **kwargs)
    return buffer.getvalue()


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, 'PNG')  # uint8: mode L, uint16: I;16
    return buffer.getvalue()


def band_folder(root, make_file, suffix: str, channels: int, per_class=(8, 4), seed=0):
    """root/train and root/val, classes 'dark' and 'bright' of 20x28 (H x W) uint16 images with `channels` bands;
    make_file(array) -> the file's bytes."""
    rng = np.random.default_rng(seed)
    for split, count in zip(('train', 'val'), per_class):
        for name, level in (('dark', 8000), ('bright', 40000)):
            folder = os.path.join(root, split, name)
            os.makedirs(folder)
            for i in range(count):
                array = (level + rng.normal(0, 3000, (20, 28, channels))).clip(0, 65535).astype(np.uint16)
                with open(os.path.join(folder, f'{i}{suffix}'), 'wb') as f:
                    f.write(make_file(array))
    return str(root)


# --- reading ---------------------------------------------------------------------------------------------------

def test_npy_tiff_and_png_keep_their_channels_and_range():
    rng = np.random.default_rng(0)
    bands = rng.integers(0, 65536, (6, 10, 5), dtype=np.uint16)
    for data in (npy_bytes(bands), tiff_bytes(bands, planarconfig='contig'),
                 tiff_bytes(np.moveaxis(bands, -1, 0), planarconfig='separate')):  # as GDAL / rasterio write bands
        tensor = to_tensor(read_array(data, 0))
        assert tensor.shape == (5, 6, 10)
        assert torch.equal(tensor, torch.from_numpy(np.moveaxis(bands, -1, 0).astype(np.float32) / 65535))
    with pytest.raises(ValueError, match='TIFF of 6 pages of 10x5 px: a page stack'):  # plain imwrite of (H, W, 5)
        read_array(tiff_bytes(bands), 0)
    grey = rng.integers(0, 256, (6, 10), dtype=np.uint8)
    assert torch.equal(to_tensor(read_array(png_bytes(grey), 0)), torch.from_numpy(grey[None] / np.float32(255)))
    sixteen = rng.integers(0, 65536, (6, 10), dtype=np.uint16)  # a 16-bit PNG keeps all 16 bits
    assert torch.equal(to_tensor(read_array(png_bytes(sixteen), 0)),
                       torch.from_numpy(sixteen[None] / np.float32(65535)))
    floats = rng.normal(0, 100, (6, 10, 2)).astype(np.float32)  # floats as stored
    assert torch.equal(to_tensor(read_array(npy_bytes(floats), 0)), torch.from_numpy(np.moveaxis(floats, -1, 0)))


def test_a_float_image_with_nan_is_a_damaged_file_and_another_channel_count_is_refused(tmp_path):
    floats = np.ones((6, 10, 2), np.float32)
    floats[2, 3, 1] = np.nan
    with pytest.raises(ValueError, match='1 NaN or infinite values'):
        to_tensor(read_array(npy_bytes(floats), 0))
    path = tmp_path / 'three.npy'
    np.save(path, np.zeros((6, 10, 3), np.uint8))
    with open(path, 'rb') as f, pytest.raises(ChannelMismatch) as error:
        ArrayDecoder(4)(f, 0)
    assert str(error.value).startswith(f'{path}: 3 channels (shape (6, 10, 3)')
    assert 'but --in_chans is 4' in str(error.value)


def test_the_crops_and_evaluation_resize_give_the_rectangle_on_any_channel_count():
    norm = Normalization(5, (0.5,) * 5, (0.25,) * 5)
    image = torch.rand(5, 40, 30)
    assert build_array_pretrain_transform((16, 48), norm)(image).shape == (5, 16, 48)
    evaluated = build_eval_transform((16, 48), norm, arrays=True)(image)
    assert evaluated.shape == (5, 16, 48)
    # normalised with the run's statistics: (0.75 - 0.5) / 0.25
    constant = build_eval_transform(32, norm, arrays=True)(torch.full((5, 40, 30), 0.75))
    assert torch.allclose(constant, torch.ones_like(constant), atol=1e-5)


def test_data_stats_prints_the_numpy_mean_and_std_as_flags(tmp_path, capsys):
    root = band_folder(tmp_path / 'bands', npy_bytes, '.npy', 3)
    assert data_stats.main([root, '--num_workers', '0']) == 0
    line = capsys.readouterr().out.strip()
    arrays = np.stack([np.load(os.path.join(d, f)) for d, _, files in os.walk(os.path.join(root, 'train'))
                       for f in files]).astype(np.float64) / 65535
    mean, std = arrays.mean(axis=(0, 1, 2)), arrays.std(axis=(0, 1, 2))
    assert line == ('--in_chans 3 --mean ' + ' '.join(f'{m:.4g}' for m in mean) + ' --std '
                    + ' '.join(f'{s:.4g}' for s in std))


def npy_shards(tmp_path) -> str:
    """band_folder's 4-band .npy set written as WebDataset shards by tools.make_shards."""
    band_folder(tmp_path / 'bands', npy_bytes, '.npy', 4)
    assert make_shards.main([str(tmp_path / 'bands'), str(tmp_path / 'wds'), '--shard_size', '5']) == 0
    return str(tmp_path / 'wds')


def test_make_shards_writes_npy_arrays_and_refuses_a_folder_with_no_image(tmp_path, capsys):
    shards_path = npy_shards(tmp_path)
    assert 'train: 16 samples of 2 classes' in capsys.readouterr().out
    dataset = build_image_folder(os.path.join(shards_path, 'train'), None, in_chans=4)
    assert len(dataset) == 16 and dataset[0][0].shape == (4, 20, 28)
    photos = tmp_path / 'photos' / 'train' / 'cat'  # a .npy beside photos (a depth map) is no sample
    photos.mkdir(parents=True)
    Image.new('RGB', (8, 8)).save(photos / '0.png')
    np.save(photos / '0.npy', np.zeros((8, 8), np.float32))
    assert make_shards.main([str(tmp_path / 'photos'), str(tmp_path / 'photo_shards')]) == 0
    assert 'train: 1 samples of 1 classes' in capsys.readouterr().out
    (tmp_path / 'empty' / 'train' / 'dark').mkdir(parents=True)
    (tmp_path / 'empty' / 'train' / 'dark' / 'notes.txt').write_text('not an image')
    assert make_shards.main([str(tmp_path / 'empty'), str(tmp_path / 'out')]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path / 'empty' / 'train'}: holds no image")
    assert not (tmp_path / 'out').exists()


def test_data_stats_of_rgb_photos_reads_them_as_totensor_gives_them(tmp_path, capsys):
    root = tmp_path / 'photos'
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        (root / 'train' / f'c{i}').mkdir(parents=True)
        Image.new('RGB', (4, 4), colour).save(root / 'train' / f'c{i}' / '0.png')
    assert data_stats.main([str(root), '--num_workers', '0']) == 0
    assert capsys.readouterr().out.strip() == '--in_chans 3 --mean 0.5 0 0.5 --std 0.5 0 0.5'


def test_data_stats_counts_the_channels_of_shards_and_names_the_image_it_counted_on_a_mismatch(tmp_path, capsys):
    shards_path = npy_shards(tmp_path)
    capsys.readouterr()
    assert data_stats.main([str(tmp_path / 'bands'), '--num_workers', '0']) == 0
    on_folders = capsys.readouterr().out
    assert data_stats.main([shards_path, '--num_workers', '2']) == 0  # workers read the shards too
    assert capsys.readouterr().out == on_folders and on_folders.startswith('--in_chans 4 ')
    np.save(tmp_path / 'bands' / 'train' / 'dark' / 'three.npy', np.zeros((20, 28, 3), np.uint16))
    with pytest.raises(ChannelMismatch) as error:
        data_stats.main([str(tmp_path / 'bands'), '--num_workers', '0'])
    first = tmp_path / 'bands' / 'train' / 'bright' / '0.npy'
    assert str(error.value).endswith(f'3 channels (shape (20, 28, 3), read as height, width, channels), but the '
                                     f'first image ({first}) has 4; all images of a dataset have the same '
                                     'channel count')


def test_loader_workers_read_shards_through_their_own_files_not_the_main_process_ones(tmp_path, monkeypatch):
    """check_channels reads the first images in the main process before the loader forks its workers: a worker
    that kept the inherited handle shared its file position with its siblings, and two workers seeking and reading
    at once gave one the other's bytes."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    dataset = build_image_folder(os.path.join(npy_shards(tmp_path), 'train'), None, in_chans=4)
    assert dataset.reader is not None  # opened by check_channels
    expected = torch.stack([dataset[i][0] for i in range(len(dataset))])
    handle = next(iter(dataset.reader.files.items.values()))
    position = os.lseek(handle.fileno(), 0, os.SEEK_SET)  # where no read ends
    context = torch.multiprocessing.get_context('fork')
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2, multiprocessing_context=context)
    assert torch.equal(torch.cat([images for images, _ in loader]), expected)
    assert os.lseek(handle.fileno(), 0, os.SEEK_CUR) == position  # the workers never moved the main one's file


# --- the command line, end to end -------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('layout', ['npy, 4 bands', 'tiff, 5 bands'])
def test_multiband_images_pretrain_fine_tune_and_infer_from_the_command_line(tmp_path, layout, capsys):
    channels = 4 if layout.startswith('npy') else 5
    if channels == 4:
        suffix, make = '.npy', npy_bytes
    else:  # band by band, as GDAL and rasterio write them
        suffix, make = '.tif', lambda a: tiff_bytes(np.moveaxis(a, -1, 0), planarconfig='separate')
    data = band_folder(tmp_path / 'data', make, suffix, channels)
    stats = ['--in_chans', str(channels), '--mean', *['0.4'] * channels, '--std', *['0.25'] * channels]
    pretrain, finetune = tmp_path / 'pretrain', tmp_path / 'finetune'
    run_script('main_pretrain.py', '--model', 'mae_vit_tiny_patch16', *RECT, *stats, *SMALL, '--epochs', '1',
               '--data_path', data, '--output_dir', pretrain, check=True)
    checkpoint = torch.load(pretrain / 'checkpoint-0.pth', map_location='cpu', weights_only=False)
    assert checkpoint['model']['patch_embed.proj.weight'].shape[1] == channels
    assert checkpoint['model']['decoder_pred.weight'].shape[0] == 4 * 4 * channels
    assert checkpoint['model']['pos_embed'].shape[1] == 1 + 4 * 6
    proc = run_script('main_finetune.py', '--model', 'vit_tiny_patch16', *RECT, *stats, *SMALL, '--epochs', '1',
                      '--nb_classes', '2', '--aa', 'none', '--data_path', data, '--output_dir', finetune,
                      '--finetune', pretrain / 'checkpoint-0.pth', check=True)
    assert '16x24 px' in proc.stdout and f'{channels} channels' in proc.stdout
    assert read_json_log(finetune)[-1]['test_num_images'] == 8
    image = os.path.join(data, 'val', 'bright', f'0{suffix}')
    # main_infer reads the channels, the 16x24 size and --mean/--std off each checkpoint
    assert main_infer.main(['--model', 'vit_tiny_patch16', '--resume', str(finetune / 'checkpoint-best.pth'),
                            '--img_path', image, '--topk', '2']) == 0
    assert 'bright' in capsys.readouterr().out
    assert main_infer.main(['--model', 'mae_vit_tiny_patch16', '--resume', str(pretrain / 'checkpoint-0.pth'),
                            '--img_path', image, '--show_channels', '3,2,1',
                            '--output_dir', str(tmp_path / 'figures')]) == 0
    assert 'reconstruction loss' in capsys.readouterr().out and (tmp_path / 'figures' / '0_mae.png').is_file()


def test_refusals_are_one_line_exit_2_and_write_nothing(tmp_path, capsys):
    data = band_folder(tmp_path / 'data', npy_bytes, '.npy', 4, per_class=(2, 1))
    out = tmp_path / 'out'
    base = ['--model', 'mae_vit_tiny_patch16', *SMALL, '--data_path', data, '--output_dir', out]
    cases = {
        ('--in_chans', '3', *RECT): "data/train/bright/0.npy: 4 channels (shape (20, 28, 4), read as "
                                    'height, width, channels), but --in_chans is 3',
        ('--in_chans', '4', *RECT): '--in_chans 4: the ImageNet statistics are for 3 channels; pass --mean and --std',
        ('--in_chans', '4', '--mean', '1', '2', '--std', '1', '1', '1', '1', *RECT):
            '--mean has 2 values, --in_chans is 4: give one per channel',
        (*FOUR, '--input_size', '16', '22', '--patch_size', '4'):
            '--input_size 16 22: must be divisible by the patch size 4',
    }
    for flags, expected in cases.items():
        code, _, err = run_in_process(main_pretrain, [*base, *flags], capsys)
        assert code == 2 and len(err) == 1 and expected in err[0], (flags, err)
        assert not out.exists()
    code, _, err = run_in_process(main_finetune, ['--model', 'vit_tiny_patch16', *RECT, *FOUR, *SMALL,
                                                  '--nb_classes', '2', '--data_path', data, '--output_dir', out],
                                  capsys)
    assert code == 2 and err == ['error: --aa rand-m9-mstd0.5-inc1: RandAugment is defined on RGB photos, not on '
                                 '--in_chans 4 (images read as arrays); pass --aa none']
    assert not out.exists()


def test_the_header_gives_the_shape_the_decoder_gives(tmp_path):
    """What the up-front check reads from headers matches what the run decodes, for every kind of file it reads."""
    files = {'a.npy': lambda p: np.save(p, np.zeros((6, 10, 5), np.float32)),
             'b.npy': lambda p: np.save(p, np.zeros((6, 10), np.uint16)),
             'c.tif': lambda p: tifffile.imwrite(p, np.zeros((6, 10, 5), np.uint16), photometric='minisblack',
                                                 planarconfig='contig'),
             'd.tif': lambda p: tifffile.imwrite(p, np.zeros((7, 6, 10), np.uint8), photometric='minisblack',
                                                 planarconfig='separate'),
             'e.png': lambda p: Image.new('L', (10, 6)).save(p),
             'f.png': lambda p: Image.new('RGBA', (10, 6)).save(p),
             'g.png': lambda p: Image.new('P', (10, 6)).save(p),
             'h.png': lambda p: Image.new('I;16', (10, 6)).save(p)}
    for name, write in files.items():
        path = str(tmp_path / name)
        write(path)
        with open(path, 'rb') as f:
            assert header_shape(path) == read_array(f.read(), 10 ** 6).shape, name
    (tmp_path / 'broken.npy').write_bytes(b'not an array')
    assert header_shape(str(tmp_path / 'broken.npy')) is None  # left to the run, which reports it


def test_a_folder_holding_an_image_of_other_channels_is_refused_before_any_work(tmp_path, capsys):
    """Every file's header is read up front (not the image): the eighth image of a class is named in one line,
    exit code 2, and the output folder is never made."""
    data = band_folder(tmp_path / 'data', npy_bytes, '.npy', 4, per_class=(8, 1))
    np.save(os.path.join(data, 'train', 'dark', '7.npy'), np.zeros((20, 28, 3), np.uint8))
    code, _, errors = run_in_process(main_pretrain, ['--model', 'mae_vit_tiny_patch16', *RECT, *FOUR,
                                                     '--num_workers', '0', '--batch_size', '8', '--epochs', '1',
                                                     '--data_path', data, '--output_dir', tmp_path / 'out'], capsys)
    assert code == 2 and errors == [
        f"error: {os.path.join(data, 'train', 'dark', '7.npy')}: 3 channels (shape (20, 28, 3), read as "
        'height, width, channels), but --in_chans is 4; every image of a run has --in_chans channels']
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('layout', ['shards', 'parquet'])
def test_shards_and_parquet_holding_an_image_of_other_channels_are_refused_before_any_work(tmp_path, monkeypatch,
                                                                                             capsys, layout):
    """The headers of every shard member (read where it lies) and Parquet row are checked up front, once per
    version of the files: the run refuses in one line naming SHARD:KEY, and never makes its output folder."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))  # a fresh shard index
    source = band_folder(tmp_path / 'folders', lambda a: tiff_bytes(a, planarconfig='contig'), '.tif', 4,
                         per_class=(8, 1))
    with open(os.path.join(source, 'train', 'dark', '7.tif'), 'wb') as f:
        f.write(png_bytes(np.zeros((20, 28, 3), np.uint8)))  # a PNG named .tif: told by its bytes, as when read
    convert = ['--parquet', '--row_group_size', '4'] if layout == 'parquet' else ['--shard_size', '6']
    assert make_shards.main([source, str(tmp_path / 'data'), *convert]) == 0
    capsys.readouterr()
    run = ['--model', 'mae_vit_tiny_patch16', *RECT, *FOUR, '--num_workers', '0', '--batch_size', '8', '--epochs',
           '1', '--data_path', tmp_path / 'data', '--output_dir', tmp_path / 'out']
    cache, kept = tmp_path / 'cache' / 'mae-pytorch' / 'shard-index', []
    for _ in range(2):  # the second run reads the shapes the first one kept, and writes nothing new
        code, _, errors = run_in_process(main_pretrain, run, capsys)
        assert code == 2 and len(errors) == 1, errors
        assert errors[0].endswith(': 3 channels (shape (20, 28, 3), read as height, width, channels), but '
                                  '--in_chans is 4; every image of a run has --in_chans channels'), errors
        where = errors[0][len('error: '):errors[0].index(': 3 channels')]
        dataset = build_image_folder(str(tmp_path / 'data' / 'train'), None)
        assert np.asarray(dataset.read(where)).shape == (20, 28, 3)  # the sample named is the PNG
        assert not (tmp_path / 'out').exists()
        kept.append({name: os.stat(cache / name).st_mtime_ns for name in os.listdir(cache)})
    assert kept[0] == kept[1] and kept[0]


def test_processes_checking_one_parquet_file_at_once_read_its_images_once(tmp_path, monkeypatch):
    """Every rank checks the channels before the process group exists: the first reads a Parquet file's image
    column (the whole file), the others wait for its cache instead of each reading the file again."""
    import threading
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
    band_folder(tmp_path / 'folders', npy_bytes, '.npy', 4)
    assert make_shards.main([str(tmp_path / 'folders'), str(tmp_path / 'pq'), '--parquet']) == 0
    [path] = glob.glob(str(tmp_path / 'pq' / 'data' / 'train-*.parquet'))
    samples = shards.read_split('parquet', [path])
    read, results = [], []

    def slow_header_shape(stream):
        read.append(1)
        time.sleep(0.01)  # long enough for the other process to arrive while this one reads
        return stream_header_shape(stream)

    checks = [threading.Thread(target=lambda: results.append(shards.image_shapes('parquet', path, list(samples),
                                                                                 slow_header_shape)))
              for _ in range(2)]
    for check in checks:
        check.start()
    for check in checks:
        check.join()
    assert len(read) == len(samples) == 16 and results[0] == results[1] == [(20, 28, 4)] * 16


def test_a_tar_members_header_reads_as_the_member_decodes(tmp_path):
    """The header of a member read in place through its window gives the shape the whole member decodes to."""
    import tarfile
    members = {'a.npy': npy_bytes(np.zeros((6, 10, 5), np.float32)),
               'b.tif': tiff_bytes(np.zeros((7, 6, 10), np.uint8), planarconfig='separate'),
               'c.png': png_bytes(np.zeros((6, 10), np.uint8))}
    path = tmp_path / 'x.tar'
    with tarfile.open(path, 'w') as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar, open(path, 'rb') as f:
        for member in tar:
            window = io.BufferedReader(MemberWindow(f, member.offset_data, member.size))
            data = members[member.name]
            assert stream_header_shape(window) == read_array(data, 10 ** 6).shape == header_shape_of(data)


def header_shape_of(data: bytes):
    return stream_header_shape(io.BytesIO(data))


@pytest.mark.slow
def test_an_image_with_other_channels_met_by_a_loader_worker_stops_the_run_in_one_line(tmp_path, monkeypatch):
    """An image whose header the up-front check cannot read (a version 3.0 .npy: NumPy has no public reader for
    its header) is met as it is read, in a DataLoader worker, which ignores SIGTERM: the run used to print the
    error and then wait for that worker forever at exit."""
    import tarfile
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))  # a fresh shard index
    rng = np.random.default_rng(0)
    (tmp_path / 'data').mkdir()
    with tarfile.open(tmp_path / 'data' / 'bands-train-0000.tar', 'w') as tar:
        for i in range(8):  # two batches of 4: every image is read
            array = rng.integers(0, 65535, (20, 28, 3 if i == 7 else 4), dtype=np.uint16)
            image = npy_bytes(array, version=(3, 0) if i == 7 else None)
            for suffix, data in (('npy', image), ('cls', str(i % 2).encode())):
                info = tarfile.TarInfo(f'{i:03d}.{suffix}')
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    proc = run_script('main_pretrain.py', '--model', 'mae_vit_tiny_patch16', *RECT, *FOUR, '--num_workers', '1',
                      '--batch_size', '4', '--epochs', '1', '--data_path', tmp_path / 'data', '--output_dir',
                      tmp_path / 'out', timeout=120, env={'XDG_CACHE_HOME': str(tmp_path / 'cache')})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'data' / 'bands-train-0000.tar'}:007: 3 channels (shape (20, 28, 3), read "
        'as height, width, channels), but --in_chans is 4; every image of a run has --in_chans channels']


# --- position tables of rectangles ----------------------------------------------------------------------------

def test_a_checkpoint_of_a_wide_grid_is_interpolated_into_a_tall_one_of_the_same_length():
    """4x6 and 6x4 grids have tables of the same length: only the checkpoint's saved --input_size tells them
    apart, and loading one into the other without interpolation would scramble the positions silently."""
    wide = models_mae.MaskedAutoencoderViT(img_size=(16, 24), patch_size=4, in_chans=2, embed_dim=32, depth=1,
                                           num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    tall = models_mae.MaskedAutoencoderViT(img_size=(24, 16), patch_size=4, in_chans=2, embed_dim=32, depth=1,
                                           num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    checkpoint = {'model': wide.state_dict(), 'args': argparse.Namespace(input_size=(16, 24))}
    load_weights(tall, checkpoint, 'wide.pth', 'tiny', fit_grid=True)
    # the sin-cos table of the wide grid, interpolated to the tall one, is not the wide table reread in order
    assert not torch.equal(tall.pos_embed, wide.pos_embed)
    assert torch.allclose(tall.pos_embed[0, 1], wide.pos_embed[0, 1], atol=0.2)  # the top-left corner stays


# --- a 1-channel MAE learns ------------------------------------------------------------------------------------

def digits_folder(root) -> str:
    """scikit-learn's handwritten digits (1,797 real 8x8 scans, shipped with the package) as 16x16 greyscale PNGs:
    the first 1,400 in train/, the rest in val/."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target)):
        folder = os.path.join(root, 'train' if i < 1400 else 'val', str(label))
        os.makedirs(folder, exist_ok=True)
        pixels = np.kron((image * 255 / 16).round().astype(np.uint8), np.ones((2, 2), np.uint8))
        Image.fromarray(pixels, 'L').save(os.path.join(folder, f'{i}.png'))
    return str(root)


def augmented_images(dataset, seed: int) -> torch.Tensor:
    """Every image of `dataset` once through its (random) transform, drawn from `seed`."""
    torch.manual_seed(seed)
    return torch.stack([dataset[i][0] for i in range(len(dataset))])


def masked_losses(model, images: torch.Tensor, mean_image: torch.Tensor) -> dict:
    """The masked-patch loss of the model, of predicting zeros and of predicting the mean training image, on the
    same masks."""
    torch.manual_seed(1)
    with torch.no_grad():
        loss, _, mask = model(images, mask_ratio=0.75)
        target = model.patchify(images)

        def of(prediction):
            return float((((target - prediction) ** 2).mean(dim=-1) * mask).sum() / mask.sum())
        return {'model': float(loss), 'zeros': of(0), 'mean image': of(model.patchify(mean_image))}


@pytest.mark.slow
def test_a_one_channel_mae_learns_on_scikit_learn_digits(tmp_path):
    """Held-out digits, cropped and flipped as in training: the masked-patch loss ends well below predicting zeros
    (the normalised pixels' mean) and below predicting the mean training image."""
    root = digits_folder(tmp_path / 'digits')
    norm = Normalization(1, (0.3056,), (0.3755,))  # python -m tools.data_stats on this folder
    transform = build_array_pretrain_transform(16, norm)
    train = build_image_folder(os.path.join(root, 'train'), transform, in_chans=1)
    held_out = augmented_images(build_image_folder(os.path.join(root, 'val'), transform, in_chans=1), seed=5)
    mean_image = augmented_images(train, seed=6).mean(dim=0, keepdim=True)
    assert held_out.shape == (397, 1, 16, 16)
    torch.manual_seed(0)
    model = models_mae.MaskedAutoencoderViT(img_size=16, patch_size=2, in_chans=1, embed_dim=64, depth=2,
                                            num_heads=4, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95))
    loader = torch.utils.data.DataLoader(train, batch_size=100, shuffle=True, drop_last=True)
    before = masked_losses(model.eval(), held_out, mean_image)
    for _ in range(8):
        model.train()
        for batch, _ in loader:
            loss, _, _ = model(batch, mask_ratio=0.75)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    after = masked_losses(model.eval(), held_out, mean_image)
    assert after['model'] < 0.75 * after['zeros'] and after['model'] < after['mean image'], (before, after)


# --- weights out: Hugging Face and timm ---------------------------------------------------------------------

def test_a_four_channel_mae_goes_to_transformers_and_back_with_the_same_numbers(tmp_path):
    import transformers
    torch.manual_seed(0)
    ours = models_mae.MaskedAutoencoderViT(img_size=16, patch_size=4, in_chans=4, embed_dim=32, depth=1, num_heads=2,
                                           decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
                                           norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()  # as the factories
    torch.save({'model': ours.state_dict(), 'args': argparse.Namespace(in_chans=4, input_size=16)},
               tmp_path / 'mae.pth')
    assert export.main([str(tmp_path / 'mae.pth'), str(tmp_path / 'hf'), '--to', 'hf', '--num_heads', '2',
                        '--decoder_num_heads', '2']) == 0
    theirs = transformers.ViTMAEForPreTraining.from_pretrained(tmp_path / 'hf').eval()
    assert theirs.config.num_channels == 4 and theirs.config.image_size == 16
    generator = torch.Generator().manual_seed(2)
    x, noise = torch.randn(2, 4, 16, 16, generator=generator), torch.rand(2, 16, generator=generator)
    with torch.no_grad():
        loss, pred, mask = ours(x, mask_ratio=0.75, noise=noise)
        out = theirs(pixel_values=x, noise=noise)
    assert pred.shape == out.logits.shape == (2, 16, 4 * 4 * 4)
    assert torch.allclose(loss, out.loss, rtol=1e-5, atol=1e-5), (loss, out.loss)
    assert (pred - out.logits).abs().max() <= 1e-5 and torch.equal(mask, out.mask)
    back = load_checkpoint(str(tmp_path / 'hf'))
    assert back['args'].in_chans == 4
    assert all(torch.equal(back['model'][k], v) for k, v in ours.state_dict().items())


def test_a_rectangular_mae_is_refused_by_the_transformers_export_in_one_line(tmp_path, capsys):
    mae = models_mae.MaskedAutoencoderViT(img_size=(16, 24), patch_size=4, in_chans=2, embed_dim=32, depth=1,
                                          num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    torch.save({'model': mae.state_dict(), 'args': argparse.Namespace(input_size=(16, 24), in_chans=2)},
               tmp_path / 'mae.pth')
    assert export.main([str(tmp_path / 'mae.pth'), str(tmp_path / 'hf'), '--to', 'hf', '--num_heads', '2',
                        '--decoder_num_heads', '2']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its images are 16x24 px, not square; Hugging Face's ViTMAE builds" in err[0]
    assert not (tmp_path / 'hf').exists()


def test_a_rectangular_five_channel_classifier_goes_to_timm_with_its_size_channels_and_statistics(tmp_path):
    import timm
    torch.manual_seed(0)
    ours = models_vit.VisionTransformer(img_size=(16, 24), patch_size=4, in_chans=5, num_classes=3, embed_dim=32,
                                        depth=1, num_heads=2).eval()
    stats = dict(mean=[0.1, 0.2, 0.3, 0.4, 0.5], std=[0.5, 0.4, 0.3, 0.2, 0.1])
    torch.save({'model': ours.state_dict(),
                'args': argparse.Namespace(model='vit_tiny_patch16', input_size=(16, 24), in_chans=5, **stats)},
               tmp_path / 'vit.pth')
    assert export.main([str(tmp_path / 'vit.pth'), str(tmp_path / 'timm'), '--to', 'timm', '--num_heads', '2']) == 0
    theirs = timm.create_model(f'local-dir:{tmp_path / "timm"}', pretrained=True).eval()
    assert tuple(theirs.pretrained_cfg['input_size']) == (5, 16, 24)
    assert list(theirs.pretrained_cfg['mean']) == stats['mean'] and list(theirs.pretrained_cfg['std']) == stats['std']
    x = torch.randn(2, 5, 16, 24, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(x) - theirs(x)).abs().max() <= 1e-5


def test_torch_hub_and_eval_take_the_channels_and_the_rectangle_from_the_checkpoint(tmp_path):
    import hubconf
    from util.classification import resolve_sizes
    from util.output_dir import Resumable
    torch.manual_seed(0)
    ours = models_vit.build_classifier('vit_tiny_patch16', img_size=(16, 24), patch_size=4, in_chans=4,
                                       num_classes=3).eval()
    checkpoint = {'model': ours.state_dict(), 'args': argparse.Namespace(input_size=(16, 24), in_chans=4)}
    torch.save(checkpoint, tmp_path / 'vit.pth')
    theirs = hubconf.vit_tiny_patch16(checkpoint=str(tmp_path / 'vit.pth')).eval()
    assert tuple(theirs.patch_embed.img_size) == (16, 24) and theirs.patch_embed.proj.in_channels == 4
    x = torch.randn(1, 4, 16, 24)
    with torch.no_grad():
        assert torch.equal(ours(x), theirs(x))
    args = argparse.Namespace(eval=True, input_size=None, patch_size=None, nb_classes=None, global_pool=None,
                              model='vit_tiny_patch16')
    sizes = resolve_sizes(args, Resumable(str(tmp_path / 'vit.pth'), checkpoint, False), global_pool_default=True)
    assert sizes.input_size == (16, 24) and sizes.patch_size == 4 and sizes.nb_classes == 3


# --- RGB data keep the official path ------------------------------------------------------------------------

def test_npy_files_beside_rgb_photos_and_rgb_tiffs_keep_the_official_path(tmp_path, monkeypatch):
    """A depth map or feature file kept beside each photo is not an image of a 3-channel run, in a folder or in a
    shard (where the photo member wins), and 3-channel TIFFs are decoded by PIL as before."""
    import tarfile
    from util.datasets import IndexedImageDataset, reads_arrays
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))  # a fresh shard index
    photo = io.BytesIO()
    Image.new('RGB', (20, 20), (200, 10, 10)).save(photo, 'JPEG')
    root = tmp_path / 'data' / 'train'
    for name in ('a', 'b'):
        (root / name).mkdir(parents=True)
        (root / name / 'x.jpg').write_bytes(photo.getvalue())
        np.save(root / name / 'x_depth.npy', np.zeros((20, 20), np.float32))
        np.save(root / name / 'a_first.npy', np.zeros((20, 20), np.float32))  # sorts before the photo
    assert not reads_arrays(str(root), 3)
    dataset = build_image_folder(str(root), None)
    assert [os.path.basename(p) for p, _ in dataset.samples] == ['x.jpg', 'x.jpg']
    assert isinstance(dataset[0][0], Image.Image)
    with tarfile.open(tmp_path / 'data' / 'pairs-train-0000.tar', 'w') as tar:
        for key in ('k0', 'k1'):
            for suffix, data in (('npy', npy_bytes(np.zeros((20, 20), np.float32))), ('jpg', photo.getvalue()),
                                 ('cls', b'0')):
                info = tarfile.TarInfo(f'{key}.{suffix}')
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (root / 'a').rename(tmp_path / 'moved_a')
    (root / 'b').rename(tmp_path / 'moved_b')
    root.rmdir()
    shards = build_image_folder(str(root), None)
    assert isinstance(shards, IndexedImageDataset) and not reads_arrays(str(root), 3)
    assert isinstance(shards[0][0], Image.Image) and shards[0][0].size == (20, 20)
    tiffs = tmp_path / 'tiffs' / 'train' / 'a'
    tiffs.mkdir(parents=True)
    tifffile.imwrite(tiffs / 'rgb.tif', np.full((20, 20, 3), 7, np.uint8), photometric='rgb')
    assert not reads_arrays(str(tiffs.parent), 3)
    # a 16-bit 3-band TIFF, or one stored band by band, would lose its low 8 bits or not open in PIL: arrays
    for name, kwargs in (('a16.tif', dict(data=np.full((20, 20, 3), 5990, np.uint16), photometric='rgb')),
                         ('a8planar.tif', dict(data=np.full((3, 20, 20), 7, np.uint8), photometric='minisblack',
                                               planarconfig='separate'))):
        tifffile.imwrite(tiffs / name, kwargs.pop('data'), **kwargs)
        assert reads_arrays(str(tiffs.parent), 3), name
        os.remove(tiffs / name)


def test_a_timm_export_reads_back_with_its_size_channels_and_statistics(tmp_path):
    ours = models_vit.VisionTransformer(img_size=(16, 24), patch_size=4, in_chans=2, num_classes=3, embed_dim=32,
                                        depth=1, num_heads=2)
    args = argparse.Namespace(model='vit_tiny_patch16', input_size=(16, 24), in_chans=2, mean=[0.1, 0.2],
                              std=[0.3, 0.4])
    torch.save({'model': ours.state_dict(), 'args': args}, tmp_path / 'vit.pth')
    assert export.main([str(tmp_path / 'vit.pth'), str(tmp_path / 'timm'), '--to', 'timm', '--num_heads', '2']) == 0
    back = load_checkpoint(str(tmp_path / 'timm'))
    assert (back['args'].input_size, back['args'].in_chans) == ((16, 24), 2)
    assert (back['args'].mean, back['args'].std) == ([0.1, 0.2], [0.3, 0.4])


def test_eval_of_a_checkpoint_trained_with_other_statistics_is_refused_in_one_line(tmp_path, capsys):
    data = band_folder(tmp_path / 'data', npy_bytes, '.npy', 4, per_class=(2, 1))
    model = models_vit.build_classifier('vit_tiny_patch16', img_size=(16, 24), patch_size=4, in_chans=4,
                                        num_classes=2)
    saved = argparse.Namespace(in_chans=4, input_size=(16, 24), mean=[0.3] * 4, std=[0.2] * 4)
    torch.save({'model': model.state_dict(), 'args': saved, 'classes': ['bright', 'dark']}, tmp_path / 'vit.pth')
    other = ['--in_chans', '4', '--mean', '0.5', '0.5', '0.5', '0.5', '--std', '0.2', '0.2', '0.2', '0.2']
    code, _, err = run_in_process(main_finetune, ['--model', 'vit_tiny_patch16', '--eval', '--resume',
                                                  tmp_path / 'vit.pth', *other, *SMALL, '--data_path', data], capsys)
    assert code == 2 and len(err) == 1
    assert err[0].endswith('pass --in_chans 4 --mean 0.3 0.3 0.3 0.3 --std 0.2 0.2 0.2 0.2 to evaluate it as it was '
                           'trained')
