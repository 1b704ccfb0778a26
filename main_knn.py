"""k-NN evaluation of any checkpoint's encoder: frozen features with nothing masked, train/ as the memory bank,
val/ as the queries, weighted k-nearest-neighbour top-1 / top-5 (util/knn.py). No training, no head.

torchrun --nproc_per_node=8 main_knn.py --model vit_base_patch16 --resume mae_pretrain_vit_base.pth \
    --nb_knn 10 20 200 --data_path $IMAGENET
Takes encoder-only and full MAE checkpoints (released or ours, pretraining checkpoints included) and classifiers.
"""
import util  # noqa: F401  first, before torch: device plugins load on demand (see util/__init__.py)
import os

import models_mae
import models_vit
from util import flags as cli
from util import checks, distributed, knn, knn_monitor, launch, pixels
from util.checkpoint_files import load_checkpoint
from util.datasets import describe
from util.distributed import print0
from util.architecture import Architecture, StateDict, architecture_of
from util.weights import load_weights, model_state_from, no_vit_cause

# what an encoder does not hold: an MAE's decoder and mask token, a classifier's head
NOT_ENCODER = ('decoder_', 'mask_token', 'head.')


def get_args_parser() -> cli.ArgumentParser:
    parser = cli.ArgumentParser('main_knn.py', 'k-NN evaluation of a ViT encoder on frozen features')
    parser.add_argument('--batch_size', default=128, type=int, check=cli.POSITIVE_INT,
                        help='images per process and forward pass')
    cli.add_model_args(parser, model='vit_base_patch16')
    parser.add_argument('--resume', default='',
                        help='the checkpoint whose encoder is evaluated (path or https URL): encoder-only or full '
                             'MAE, released or a main_pretrain.py checkpoint, or a classifier; required')
    parser.add_argument('--feature', default=knn.DEFAULT_FEATURE, choices=knn.FEATURES,
                        help='the class token or the mean of the patch tokens, after the final norm (a global-pool '
                             "classifier: its fc_norm'd mean)")
    parser.add_argument('--nb_knn', default=[knn.DEFAULT_K], type=int, nargs='+',
                        check=((lambda ks: min(ks) >= 1), 'every k must be >= 1'),
                        help='neighbours that vote; several values are evaluated in one pass')
    parser.add_argument('--temperature', default=knn.DEFAULT_TEMPERATURE, type=float, check=cli.TEMPERATURE,
                        help='T in the vote weight exp(cosine similarity / T)')
    parser.add_argument('--train_per_class', default=0, type=int, check=knn_monitor.EVERY_IMAGE_AT_0,
                        help='bank images per class, the first in sorted file order (0: all)')
    parser.add_argument('--val_per_class', default=0, type=int, check=knn_monitor.EVERY_IMAGE_AT_0,
                        help='query images per class, the first in sorted file order (0: all)')
    parser.add_argument('--query_chunk', default=knn.QUERY_CHUNK, type=int, check=cli.at_least(1),
                        help='queries scored at once; the similarities hold at most 24 bytes x query_chunk x '
                             'bank_chunk beside the bank')
    parser.add_argument('--bank_chunk', default=knn.BANK_CHUNK, type=int, check=cli.within(1, knn.MAX_BANK_CHUNK),
                        help='bank images scored at once')
    parser.add_argument('--print_freq', default=50, type=int, check=cli.at_least(1),
                        help='print a progress line every N batches of features (where a stop signal is acted on)')
    cli.add_data_args(parser, folders='train/ (the memory bank) and val/ (the queries)')
    cli.add_runtime_args(parser, training=False)
    return parser


def check_args(args):
    errors = []
    encoders = {**models_vit.MODELS, **models_mae.MODELS}
    checks.check_model_args(args, encoders, 'ViT encoder', {}, '', '', errors)
    checks.check_data_path(args.data_path, ['train', 'val'], errors)
    if not args.resume:
        errors.append('--resume: required; the checkpoint whose encoder is evaluated (e.g. mae_pretrain_vit_base.pth '
                      'or a main_pretrain.py checkpoint)')
    checks.check_checkpoint_path('--resume', args.resume, errors)
    checks.raise_if_errors(errors)


def check_encoder(arch: Architecture, state: StateDict, path: str, feature: str):
    """Refuse (one line) weights that are not a ViT, and the class token of a global-pool classifier, which has no
    final norm for it."""
    if not arch.kind:
        raise checks.UsageError(f'--resume {path}: {no_vit_cause(state)}')
    if arch.fc_norm and feature == 'cls':
        raise checks.UsageError(f'--feature cls: {path} is a global-pool classifier; its class token has no final '
                                'norm (fc_norm normalises the mean of the patch tokens): use --feature mean')


def is_encoder_key(key: str) -> bool:
    return not key.startswith(NOT_ENCODER)


def build_encoder(args, checkpoint: dict) -> models_vit.VisionTransformer:
    """The --model encoder (an MAE name means its encoder) without a head, with the checkpoint's encoder weights:
    strict, after fitting the position table to --input_size; a misfit is one line naming the cause."""
    state = model_state_from(checkpoint, args.resume)
    arch = architecture_of(state)
    check_encoder(arch, state, args.resume, args.feature)
    name = args.model.removeprefix('mae_')  # mae_vit_base_patch16's encoder is vit_base_patch16
    model = models_vit.build_classifier(name, patch_size=args.patch_size, img_size=args.input_size, num_classes=0,
                                        in_chans=args.in_chans, global_pool=arch.fc_norm, attn_impl=args.attn)
    load_weights(model, checkpoint, args.resume, args.model, fit_grid=True, keep=is_encoder_key)
    return model


def header(args, encoder: models_vit.VisionTransformer) -> str:
    """The run's first line, as the training scripts' headers start: what is evaluated, how."""
    size = pixels.size_text(pixels.as_size(*encoder.patch_embed.img_size))
    ks = ', '.join(map(str, args.nb_knn))
    return (f'k-NN evaluation: the {args.model} encoder of {args.resume}, {size}, {args.feature} features; '
            f'k {ks}, T {args.temperature:g}')


def main(args):
    check_args(args)
    checkpoint = load_checkpoint(args.resume)
    refusal = pixels.saved_normalization_refusal(pixels.normalization_of(args), checkpoint.get('args'), args.resume)
    if refusal:
        raise checks.UsageError(refusal)
    encoder = build_encoder(args, checkpoint)  # a checkpoint that does not fit stops the run here
    print0(header(args, encoder))
    data = knn.read_knn_data(args.data_path, args.input_size, args.train_per_class, args.val_per_class,
                             args.max_image_pixels, pixels.normalization_of(args))
    print0(f'data: bank {describe(data.bank, training=False)}; queries {describe(data.queries, training=False)}')
    refusal = knn.k_too_large('--nb_knn', args.nb_knn, data, os.path.join(args.data_path, 'train'))
    if refusal:
        raise checks.UsageError(refusal)

    runtime = launch.start(args, training=False)
    world_size = distributed.get_world_size()
    print0(f'device: {runtime.describe()}, {world_size} process{"es" * (world_size > 1)}')
    results = knn.evaluate(encoder.to(runtime.device), data, args, runtime, args.feature, args.nb_knn,
                           args.temperature, args.query_chunk, args.bank_chunk)
    for k, result in results.items():
        print0(f'* k-NN k={k} T={args.temperature:g} {args.feature}: top-1 {result["top1"]:.3f} top-5 '
               f'{result["top5"]:.3f} ({knn.describe_counts(data, result)})')
    return results


if __name__ == '__main__':
    launch.run_main(main, cli.parse_with(get_args_parser()))
