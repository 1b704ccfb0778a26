"""Write a checkpoint (ours, an official one, or anything util/checkpoint_files.py reads) in another library's layout,
as config.json + model.safetensors in OUT_DIR:
--to hf    an MAE (encoder and decoder) for transformers' ViTMAEForPreTraining.from_pretrained(OUT_DIR); an encoder
           alone for ViTMAEModel (key map: util/hf_layout.py).
--to timm  a fine-tuned classifier for timm.create_model('local-dir:OUT_DIR', pretrained=True): timm's
           VisionTransformer with our pooling (global_pool 'avg' + fc_norm, or 'token'), class count and class names.

python -m tools.export --to hf demo_output/checkpoint-last.pth demo_hf/
python -m tools.export --to timm finetune_output/checkpoint-best.pth vit_timm/
Exit code 0: written; 2: the checkpoint cannot be exported (one line saying why).
"""
import argparse
import json
import os
import sys
from typing import Dict, Optional

import safetensors.torch
import torch

import models_mae
import models_vit
from util import flags as cli
from util import hf_layout, pixels
from util.checkpoint_files import CheckpointError, load_checkpoint
from util.weights import checkpoint_image_size, model_state_from
from util.architecture import KIND_WORDS, Architecture, architecture_of, attention_heads

WEIGHTS_NAME = 'model.safetensors'


class ExportError(ValueError):
    """The checkpoint has no equivalent in the chosen layout; the message is one line."""


def get_args_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser('python -m tools.export',
                                'Write a checkpoint for Hugging Face transformers (ViTMAE) or timm')
    parser.add_argument('checkpoint', help='.pth / .safetensors file or Hugging Face ViTMAE folder, path or URL')
    parser.add_argument('out_dir', help='folder to write config.json and model.safetensors into')
    parser.add_argument('--to', required=True, choices=('hf', 'timm'),
                        help='hf: an MAE or its encoder for transformers; timm: a fine-tuned classifier; required')
    parser.add_argument('--num_heads', type=int, default=None,
                        help="attention heads of the encoder (default: those of the checkpoint's --model, or of the "
                             'model of this repository with its sizes)')
    parser.add_argument('--decoder_num_heads', type=int, default=None, help='attention heads of the MAE decoder')
    parser.add_argument('--norm_pix_loss', action=argparse.BooleanOptionalAction, default=None,
                        help="hf: the MAE predicts per-patch normalised pixels (default: the checkpoint's setting, "
                             'else no)')
    parser.add_argument('--mask_ratio', type=float, default=None,
                        help="hf: the mask ratio config.json names (default: the checkpoint's, else 0.75)")
    return parser


# --- what the weights do not show ----------------------------------------------------------------------------

def factory_heads(name: str) -> Optional[tuple]:
    """(the architecture, the attention heads) of a factory of models_mae / models_vit, built on the meta device."""
    factory = models_mae.MODELS.get(name) or models_vit.MODELS.get(name)
    if factory is None:
        return None
    with torch.device('meta'):
        model = factory()
    return architecture_of(model.state_dict()), attention_heads(model)


def same_sizes(theirs: Architecture, ours: Architecture) -> bool:
    encoder = (theirs.embed_dim, theirs.depth) == (ours.embed_dim, ours.depth)
    decoder = (theirs.decoder_embed_dim, theirs.decoder_depth) == (ours.decoder_embed_dim, ours.decoder_depth)
    return encoder and (decoder or theirs.kind != 'mae')


