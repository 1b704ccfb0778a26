"""Weighted k-nearest-neighbour accuracy of frozen encoder features: a cheap proxy for representation quality,
used by main_knn.py (any checkpoint) and by the pretraining monitor (main_pretrain.py --knn_data_path).

The protocol (Wu et al. 2018, as DINO's eval_knn.py runs it; k = 20 and T = 0.07 are DINO's defaults): features
of the encoder with nothing masked, L2-normalised; the cosine similarity of each query (val/) to every image of
the memory bank (train/); the k most similar bank images, each voting for its class with weight exp(sim / T);
top-1 / top-5 of the summed votes (a class no neighbour voted for is never in the top 5). Ties are broken the
same way everywhere: among equal similarities the lower bank index is the nearer neighbour, among equal votes the
lower class index ranks first.

Similarities are computed in chunks (queries x bank images) with a running top-k, so memory is bounded by the
chunk sizes, not by the bank: see chunk_bytes. They are float32 matrix products, as in DINO: the tie rules apply to
equal float32 values. Two copies of one image at different bank positions can differ in the last bit (the BLAS
computes edge columns of a product with other kernels), so which copy is nearer is decided by that rounding, the
same way on every run with the same chunk sizes. Other chunk sizes can move a similarity by such a rounding step
(about 1e-7), which changes a decision only between neighbours that close.
"""
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

from models_vit import run_blocks
from util import distributed
from util.distributed import print0
from util.bad_images import BadImageBudget
from util.classes import check_subset
from util.images import DEFAULT_MAX_PIXELS
from util.datasets import (LEFT_OUT, DataError, ImageFolderDataset, build_image_folder, build_loader, cap_per_class,
                           reads_arrays)
from util.pixels import IMAGENET_RGB, Normalization, Size
from util.progress import evaluation_batches, format_seconds
from util.transforms import build_eval_transform, to_device_normalized

FEATURES = ('cls', 'mean')
DEFAULT_FEATURE = 'mean'  # on real images: far ahead of the class token early in a run, close at its end (README)
DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07
QUERY_CHUNK = 1024
BANK_CHUNK = 16384
PAIR_BYTES = 24  # peak bytes per query x bank pair of a similarity chunk (chunk_bytes)
MAX_BANK_CHUNK = 2 ** 24  # chunk_topk numbers the bank images of a chunk in float32
TOP5 = 5
NO_CLASS = -1  # a top-5 place no neighbour voted for: never a hit


# --- features ----------------------------------------------------------------------------------------------

