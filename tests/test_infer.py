"""main_infer.py: top-k classification and the 4-panel MAE reconstruction on user pictures of any kind."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from conftest import COLOURS, PHOTO, colour_classifier, run_script, save_classifier
from PIL import Image

import main_infer
import models_mae
import models_vit
from util import reconstruction
from util.imagenet import IMAGENET_NAMES


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp('checkpoints')
    torch.manual_seed(0)
    mae = models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=4)
    torch.save({'model': mae.state_dict(), 'args': argparse.Namespace(norm_pix_loss=False)}, folder / 'mae.pth')
    torch.save({'model': mae.state_dict(), 'args': argparse.Namespace(norm_pix_loss=True)}, folder / 'mae_npl.pth')
    encoder = {k: v for k, v in mae.state_dict().items() if not k.startswith('decoder') and k != 'mask_token'}
    torch.save({'model': encoder}, folder / 'encoder_only.pth')
    vit4 = models_vit.vit_tiny_patch16(img_size=32, patch_size=4, num_classes=4)
    torch.save({'model': vit4.state_dict()}, folder / 'vit4.pth')
    vit1000 = models_vit.vit_tiny_patch16(img_size=32, patch_size=4, num_classes=1000)
    torch.save({'model': vit1000.state_dict()}, folder / 'vit1000.pth')
    small = models_vit.vit_small_patch16(img_size=32, patch_size=4, num_classes=4)
    torch.save({'model': small.state_dict()}, folder / 'vit_small.pth')
    return folder


@pytest.fixture
def pictures(tmp_path):
    """One picture per awkward kind a user may pass, all 48x36 (landscape) unless rotated."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (36, 48, 3), dtype=np.uint8)
    paths = {}
    paths['rgb'] = tmp_path / 'rgb.jpg'
    Image.fromarray(rgb).save(paths['rgb'])
    paths['gray'] = tmp_path / 'gray.png'
    Image.fromarray(rgb[..., 0]).save(paths['gray'])
    paths['rgba'] = tmp_path / 'rgba.png'
    Image.fromarray(np.dstack([rgb, np.full((36, 48), 128, np.uint8)])).save(paths['rgba'])
    paths['palette'] = tmp_path / 'palette.gif'
    Image.fromarray(rgb).convert('P').save(paths['palette'])
    paths['cmyk'] = tmp_path / 'cmyk.jpg'
    Image.fromarray(rgb).convert('CMYK').save(paths['cmyk'])
    paths['16bit'] = tmp_path / 'sixteen.png'
    Image.fromarray((rgb[..., 1].astype(np.uint16) * 257)).save(paths['16bit'])
    paths['exif'] = tmp_path / 'exif.jpg'
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(paths['exif'], exif=exif)
    return paths


