"""--data_path in three layouts, recognised from what is there: image folders, WebDataset tar shards and Parquet
files (util/shards.py), written here by tools/make_shards.py from the same images; the same numbers on each."""
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch
from conftest import (
    ROOT,
    TINY_CLASSIFIER_ARGS,
    TINY_PRETRAIN_ARGS,
    read_json_log,
    run_in_process,
    run_script,
    run_torchrun,
    start_process,
    subprocess_env,
    wait_for_line,
)

import main_finetune
import main_pretrain
import models_vit
from engine_finetune import evaluate
from tools import make_shards
from util.checkpoint_files import load_checkpoint
from util.datasets import ResumableSampler, build_image_folder, build_loader, shard_aware_order
from util.device import Runtime
from util.transforms import build_eval_transform

@pytest.fixture(scope='module')
def layouts(texture_data, tmp_path_factory):
    """texture_data (4 classes, 32 train and 16 val images each) as folders, tar shards of 20 samples and Parquet
    files of 20 rows in row groups of 8."""
    root = tmp_path_factory.mktemp('layouts')
    assert make_shards.main([texture_data, str(root / 'wds'), '--shard_size', '20']) == 0
    assert make_shards.main([texture_data, str(root / 'parquet'), '--parquet', '--shard_size', '20',
                             '--row_group_size', '8']) == 0
    return {'folders': texture_data, 'wds': str(root / 'wds'), 'parquet': str(root / 'parquet')}


def evaluation(data_path: str, model, classes, **flags) -> dict:
    dataset = build_image_folder(os.path.join(data_path, 'val'), build_eval_transform(32), classes=classes,
                                 substitute=False)
    args = main_finetune.get_args_parser().parse_args(['--num_workers', '0', '--batch_size', '7', '--output_dir', '',
                                                       *[str(f) for f in flags.get('argv', [])]])
    return evaluate(build_loader(dataset, args, Runtime('cpu'), False, 0, 1), model, Runtime('cpu'), args)


def test_the_three_layouts_give_the_same_samples_labels_and_evaluation(layouts):
    folders = build_image_folder(os.path.join(layouts['folders'], 'val'), None)
    torch.manual_seed(0)
    model = models_vit.vit_tiny_patch16(img_size=32, patch_size=4, num_classes=4).eval()
    reference = evaluation(layouts['folders'], model, folders.classes)
    for layout in ('wds', 'parquet'):
        dataset = build_image_folder(os.path.join(layouts[layout], 'val'), None)
        assert dataset.classes == folders.classes and len(dataset) == len(folders) == 64
        assert sorted(dataset.targets) == sorted(folders.targets)
        stats = evaluation(layouts[layout], model, folders.classes)  # other batches (the shards are shuffled): the
        assert {k: v for k, v in stats.items() if k != 'loss'} == {k: v for k, v in reference.items() if k != 'loss'}
        assert stats['loss'] == pytest.approx(reference['loss'], rel=1e-6)  # loss sums in another order
        assert f"{stats['loss']:.3f}" == f"{reference['loss']:.3f}"  # as printed


def test_a_sample_is_labelled_by_its_class_name_not_its_index(tmp_path):
    """A split holding some classes only (here the second and fourth of the run's list) scores against the run's
    list: labels come from the names in the files (KEY.json, the ClassLabel), as folder names label folders."""
    from tools.synthetic import CLASSES, make_image_folder
    classes = sorted(CLASSES[:4])
    folder = make_image_folder(str(tmp_path / 'some'), {'val': 3}, size=32, classes=[classes[1], classes[3]])
    for layout, extra in (('wds', []), ('parquet', ['--parquet'])):
        assert make_shards.main([folder, str(tmp_path / layout), *extra]) == 0
        dataset = build_image_folder(str(tmp_path / layout / 'val'), None, classes=classes)
        assert sorted(set(dataset.targets)) == [1, 3]


