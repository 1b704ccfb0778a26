"""Run a checkpoint on your own pictures: top-k classes for a `vit_*` classifier, or the MAE reconstruction figure
(original | masked | reconstruction | reconstruction + visible patches) for an `mae_*` model.

python main_infer.py --model vit_base_patch16 --resume mae_finetuned_vit_base.pth --img_path cat.jpg --topk 5
python main_infer.py --model mae_vit_large_patch16 --resume mae_visualize_vit_large.pth --img_path cat.jpg \
    --mask_ratio 0.75 --output_dir out/
"""
import util  # noqa: F401  first, before torch: device plugins load on demand (see util/__init__.py)
import argparse
import contextlib
import json
import os
import sys
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
from PIL import Image

import models_mae
import models_vit
from util import flags as cli
from util import checks, pixels
from util.arrays import ArrayDecoder, ChannelMismatch, reads_arrays
from util.checkpoint_files import CheckpointError, load_checkpoint
from util.classes import display_names
from util.imagenet import read_lines
from util.device import AMP_CHOICES, DEVICE_CHOICES, DeviceError, setup_runtime
from util.folders import collect_images, describe_skipped
from util.images import DECODE_ERRORS, DEFAULT_MAX_PIXELS, NOT_DAMAGED, decode_image, describe_error
from util.architecture import architecture_of
from util.reconstruction import figure_class, reconstruct, reconstruction_transform, save_figure
from util.weights import checkpoint_image_size, load_weights, model_state_from
from util.transforms import build_eval_transform


def get_args_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser('main_infer.py', 'MAE / ViT inference on your own images')
    parser.add_argument('--model', required=True,
                        help='vit_* (classification) or mae_vit_* (reconstruction), e.g. vit_base_patch16; required')
    parser.add_argument('--resume', required=True,
                        help='checkpoint: a .pth or .safetensors file or a Hugging Face ViTMAE folder, path or https '
                             'URL; required')
    parser.add_argument('--img_path', nargs='+', required=True,
                        help='image files and/or folders of images; required')
    cli.add_input_size(parser, None, "image side in pixels fed to the model, or height and width (default: the "
                                     "checkpoint's; another size interpolates the position embeddings)",
                       recipe=False)
    parser.add_argument('--mean', default=None, type=float, nargs='+', metavar='M',
                        help="per-channel mean of the normalisation (default: the checkpoint's saved --mean, else "
                             "ImageNet's for 3 channels)")
    parser.add_argument('--std', default=None, type=float, nargs='+', metavar='S', help='per-channel std, as --mean')
    parser.add_argument('--show_channels', default=None, metavar='LIST',
                        help='MAE figures of images of other than 3 channels: the channels shown as red, green, '
                             'blue, 1-based (e.g. 3,2,1 for true colour from Sentinel-2 bands B2,B3,B4), or one '
                             'shown in grey (default: the first three, or the one)')
    parser.add_argument('--patch_size', type=int, default=None, check=cli.POSITIVE_INT,
                        help="patch side in pixels (default: the checkpoint's)")
    parser.add_argument('--topk', type=int, default=5, check=cli.at_least(1), help='classes to print per image')
    parser.add_argument('--class_names', default=None,
                        help="text file, one class name per line in output order (default: the checkpoint's own "
                             'list, else ImageNet-1k names for 1000 outputs)')
    parser.add_argument('--mask_ratio', type=float, default=0.75, check=cli.within(0, 1, '[)'),
                        help='fraction of patches hidden (MAE), 0 <= ratio < 1')
    parser.add_argument('--seed', type=int, default=0, check=cli.SEED,
                        help='mask seed: the same seed gives the same mask')
    parser.add_argument('--norm_pix_loss', action='store_true', default=None,
                        help="the MAE predicts per-patch normalised pixels (default: read from the checkpoint's "
                             'args; the released visualisation checkpoints predict raw pixels)')
    parser.add_argument('--output_dir', default='reconstructions',
                        help='folder for the reconstruction figures, <image name>_mae.png')
    parser.add_argument('--json', default=None, metavar='FILE', help="also write the results as JSON ('-': stdout)")
    cli.add_max_image_pixels(parser)
    parser.add_argument('--device', default='auto', choices=DEVICE_CHOICES, help='backend (auto: the first available)')
    parser.add_argument('--amp', default='off', choices=AMP_CHOICES, help='precision of the forward pass')
    return parser