def infer(capsys, *argv):
    code = main_infer.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def drawn(monkeypatch):
    """The rows of panels main_infer draws into its figure ([4, 3, H, W] each, values in [0, 1]), as uint8 arrays
    [4, H, W, 3]; the figure is still written."""
    rows = []

    def record(panels, path, *args, **kwargs):
        rows.extend((p * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy().astype(np.int16) for p in panels)
        return reconstruction.save_figure(panels, path, *args, **kwargs)
    monkeypatch.setattr(main_infer, 'save_figure', record)
    return rows


def test_reconstruction_writes_a_titled_figure_large_enough_to_read(checkpoints, pictures, tmp_path, capsys, drawn):
    out_dir = tmp_path / 'out'
    code, out, _ = infer(capsys, '--model', 'mae_vit_tiny_patch16', '--resume', checkpoints / 'mae.pth',
                         '--img_path', pictures['rgb'], '--output_dir', out_dir)
    assert code == 0
    png = out_dir / 'rgb_mae.png'
    # 4 panels of 240 px (a 32-px image shown 7x) under their column titles
    assert Image.open(png).size == (960, 280) and Image.open(png).mode == 'RGBA'
    assert 'reconstruction loss' in out and '48 of 64 patches masked' in out and f'-> {png}' in out
    original, masked, _, pasted = drawn[0]
    hidden = (masked == 128).all(axis=-1)  # grey where hidden
    assert 0.5 < hidden.mean() < 0.9
    assert np.abs(pasted[~hidden] - original[~hidden]).max() <= 1  # visible patches pasted back


def test_the_figure_has_a_row_of_four_titled_columns_per_image(tmp_path):
    rows = [torch.rand(4, 3, 64, 64) for _ in range(3)]
    reconstruction.save_figure(rows, str(tmp_path / 'f.png'), row_labels=['a', 'b', 'c'])
    assert Image.open(tmp_path / 'f.png').size == (960, 3 * 240 + 40)
    assert reconstruction.COLUMN_TITLES == ('original', 'masked', 'reconstruction', 'reconstruction + visible')


def masked_panel(checkpoints, image, out_dir, seed, capsys, drawn):
    infer(capsys, '--model', 'mae_vit_tiny_patch16', '--resume', checkpoints / 'mae.pth', '--img_path', image,
          '--output_dir', out_dir, '--seed', seed)
    return drawn.pop()[1]


def test_the_same_seed_gives_the_same_mask_and_another_seed_another(checkpoints, pictures, tmp_path, capsys, drawn):
    first = masked_panel(checkpoints, pictures['rgb'], tmp_path / 'a', 7, capsys, drawn)
    again = masked_panel(checkpoints, pictures['rgb'], tmp_path / 'b', 7, capsys, drawn)
    other = masked_panel(checkpoints, pictures['rgb'], tmp_path / 'c', 8, capsys, drawn)
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert (tmp_path / 'a' / 'rgb_mae.png').read_bytes() == (tmp_path / 'b' / 'rgb_mae.png').read_bytes()


def test_mask_ratio_zero_reproduces_the_visible_pixels(checkpoints, pictures, tmp_path, capsys, drawn):
    code, out, _ = infer(capsys, '--model', 'mae_vit_tiny_patch16', '--resume', checkpoints / 'mae.pth',
                         '--img_path', pictures['rgb'], '--output_dir', tmp_path, '--mask_ratio', '0')
    assert code == 0 and 'n/a (no patch masked)' in out
    original, masked, _, pasted = drawn[0]
    assert np.array_equal(masked, original) and np.array_equal(pasted, original)


def test_reconstruct_matches_the_model_loss_and_mask(checkpoints):
    model = models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=4).eval()
    model.load_state_dict(torch.load(checkpoints / 'mae.pth', weights_only=False)['model'])
    from util.device import Runtime
    x = torch.randn(1, 3, 32, 32)
    panels, loss, mask = reconstruction.reconstruct(model, x, 0.75, 3, False, Runtime('cpu'))
    with torch.no_grad():
        expected_loss, _, expected_mask = model(x, 0.75, noise=reconstruction.mask_noise(3, 64))
    assert loss == pytest.approx(expected_loss.item()) and torch.equal(mask, expected_mask[0])
    assert panels.shape == (4, 3, 32, 32) and panels.min() >= 0 and panels.max() <= 1


def test_norm_pix_checkpoints_are_announced_and_unnormalised_with_patch_statistics(checkpoints, pictures,
                                                                                     tmp_path, capsys):
    code, out, _ = infer(capsys, '--model', 'mae_vit_tiny_patch16', '--resume', checkpoints / 'mae_npl.pth',
                         '--img_path', pictures['rgb'], '--output_dir', tmp_path, '--json', tmp_path / 'r.json')
    assert code == 0 and 'per-patch normalised pixels (norm_pix_loss)' in out
    assert json.loads((tmp_path / 'r.json').read_text())['norm_pix_loss'] is True
    # a model that predicts each patch's normalised pixels exactly would show the original image
    model = models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=4, norm_pix_loss=True).eval()
    x = torch.randn(1, 3, 32, 32)
    target = model.patchify(x)
    perfect = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** .5
    model.forward_decoder = lambda latent, ids_restore: perfect
    from util.device import Runtime
    panels, _, _ = reconstruction.reconstruct(model, x, 0.75, 0, True, Runtime('cpu'))
    original = reconstruction.denormalize(x).clamp(0, 1)[0]
    assert torch.allclose(panels[2], original, atol=1e-4)


def test_encoder_only_checkpoint_gets_a_clear_reconstruction_error(checkpoints, pictures, tmp_path, capsys):
    code, _, err = infer(capsys, '--model', 'mae_vit_tiny_patch16', '--resume', checkpoints / 'encoder_only.pth',
                         '--img_path', pictures['rgb'], '--output_dir', tmp_path)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert 'it is an MAE encoder without its decoder' in err and 'mae_visualize_vit_' in err


# --- classification ----------------------------------------------------------------------------------------

