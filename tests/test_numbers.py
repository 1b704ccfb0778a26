"""Every number a researcher reads is right, or the run refuses before any work (issue 12): labels by class name,
each evaluation image counted once at any world size, no run without an optimizer step, values that the code
cannot honour refused up front, one decoding for every path, inference fitting image sizes as evaluation does,
errors that name the real cause, and no empty crops."""
import argparse

import numpy as np
import pytest
import torch
from PIL import Image

import main_finetune
import main_infer
import main_linprobe
import main_pretrain
import models_mae
import models_vit
from conftest import (TINY_CLASSIFIER_ARGS, TINY_PRETRAIN_ARGS, read_json_log, run_in_process, run_script,
                      run_torchrun)

SCRIPTS = {'main_pretrain.py': main_pretrain, 'main_finetune.py': main_finetune, 'main_linprobe.py': main_linprobe}
COLOURS = {'a': (0, 200, 0), 'b': (230, 20, 20), 'c': (200, 200, 0), 'd': (20, 20, 230)}


def colour_folder(root, split_counts: dict):
    """root/<split>/<class>/<i>.png, each class one flat colour (COLOURS)."""
    for split, classes in split_counts.items():
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.new('RGB', (32, 32), COLOURS[name]).save(folder / f'{i}.png')
    return root


def colour_classifier(outputs=('a', 'b', 'c', 'd')) -> models_vit.VisionTransformer:
    """A tiny global-pool ViT that is right on the 'b' (red) and 'd' (blue) images by construction: each token
    carries the patch's mean colour, the blocks are identities, the head reads red for b and blue for d."""
    torch.manual_seed(0)
    model = models_vit.vit_tiny_patch16(num_classes=len(outputs), img_size=32, patch_size=4)
    state = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}  # zero blocks: identities
    for channel in range(3):
        state['patch_embed.proj.weight'][channel, channel] = 1 / 16  # token dim c = mean of channel c
    state['fc_norm.weight'] = torch.ones_like(state['fc_norm.weight'])
    state['head.weight'][outputs.index('b'), 0] = 1.0  # red
    state['head.weight'][outputs.index('d'), 2] = 1.0  # blue
    model.load_state_dict(state)
    return model.eval()


def save_classifier(path, model, classes=None, **extra):
    checkpoint = {'model': model.state_dict(), **extra}
    if classes is not None:
        checkpoint['classes'] = list(classes)
    torch.save(checkpoint, path)
    return path


EVAL_FLAGS = ['--model', 'vit_tiny_patch16', '--input_size', '32', '--patch_size', '4', '--num_workers', '0',
              '--batch_size', '16', '--nb_classes', '4']


def accuracy_line(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if '* Acc@1' in line)


# --- 1. labels by class name -------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_val_subset_is_scored_against_the_train_class_indices(tmp_path):
    data = colour_folder(tmp_path / 'data', {'train': dict.fromkeys('abcd', 1), 'val': {'b': 1, 'd': 1}})
    weights = save_classifier(tmp_path / 'released_format.pth', colour_classifier())  # no class list stored
    proc = run_script('main_finetune.py', '--eval', '--resume', weights, '--data_path', data, *EVAL_FLAGS, check=True)
    assert '* Acc@1 100.000' in accuracy_line(proc.stdout)  # b -> output 1, d -> output 3, as in train/


@pytest.mark.slow
def test_eval_uses_the_class_list_stored_in_the_checkpoint_without_a_train_folder(tmp_path):
    data = colour_folder(tmp_path / 'data', {'val': {'b': 2, 'd': 1}})
    weights = save_classifier(tmp_path / 'ours.pth', colour_classifier(), classes='abcd')
    proc = run_script('main_finetune.py', '--eval', '--resume', weights, '--data_path', data, *EVAL_FLAGS, check=True)
    assert '* Acc@1 100.000' in accuracy_line(proc.stdout)
    assert 'Accuracy of the network on the 3 test images: 100.0%' in proc.stdout


