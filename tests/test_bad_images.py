"""Images that cannot be used: an evaluation leaves them out of every count and says so (training replaces them),
the --max_bad_images budget stops a run when it is exceeded, not at the end of the pass, and an image over
Pillow's decompression-bomb limit is named for what it is, with the flag that allows it."""
import io
import os
import shutil
import struct
import zlib

import pytest
import torch
from conftest import TINY_CLASSIFIER_ARGS, TINY_PRETRAIN_ARGS, run_script
from PIL import Image

import models_mae
import models_vit
from engine_finetune import evaluate
from tools.synthetic import CLASSES, make_image_folder
from util import knn
from util.bad_images import BadImageBudgetError
from util.checkpoint_files import load_checkpoint
from util.datasets import LEFT_OUT, build_image_folder, build_loader
from util.device import Runtime
from util.flags import parse_with
from util.images import DEFAULT_MAX_PIXELS, ImageTooLarge, decode_image, decode_image_tensor
from util.transforms import build_eval_transform


def damage(path):
    """Truncate an image file to its first bytes, as an interrupted copy leaves it."""
    data = open(path, 'rb').read()
    with open(path, 'wb') as f:
        f.write(data[:40])


def first_files(folder, count):
    return [os.path.join(folder, name) for name in sorted(os.listdir(folder))[:count]]


@pytest.fixture
def val_with_one_bad(tmp_path):
    """val/ of 4 classes x 4 images with one truncated file, and the same folder without that file."""
    data = make_image_folder(str(tmp_path / 'data'), {'train': 4, 'val': 4}, size=32, classes=CLASSES[:4],
                             class_colours=True)
    bad = first_files(os.path.join(data, 'val', CLASSES[1]), 1)[0]
    damage(bad)
    without = str(tmp_path / 'without')
    shutil.copytree(data, without)
    os.remove(os.path.join(without, 'val', CLASSES[1], os.path.basename(bad)))
    return data, without, bad


def tiny_classifier():
    torch.manual_seed(0)
    return models_vit.vit_tiny_patch16(num_classes=4, img_size=32, patch_size=4, depth=1).eval()


def eval_args(*argv):
    import main_finetune
    return parse_with(main_finetune.get_args_parser(), ['--num_workers', '0', '--batch_size', '3', *map(str, argv)])


def evaluate_folder(root, max_bad_images=0.5, print_freq=50):
    dataset = build_image_folder(os.path.join(root, 'val'), build_eval_transform(32), substitute=False)
    loader = build_loader(dataset, eval_args(), Runtime('cpu'), False, 0, 1)
    flags = eval_args('--max_bad_images', max_bad_images, '--print_freq', print_freq, '--output_dir', '')
    return evaluate(loader, tiny_classifier(), Runtime('cpu'), flags)


def test_an_unreadable_validation_image_is_left_out_of_numerator_and_denominator(val_with_one_bad, capsys):
    """The issue's instance: the bad image was replaced by the next one, which was counted twice."""
    data, without, bad = val_with_one_bad
    ours, reference = evaluate_folder(data), evaluate_folder(without)
    assert ours['num_images'] == reference['num_images'] == 15 and ours['left_out'] == 1
    assert (ours['acc1'], ours['acc5']) == (reference['acc1'], reference['acc5'])
    assert ours['loss'] == pytest.approx(reference['loss'], rel=1e-6)
    out = capsys.readouterr().out
    assert f'Image left out of the evaluation: {bad} (' in out
    assert 'on the 15 test images: ' in out and '(1 unreadable image left out)' in out


def test_the_budget_stops_an_evaluation_when_it_is_exceeded_not_at_its_end(tmp_path, capsys):
    data = make_image_folder(str(tmp_path / 'data'), {'train': 1, 'val': 12}, size=32, classes=CLASSES[:4])
    for path in first_files(os.path.join(data, 'val', sorted(CLASSES[:4])[0]), 6):  # the first two batches of 3
        damage(path)
    with pytest.raises(BadImageBudgetError, match=r'6 unreadable images, more than --max_bad_images allows \(2\)'):
        evaluate_folder(data, max_bad_images=2, print_freq=2)
    out = capsys.readouterr().out
    assert 'Test:  [2/16]' in out and 'Test:  [4/16]' not in out  # stopped at the first check, 2 of 16 batches


@pytest.mark.slow
def test_the_budget_stops_training_within_the_epoch(tmp_path):
    data = make_image_folder(str(tmp_path / 'data'), {'train': 32}, size=32, classes=CLASSES[:4])
    for name in CLASSES[:4]:
        for path in first_files(os.path.join(data, 'train', name), 32)[::3]:  # every third: never 20 in a row
            damage(path)
    proc = run_script('main_pretrain.py', '--data_path', data, '--output_dir', tmp_path / 'out', '--epochs', '1',
                      *TINY_PRETRAIN_ARGS, '--max_bad_images', '3', '--print_freq', '1')
    assert proc.returncode == 2 and 'more than --max_bad_images allows (3)' in proc.stderr, proc.stderr[-2000:]
    assert 'No checkpoint was saved before it.' in proc.stderr  # where the run's work is: none yet
    assert 'Epoch: [0]  [2/8]' not in proc.stdout  # the first window's check, not the epoch's end
    assert os.path.isfile(tmp_path / 'out' / 'bad_images.txt')