def test_topk_lines_name_classes_with_probabilities(checkpoints, pictures, tmp_path, capsys):
    names = tmp_path / 'names.txt'
    names.write_text('cat\ndog\nbird\nfish\n')
    code, out, _ = infer(capsys, '--model', 'vit_tiny_patch16', '--resume', checkpoints / 'vit4.pth',
                         '--img_path', pictures['rgb'], '--topk', '3', '--class_names', names)
    lines = out.strip().splitlines()
    assert code == 0 and lines[0] == str(pictures['rgb']) and len(lines) == 4
    probs = []
    for line in lines[1:]:
        name, prob = line.strip().rsplit(' ', 1)
        assert name in ('cat', 'dog', 'bird', 'fish')
        probs.append(float(prob))
    assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)


def test_imagenet_heads_get_imagenet_names_and_the_json_schema(checkpoints, tmp_path, capsys):
    code, out, _ = infer(capsys, '--model', 'vit_tiny_patch16', '--resume', checkpoints / 'vit1000.pth',
                         '--img_path', PHOTO, '--topk', '5', '--json', tmp_path / 'r.json')
    assert code == 0
    report = json.loads((tmp_path / 'r.json').read_text())
    assert report['task'] == 'classification' and report['model'] == 'vit_tiny_patch16' and report['errors'] == []
    (result,) = report['results']
    assert result['image'] == PHOTO and len(result['topk']) == 5
    names = open(IMAGENET_NAMES).read().splitlines()
    for entry in result['topk']:
        assert set(entry) == {'index', 'label', 'prob'} and entry['label'] == names[entry['index']]
        assert f"  {entry['label']} {entry['prob']:.2f}" in out
    assert sum(e['prob'] for e in result['topk']) <= 1 + 1e-6


def test_imagenet_label_list_is_in_synset_order():
    names = open(IMAGENET_NAMES).read().splitlines()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert (names[0], names[1], names[281], names[285], names[999]) == \
        ('tench', 'goldfish', 'tabby cat', 'Egyptian cat', 'toilet tissue')


@pytest.mark.parametrize('kind', ['gray', 'rgba', 'palette', 'cmyk', '16bit', 'exif'])
def test_every_image_mode_goes_through_both_modes(checkpoints, pictures, kind, tmp_path, capsys):
    code, _, err = infer(capsys, '--model', 'vit_tiny_patch16', '--resume', checkpoints / 'vit4.pth', '--img_path',
                         pictures[kind])
    assert code == 0, err
    code, _, err = infer(capsys, '--model', 'mae_vit_tiny_patch16', '--resume', checkpoints / 'mae.pth',
                         '--img_path', pictures[kind], '--output_dir', tmp_path)
    assert code == 0, err


def test_exif_orientation_is_applied_and_modes_become_8_bit_rgb(pictures):
    rotated = main_infer.open_image(str(pictures['exif']))
    assert rotated.size == (36, 48)  # portrait once the EXIF rotation is applied
    sixteen = main_infer.open_image(str(pictures['16bit']))
    expected = np.asarray(Image.open(pictures['rgb']).convert('RGB'))  # jpeg: compare loosely below
    assert sixteen.mode == 'RGB' and np.asarray(sixteen).max() > 128  # scaled from 16 bits, not clipped
    assert np.asarray(sixteen).shape == expected.shape
    rgba = main_infer.open_image(str(pictures['rgba']))
    assert rgba.mode == 'RGB' and np.asarray(rgba).min() >= 64  # half-transparent over white


def test_a_corrupt_file_and_a_text_file_named_jpg_get_one_clear_line_each(pictures, checkpoints, tmp_path, capsys):
    truncated = tmp_path / 'truncated.jpg'
    truncated.write_bytes(pictures['rgb'].read_bytes()[:300])
    text = tmp_path / 'notes.jpg'
    text.write_text('this is not an image')
    for bad in (truncated, text):
        code, _, err = infer(capsys, '--model', 'vit_tiny_patch16', '--resume', checkpoints / 'vit4.pth',
                             '--img_path', bad)
        assert code == 1
        assert err.splitlines()[0].startswith(f'error: {bad}: cannot read as an image')


