"""What a folder scan takes for data: hidden entries and the metadata other systems leave beside images are neither
classes nor samples, links are followed the same way, and every path that walks folders (the datasets, the class
lists, main_infer.py's folder mode) agrees; a clean tree gives torchvision's ImageFolder samples in its order."""
import os
import shutil

import pytest
import torchvision
from conftest import TINY_PRETRAIN_ARGS, run_script
from PIL import Image

from tools.synthetic import CLASSES, make_image_folder
from util.classes import check_subset, folder_classes, run_classes
from util.datasets import build_image_folder
from util.folders import collect_images


def image(path, colour=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new('RGB', (8, 8), colour).save(path)


def litter(root):
    """What file managers, archivers, NAS boxes and notebooks leave in a dataset, at every level."""
    image(os.path.join(root, '.thumbnails', 'a.png'))                         # the hidden class folder
    image(os.path.join(root, '__MACOSX', CLASSES[0], 'x.png'))                # a zip made on a Mac
    image(os.path.join(root, '.ipynb_checkpoints', 'y.png'))                  # Jupyter
    for name in CLASSES[:2]:
        with open(os.path.join(root, name, '._0000.png'), 'wb') as f:          # macOS AppleDouble: not an image
            f.write(b'\x00\x05\x16\x07 AppleDouble metadata')
        image(os.path.join(root, name, '@eaDir', '0000.png', 'SYNOPHOTO_THUMB_M.png'))  # Synology thumbnails
        image(os.path.join(root, name, '.cache', 'z.png'))
        open(os.path.join(root, name, 'Thumbs.db'), 'wb').close()
        open(os.path.join(root, name, '.DS_Store'), 'wb').close()


@pytest.fixture
def clean_and_littered(tmp_path):
    clean = make_image_folder(str(tmp_path / 'clean'), {'train': 3, 'val': 2}, size=16, classes=CLASSES[:2])
    littered = str(tmp_path / 'littered')
    shutil.copytree(clean, littered)
    for split in ('train', 'val'):
        litter(os.path.join(littered, split))
    return clean, littered


def relative(paths, root):
    return [os.path.relpath(p, root) for p in paths]


def test_hidden_folders_and_metadata_are_neither_classes_nor_samples(clean_and_littered, capsys):
    clean, littered = clean_and_littered
    ours = build_image_folder(os.path.join(littered, 'train'), None)
    reference = build_image_folder(os.path.join(clean, 'train'), None)
    assert ours.classes == reference.classes == sorted(CLASSES[:2])  # '.thumbnails' was class 0
    assert relative([p for p, _ in ours.samples], os.path.join(littered, 'train')) == \
        relative([p for p, _ in reference.samples], os.path.join(clean, 'train'))
    assert ours.targets == reference.targets
    note = capsys.readouterr().out
    assert 'hidden or metadata entries skipped, not data' in note and '.thumbnails' in note and '__MACOSX' in note


def test_class_lists_and_the_val_check_skip_them_too(clean_and_littered):
    _, littered = clean_and_littered
    train, val = os.path.join(littered, 'train'), os.path.join(littered, 'val')
    assert folder_classes(train) == sorted(CLASSES[:2])
    assert run_classes(None, os.path.join(littered, 'nowhere'), val, 2) == sorted(CLASSES[:2])
    check_subset(val, sorted(CLASSES[:2]))  # '.ipynb_checkpoints' in val/ was an unknown class: refused


def test_inference_folder_mode_takes_the_same_images_as_the_dataset(clean_and_littered):
    _, littered = clean_and_littered
    train = os.path.join(littered, 'train')
    files, errors, skipped = collect_images([train])
    assert files == [p for p, _ in build_image_folder(train, None).samples] and not errors
    assert any(p.endswith('._0000.png') for p in skipped) and any(p.endswith('@eaDir') for p in skipped)


def test_a_clean_tree_gives_torchvisions_samples_in_torchvisions_order(tmp_path):
    root = make_image_folder(str(tmp_path / 'data'), {'train': 4}, size=16, classes=CLASSES[:3])
    train = os.path.join(root, 'train')
    image(os.path.join(train, CLASSES[1], 'nested', 'deeper', 'n.png'))  # torchvision walks sub-folders
    image(os.path.join(train, CLASSES[1], 'Nested_upper.jpg'))
    theirs = torchvision.datasets.ImageFolder(train)
    ours = build_image_folder(train, None)
    assert ours.samples == theirs.samples and ours.classes == theirs.classes


def test_links_are_followed_alike_and_a_link_back_to_an_ancestor_is_walked_once(tmp_path):
    elsewhere = tmp_path / 'elsewhere'
    image(str(elsewhere / 'linked_class' / 'l.png'))
    image(str(elsewhere / 'loose.png'))
    train = tmp_path / 'data' / 'train'
    image(str(train / 'cats' / 'c.png'))
    os.symlink(elsewhere / 'linked_class', train / 'dogs')                    # a class folder that is a link
    os.symlink(elsewhere / 'loose.png', train / 'cats' / 'linked.png')        # an image that is a link
    os.symlink(train / 'cats', train / 'cats' / 'loop')                       # a link back to its own folder
    os.symlink(tmp_path / 'missing.png', train / 'cats' / 'broken.png')       # a link to nothing
    dataset = build_image_folder(str(train), None)
    assert dataset.classes == ['cats', 'dogs'] == folder_classes(str(train))
    assert relative([p for p, _ in dataset.samples], str(train)) == [
        'cats/broken.png', 'cats/c.png', 'cats/linked.png', 'dogs/l.png']
    files, errors, _ = collect_images([str(train)])
    assert files == [p for p, _ in dataset.samples] and not errors
    dataset[0]  # the broken link: reported as unreadable, replaced by the next image
    assert [os.path.basename(p) for p in dataset.bad_images.collect()] == ['broken.png']


def test_explicitly_named_files_are_taken_even_if_hidden(tmp_path):
    image(str(tmp_path / '.hidden.png'))
    files, errors, _ = collect_images([str(tmp_path / '.hidden.png')])
    assert files == [str(tmp_path / '.hidden.png')] and not errors


@pytest.mark.slow
def test_pretraining_on_a_littered_folder_sees_only_the_classes_and_says_what_it_skipped(clean_and_littered,
                                                                                         tmp_path):
    _, littered = clean_and_littered
    proc = run_script('main_pretrain.py', '--data_path', littered, '--output_dir', tmp_path / 'out', '--epochs', '1',
                      *TINY_PRETRAIN_ARGS, '--batch_size', '2')
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert '6 images of 2 classes' in proc.stdout and 'hidden or metadata entries skipped' in proc.stdout
    assert 'Image replaced' not in proc.stdout  # no AppleDouble file was taken for a damaged image


def test_more_loader_workers_than_cores_are_capped_and_said_once(texture_data, monkeypatch, capsys):
    """The official default --num_workers 10 on a 2-core machine: torch warned that the loader may freeze. The
    default stays; the loader uses the cores there are, and says so once."""
    import argparse
    from util import datasets
    from util.device import Runtime
    monkeypatch.setattr(datasets, 'usable_cpus', lambda: 2)
    monkeypatch.setattr(datasets, 'CAPPED_WORKERS', set())
    dataset = build_image_folder(os.path.join(texture_data, 'val'), None)
    args = argparse.Namespace(seed=0, batch_size=4, num_workers=10, pin_mem=False, persistent_workers=False)
    loaders = [datasets.build_loader(dataset, args, Runtime('cpu'), train, 0, 1) for train in (True, False)]
    assert [loader.num_workers for loader in loaders] == [2, 2]
    notes = [line for line in capsys.readouterr().out.splitlines() if 'num_workers' in line]
    assert len(notes) == 1 and notes[0].endswith('Note: --num_workers 10 is more than the 2 CPU cores this process '
                                                 'may use: 2 loader workers instead')
    args.num_workers = 1
    assert datasets.build_loader(dataset, args, Runtime('cpu'), True, 0, 1).num_workers == 1