@pytest.mark.slow
def test_too_many_unreadable_images_in_an_epochs_evaluation_keep_the_trained_epoch(val_with_one_bad, tmp_path):
    """The budget stops the run in its evaluation: the epoch it trained is saved, evaluated when it continues."""
    data, _, bad = val_with_one_bad
    command = ['--data_path', data, '--output_dir', tmp_path / 'out', '--epochs', '2', *TINY_CLASSIFIER_ARGS,
               '--batch_size', '4']
    proc = run_script('main_finetune.py', *command)  # default budget: 0.1% of 16 images, none
    assert proc.returncode == 2 and 'error: 1 unreadable image, more than --max_bad_images allows (0)' in proc.stderr
    assert f"epoch 0 is trained and saved in {tmp_path / 'out' / 'checkpoint-last.pth'}" in proc.stderr
    assert load_checkpoint(str(tmp_path / 'out' / 'checkpoint-last.pth'))['evaluation_pending']['epoch'] == 0
    os.remove(bad)  # repaired
    proc = run_script('main_finetune.py', *command)
    assert proc.returncode == 0 and 'Continuing at epoch 0 with its evaluation' in proc.stdout, proc.stderr[-2000:]
    assert 'on the 15 test images' in proc.stdout


@pytest.mark.slow
def test_fine_tuning_eval_reports_the_count_without_the_unreadable_image(val_with_one_bad, tmp_path):
    data, without, _ = val_with_one_bad
    results = []
    for root in (data, without):
        out = tmp_path / 'runs' / os.path.basename(root)
        proc = run_script('main_finetune.py', '--data_path', root, '--output_dir', out, '--epochs', '1',
                          *TINY_CLASSIFIER_ARGS, '--batch_size', '4', '--max_bad_images', '1')
        assert proc.returncode == 0, proc.stderr[-2000:]
        results.append([line.split('] ', 1)[1] for line in proc.stdout.splitlines() if 'Acc@1' in line])
    assert results[0] == results[1]  # the same accuracy as on the folder without the file


def test_knn_leaves_unreadable_bank_and_query_images_out(tmp_path):
    data = make_image_folder(str(tmp_path / 'data'), {'train': 5, 'val': 3}, size=32, classes=CLASSES[:3],
                             class_colours=True)
    for split in ('train', 'val'):
        damage(first_files(os.path.join(data, split, CLASSES[2]), 1)[0])
    torch.manual_seed(0)
    mae = models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=4)
    import main_knn
    args = parse_with(main_knn.get_args_parser(), ['--num_workers', '0', '--batch_size', '4', '--resume', 'x',
                                                   '--max_bad_images', '2'])
    loaded = knn.read_knn_data(data, 32, 0, 0)
    results = knn.evaluate(mae, loaded, args, Runtime('cpu'), 'mean', [1, 3], 0.07)
    assert results[1]['queries'] == 8 and results[1]['bank'] == 14
    assert knn.describe_counts(loaded, results[1]) == '8 queries, bank of 14 images, 3 classes; 2 unreadable ' \
                                                      'images left out'
    assert 100 * round(results[1]['top1'] * 8 / 100) == pytest.approx(results[1]['top1'] * 8)  # hits of 8 queries


def test_an_evaluation_sample_that_cannot_be_read_is_a_left_out_blank_never_another_image(val_with_one_bad):
    data, _, bad = val_with_one_bad
    dataset = build_image_folder(os.path.join(data, 'val'), build_eval_transform(32), substitute=False)
    index = [p for p, _ in dataset.samples].index(bad)
    image, target = dataset[index]
    assert target == LEFT_OUT and image.shape == dataset[index + 1][0].shape
    assert torch.equal(image, build_eval_transform(32)(Image.new('RGB', (64, 64))))  # a black image, not a neighbour


# --- images over Pillow's decompression-bomb limit ---------------------------------------------------------

@pytest.fixture(scope='module')
def huge_png(tmp_path_factory):
    """The issue's instance: a valid 182-megapixel PNG (one colour, so the file is small)."""
    path = tmp_path_factory.mktemp('huge') / 'panorama.png'
    Image.new('L', (13500, 13500), 128).save(path, optimize=False)
    return path


@pytest.mark.slow
def test_a_huge_valid_image_is_named_too_large_with_the_flag_that_allows_it(huge_png):
    with pytest.raises(ImageTooLarge) as error:
        decode_image(str(huge_png))
    message = str(error.value)
    assert message.startswith('182,250,000 pixels (13500 x 13500), more than --max_image_pixels 178,956,970')
    assert 'not damaged' in message and '--max_image_pixels 0' in message and 'repair' not in message
    assert decode_image(str(huge_png), max_pixels=0).size == (13500, 13500)  # allowed: decoded in full


