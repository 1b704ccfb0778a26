"""The k-NN benchmark of `python -m tools.benchmark --knn`: what the k-NN monitor and main_knn.py cost, measured
beside the pretraining step on the same device in the same run.

- the feature forward of the encoder (nothing masked, no gradients) per image, against the MAE training step per
  image: the monitor's share of an ImageNet epoch follows from its image cap;
- the chunked similarity and top-k against a bank of --knn_bank random features, per query and per query x bank
  pair, with the process's peak memory beside the bound util.knn.chunk_bytes states.
"""
import statistics
from typing import Dict

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import models_vit
from tools import benchmark_step as step
from util import knn

IMAGENET_TRAIN = 1_281_167
IMAGENET_VAL = 50_000
IMAGENET_CLASSES = 1000
FILL = 65536


def timed(fn, runtime, warmup: int, windows: int, steps: int) -> float:
    """Median seconds per call of fn over `windows` windows of `steps` calls, after `warmup` calls."""
    return statistics.median(step.time_windows(fn, runtime, warmup, windows, steps))


def measure_features(args, runtime) -> Dict[str, float]:
    """Seconds per image of the encoder's features (the class token; the patch mean costs the same) at
    --input_size, in batches of --batch_size."""
    name = args.model.removeprefix('mae_')
    torch.manual_seed(0)
    encoder = models_vit.build_classifier(name, patch_size=args.patch_size, img_size=args.input_size, num_classes=0,
                                          global_pool=False).to(runtime.device).eval()
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=runtime.device)

    @torch.no_grad()
    def forward():
        with runtime.autocast():
            knn.encoder_features(encoder, images, 'cls')
    counter = FlopCounterMode(display=False)
    with counter:
        forward()
    seconds = timed(forward, runtime, args.warmup, args.windows, args.steps)
    return {'encoder': name, 'batch_size': args.batch_size, 'feature_ms_per_image': 1000 * seconds / args.batch_size,
            'gflops_per_image': counter.get_total_flops() / args.batch_size / 1e9}


def measure_similarity(args, runtime) -> Dict[str, float]:
    """One query chunk against a bank of --knn_bank random unit features (the encoder's width): seconds per query,
    per query x bank pair, and the peak memory above the bank and queries."""
    with torch.device('meta'):
        dim = models_vit.MODELS[args.model.removeprefix('mae_')]().cls_token.shape[-1]
    g = torch.Generator().manual_seed(0)
    bank = torch.empty(args.knn_bank, dim, device=runtime.device)
    for start in range(0, args.knn_bank, FILL):  # filled in slices: no second bank-sized temporary
        bank[start:start + FILL] = F.normalize(torch.randn(min(FILL, args.knn_bank - start), dim, generator=g), dim=1)
    queries = F.normalize(torch.randn(args.knn_queries, dim, generator=g), dim=1).to(runtime.device)
    labels = torch.randint(0, IMAGENET_CLASSES, (args.knn_bank,), generator=g).to(runtime.device)
    runtime.reset_peak_memory_stats()
    before = runtime.max_memory_allocated()

    def classify():
        knn.knn_hits(queries, labels[:args.knn_queries], bank, labels, IMAGENET_CLASSES, [args.knn_k], 0.07,
                     args.knn_queries, knn.BANK_CHUNK, runtime.sum_dtype)
    seconds = timed(classify, runtime, 1, 1, 1)
    return {'bank_images': args.knn_bank, 'queries': args.knn_queries, 'dim': dim, 'k': args.knn_k,
            'bank_chunk': knn.BANK_CHUNK, 'similarity_ms_per_query': 1000 * seconds / args.knn_queries,
            'ns_per_pair': 1e9 * seconds / (args.knn_queries * args.knn_bank),
            'bank_gib_fp32': args.knn_bank * dim * 4 / 2 ** 30,
            'chunk_bound_mib': knn.chunk_bytes(args.knn_queries, knn.BANK_CHUNK, args.knn_k) / 2 ** 20,
            'peak_growth_mib': (runtime.max_memory_allocated() - before) / 2 ** 20}


def report(args, runtime) -> Dict[str, object]:
    """The measurements and the arithmetic of the README: the monitor's share of an ImageNet epoch at its default
    cap, and a k-NN evaluation of all of ImageNet val against the whole train set."""
    similarity = measure_similarity(args, runtime)  # first: on the CPU the peak memory is the process's peak
    features = measure_features(args, runtime)
    train_step = step.measure(args.model, args, runtime)
    feature_s = features['feature_ms_per_image'] / 1000
    step_s = train_step['step_ms'] / 1000 / args.batch_size
    monitor_images = (args.knn_train_per_class + args.knn_val_per_class) * IMAGENET_CLASSES
    pair_s = similarity['ns_per_pair'] / 1e9
    monitor_s = monitor_images * feature_s + args.knn_val_per_class * IMAGENET_CLASSES * \
        args.knn_train_per_class * IMAGENET_CLASSES * pair_s
    epoch_s = IMAGENET_TRAIN * step_s
    full_s = (IMAGENET_TRAIN + IMAGENET_VAL) * feature_s + IMAGENET_VAL * IMAGENET_TRAIN * pair_s
    return {'features': features, 'train_step': train_step, 'similarity': similarity,
            'feature_over_step': feature_s / step_s,
            'feature_over_step_flops': features['gflops_per_image'] / train_step['gflops_per_image'],
            'monitor': {'images': monitor_images, 'seconds': monitor_s, 'epoch_seconds': epoch_s,
                        'fraction_of_epoch': monitor_s / epoch_s},
            'full_imagenet': {'seconds': full_s, 'feature_seconds': (IMAGENET_TRAIN + IMAGENET_VAL) * feature_s,
                              'similarity_seconds': IMAGENET_VAL * IMAGENET_TRAIN * pair_s}}


def print_report(result: Dict[str, object], args):
    f, s, sim = result['features'], result['train_step'], result['similarity']
    m, full = result['monitor'], result['full_imagenet']
    print(f"\nk-NN costs ({args.input_size} px, batch {args.batch_size})")
    print(f"  feature forward ({f['encoder']}, nothing masked): {f['feature_ms_per_image']:.2f} ms/image")
    print(f"  training step ({s['model']}, mask {args.mask_ratio}): {s['step_ms'] / args.batch_size:.2f} ms/image"
          f"  -> a feature costs {result['feature_over_step']:.2f} training-step images (FLOPs: "
          f"{f['gflops_per_image']:.1f} / {s['gflops_per_image']:.1f} GFLOP = {result['feature_over_step_flops']:.2f})")
    print(f"  similarity + top-{sim['k']} against {sim['bank_images']:,} x {sim['dim']}: "
          f"{sim['similarity_ms_per_query']:.2f} ms/query ({sim['ns_per_pair']:.3f} ns per pair); bank "
          f"{sim['bank_gib_fp32']:.2f} GiB fp32; chunk bound {sim['chunk_bound_mib']:.0f} MiB, measured peak growth "
          f"{sim['peak_growth_mib']:.0f} MiB")
    print(f"  monitor at {args.knn_train_per_class} + {args.knn_val_per_class} images per class x 1000 classes = "
          f"{m['images']:,} images: {m['seconds']:.0f} s against an ImageNet epoch of {m['epoch_seconds']:.0f} s "
          f"= {m['fraction_of_epoch']:.2%}")
    print(f"  ImageNet val against all of train: {full['feature_seconds']:.0f} s of features + "
          f"{full['similarity_seconds']:.0f} s of similarities")