def test_a_folder_with_a_bad_file_processes_the_rest_and_exits_non_zero(pictures, checkpoints, tmp_path, capsys):
    folder = pictures['rgb'].parent
    (folder / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
    code, out, err = infer(capsys, '--model', 'vit_tiny_patch16', '--resume', checkpoints / 'vit4.pth',
                           '--img_path', folder, '--json', tmp_path / 'r.json')
    report = json.loads((tmp_path / 'r.json').read_text())
    assert code == 1 and len(report['results']) == len(pictures)
    assert [e['image'] for e in report['errors']] == [str(folder / 'broken.png')]
    assert f'error: {folder / "broken.png"}: cannot read as an image' in err
    assert f'1 of {len(pictures) + 1} inputs failed' in err


def test_a_checkpoint_of_another_architecture_names_the_mismatched_keys(checkpoints, pictures, capsys):
    code, _, err = infer(capsys, '--model', 'vit_tiny_patch16', '--resume', checkpoints / 'vit_small.pth',
                         '--img_path', pictures['rgb'])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert ('does not fit --model vit_tiny_patch16: embed dim 384 and 12 blocks in the checkpoint, 192 and 12 in '
            'the model (another --model); shape mismatch') in err
    assert 'cls_token (1, 1, 384) vs (1, 1, 192)' in err


def test_another_patch_size_is_named_first_and_nothing_is_interpolated_before(checkpoints, pictures, capsys):
    code, out, err = infer(capsys, '--model', 'mae_vit_tiny_patch16', '--resume', checkpoints / 'mae.pth',
                           '--patch_size', '8', '--input_size', '128', '--img_path', pictures['rgb'])
    assert code == 2 and len(err.strip().splitlines()) == 1 and 'Position interpolate' not in out
    assert 'patch 4 px in the checkpoint, 8 px in the model (pass --patch_size 4)' in err


def test_missing_inputs_and_unknown_models_are_reported(checkpoints, tmp_path, capsys):
    code, _, err = infer(capsys, '--model', 'vit_gigantic', '--resume', checkpoints / 'vit4.pth', '--img_path', 'x')
    models = ('vit_tiny_patch16, vit_small_patch16, vit_base_patch16, vit_large_patch16, vit_huge_patch14, '
              'vit_giant_patch14, vit_2b_patch14')
    every = f'{models}, {models.replace("vit_", "mae_vit_")}'
    assert code == 2 and f'error: --model vit_gigantic: unknown model; choose from {every}\n' in err

def test_a_missing_image_is_refused_before_the_model_loads_and_nothing_is_written(checkpoints, tmp_path, capsys,
                                                                                   monkeypatch):
    """It was found after the model loaded, with exit code 1, after an unrelated note, leaving an empty output
    folder. Now: one line per missing path or empty folder, exit 2, no checkpoint read, no folder made."""
    monkeypatch.setattr(main_infer, 'load_checkpoint', lambda path: pytest.fail('the checkpoint was read'))
    (tmp_path / 'empty').mkdir()
    code, out, err = infer(capsys, '--model', 'mae_vit_tiny_patch16', '--resume', checkpoints / 'mae.pth',
                           '--img_path', tmp_path / 'nothing.jpg', tmp_path / 'empty', '--output_dir',
                           tmp_path / 'figures')
    assert code == 2 and out == '' and err.splitlines() == [
        f"error: --img_path {tmp_path / 'nothing.jpg'}: no such file or folder",
        f"error: --img_path {tmp_path / 'empty'}: folder holds no image files"]
    assert not (tmp_path / 'figures').exists()


@pytest.mark.slow
def test_a_real_photo_through_both_modes_as_a_user_runs_them(checkpoints, tmp_path):
    proc = run_script('main_infer.py', '--model', 'vit_tiny_patch16', '--resume', checkpoints / 'vit1000.pth',
                      '--img_path', PHOTO, '--topk', '5', check=True)
    assert proc.stdout.splitlines()[0] == PHOTO and len(proc.stdout.strip().splitlines()) == 6
    proc = run_script('main_infer.py', '--model', 'mae_vit_tiny_patch16', '--resume', checkpoints / 'mae.pth',
                      '--img_path', PHOTO, '--output_dir', tmp_path, check=True)
    assert 'circuit_board_mae.png' in proc.stdout
    assert Image.open(tmp_path / 'circuit_board_mae.png').size == (960, 280)


def test_json_to_stdout_is_the_json_alone(checkpoints, pictures, capsys):
    code, out, err = infer(capsys, '--model', 'vit_tiny_patch16', '--resume', checkpoints / 'vit4.pth',
                           '--img_path', pictures['rgb'], '--json', '-')
    assert code == 0 and json.loads(out)['results'][0]['image'] == str(pictures['rgb'])
    assert str(pictures['rgb']) in err  # the human-readable lines moved to stderr


@pytest.mark.parametrize('flag', ['--output_dir', '--json'])
def test_an_unwritable_output_is_refused_before_any_work(flag, checkpoints, pictures, tmp_path, capsys):
    blocker = tmp_path / 'a_file'
    blocker.write_text('x')
    target = blocker if flag == '--output_dir' else tmp_path / 'missing_folder' / 'r.json'
    code, out, err = infer(capsys, '--model', 'mae_vit_tiny_patch16', '--resume', checkpoints / 'mae.pth',
                           '--img_path', pictures['rgb'], flag, target)
    assert code == 2 and err.strip().splitlines() == [err.strip().splitlines()[0]]
    assert err.startswith(f'error: {flag} {target}: cannot') and 'reconstruction loss' not in out


def test_inference_at_another_input_size_interpolates_like_eval(tmp_path, capsys):
    weights = save_classifier(tmp_path / 'w.pth', colour_classifier(), classes='abcd')
    red = tmp_path / 'red.png'
    Image.new('RGB', (50, 40), COLOURS['b']).save(red)
    code = main_infer.main(['--model', 'vit_tiny_patch16', '--resume', str(weights), '--img_path', str(red),
                            '--input_size', '64', '--topk', '1'])
    out = capsys.readouterr()
    assert code == 0 and 'Position interpolate from 8x8 to 16x16' in out.out and '  b ' in out.out
    code = main_infer.main(['--model', 'vit_tiny_patch16', '--resume', str(weights), '--img_path', str(red),
                            '--input_size', '30'])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ['error: --input_size 30: the image side 30 px is not a multiple of the patch size '
                                 '4 px']


def test_a_classifier_given_for_reconstruction_is_called_a_classifier(tmp_path, capsys):
    weights = save_classifier(tmp_path / 'w.pth', colour_classifier())
    picture = tmp_path / 'p.png'
    Image.new('RGB', (32, 32)).save(picture)
    code = main_infer.main(['--model', 'mae_vit_tiny_patch16', '--resume', str(weights), '--img_path',
                            str(picture), '--output_dir', str(tmp_path / 'out')])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert 'does not fit --model mae_vit_tiny_patch16: it is a classifier (it has head.weight)' in err[0]
    assert 'unexpected 4: fc_norm.weight, fc_norm.bias, head.weight, head.bias' in err[0]


def test_inference_writes_its_figures_into_a_folder_named_for_them(tmp_path, monkeypatch, capsys):
    from conftest import PHOTO

    import main_infer
    import models_mae
    torch.save({'model': models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=4).state_dict()}, tmp_path / 'm.pth')
    monkeypatch.chdir(tmp_path)
    code = main_infer.main(['--model', 'mae_vit_tiny_patch16', '--resume', str(tmp_path / 'm.pth'), '--img_path',
                            PHOTO])
    assert code == 0 and os.listdir(tmp_path / 'reconstructions') == ['circuit_board_mae.png']
    assert 'reconstructions/circuit_board_mae.png' in capsys.readouterr().out