def encoder_features(encoder: torch.nn.Module, images: torch.Tensor, feature: str) -> torch.Tensor:
    """images [N, 3, H, W] (normalised) -> features [N, D] of the ViT encoder with nothing masked.

    `encoder` is an MAE (models_mae) or a classifier (models_vit): both have patch_embed, cls_token, pos_embed,
    blocks and a final norm. feature 'cls': the class token after the final norm; 'mean': the mean of the patch
    tokens after the final norm. For an MAE these are the tokens forward_encoder(imgs, mask_ratio=0) returns,
    without its random shuffle of the patch order (which a mean and the class token do not depend on) and without
    drawing its noise; for a class-token classifier 'cls' is its forward_features. A global-pool classifier has no
    final norm but fc_norm on the patch-token mean: 'mean' is its forward_features, 'cls' raises ValueError."""
    x = encoder.patch_embed(images)  # [N, L, D]
    x = torch.cat((encoder.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + encoder.pos_embed  # [N, 1 + L, D]
    x = run_blocks(encoder.blocks, x, grad_checkpointing=False)
    if getattr(encoder, 'global_pool', False):
        if feature != 'mean':
            raise ValueError("a global-pool classifier has no final norm for the class token; use feature 'mean'")
        return encoder.fc_norm(x[:, 1:].mean(dim=1))
    x = encoder.norm(x)
    return x[:, 0] if feature == 'cls' else x[:, 1:].mean(dim=1)


@torch.no_grad()
def extract_features(encoder: torch.nn.Module, loader, runtime, feature: str, budget: BadImageBudget,
                     every: int = 50) -> Tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of a dataset through the encoder: (features [n, D] float32, labels [n] int64), on the
    device, in the loader's order; an image that could not be read keeps its place with the label LEFT_OUT (the
    caller drops it after gathering). A progress line every `every` batches, where stops and unreadable images are
    agreed on as in every evaluation (util/progress.evaluation_batches)."""
    features, labels = [], []
    start = time.perf_counter()
    for i, (images, targets) in evaluation_batches(loader, budget, every):
        if (i + 1) % every == 0:
            print0(progress_line(loader, i + 1, time.perf_counter() - start))
        images = to_device_normalized(images, runtime.device)
        with runtime.autocast():
            features.append(encoder_features(encoder, images, feature).float())
        labels.append(targets.to(runtime.device))
    if not features:  # more ranks than images
        dim = encoder.cls_token.shape[-1]
        return torch.zeros(0, dim, device=runtime.device), torch.zeros(0, dtype=torch.int64, device=runtime.device)
    return torch.cat(features), torch.cat(labels)


def progress_line(loader, done: int, elapsed: float) -> str:
    """'k-NN features of ROOT: [done/total]  eta: H:MM:SS  img/s: N', the training progress lines' conventions
    (images per second over all ranks)."""
    rate = done / max(elapsed, 1e-9)
    images = done * loader.batch_size * distributed.get_world_size()
    return (f'k-NN features of {loader.dataset.root}: [{done}/{len(loader)}]  eta: '
            f'{format_seconds((len(loader) - done) / rate)}  img/s: {images / max(elapsed, 1e-9):.1f}')


# --- the classifier ----------------------------------------------------------------------------------------

def chunk_topk(sims: torch.Tensor, k: int, offset: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """sims [q, b] (queries x a chunk of bank images starting at bank index `offset`) -> the k most similar,
    (values [q, k], bank indices [q, k]), sorted by similarity, the lower index first among equal values.
    torch.topk leaves the choice among equal values open; here the last places go to the lowest indices."""
    k = min(k, sims.shape[1])
    threshold = sims.topk(k, dim=1).values[:, -1:]  # [q, 1], the k-th largest value
    above = sims > threshold
    room = k - above.sum(dim=1, keepdim=True)  # places left for values equal to the threshold
    at = sims == threshold
    chosen = above | (at & (at.cumsum(dim=1, dtype=torch.int32) <= room))  # exactly k per row
    del above, at
    # a key that falls with the index on the chosen, 0 elsewhere: its top k (distinct values) is the chosen set
    # (float32 counts exactly up to 2^24, the largest bank chunk allowed)
    key = torch.arange(sims.shape[1], 0, -1, device=sims.device, dtype=torch.float32)
    index = torch.where(chosen, key, 0.).topk(k, dim=1).indices  # [q, k], ascending index
    return sort_neighbours(sims.gather(1, index), index + offset)


def sort_neighbours(values: torch.Tensor, index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Order each row by value, descending. The sort is stable, so rows given in ascending index keep the lower
    index first among equal values."""
    order = values.sort(dim=1, descending=True, stable=True).indices
    return values.gather(1, order), index.gather(1, order)


def nearest_neighbours(queries: torch.Tensor, bank: torch.Tensor, k: int,
                       bank_chunk: int = BANK_CHUNK) -> Tuple[torch.Tensor, torch.Tensor]:
    """queries [q, D] and bank [N, D] (both L2-normalised) -> the k nearest bank images of each query by cosine
    similarity: (similarities [q, k], bank indices [q, k]), nearest first, lower index first on ties. Bank chunks
    of `bank_chunk` images are scored in turn and merged into a running top-k; raises ValueError if k > N."""
    if k > bank.shape[0]:
        raise ValueError(f'k {k} is more than the {bank.shape[0]} images of the bank')
    best_values = queries.new_zeros(queries.shape[0], 0)
    best_index = torch.zeros(queries.shape[0], 0, dtype=torch.int64, device=queries.device)
    for start in range(0, bank.shape[0], bank_chunk):
        values, index = chunk_topk(queries @ bank[start:start + bank_chunk].T, k, start)
        # earlier chunks hold lower indices: listed first, the stable sort keeps them first among equal values
        values, index = sort_neighbours(torch.cat((best_values, values), 1), torch.cat((best_index, index), 1))
        best_values, best_index = values[:, :k], index[:, :k]
    return best_values, best_index


def ranked_classes(similarities: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int,
                   temperature: float, votes_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The k neighbours' votes: similarities [q, k] (nearest first) and their labels [q, k] -> the classes [q,
    min(5, num_classes)] with the most votes, each vote weighted exp(sim / T); NO_CLASS (-1) fills the places
    beyond the classes that got a vote (with k = 1 only one class has evidence: the other four places of a top-5
    are not guesses to be credited). Ties go to the lower class index.

    Each class is ranked by the log of its summed votes, relative to the nearest neighbour: log sum exp((sim -
    nearest) / T), its largest term taken out of the sum. That is the order of the summed exp(sim / T), but it
    stays finite for every T the flags accept (util/flags.MIN_TEMPERATURE): exp(sim / T) itself overflows to inf
    below T ~ 1/709 and underflows to 0 for far neighbours, and either ties the classes, then ranked by index.
    Sums run nearest first in `votes_dtype` (float64; MPS has none), a fixed order, so equal sets of votes tie."""
    dtype = votes_dtype
    # float32 (MPS) holds no temperature below its smallest normal number; there the limit ranking is reached
    temperature = max(temperature, torch.finfo(dtype).tiny)
    scaled = (similarities.to(dtype) - similarities[:, :1].to(dtype)) / temperature  # [q, k], <= 0, finite
    rows, cols = similarities.shape[0], num_classes
    largest = torch.full((rows, cols), -torch.inf, dtype=dtype, device=similarities.device)
    largest.scatter_reduce_(1, neighbour_labels, scaled, 'amax')  # [q, C], -inf where no neighbour voted
    terms = (scaled - largest.gather(1, neighbour_labels)).exp()  # [q, k], in (0, 1], 1 for a class's nearest
    sums = torch.zeros(rows, cols, dtype=dtype, device=similarities.device)
    row = torch.arange(rows, device=similarities.device)
    for j in range(similarities.shape[1]):  # one neighbour per row at a time: a fixed summation order
        sums.index_put_((row, neighbour_labels[:, j]), terms[:, j], accumulate=True)
    votes = largest + sums.log()  # log of the summed votes, less nearest / T; -inf for a class with none
    order = votes.sort(dim=1, descending=True, stable=True)
    places = min(TOP5, num_classes)
    return torch.where(order.values[:, :places] > -torch.inf, order.indices[:, :places], NO_CLASS)


def knn_hits(queries: torch.Tensor, query_labels: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
             num_classes: int, ks: Sequence[int], temperature: float, query_chunk: int = QUERY_CHUNK,
             bank_chunk: int = BANK_CHUNK, votes_dtype: torch.dtype = torch.float64) -> Dict[int, torch.Tensor]:
    """Weighted k-NN: queries [q, D] with labels [q] against bank [N, D] with labels [N], both L2-normalised
    (normalised by the caller, so that a bank of a million images is never copied). Returns, for each k, [top-1
    hits, top-5 hits] (a tensor of counts in votes_dtype) over the queries. Memory beyond the inputs:
    chunk_bytes(query_chunk, bank_chunk, max(ks)), whatever N is."""
    hits = {k: torch.zeros(2, dtype=votes_dtype, device=queries.device) for k in ks}
    for start in range(0, queries.shape[0], query_chunk):
        sims, index = nearest_neighbours(queries[start:start + query_chunk], bank, max(ks), bank_chunk)
        labels = query_labels[start:start + query_chunk, None]
        for k in ks:  # the nearest k of the max(ks) found, as they are sorted nearest first
            ranked = ranked_classes(sims[:, :k], bank_labels[index[:, :k]], num_classes, temperature, votes_dtype)
            hits[k] += torch.stack([(ranked[:, :1] == labels).sum(), (ranked == labels).sum()]).to(votes_dtype)
    return hits


def chunk_bytes(query_chunk: int, bank_chunk: int, k: int) -> int:
    """Bytes one step of knn_hits holds beside the bank and the queries: per query x bank pair the similarity
    (4 bytes) and chunk_topk's masks, running count and key, 24 bytes in all (measured on the CPU: 20-23 at 512-1024
    queries x 8192-16384 bank images, the same for a bank of 0.1M and of 1M images); per query the running and the
    new top-k (values and indices, 4 + 8 bytes each)."""
    return query_chunk * bank_chunk * PAIR_BYTES + query_chunk * 2 * k * (4 + 8) * 2


# --- datasets and the evaluation ---------------------------------------------------------------------------

@dataclass
class KnnData:
    """The memory bank (train/) and the queries (val/), labelled by train/'s class names."""
    bank: ImageFolderDataset
    queries: ImageFolderDataset

    @property
    def classes(self) -> List[str]:
        return self.bank.classes