def heads_for(checkpoint: dict, arch: Architecture, args) -> Dict[str, int]:
    """The attention heads: the flags, else those a Hugging Face config named, else those of the checkpoint's
    --model, else those of the one model here with these sizes; refused when none of these says."""
    named = dict(checkpoint.get('attention_heads') or {})
    saved_model = getattr(checkpoint.get('args'), 'model', None)
    if 'encoder' not in named:
        candidates = [saved_model] if saved_model else []
        candidates += list(models_mae.MODELS if arch.kind == 'mae' else models_vit.MODELS)
        for name in candidates:
            found = factory_heads(name)
            if found and same_sizes(arch, found[0]):
                named = found[1]
                break
    if args.num_heads:
        named['encoder'] = args.num_heads
    if args.decoder_num_heads:
        named['decoder'] = args.decoder_num_heads
    needed = ['encoder'] + (['decoder'] if arch.kind == 'mae' else [])
    missing = [part for part in needed if part not in named]
    if missing:
        flags = ' and '.join('--num_heads' if part == 'encoder' else '--decoder_num_heads' for part in missing)
        raise ExportError(f'the weights do not show how many attention heads the {" and ".join(missing)} '
                          f'{"has" if len(missing) == 1 else "have"} (no model here has an {arch.describe()} '
                          f'encoder{" and this decoder" if arch.kind == "mae" else ""}); pass {flags}')
    return named


# --- Hugging Face transformers -------------------------------------------------------------------------------

def hf_folder(checkpoint: dict, state: dict, arch: Architecture, args) -> tuple:
    """(weights, config.json) for ViTMAEForPreTraining (an MAE) or ViTMAEModel (an encoder)."""
    if arch.kind not in ('mae', 'encoder'):
        raise ExportError(f'it is {KIND_WORDS.get(arch.kind, "not ViT weights")}; --to hf writes an MAE or its '
                          'encoder (a fine-tuned classifier goes to timm: --to timm)')
    saved = checkpoint.get('args')
    size = checkpoint_image_size(checkpoint, state)
    if isinstance(size, tuple):
        raise ExportError(f'its images are {pixels.size_text(size)}, not square; Hugging Face\'s ViTMAE builds its '
                          'sin-cos position tables for square grids only (export the encoder of a square run, or '
                          'a fine-tuned classifier with --to timm)')
    norm_pix = args.norm_pix_loss if args.norm_pix_loss is not None else getattr(saved, 'norm_pix_loss', None)
    if norm_pix is None and arch.kind == 'mae':
        print('Note: the checkpoint does not say whether it predicts normalised pixels; config.json says '
              'norm_pix_loss false (pass --norm_pix_loss for the released mae_pretrain_*_full.pth files)')
    mask_ratio = args.mask_ratio if args.mask_ratio is not None else getattr(saved, 'mask_ratio', 0.75)
    config = hf_layout.hf_config(state, heads_for(checkpoint, arch, args), bool(norm_pix), float(mask_ratio))
    return hf_layout.to_hf(state), config


# --- timm ---------------------------------------------------------------------------------------------------

def timm_architecture(saved_model: Optional[str]) -> str:
    """timm's name for our classifier factory (vit_base_patch16 -> vit_base_patch16_224); the sizes are given as
    model_args anyway, so any ViT name would do for other sizes."""
    return f'{saved_model}_224' if saved_model in models_vit.MODELS else 'vit_base_patch16_224'