# --- inputs ---------------------------------------------------------------------------------------------------

def open_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS, in_chans: int = 3) -> Union[Image.Image, torch.Tensor]:
    """Decode now (util/images.py: the decoding of every path), so a bad file fails here with a clear message.
    Images of other than 3 channels, and .npy/TIFF files, are read as float tensors [in_chans, H, W]
    (util/arrays.py); another channel count is a ValueError naming both."""
    try:
        if reads_arrays(in_chans, path):
            with open(path, 'rb') as f:
                return ArrayDecoder(in_chans)(f, max_pixels)
        return decode_image(path, max_pixels)
    except ChannelMismatch as e:
        raise ValueError(e.detail) from None
    except NOT_DAMAGED as e:  # a safety limit of Pillow's, not damage: the message says how to read it
        raise ValueError(f'not read: {e}') from None
    except DECODE_ERRORS as e:
        raise ValueError(f'cannot read as an image ({describe_error(e)})') from None


def preprocess(img, input_size: pixels.Size, normalization: pixels.Normalization = pixels.IMAGENET_RGB) -> torch.Tensor:
    """A classifier's input [1, C, H, W]: the evaluation transform, exactly as --eval's loader applies it (img: a
    PIL image, or the float tensor of util/arrays.py)."""
    arrays = isinstance(img, torch.Tensor)
    return build_eval_transform(input_size, normalization, arrays)(img).unsqueeze(0)


# --- model -----------------------------------------------------------------------------------------------------

def load_model(args, checkpoint: dict, path: str) -> nn.Module:
    """The --model architecture with what the checkpoint shows of it (patch size, image size, classes, pooling,
    a linear probe's BatchNorm head); --input_size / --patch_size override, position embeddings are fitted."""
    state = model_state_from(checkpoint, path)
    arch = architecture_of(state)
    kwargs = arch.size_kwargs() if arch.kind else {}
    if arch.kind:
        kwargs['img_size'] = checkpoint_image_size(checkpoint, state)
    if args.patch_size:
        kwargs['patch_size'] = args.patch_size
    if args.input_size:
        kwargs['img_size'] = args.input_size
    patch = kwargs.get('patch_size') or models_vit.default_patch_size(model_factory(args.model))
    size = kwargs['img_size'] = kwargs.get('img_size') or 224
    if any(side % patch for side in pixels.height_width(size)):
        flag = '--input_size' if args.input_size else '--patch_size'
        given = ' '.join(map(str, dict.fromkeys(pixels.height_width(args.input_size or args.patch_size))))
        what = 'side' if isinstance(size, int) else 'size'
        raise checks.UsageError(f'{flag} {given}: the image {what} {pixels.size_text(size)} is not a multiple of the '
                                f'patch size {patch} px')
    if args.model in models_mae.MODELS:
        kwargs = {k: v for k, v in kwargs.items() if k in ('patch_size', 'img_size', 'in_chans')}
        model = models_mae.build_mae(args.model, **kwargs)
    else:
        model = models_vit.build_classifier(args.model, **kwargs)
        if arch.kind == 'linear probe':
            model = models_vit.add_batchnorm_head(model)
    load_weights(model, checkpoint, path, args.model, fit_grid=True)
    return model.eval()


def model_size(model: nn.Module) -> pixels.Size:
    return pixels.as_size(*model.patch_embed.img_size)


def model_channels(model: nn.Module) -> int:
    return model.patch_embed.proj.weight.shape[1]


def model_factory(name: str):
    return models_mae.MODELS.get(name) or models_vit.MODELS[name]