def read_knn_data(data_path: str, input_size: Size, train_per_class: int, val_per_class: int,
                  max_pixels: int = DEFAULT_MAX_PIXELS, normalization: Normalization = IMAGENET_RGB) -> KnnData:
    """train/ and val/ of data_path with the evaluation transform, each capped at the first N images of each class
    (sorted file order; 0: all). train/'s folders are the classes; a val/ folder not among them is refused in one
    line (ClassListError), as is an empty or missing folder (DataError). Both are evaluation sets: an unreadable
    image (or one over max_pixels pixels) is left out, never replaced. Images of another channel count than 3, or
    .npy/TIFF files, are read as arrays (util/arrays.py) of normalization.in_chans channels."""
    train_root, val_root = os.path.join(data_path, 'train'), os.path.join(data_path, 'val')
    as_arrays = reads_arrays(train_root, normalization.in_chans)
    transform = build_eval_transform(input_size, normalization, as_arrays)
    in_chans = normalization.in_chans if as_arrays else None
    bank = cap_per_class(build_image_folder(train_root, transform, max_pixels=max_pixels, substitute=False,
                                            in_chans=in_chans), train_per_class)
    check_subset(val_root, bank.classes, what=f"{train_root}'s")
    queries = cap_per_class(build_image_folder(val_root, transform, classes=bank.classes, max_pixels=max_pixels,
                                               substitute=False, in_chans=in_chans), val_per_class)
    return KnnData(bank, queries)