def test_a_val_class_the_model_does_not_know_is_refused_in_one_line_naming_it(tmp_path, capsys):
    data = colour_folder(tmp_path / 'data', {'val': {'b': 1, 'c': 1}})
    weights = save_classifier(tmp_path / 'ours.pth', colour_classifier(('a', 'b', 'd', 'x')), classes='abdx')
    code, _, err = run_in_process(main_finetune, ['--eval', '--resume', weights, '--data_path', data, *EVAL_FLAGS],
                                  capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {data / 'val'}: class folder c not among the run's 4 classes (a, b, d, x)")


def test_a_val_subset_without_any_class_list_is_refused(tmp_path, capsys):
    data = colour_folder(tmp_path / 'data', {'val': {'b': 1, 'd': 1}})
    weights = save_classifier(tmp_path / 'released_format.pth', colour_classifier())
    code, _, err = run_in_process(main_finetune, ['--eval', '--resume', weights, '--data_path', data, *EVAL_FLAGS],
                                  capsys)
    assert code == 2 and len(err) == 1
    assert 'holds 2 class folders and the model has 4 outputs, but neither the checkpoint nor a train/' in err[0]


@pytest.mark.slow
@pytest.mark.parametrize('script', ['main_finetune.py', 'main_linprobe.py'])
def test_training_logs_the_accuracy_of_a_val_subset_by_class_name_and_stores_the_list(tmp_path, script):
    data = colour_folder(tmp_path / 'data', {'train': dict.fromkeys('abcd', 8), 'val': {'b': 2, 'd': 2}})
    out = tmp_path / 'run'
    run_script(script, '--data_path', data, '--output_dir', out, '--epochs', '1', '--batch_size', '8',
               *TINY_CLASSIFIER_ARGS[:8], '--nb_classes', '4', '--blr', '0.05', check=True)
    (entry,) = read_json_log(out)
    checkpoint = torch.load(out / 'checkpoint-last.pth', weights_only=False)
    assert checkpoint['classes'] == list('abcd')
    model = models_vit.vit_tiny_patch16(img_size=32, patch_size=4, num_classes=4,
                                        global_pool=script == 'main_finetune.py')
    if script == 'main_linprobe.py':
        model = models_vit.add_batchnorm_head(model)
    model.load_state_dict(checkpoint['model'])
    red, blue = (torch.tensor(COLOURS[c], dtype=torch.float32).div(255) for c in 'bd')
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    images = torch.stack([((c - mean) / std).view(3, 1, 1).expand(3, 32, 32) for c in (red, red, blue, blue)])
    predicted = model.eval()(images).argmax(-1)
    expected = 100 * (predicted == torch.tensor([1, 1, 3, 3])).float().mean().item()
    assert entry['test_acc1'] == pytest.approx(expected) and entry['test_num_images'] == 4


# --- 2. distributed evaluation counts every image once --------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('images_per_class', [(4, 4, 4, 3), (1, 0, 0, 0)], ids=['15 images', '1 image'])
def test_dist_eval_on_two_processes_equals_one_process(tmp_path, images_per_class):
    data = colour_folder(tmp_path / 'data', {'val': {c: n for c, n in zip('abcd', images_per_class) if n}})
    torch.manual_seed(3)
    model = models_vit.vit_tiny_patch16(num_classes=4, img_size=32, patch_size=4)
    weights = save_classifier(tmp_path / 'w.pth', model, classes='abcd')
    flags = ['--eval', '--resume', weights, '--data_path', data, *EVAL_FLAGS[:-4], '--batch_size', '2',
             '--nb_classes', '4']
    single = run_script('main_finetune.py', *flags, check=True)
    double = run_torchrun('main_finetune.py', *flags, '--dist_eval', check=True)
    total = sum(images_per_class)
    for proc in (single, double):
        assert f'Accuracy of the network on the {total} test images' in proc.stdout
    acc_single, acc_double = accuracy_line(single.stdout), accuracy_line(double.stdout)
    assert acc_single.split('*')[1] == acc_double.split('*')[1]  # Acc@1, Acc@5 and loss, printed to 3 decimals


def test_evaluate_sums_per_image_and_shards_without_padding(tmp_path):
    from engine_finetune import evaluate
    from util.bad_images import BadImageLog
    from util.datasets import ShardedEvalSampler
    from util.device import Runtime
    shards = [ShardedEvalSampler(15, 2, rank).indices for rank in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(15)) and ShardedEvalSampler(1, 2, 1).indices == []
    torch.manual_seed(0)
    images, targets = torch.randn(5, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0])
    model = models_vit.vit_tiny_patch16(num_classes=4, img_size=32, patch_size=4, depth=1).eval()
    dataset = torch.utils.data.TensorDataset(images, targets)
    dataset.bad_images = BadImageLog()
    loader = torch.utils.data.DataLoader(dataset, batch_size=2)  # batches of 2, 2 and 1
    stats = evaluate(loader, model, Runtime('cpu'), sharded=False)
    logits = model(images)
    assert stats['num_images'] == 5
    assert stats['loss'] == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-6)
    assert stats['acc1'] == pytest.approx(100 * (logits.argmax(-1) == targets).float().mean().item())