def normalization_for(args, checkpoint: dict, in_chans: int) -> pixels.Normalization:
    """--mean/--std, else those the checkpoint's run was trained with (its saved args), else ImageNet's for 3
    channels; a UsageError when none fits the model's channel count."""
    saved = checkpoint.get('args')
    mean = args.mean if args.mean is not None else getattr(saved, 'mean', None)
    std = args.std if args.std is not None else getattr(saved, 'std', None)
    if mean is None and std is None and in_chans == 3:
        return pixels.IMAGENET_RGB
    given = argparse.Namespace(in_chans=in_chans, mean=mean, std=std, data_path=None)
    errors = []
    pixels.check_args(given, errors)
    if errors:
        raise checks.UsageError(f'the model reads {in_chans} channels and {args.resume} does not say how its images '
                                f'were normalised: {errors[0]}')
    return pixels.normalization_of(given)


def uses_norm_pix(args, checkpoint: dict) -> bool:
    if args.norm_pix_loss is not None:
        return args.norm_pix_loss
    return bool(getattr(checkpoint.get('args'), 'norm_pix_loss', False))


# --- classification ------------------------------------------------------------------------------------------

def class_names(args, checkpoint: dict, num_classes: int) -> List[str]:
    """--class_names, else the class list the checkpoint was trained with, else ImageNet names / 'class i'."""
    if args.class_names:
        names = read_lines(args.class_names)
        if len(names) != num_classes:
            raise checks.UsageError(f'--class_names {args.class_names}: has {len(names)} names but the model has '
                                    f'{num_classes} outputs')
        return names
    return display_names(checkpoint.get('classes'), num_classes)


@torch.no_grad()
def classify(model: nn.Module, img, input_size: pixels.Size, runtime, topk: int, names: List[str],
             normalization: pixels.Normalization = pixels.IMAGENET_RGB) -> list:
    x = preprocess(img, input_size, normalization).to(runtime.device)
    with runtime.autocast():
        logits = model(x)
    probs = logits.float().softmax(dim=-1)[0]
    values, indices = probs.topk(min(topk, probs.numel()))
    return [{'index': int(i), 'label': names[int(i)], 'prob': float(p)} for p, i in zip(values, indices)]


# --- reconstruction outputs ----------------------------------------------------------------------------------

def output_png_path(output_dir: str, image_path: str, taken: set) -> str:
    stem = os.path.splitext(os.path.basename(image_path))[0]
    name, n = f'{stem}_mae.png', 1
    while name in taken:
        n += 1
        name = f'{stem}_{n}_mae.png'
    taken.add(name)
    return os.path.join(output_dir, name)


# --- the command -------------------------------------------------------------------------------------------------

def check_args(args) -> Tuple[List[str], List[str]]:
    """Every flag before any work (no model is loaded, no folder made): one line per problem (UsageError). Returns
    the image files --img_path names (folders expanded) and the entries skipped in them."""
    files, missing, skipped = collect_images(args.img_path)
    errors = [f"--img_path {entry['image']}: {entry['error']}" for entry in missing]
    if args.model not in models_vit.MODELS and args.model not in models_mae.MODELS:
        errors.append(f'--model {args.model}: unknown model; choose from '
                      f'{", ".join(list(models_vit.MODELS) + list(models_mae.MODELS))}')
    if args.class_names and not os.path.isfile(args.class_names):
        errors.append(f'--class_names {args.class_names}: no such file')
    checks.check_checkpoint_path('--resume', args.resume, errors)
    if args.model in models_mae.MODELS and not checks.writable_folder(args.output_dir):
        errors.append(f'--output_dir {args.output_dir}: cannot create or write to this folder')
    if args.json and args.json != '-' and not checks.writable_file(args.json):
        errors.append(f'--json {args.json}: cannot write this file (is its folder there and writable?)')
    checks.raise_if_errors(errors)
    if args.model in models_mae.MODELS:
        figure_class()  # matplotlib, only for the figure: missing, one line before any work
    return files, skipped