def k_too_large(flag: str, ks: Sequence[int], data: KnnData, where: str) -> str:
    """'' when every k fits in the bank, else the one-line refusal."""
    if max(ks) <= len(data.bank):
        return ''
    return (f'{flag} {max(ks)}: the memory bank ({where}) holds {len(data.bank)} images; use k <= '
            f'{len(data.bank)} or more bank images per class')


def all_features(encoder: torch.nn.Module, dataset: ImageFolderDataset, args, runtime, feature: str,
                 gather: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features and labels of a dataset's readable images, each image computed on one rank
    (ShardedEvalSampler); with `gather` every rank receives all of them in dataset order (one all_gather), else
    each keeps its share. Unreadable images are left out (args.max_bad_images holds them to a budget)."""
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    loader = build_loader(dataset, args, runtime, False, rank, world_size, dist_eval=True)
    budget = BadImageBudget(dataset.bad_images, len(dataset), args.max_bad_images, output_dir='')
    features, labels = extract_features(encoder, loader, runtime, feature, budget, args.print_freq)
    features = F.normalize(features, dim=1)  # here, per rank: the gathered bank is never copied to normalise it
    if gather:
        features = distributed.all_gather_interleaved(features, len(dataset))
        labels = distributed.all_gather_interleaved(labels, len(dataset))
    readable = labels != LEFT_OUT
    if not readable.all():  # a copy only when some image was unreadable
        features, labels = features[readable], labels[readable]
    return features, labels


def check_readable(data: KnnData, bank_size: int, num_queries: int, k: int):
    """DataError when too few images could be read to classify: no query, or fewer bank images than k."""
    if not num_queries:
        raise DataError(f'{data.queries.root}: none of its {len(data.queries)} query images could be read')
    if bank_size < k:
        raise DataError(f'{data.bank.root}: {bank_size} of its {len(data.bank)} bank images could be read, fewer than '
                        f'k = {k}; repair the images or lower k')


def describe_counts(data: KnnData, result: Dict[str, float]) -> str:
    """'32 queries, bank of 2000 images, 8 classes', with the unreadable images left out, if any."""
    left_out = len(data.queries) + len(data.bank) - result['queries'] - result['bank']
    return (f'{result["queries"]} queries, bank of {result["bank"]} images, {len(data.classes)} classes'
            + (f'; {left_out} unreadable image{"s" if left_out > 1 else ""} left out' if left_out else ''))


def evaluate(encoder: torch.nn.Module, data: KnnData, args, runtime, feature: str, ks: Sequence[int],
             temperature: float, query_chunk: int = QUERY_CHUNK, bank_chunk: int = BANK_CHUNK
             ) -> Dict[int, Dict[str, float]]:
    """k-NN top-1 / top-5 (percent) for each k, on every rank (a collective), with 'queries' and 'bank' the
    numbers of images used (unreadable ones are left out of both, never replaced by others). Each rank computes
    the features of its share of the bank and the queries; the bank is gathered once, each rank classifies its own
    queries and the hits are summed, so every image counts exactly once at any process count. Loaders:
    args.batch_size, num_workers, pin_mem, seed (their own generator); args.max_bad_images holds unreadable images
    to a budget; args.print_freq batches between progress lines and stop checks (EvaluationInterrupted). Raises
    DataError when no query, or fewer bank images than the largest k, could be read."""
    was_training = encoder.training
    encoder.eval()
    try:
        bank, bank_labels = all_features(encoder, data.bank, args, runtime, feature, gather=True)
        queries, query_labels = all_features(encoder, data.queries, args, runtime, feature, gather=False)
        counts = distributed.all_reduce_sum(torch.tensor([float(queries.shape[0])], dtype=torch.float64,
                                                         device=distributed.comm_device()))
        num_queries = int(counts.item())
        check_readable(data, bank.shape[0], num_queries, max(ks))
        hits = knn_hits(queries, query_labels, bank, bank_labels, len(data.classes), ks, temperature, query_chunk,
                        bank_chunk, runtime.sum_dtype)
    finally:
        encoder.train(was_training)
    results = {}
    for k in ks:
        top1, top5 = distributed.all_reduce_sum(hits[k]).tolist()
        results[k] = {'top1': 100 * top1 / num_queries, 'top5': 100 * top5 / num_queries,
                      'queries': num_queries, 'bank': bank.shape[0]}
    return results