def timm_config(checkpoint: dict, state: dict, arch: Architecture, heads: Dict[str, int]) -> dict:
    """config.json as timm's push_to_hub writes it: architecture, model_args (every size, our pooling, the channel
    count), the preprocessing of our --eval (bicubic, crop 224/256, the run's --mean/--std: ImageNet's by default)
    and the class names."""
    pool = 'avg' if arch.global_pool else 'token'
    height, width = pixels.height_width(checkpoint_image_size(checkpoint, state))
    try:
        normalization = pixels.normalization_of(checkpoint.get('args'))
    except ValueError:
        normalization = None
    if normalization is None or normalization.in_chans != arch.in_chans:
        if arch.in_chans != 3:
            raise ExportError(f'its patch embedding reads {arch.in_chans} channels and its saved args do not say '
                              "their --mean and --std, which timm's pretrained_cfg must name")
        normalization = pixels.IMAGENET_RGB
    model_args = dict(img_size=pixels.as_size(height, width), patch_size=arch.patch_size, in_chans=arch.in_chans,
                      embed_dim=arch.embed_dim, depth=arch.depth,
                      num_heads=heads['encoder'], mlp_ratio=arch.mlp_dim / arch.embed_dim,
                      qkv_bias=True, class_token=True, global_pool=pool, fc_norm=bool(arch.global_pool))
    pretrained_cfg = dict(input_size=[arch.in_chans, height, width], interpolation='bicubic',
                          crop_pct=224 / 256 if max(height, width) <= 224 else 1.0, crop_mode='center',
                          mean=list(normalization.mean), std=list(normalization.std),
                          num_classes=arch.num_classes, first_conv='patch_embed.proj', classifier='head',
                          fixed_input_size=True)
    config = dict(architecture=timm_architecture(getattr(checkpoint.get('args'), 'model', None)),
                  num_classes=arch.num_classes, num_features=arch.embed_dim, global_pool=pool, model_args=model_args,
                  pretrained_cfg=pretrained_cfg)
    classes = checkpoint.get('classes')
    if classes and len(classes) == arch.num_classes:
        config['label_names'] = list(classes)
    return config


def timm_folder(checkpoint: dict, state: dict, arch: Architecture, args) -> tuple:
    """(weights, config.json) for timm's VisionTransformer: our classifier's keys are timm's."""
    if arch.kind == 'linear probe':
        raise ExportError(f'it is {KIND_WORDS[arch.kind]}, which timm\'s VisionTransformer has no place for; '
                          '--to timm writes a fine-tuned classifier')
    if arch.kind != 'classifier':
        raise ExportError(f'it is {KIND_WORDS.get(arch.kind, "not ViT weights")}, not a classifier; fine-tune it '
                          'first (main_finetune.py --finetune), or write it for transformers with --to hf')
    weights = {k: v.detach().clone().contiguous() for k, v in state.items()}
    return weights, timm_config(checkpoint, state, arch, heads_for(checkpoint, arch, args))


# --- the command -------------------------------------------------------------------------------------------------

def write_folder(out_dir: str, weights: dict, config: dict):
    """model.safetensors, then config.json (a folder with a config.json is a complete export)."""
    os.makedirs(out_dir, exist_ok=True)
    safetensors.torch.save_file(weights, os.path.join(out_dir, WEIGHTS_NAME), metadata={'format': 'pt'})
    with open(os.path.join(out_dir, hf_layout.CONFIG_NAME), 'w', encoding='utf-8') as f:
        json.dump(config, f, indent=2)
        f.write('\n')


def export(args) -> str:
    """Write args.checkpoint into args.out_dir in the args.to layout; returns how to load it."""
    checkpoint = load_checkpoint(args.checkpoint)
    state = model_state_from(checkpoint, args.checkpoint)
    arch = architecture_of(state)
    try:
        if args.to == 'hf':
            weights, config = hf_folder(checkpoint, state, arch, args)
        else:
            weights, config = timm_folder(checkpoint, state, arch, args)
    except (ExportError, hf_layout.ConversionError) as e:
        raise ExportError(f'{args.checkpoint} cannot be written for {args.to}: {e}') from None
    write_folder(args.out_dir, weights, config)
    if args.to == 'hf':
        return f"transformers.{config['architectures'][0]}.from_pretrained({args.out_dir!r})"
    return (f"timm.create_model('local-dir:{args.out_dir}', pretrained=True)  # {config['architecture']}, "
            f"{config['num_classes']} classes, global_pool {config['global_pool']!r}")


def main(argv=None) -> int:
    args = cli.parse_with(get_args_parser(), argv)
    try:
        how = export(args)
    except (CheckpointError, ExportError, OSError) as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        return 2
    print(f'Wrote {os.path.join(args.out_dir, WEIGHTS_NAME)} and {hf_layout.CONFIG_NAME}; load it with {how}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