def test_a_class_in_the_shards_the_run_does_not_know_is_refused_in_one_line_naming_it(layouts):
    from util.datasets import DataError
    classes = build_image_folder(os.path.join(layouts['folders'], 'val'), None).classes
    root = os.path.join(layouts['wds'], 'val')
    with pytest.raises(DataError, match=rf"^{root}: class {classes[3]} not among the run's 3 classes "
                                        rf"\({', '.join(classes[:3])}\); the model has no output for it$"):
        build_image_folder(root, None, classes=classes[:3])


def write_parquet(path, labels, names):
    import pyarrow as pa
    import pyarrow.parquet as pq
    image = {'bytes': open(os.path.join(ROOT, 'tests', 'data', 'circuit_board.jpg'), 'rb').read(), 'path': 'a.jpg'}
    metadata = {b'huggingface': json.dumps({'info': {'features': {'label': {'names': names,
                                                                            '_type': 'ClassLabel'}}}}).encode()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    table = pa.table({'image': [image] * len(labels), 'label': labels}).replace_schema_metadata(metadata)
    pq.write_table(table, path)


def test_imagenet_named_by_lemma_or_index_scores_against_synset_classes_in_the_standard_order(tmp_path):
    """The hub's ILSVRC/imagenet-1k names its classes 'tench, Tinca tinca' ...; sorted as names they would give
    another order than the synsets of folders, and a released 1000-class checkpoint (no class list: the standard
    order) would score at chance. Lemmas that are their index's ImageNet class become synsets; shards with only
    .cls indices meet a run named by synsets (and the other way round) through the standard order."""
    from util.classes import run_classes
    from util.imagenet import IMAGENET_LEMMAS, imagenet_synsets, read_lines
    synsets, lemmas = imagenet_synsets(), read_lines(IMAGENET_LEMMAS)
    labels = [999, 0, 517, 134, 7]  # 134 and 517 are both 'crane'; ClassLabel names are unique: 'crane2'
    hub_names = lemmas[:517] + ['crane2'] + lemmas[518:]
    write_parquet(str(tmp_path / 'hub' / 'data' / 'validation-00000-of-00001.parquet'), labels, hub_names)
    val = str(tmp_path / 'hub' / 'val')
    classes = run_classes(None, str(tmp_path / 'hub' / 'train'), val, 1000)  # a released checkpoint's outputs
    assert classes == synsets
    assert build_image_folder(val, None, classes=classes).targets == labels
    assert build_image_folder(val, None).classes == sorted(synsets[i] for i in labels)
    data = tmp_path / 'cls'
    data.mkdir()
    with tarfile.open(data / 'x-validation-0000.tar', 'w') as tar:
        for i, label in enumerate(labels):
            add(tar, f'{i}.jpg', b'jpeg')
            add(tar, f'{i}.cls', str(label).encode())
    assert build_image_folder(str(data / 'val'), None, classes=synsets).targets == labels
    index_named = [str(i) for i in range(1000)]  # a run trained on those shards, evaluated on synset folders
    for i in labels:
        (tmp_path / 'folders' / synsets[i]).mkdir(parents=True)
        (tmp_path / 'folders' / synsets[i] / 'a.jpg').write_bytes(b'jpeg')
    assert build_image_folder(str(tmp_path / 'folders'), None, classes=index_named).targets == sorted(labels)
    for digit in ('0', '1'):  # folders named by digits are names, not ImageNet indices (CIFAR-10's 0 ... 9)
        (tmp_path / 'digits' / digit).mkdir(parents=True)
        (tmp_path / 'digits' / digit / 'a.jpg').write_bytes(b'jpeg')
    from util.datasets import DataError
    with pytest.raises(DataError, match="class folders 0, 1 not among the run's 1000 classes"):
        build_image_folder(str(tmp_path / 'digits'), None, classes=synsets)
    other = tmp_path / 'other' / 'data' / 'validation-00000-of-00001.parquet'  # not ImageNet: names kept
    write_parquet(str(other), [0, 1], ['tench, Tinca tinca', 'mug'])
    assert build_image_folder(str(tmp_path / 'other' / 'val'), None).classes == ['mug', 'tench, Tinca tinca']


@pytest.mark.parametrize('world_size', [1, 2, 3])
def test_the_shard_aware_order_reads_every_shard_front_to_back_on_one_rank(layouts, world_size):
    dataset = build_image_folder(os.path.join(layouts['wds'], 'train'), None)
    assert [end - start for start, end in dataset.groups] == [20] * 6 + [8]
    epoch_order = shard_aware_order(dataset.groups, torch.Generator().manual_seed(3 + 5))  # seed 3, epoch 5
    assert sorted(epoch_order) == list(range(len(dataset)))
    for start, end in dataset.groups:  # within a shard, increasing positions: no seek backwards
        positions = [i for i in epoch_order if start <= i < end]
        assert positions == sorted(positions)
    padded = epoch_order + epoch_order[:-len(dataset) % world_size or 0]  # as DistributedSampler pads
    share = len(padded) // world_size
    for rank in range(world_size):  # a consecutive share of the epoch's order each
        sampler = ResumableSampler(dataset, world_size, rank, shuffle=True, seed=3)
        sampler.set_epoch(5)
        assert list(sampler) == padded[rank * share:(rank + 1) * share]
    first16 = shard_aware_order(dataset.groups, torch.Generator().manual_seed(8))[:16]
    assert len({dataset.samples[i][1] for i in first16}) > 1  # a batch mixes classes (the shards are shuffled)


def test_with_more_stretches_than_processes_a_shard_is_read_by_at_most_two(tmp_path):
    """64 shards are 4 stretches of 16: over 3 processes, each shard is read by one process, or two where a share
    ends inside its stretch (before, every process read every shard)."""
    groups = [(i * 10, (i + 1) * 10) for i in range(64)]
    order = shard_aware_order(groups, torch.Generator().manual_seed(1))
    share = -(-len(order) // 3)
    readers = {}
    for rank in range(3):
        for i in order[rank * share:(rank + 1) * share]:
            readers.setdefault(i // 10, set()).add(rank)
    assert len(readers) == 64 and max(len(ranks) for ranks in readers.values()) <= 2
    assert sum(len(ranks) == 2 for ranks in readers.values()) <= 2 * 16  # only in the two stretches cut by a share


def test_an_epoch_opens_each_shard_and_reads_each_row_group_once(tmp_path):
    """More shards than one stretch mixes (shards.SHARDS_MIXED), read in an epoch's order by one reader: each
    tar shard opened once, each Parquet row group read once (a reader keeping one open re-opened it per sample)."""
    from tools.synthetic import make_image_folder
    from util import shards
    folder = make_image_folder(str(tmp_path / 'images'), {'train': 20}, size=8)  # 8 classes: 160 images
    assert make_shards.main([folder, str(tmp_path / 'wds'), '--shard_size', '4']) == 0  # 40 shards
    assert make_shards.main([folder, str(tmp_path / 'pq'), '--parquet', '--shard_size', '40',
                             '--row_group_size', '4']) == 0  # 4 files of 10 row groups
    for layout, groups in (('wds', 40), ('pq', 40)):
        dataset = build_image_folder(str(tmp_path / layout / 'train'), None)
        assert len(dataset.groups) == groups > shards.SHARDS_MIXED
        sampler = ResumableSampler(dataset, 1, 0, shuffle=True, seed=0)
        opened = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            assert len([dataset[i] for i in sampler]) == 160
            reader = dataset.reader.files if layout == 'wds' else dataset.reader.groups
            opened.append(reader.opened - sum(opened))
        assert opened[0] == groups and opened[1] <= groups  # once per epoch (some shards stay open from the last)
        if layout == 'pq':
            assert dataset.reader.files.opened == 4  # the 4 files stay open (16 handles kept)


@pytest.mark.slow
def test_pretraining_takes_the_same_images_on_each_layout_with_either_decoder(layouts, tmp_path):
    for layout, fast in (('folders', []), ('wds', ['--fast_decode']), ('parquet', [])):
        out = tmp_path / f'{layout}{len(fast)}'
        proc = run_script('main_pretrain.py', *TINY_PRETRAIN_ARGS, '--epochs', '1', '--data_path', layouts[layout],
                          '--output_dir', out, '--num_workers', '2', *fast, check=True)
        assert '128 images of 4 classes in ' in proc.stdout
        assert ('(WebDataset)' in proc.stdout) == (layout == 'wds')
        assert read_json_log(out)[0]['epoch'] == 0


@pytest.mark.slow
def test_dist_eval_on_shards_over_two_processes_equals_one(layouts, tmp_path):
    torch.manual_seed(1)
    weights = tmp_path / 'c.pth'
    torch.save({'model': models_vit.vit_tiny_patch16(img_size=32, patch_size=4, num_classes=4).state_dict()},
               weights)
    flags = ['--eval', '--resume', weights, '--data_path', layouts['wds'], *TINY_CLASSIFIER_ARGS, '--batch_size', '5']
    one = run_script('main_finetune.py', *flags, check=True)
    two = run_torchrun('main_finetune.py', *flags, '--dist_eval', check=True)
    assert f"data: 64 images of 4 classes in 4 shards in {layouts['wds']} (WebDataset)" in one.stdout
    line = [entry for entry in one.stdout.splitlines() if '* Acc@1' in entry][0].split('* ')[1]
    assert f'* {line}' in two.stdout and 'on the 64 test images' in two.stdout


@pytest.mark.slow
def test_a_run_on_shards_killed_mid_epoch_resumes_to_the_uninterrupted_weights(layouts, tmp_path):
    flags = [sys.executable, 'main_pretrain.py', '--data_path', layouts['wds'], *TINY_PRETRAIN_ARGS, '--epochs', '2',
             '--save_every_iters', '2', '--seed', '3']  # --num_workers 0: exact (README, Fault tolerance)
    whole = tmp_path / 'whole'
    subprocess.run([*flags, '--output_dir', whole], cwd=ROOT, env=subprocess_env(), check=True, capture_output=True)
    out = tmp_path / 'killed'
    proc = start_process([*flags, '--output_dir', out], tmp_path / 'first.log')
    wait_for_line(tmp_path / 'first.log', 'Epoch: [0]  [4/8]', proc)
    proc.kill()
    proc.wait()
    relaunch = subprocess.run([*flags, '--output_dir', out], cwd=ROOT, env=subprocess_env(), capture_output=True,
                              text=True)
    assert relaunch.returncode == 0 and 'Continuing at epoch' in relaunch.stdout, relaunch.stderr[-2000:]
    ours, theirs = (load_checkpoint(str(d / 'checkpoint-last.pth'))['model'] for d in (out, whole))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


# --- bad input: one line naming the file, exit code 2, before any training step, nothing written -----------------

def add(tar: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def refusal(data_path, tmp_path, capsys) -> str:
    out = tmp_path / 'out'
    code, stdout, err = run_in_process(main_pretrain, ['--data_path', data_path, '--output_dir', out,
                                                       *TINY_PRETRAIN_ARGS], capsys)
    assert code == 2 and len(err) == 1 and not out.exists(), err
    return err[0]


def test_a_folder_with_none_of_the_layouts_is_one_line_listing_what_was_looked_for(tmp_path, capsys):
    (tmp_path / 'data').mkdir()
    line = refusal(tmp_path / 'data', tmp_path, capsys)
    assert 'has no train/ folder' in line and 'NAME-train-NNNN.tar' in line and 'data/train-*.parquet' in line


def test_a_shard_sample_without_a_class_and_a_truncated_shard_are_named(layouts, tmp_path, capsys):
    data = tmp_path / 'data'
    data.mkdir()
    with tarfile.open(data / 'x-train-0000.tar', 'w') as tar:
        add(tar, 'a.jpg', open(os.path.join(ROOT, 'tests', 'data', 'circuit_board.jpg'), 'rb').read())
    assert refusal(data, tmp_path, capsys).endswith(f'{data / "x-train-0000.tar"}: sample a has no class: no a.cls, '
                                                    'and no class_name or synset in a.json')
    shard = sorted(p for p in os.listdir(layouts['wds']) if '-train-' in p)[0]
    whole = open(os.path.join(layouts['wds'], shard), 'rb').read()
    (data / 'x-train-0000.tar').write_bytes(whole[:len(whole) // 2])
    assert f'{data / "x-train-0000.tar"}: truncated' in refusal(data, tmp_path, capsys)


def test_a_shard_missing_from_or_shorter_than_its_info_json_is_refused_naming_it(layouts, tmp_path, capsys):
    """make_shards writes _info.json as timm/imagenet-1k-wds has it (each split's shards and lengths): a partial
    copy stops before any work, instead of training on what happens to be there."""
    import shutil
    data = tmp_path / 'data'
    shutil.copytree(layouts['wds'], data)
    info = json.loads((data / '_info.json').read_text())['splits']
    assert info['train']['shard_lengths'] == [20] * 6 + [8] and info['validation']['num_samples'] == 64
    last = data / info['train']['filenames'][-1]
    saved = last.read_bytes()
    last.unlink()
    assert refusal(data, tmp_path, capsys).endswith(
        f'{data}: 1 of the 7 train shards that _info.json lists are missing ({last.name}): download them again, '
        'or remove _info.json to use the shards that are here')
    with tarfile.open(last, 'w') as tar:  # a shard of that name, but another one
        add(tar, 'k.jpg', saved[:10])
        add(tar, 'k.cls', b'0')
    assert refusal(data, tmp_path, capsys).endswith(f'{last}: 1 samples, 8 by _info.json: download it again')


def test_shards_sorted_by_class_are_flagged_in_the_header_and_shuffled_ones_are_not(tmp_path, layouts):
    """A batch draws on 16 shards at a time (webdataset#71's bunching): shards written class by class would give
    batches of few classes. The run header says so."""
    from util.datasets import describe
    folders = build_image_folder(os.path.join(layouts['folders'], 'train'), None)
    data = tmp_path / 'sorted'
    data.mkdir()
    with tarfile.open(data / 'x-train-0000.tar', 'w') as tar:  # 128 images in class order
        for i, (path, target) in enumerate(folders.samples):
            add(tar, f'{i:04d}.jpg', open(path, 'rb').read())
            add(tar, f'{i:04d}.cls', str(target).encode())
    assert 'warning: its samples are sorted by class' in describe(build_image_folder(str(data / 'train'), None))
    assert 'warning' not in describe(build_image_folder(os.path.join(layouts['wds'], 'train'), None))


def test_parquet_without_a_label_column_and_a_label_outside_its_classes_are_named(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / 'data' / 'data').mkdir(parents=True)
    path = tmp_path / 'data' / 'data' / 'train-00000-of-00001.parquet'
    image = {'bytes': open(os.path.join(ROOT, 'tests', 'data', 'circuit_board.jpg'), 'rb').read(), 'path': 'a.jpg'}
    pq.write_table(pa.table({'image': [image]}), path)
    assert refusal(tmp_path / 'data', tmp_path, capsys).endswith(f"{path}: no 'label' column (it has image); "
                                                                 'expected the layout the `datasets` library writes: '
                                                                 'image {bytes, path}, label')
    metadata = {b'huggingface': json.dumps({'info': {'features': {'label': {'names': ['a', 'b'],
                                                                            '_type': 'ClassLabel'}}}}).encode()}
    pq.write_table(pa.table({'image': [image], 'label': [7]}).replace_schema_metadata(metadata), path)
    assert refusal(tmp_path / 'data', tmp_path, capsys).endswith(f'{path}: row 0 has label 7, outside its 2 class '
                                                                 'names')


def test_odd_metadata_is_one_line_or_left_alone_never_a_traceback(layouts, tmp_path, capsys):
    import shutil
    data = tmp_path / 'data'
    shutil.copytree(layouts['wds'], data)
    (data / '_info.json').unlink()
    for other in ([1, 2], {'splits': [1]}, {'splits': {'train': {'filenames': [[1]]}}}):  # someone else's info.json
        (data / 'info.json').write_text(json.dumps(other))
        assert len(build_image_folder(str(data / 'train'), None)) == 128
    names = sorted(p.name for p in data.glob('*-train-*.tar'))
    (data / 'info.json').write_text(json.dumps({'splits': {'train': {'filenames': names + ['x-train-9999.tar']}}}))
    assert 'train shards that info.json lists are missing (x-train-9999.tar)' in refusal(data, tmp_path, capsys)
    (data / 'info.json').write_text('{')
    assert refusal(data, tmp_path, capsys).startswith(f'error: {data / "info.json"}: not readable as JSON')

    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / 'pq' / 'data' / 'train-00000-of-00001.parquet'
    path.parent.mkdir(parents=True)
    image = {'bytes': b'jpeg', 'path': 'a.jpg'}
    pq.write_table(pa.table({'image': [image], 'label': [0]}).replace_schema_metadata({b'huggingface': b'{'}), path)
    assert "'huggingface' metadata is not the `datasets` library's" in refusal(tmp_path / 'pq', tmp_path, capsys)
    pq.write_table(pa.table({'image': [image], 'label': ['cat']}), path)
    assert refusal(tmp_path / 'pq', tmp_path, capsys).endswith(f"{path}: its 'label' column holds string, not class "
                                                               'indices (integers)')
    shard = tmp_path / 'odd' / 'x-train-0000.tar'
    shard.parent.mkdir()
    with tarfile.open(shard, 'w') as tar:  # a .cls that is a digit to str.isdigit but not a number
        add(tar, 'k.jpg', b'jpeg')
        add(tar, 'k.cls', '²'.encode())
    assert build_image_folder(str(tmp_path / 'odd' / 'train'), None).classes == ['²']


def test_parquet_with_large_row_groups_interleaves_fewer_and_says_so(layouts, monkeypatch):
    """pandas and pyarrow write one large row group per file by default: 16 of them in memory per loader worker
    could be gigabytes, and fewer kept would re-read a group per sample. The order then mixes as many as fit."""
    from util import shards
    from util.datasets import describe
    largest = 20 * 1024  # bytes: the fixture's row groups are of 8 tiny images, about this size
    monkeypatch.setattr(shards, 'ROW_GROUP_BUDGET', 3 * largest)
    dataset = build_image_folder(os.path.join(layouts['parquet'], 'train'), None)
    assert 1 <= dataset.mixed < shards.SHARDS_MIXED
    assert f'a batch draws on {dataset.mixed} at a time' in describe(dataset)
    monkeypatch.undo()
    dataset = build_image_folder(os.path.join(layouts['parquet'], 'train'), None)
    assert dataset.mixed == shards.SHARDS_MIXED and 'warning' not in describe(dataset)


def test_an_undecodable_sample_is_reported_by_shard_and_key_and_left_out_of_the_evaluation(layouts, tmp_path,
                                                                                           capsys):
    data = tmp_path / 'data'
    data.mkdir()
    with tarfile.open(data / 'x-validation-0000.tar', 'w') as tar:
        good = open(os.path.join(ROOT, 'tests', 'data', 'circuit_board.jpg'), 'rb').read()
        for key, image in (('k0', good), ('k1', bytes(300)), ('k2', good)):  # k1: not an image at all
            add(tar, f'{key}.jpg', image)
            add(tar, f'{key}.cls', b'0')
    model = models_vit.vit_tiny_patch16(img_size=32, patch_size=4, num_classes=1).eval()
    stats = evaluation(str(data), model, ['0'], argv=['--max_bad_images', '1'])
    assert stats['num_images'] == 2 and stats['left_out'] == 1
    out = capsys.readouterr()
    assert f"{data / 'x-validation-0000.tar'}:k1" in out.out + out.err and 'BytesIO' not in out.out + out.err


def test_parquet_without_pyarrow_is_one_line_naming_what_to_install(layouts):
    code = ('import sys; sys.modules["pyarrow"] = None; sys.modules["pyarrow.parquet"] = None\n'
            'from util.shards import LayoutError, parquet_samples\n'
            'try:\n    parquet_samples(sys.argv[1])\nexcept LayoutError as e:\n    print(e)\n')
    path = os.path.join(layouts['parquet'], 'data', sorted(os.listdir(os.path.join(layouts['parquet'], 'data')))[0])
    proc = subprocess.run([sys.executable, '-c', code, path], cwd=ROOT, capture_output=True, text=True)
    assert proc.stdout.strip() == 'reading Parquet needs pyarrow, which is not installed: pip install pyarrow'