# --- 3. runs that would take no optimizer step ----------------------------------------------------------------

def six_images(tmp_path):
    return colour_folder(tmp_path / 'data', {'train': {'a': 3, 'b': 3}, 'val': {'a': 1, 'b': 1}})


@pytest.mark.parametrize('script', list(SCRIPTS))
@pytest.mark.parametrize('flags, world_size, expected', [
    (['--batch_size', '8'], 1, '--batch_size 8: the 6 images in {train} make no full batch, so an epoch would '
                               'take no optimizer step; use --batch_size 6 or less'),
    (['--batch_size', '4'], 2, '--batch_size 4: the 6 images (3 per process, 2 processes) in {train} make no full '
                               'batch'),
    (['--batch_size', '2', '--accum_iter', '4'], 1, '--accum_iter 4: an epoch has 3 iterations of 2 images per '
                                                    'process (6 images in {train}, 1 process) and one optimizer '
                                                    'step takes 4'),
], ids=['batch', 'processes', 'accum_iter'])
def test_an_epoch_without_an_optimizer_step_is_refused_before_any_work(script, flags, world_size, expected,
                                                                      tmp_path, capsys, monkeypatch):
    data = six_images(tmp_path)
    if world_size > 1:  # what torchrun sets; the check runs before the process group would be joined
        monkeypatch.setenv('RANK', '0')
        monkeypatch.setenv('WORLD_SIZE', str(world_size))
    tiny = TINY_PRETRAIN_ARGS if script == 'main_pretrain.py' else TINY_CLASSIFIER_ARGS
    out = tmp_path / 'out'
    code, stdout, err = run_in_process(SCRIPTS[script], ['--data_path', data, '--output_dir', out, *tiny, *flags],
                                       capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith('error: ' + expected.format(train=data / 'train')), err
    assert not out.exists() and stdout == ''


# --- 4. values that pass the types but not the code -----------------------------------------------------------

@pytest.mark.parametrize('script, flags, expected', [
    ('main_pretrain.py', ['--mask_ratio', '0'], '--mask_ratio 0.0: hides none of the 64 patches (32 px images, '
                                                '4 px patches), and the loss is computed on hidden patches only'),
    ('main_pretrain.py', ['--mask_ratio', '0.99'], '--mask_ratio 0.99: leaves none of the 64 patches'),
    ('main_linprobe.py', ['--batch_size', '1'], '--batch_size 1: the BatchNorm before the linear head normalises '
                                                'over the batch'),
    ('main_pretrain.py', ['--save_freq', '0'], '--save_freq 0: must be >= 1'),
    ('main_pretrain.py', ['--seed', '-1'], '--seed -1: must be in [0, 2^31)'),
    ('main_finetune.py', ['--cutmix_minmax', '0.5'], '--cutmix_minmax [0.5]: must be two fractions'),
    ('main_finetune.py', ['--remode', 'noise'], '--remode noise: choose from pixel, rand, const'),
    ('main_finetune.py', ['--min_lr', '0.01'], '--min_lr 0.01: above the peak learning rate 6.25e-05'),
    ('main_finetune.py', ['--color_jitter', '-1'], '--color_jitter -1.0: must be >= 0'),
], ids=lambda v: ' '.join(v) if isinstance(v, list) else None)
def test_values_the_code_cannot_honour_are_refused_up_front(script, flags, expected, texture_data, tmp_path,
                                                            capsys):
    tiny = TINY_PRETRAIN_ARGS if script == 'main_pretrain.py' else TINY_CLASSIFIER_ARGS
    out = tmp_path / 'out'
    code, stdout, err = run_in_process(SCRIPTS[script], ['--data_path', texture_data, '--output_dir', out, *tiny,
                                                         *flags], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith('error: ' + expected), err
    assert not out.exists() and stdout == ''


@pytest.mark.parametrize('script', list(SCRIPTS))
def test_an_empty_train_folder_and_a_text_file_checkpoint_are_refused_before_anything_is_printed(script, tmp_path,
                                                                                                capsys):
    empty = tmp_path / 'empty'
    (empty / 'train' / 'a').mkdir(parents=True)
    (empty / 'val' / 'a').mkdir(parents=True)
    tiny = TINY_PRETRAIN_ARGS if script == 'main_pretrain.py' else TINY_CLASSIFIER_ARGS
    out = tmp_path / 'out'
    code, stdout, err = run_in_process(SCRIPTS[script], ['--data_path', empty, '--output_dir', out, *tiny], capsys)
    assert code == 2 and len(err) == 1 and 'Found no valid file for the classes a' in err[0] and stdout == ''
    text = tmp_path / 'notes.pth'
    text.write_text('not a checkpoint')
    flag = '--resume' if script == 'main_pretrain.py' else '--finetune'
    good = colour_folder(tmp_path / 'data', {'train': {'a': 16, 'b': 16}, 'val': {'a': 1}})
    code, stdout, err = run_in_process(SCRIPTS[script], ['--data_path', good, '--output_dir', out, *tiny, flag, text],
                                       capsys)
    assert code == 2 and err == [f'error: {text}: not a readable checkpoint (it is neither a file written by '
                                 "torch.save nor a safetensors file; it starts with b'not ')"]
    assert stdout == '' and not out.exists()


@pytest.mark.parametrize('script', ['main_pretrain.py', 'main_infer.py', '-m tools.benchmark'])
def test_a_malformed_value_is_one_line_not_the_usage_text(script):
    argv = script.split() + ['--batch_size' if script != 'main_infer.py' else '--topk', 'abc']
    proc = run_script(argv[0], *argv[1:])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "invalid int value: 'abc'" in proc.stderr and proc.stderr.startswith('error: ')


# --- 5. one decoding for every path ----------------------------------------------------------------------------

def awkward_images(folder) -> dict:
    """One file per mode PIL opens that needs more than convert('RGB'), each 40x24 with a distinct picture."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    alpha = np.tile(np.linspace(0, 255, 40).astype(np.uint8), (24, 1))  # transparent on the left
    files = {'L': Image.fromarray(rgb[..., 0]), 'LA': Image.fromarray(np.dstack([rgb[..., 0], alpha]), 'LA'),
             'RGBA': Image.fromarray(np.dstack([rgb, alpha])), 'CMYK': Image.fromarray(rgb).convert('CMYK'),
             'I;16': Image.fromarray(rgb[..., 1].astype(np.uint16) * 257)}
    palette = Image.fromarray(rgb).convert('P')
    palette.info['transparency'] = 0
    files['P'] = palette
    paths = {}
    for mode, img in files.items():
        suffix = 'jpg' if mode == 'CMYK' else 'png'
        paths[mode] = folder / f'{mode.replace(";", "")}.{suffix}'
        img.save(paths[mode], transparency=0) if mode == 'P' else img.save(paths[mode])
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    paths['EXIF'] = folder / 'exif.jpg'
    Image.fromarray(rgb).save(paths['EXIF'], exif=exif)
    return paths


def test_one_file_gives_the_same_tensor_through_inference_and_the_eval_loader_in_every_mode(tmp_path):
    from util.datasets import build_image_folder
    from util.transforms import build_eval_transform
    (tmp_path / 'val' / 'one_class').mkdir(parents=True)
    paths = awkward_images(tmp_path / 'val' / 'one_class')
    dataset = build_image_folder(str(tmp_path / 'val'), build_eval_transform(32))
    by_path = {p: i for i, (p, _) in enumerate(dataset.samples)}
    for mode, path in paths.items():
        loader_tensor = dataset[by_path[str(path)]][0]
        infer_tensor = main_infer.preprocess(main_infer.open_image(str(path)), 32)[0]
        assert torch.equal(loader_tensor, infer_tensor), mode


def test_the_decoding_applies_rotation_transparency_and_bit_depth(tmp_path):
    from util.images import decode_image, decode_image_tensor
    paths = awkward_images(tmp_path)
    assert decode_image(paths['EXIF']).size == (24, 40)  # upright: portrait
    rgba = np.asarray(decode_image(paths['RGBA']))
    assert (rgba[:, 0] == 255).all()  # fully transparent column: white, not the stored colour
    assert np.asarray(decode_image(paths['I;16'])).max() > 200  # scaled from 16 bits, not clipped to white
    for mode in ('EXIF', 'CMYK'):  # the --fast_decode JPEG path decodes exactly as PIL does
        with open(paths[mode], 'rb') as f:
            fast = decode_image_tensor(f)
        assert torch.equal(fast, torch.from_numpy(np.array(decode_image(paths[mode]))).permute(2, 0, 1)), mode
    with open(paths['RGBA'], 'rb') as f:
        assert torch.equal(decode_image_tensor(f), torch.from_numpy(rgba.copy()).permute(2, 0, 1))


# --- 6. inference fits image sizes as evaluation does ---------------------------------------------------------

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


# --- 7. errors that name the real cause ---------------------------------------------------------------------------

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


def test_a_patch_size_mismatch_in_eval_resizes_nothing_and_names_the_patch(tmp_path, capsys):
    data = colour_folder(tmp_path / 'data', {'val': {'a': 1, 'b': 1, 'c': 1, 'd': 1}})
    weights = save_classifier(tmp_path / 'w.pth', colour_classifier(), classes='abcd')  # 32 px, 4-px patches
    flags = [*EVAL_FLAGS, '--patch_size', '8', '--input_size', '64']
    code, out, err = run_in_process(main_finetune, ['--eval', '--resume', weights, '--data_path', data, *flags],
                                    capsys)
    assert code == 2 and len(err) == 1 and 'Position interpolate' not in out
    assert 'patch 4 px in the checkpoint, 8 px in the model (pass --patch_size 4)' in err[0]


def test_a_patch_size_mismatch_in_finetune_leads_with_the_cause_and_names_the_model(texture_data, tmp_path, capsys):
    mae = models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=8)
    torch.save({'model': mae.state_dict(), 'args': argparse.Namespace(model='mae_vit_tiny_patch16')},
               tmp_path / 'mae8.pth')
    code, out, err = run_in_process(main_finetune, ['--data_path', texture_data, '--output_dir', tmp_path / 'out',
                                                    *TINY_CLASSIFIER_ARGS, '--finetune', tmp_path / 'mae8.pth'], capsys)
    assert code == 2 and len(err) == 1 and 'Position interpolate' not in out  # no table resized for another patch
    assert err[0].startswith(f"error: {tmp_path / 'mae8.pth'} is not an encoder of --model vit_tiny_patch16: patch 8 "
                             'px in the checkpoint, 4 px in the model (pass --patch_size 8)')


# --- 8. no empty crops ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('size', [(1, 1), (2, 3), (3, 2)])
def test_no_crop_of_a_tiny_image_is_empty(size):
    from types import SimpleNamespace

    from util.crop import RandomResizedCrop as TFCrop
    from util.transforms import (build_fast_pretrain_transform, build_finetune_transform, build_linprobe_transform,
                                 build_pretrain_transform)
    red = Image.new('RGB', size, (200, 10, 10))
    torch.manual_seed(0)
    for _ in range(200):
        _, _, h, w = TFCrop.get_params(red, (0.08, 1.0), (3 / 4, 4 / 3))
        assert h >= 1 and w >= 1
    finetune = build_finetune_transform(SimpleNamespace(color_jitter=None, aa='none', reprob=0, remode='pixel',
                                                        recount=1), 8)
    for transform in (build_linprobe_transform(8), build_pretrain_transform(8), finetune):
        for _ in range(50):
            out = transform(red)
            assert out[0].min() > 0.5, transform  # red everywhere, never the black of an empty box
    tensor = torch.tensor([200, 10, 10], dtype=torch.uint8).view(3, 1, 1).expand(3, size[1], size[0]).contiguous()
    for _ in range(50):
        assert build_fast_pretrain_transform(8)(tensor)[0].min() > 150