# imports main_infer (and the training scripts) as a user's command would, with matplotlib absent when asked
OPTIONAL_IMPORTS = '''
import runpy, sys
if sys.argv[1] == 'without-matplotlib':
    sys.modules['matplotlib'] = None  # import matplotlib now fails, as where it is not installed
script, sys.argv = sys.argv[2], sys.argv[2:]
try:
    runpy.run_path(script, run_name='__main__')
except SystemExit as e:
    print('matplotlib imported:', 'matplotlib.figure' in sys.modules, 'exit', e.code)
    raise
'''


@pytest.mark.parametrize('script', ['main_infer.py', 'main_pretrain.py', 'main_finetune.py', 'main_knn.py'])
def test_help_does_not_import_matplotlib(script):
    proc = run_script('-c', OPTIONAL_IMPORTS, 'with', script, '--help')
    assert proc.returncode == 0 and 'matplotlib imported: False exit 0' in proc.stdout


def test_classification_runs_without_matplotlib_and_a_reconstruction_asks_for_it_in_one_line(checkpoints, tmp_path):
    proc = run_script('-c', OPTIONAL_IMPORTS, 'without-matplotlib', 'main_infer.py', '--model', 'vit_tiny_patch16',
                      '--resume', checkpoints / 'vit4.pth', '--img_path', PHOTO)
    assert proc.returncode == 0 and f'{PHOTO}\n' in proc.stdout, proc.stderr
    out = tmp_path / 'figures'
    proc = run_script('-c', OPTIONAL_IMPORTS, 'without-matplotlib', 'main_infer.py', '--model', 'mae_vit_tiny_patch16',
                      '--resume', checkpoints / 'mae.pth', '--img_path', PHOTO, '--output_dir', out)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        'error: the reconstruction figure needs matplotlib, which is not installed: pip install matplotlib (or pip '
        'install -r requirements.txt)'] and not out.exists()