@pytest.mark.slow
def test_an_image_between_pillows_warning_and_its_limit_decodes_without_a_warning(tmp_path):
    """Pillow warns (DecompressionBombWarning) from 89,478,485 pixels, once per image, in every worker; a
    100-megapixel image is under the limit and decodes in silence."""
    import warnings
    path = tmp_path / 'scan.png'
    Image.new('L', (10000, 10000), 7).save(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        assert decode_image(str(path)).size == (10000, 10000)
    assert not caught


@pytest.mark.slow
def test_a_training_run_names_the_huge_image_and_the_budget_says_it_is_not_damaged(huge_png, tmp_path):
    data = make_image_folder(str(tmp_path / 'data'), {'train': 8}, size=32, classes=CLASSES[:2])
    shutil.copy(huge_png, os.path.join(data, 'train', CLASSES[0], 'panorama.png'))
    proc = run_script('main_pretrain.py', '--data_path', data, '--output_dir', tmp_path / 'out', '--epochs', '1',
                      *TINY_PRETRAIN_ARGS, '--batch_size', '4', '--max_bad_images', '0')
    assert proc.returncode == 2
    assert 'Image replaced by another sample: ' in proc.stdout and 'ImageTooLarge: 182,250,000 pixels' in proc.stdout
    assert 'not damaged but larger than --max_image_pixels allows (pass --max_image_pixels 0' in proc.stderr
    assert 'repair or remove' not in proc.stderr


def test_the_limit_is_the_flags_on_every_decoding_path(tmp_path):
    path = tmp_path / 'photo.jpg'
    Image.new('RGB', (40, 30), (10, 200, 30)).save(path)
    for decode in (decode_image, decode_image_tensor):
        with open(path, 'rb') as f, pytest.raises(ImageTooLarge, match=r'1,200 pixels \(40 x 30\), more than '
                                                                         r'--max_image_pixels 1,000'):
            decode(f, 1000)
        with open(path, 'rb') as f:
            decode(f, 1200)  # the limit itself is allowed
    assert DEFAULT_MAX_PIXELS == 2 * 89_478_485  # Pillow's default refusal threshold


def png_with_metadata_after_the_pixels(path, text: bytes):
    """A PNG whose compressed text chunk comes after the image data (Pillow reads it while decoding, not when
    opening the file)."""
    buffer = io.BytesIO()
    Image.new('RGB', (8, 8)).save(buffer, 'PNG')
    data = buffer.getvalue()
    payload = b'comment\x00\x00' + zlib.compress(text)
    chunk = struct.pack('>I', len(payload)) + b'zTXt' + payload + struct.pack('>I', zlib.crc32(b'zTXt' + payload))
    end = data.rindex(b'IEND') - 4
    path.write_bytes(data[:end] + chunk + data[end:])


@pytest.mark.parametrize('where', ['before the pixels', 'after the pixels'])
def test_png_metadata_over_pillows_limit_is_named_as_such_not_as_damage(where, tmp_path):
    from PIL import PngImagePlugin

    from util.bad_images import BadImageBudget, BadImageLog
    from util.images import MetadataTooLarge
    path = tmp_path / 'annotated.png'
    text = b'x' * (PngImagePlugin.MAX_TEXT_CHUNK + 1)
    if where == 'before the pixels':
        info = PngImagePlugin.PngInfo()
        info.add_text('comment', text.decode(), zip=True)
        Image.new('RGB', (8, 8)).save(path, pnginfo=info)
    else:
        png_with_metadata_after_the_pixels(path, text)
    with pytest.raises(MetadataTooLarge, match=r'PngImagePlugin.MAX_TEXT_CHUNK.*the pixels are not damaged'):
        decode_image(str(path))
    log = BadImageLog()
    log.report(str(path), MetadataTooLarge())
    with pytest.raises(BadImageBudgetError) as error:
        BadImageBudget(log, 10, 0, '').check()
    assert "1 of them are not damaged but carry PNG metadata over Pillow's limit" in str(error.value)
    assert 'repair or remove' not in str(error.value)


@pytest.mark.slow
def test_main_infer_names_a_huge_image_and_goes_on(huge_png, tmp_path):
    torch.manual_seed(0)
    torch.save({'model': models_vit.vit_tiny_patch16(img_size=32, patch_size=4, num_classes=3).state_dict()},
               tmp_path / 'vit.pth')
    small = tmp_path / 'small.png'
    Image.new('RGB', (32, 32), (1, 2, 3)).save(small)
    proc = run_script('main_infer.py', '--model', 'vit_tiny_patch16', '--resume', tmp_path / 'vit.pth',
                      '--img_path', small, huge_png)
    assert proc.returncode == 1 and f'{small}\n' in proc.stdout
    assert f'error: {huge_png}: not read: 182,250,000 pixels (13500 x 13500)' in proc.stderr