def reconstruction_handler(args, model, checkpoint, runtime, report: dict):
    """A function path, image -> result that writes the 4-panel PNG and prints the masked-patch loss."""
    norm_pix = uses_norm_pix(args, checkpoint)
    report.update(mask_ratio=args.mask_ratio, seed=args.seed, norm_pix_loss=norm_pix)
    if norm_pix:
        print('Note: this MAE predicts per-patch normalised pixels (norm_pix_loss); the reconstruction is '
              "shown with each hidden patch's own mean and std taken from the original image")
    size = model_size(model)
    normalization = normalization_for(args, checkpoint, model_channels(model))
    try:
        channels = pixels.channel_list(args.show_channels, model.in_chans) if args.show_channels else None
    except ValueError as e:
        raise checks.UsageError(str(e)) from None
    os.makedirs(args.output_dir, exist_ok=True)
    taken = set()

    def handle(path: str, img) -> dict:
        transform = reconstruction_transform(size, normalization, arrays=isinstance(img, torch.Tensor))
        panels, loss, mask = reconstruct(model, transform(img).unsqueeze(0), args.mask_ratio, args.seed, norm_pix,
                                         runtime, normalization, channels)
        out = output_png_path(args.output_dir, path, taken)
        save_figure([panels], out)
        loss_text = f'{loss:.4f}' if loss is not None else 'n/a (no patch masked)'
        print(f'{path}: reconstruction loss {loss_text} on {int(mask.sum())} of {mask.numel()} patches masked '
              f'-> {out}')
        return {'image': path, 'output': out, 'loss': loss, 'masked_patches': int(mask.sum()),
                'num_patches': mask.numel()}
    return handle


def classification_handler(args, model, checkpoint, runtime):
    """A function path, image -> result that prints the top-k classes with their probabilities."""
    names = class_names(args, checkpoint, model.num_classes)
    normalization = normalization_for(args, checkpoint, model_channels(model))

    def handle(path: str, img) -> dict:
        top = classify(model, img, model_size(model), runtime, args.topk, names, normalization)
        print(path)
        for entry in top:
            print(f"  {entry['label']} {entry['prob']:.2f}")
        return {'image': path, 'topk': top}
    return handle


def run(args) -> dict:
    """Returns {'model', 'checkpoint', 'task', 'results': [...], 'errors': [...]}."""
    files, skipped = check_args(args)
    checkpoint = load_checkpoint(args.resume)
    model = load_model(args, checkpoint, args.resume)
    runtime = setup_runtime(args.device, args.amp)
    model.to(runtime.device)
    if skipped:
        print(describe_skipped(' '.join(args.img_path), skipped), flush=True)
    errors = []  # images that could not be read
    is_mae = args.model in models_mae.MODELS
    report = {'model': args.model, 'checkpoint': args.resume, 'task': 'reconstruction' if is_mae else
              'classification', 'device': runtime.device_str, 'results': [], 'errors': errors}
    if is_mae:
        handle = reconstruction_handler(args, model, checkpoint, runtime, report)
    else:
        handle = classification_handler(args, model, checkpoint, runtime)
    for path in files:
        try:
            img = open_image(path, args.max_image_pixels, model_channels(model))
        except ValueError as e:
            errors.append({'image': path, 'error': str(e)})
            print(f'error: {path}: {e}', file=sys.stderr, flush=True)
            continue
        report['results'].append(handle(path, img))
    return report


def write_json(report: dict, destination: str):
    text = json.dumps(report, indent=2)
    if destination == '-':
        print(text)
    else:
        with open(destination, 'w', encoding='utf-8') as f:
            f.write(text + '\n')


def main(argv: Optional[List[str]] = None) -> int:
    args = cli.parse_with(get_args_parser(), argv)
    # with --json -, stdout carries the JSON alone: the per-image lines go to stderr
    human_output = contextlib.redirect_stdout(sys.stderr) if args.json == '-' else contextlib.nullcontext()
    try:
        with human_output:
            report = run(args)
        if args.json:
            write_json(report, args.json)
    except (checks.UsageError, DeviceError, CheckpointError, OSError) as e:
        for line in str(e).splitlines():
            print(f'error: {line}', file=sys.stderr, flush=True)
        return 2
    if report['errors']:
        print(f"{len(report['errors'])} of {len(report['results']) + len(report['errors'])} inputs failed",
              file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
