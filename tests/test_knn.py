"""k-NN evaluation (util/knn.py, main_knn.py) and the pretraining monitor (main_pretrain.py --knn_data_path):
exact against a float64 brute force, chunking that changes nothing, labels by class name, refusals in one line,
every image once under torchrun, and a monitor that leaves training bit-identical and survives kill-and-resume."""
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ROOT,
    TINY,
    TINY_MAE,
    TINY_PRETRAIN_ARGS,
    read_json_log,
    run_in_process,
    run_script,
    run_torchrun,
    start_process,
    subprocess_env,
    wait_for_line,
)

import main_knn
import main_pretrain
import models_mae
import models_vit
from util import flags as cli
from util import knn
from util.checkpoint_files import load_checkpoint
from util.device import Runtime
from util.weights import load_weights

TINY_KNN_ARGS = ['--model', 'mae_vit_tiny_patch16', '--input_size', '32', '--patch_size', '4', '--num_workers', '0',
                 '--batch_size', '16']
# 3 epochs, the monitor after epochs 1 (every 2) and 2 (the last), over all 128 bank and 64 query images
MONITORED = ['--epochs', '3', '--warmup_epochs', '1', '--blr', '1.6e-2', '--seed', '3', *TINY_PRETRAIN_ARGS]
MONITOR = ['--knn_every', '2', '--knn_train_per_class', '0', '--knn_val_per_class', '0']


def reference_ranked_classes(queries: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor,
                             num_classes: int, k: int, temperature: float) -> torch.Tensor:
    """util/knn.py's classifier computed another way (small inputs): float64 features, every similarity at
    once, neighbours by a full lexicographic sort on (similarity descending, index ascending), each class's votes
    summed exactly (math.fsum, so equal sets of weights give equal votes), classes ranked by (votes descending,
    class index ascending), only classes some neighbour voted for; -1 in the places left. Returns [q, min(5, C)]."""
    queries, bank = F.normalize(queries.double(), dim=1), F.normalize(bank.double(), dim=1)
    sims = (queries @ bank.T).numpy()  # [q, N]
    index = np.broadcast_to(np.arange(bank.shape[0]), sims.shape)
    order = np.lexsort((index, -sims), axis=1)[:, :k]  # the last key sorts first
    labels = bank_labels.numpy()
    ranked = []
    for row, neighbours in zip(sims, order):
        votes = [math.fsum(math.exp(row[j] / temperature) for j in neighbours if labels[j] == c)
                 for c in range(num_classes)]
        voted = [c for c in range(num_classes) if any(labels[j] == c for j in neighbours)]
        top = sorted(voted, key=lambda c: (-votes[c], c))[:knn.TOP5]
        ranked.append(top + [-1] * (min(knn.TOP5, num_classes) - len(top)))
    return torch.tensor(ranked)


def ranked(queries, bank, bank_labels, num_classes, k, temperature=0.07, query_chunk=knn.QUERY_CHUNK,
           bank_chunk=knn.BANK_CHUNK):
    """The classifier of util/knn.py, chunk by chunk as knn_hits runs it: the ranked classes of every query."""
    queries, bank = F.normalize(queries, dim=1), F.normalize(bank, dim=1)
    rows = []
    for start in range(0, queries.shape[0], query_chunk):
        sims, index = knn.nearest_neighbours(queries[start:start + query_chunk], bank, k, bank_chunk)
        rows.append(knn.ranked_classes(sims, bank_labels[index], num_classes, temperature))
    return torch.cat(rows)


def random_features(queries=60, bank=300, dim=16, num_classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(queries, dim, generator=g), torch.randn(bank, dim, generator=g),
            torch.randint(0, num_classes, (bank,), generator=g))


def tied_features(queries=40, bank=200, num_classes=5):
    """Vectors of +-0.5 in 4-d: unit length exactly, every cosine a multiple of 0.25 (exact in float32), so a
    query has dozens of bank images at exactly the same similarity."""
    corners = torch.tensor(list(itertools.product([-0.5, 0.5], repeat=4)))
    g = torch.Generator().manual_seed(1)
    return (corners[torch.randint(0, 16, (queries,), generator=g)], corners[torch.randint(0, 16, (bank,), generator=g)],
            torch.randint(0, num_classes, (bank,), generator=g))


# --- the classifier ----------------------------------------------------------------------------------------

@pytest.mark.parametrize('k', [1, 5, 20, 200])
def test_weighted_knn_equals_a_float64_brute_force_on_the_same_features(k):
    queries, bank, labels = random_features()
    reference = reference_ranked_classes(queries, bank, labels, 7, k, 0.07)
    assert torch.equal(ranked(queries, bank, labels, 7, k), reference)


@pytest.mark.parametrize('k', [1, 3, 20, 100])
def test_ties_in_similarity_and_in_votes_are_broken_as_the_brute_force_breaks_them(k):
    queries, bank, labels = tied_features()
    reference = reference_ranked_classes(queries, bank, labels, 5, k, 0.07)
    for bank_chunk in (1, 7, 64, 200):
        assert torch.equal(ranked(queries, bank, labels, 5, k, bank_chunk=bank_chunk), reference), bank_chunk


def test_the_lower_bank_index_is_the_nearer_of_equal_neighbours_and_the_lower_class_wins_equal_votes():
    bank = torch.tensor([[1., 0.], [1., 0.], [1., 0.], [0., 1.]])  # three copies of the same image
    labels = torch.tensor([2, 1, 0, 3])
    sims, index = knn.nearest_neighbours(torch.tensor([[1., 0.]]), bank, 2, bank_chunk=1)
    assert index.tolist() == [[0, 1]] and sims.tolist() == [[1., 1.]]
    assert ranked(torch.tensor([[1., 0.]]), bank, labels, 4, 1)[0, 0] == 2  # index 0 is the nearest
    assert ranked(torch.tensor([[1., 0.]]), bank, labels, 4, 2)[0].tolist()[:2] == [1, 2]  # equal votes: class 1


def test_a_class_no_neighbour_voted_for_is_never_in_the_top_5():
    queries, bank, labels = random_features(num_classes=10)
    top = ranked(queries, bank, labels, 10, 1)
    assert (top[:, 1:] == knn.NO_CLASS).all()  # k = 1: one class has evidence, the other four places stay empty
    # the instance: top-5 equals top-1 with one neighbour (was 53.3 against 6.7, filled in by class index)
    hits = knn.knn_hits(F.normalize(queries, dim=1), labels[:60], F.normalize(bank, dim=1), labels, 10, [1, 3], 0.07)
    assert hits[1][1] == hits[1][0]
    three = ranked(queries, bank, labels, 10, 3)
    assert ((three != knn.NO_CLASS).sum(dim=1) <= 3).all() and (three[:, 3:] == knn.NO_CLASS).all()


@pytest.mark.parametrize('temperature', [1e-3, 1e-6, 1e-100, cli.MIN_TEMPERATURE, 1e6, math.inf])
def test_every_accepted_temperature_gives_finite_weights_and_the_limit_ranking(temperature):
    """exp(sim / T) overflows to inf for T below ~1/709 (float64), and every class then ties at inf: the ranking
    fell back to class index. As T -> 0 the nearest neighbour's class must lead (then the next nearest class, ...);
    as T -> inf every vote weighs the same (a majority vote)."""
    queries, bank, labels = random_features(queries=30, bank=200)
    queries, bank = F.normalize(queries, dim=1), F.normalize(bank, dim=1)
    sims, index = knn.nearest_neighbours(queries, bank, 20)
    top = knn.ranked_classes(sims, labels[index], 7, temperature)
    for row, neighbours, got in zip(sims.tolist(), labels[index].tolist(), top.tolist()):
        voted = sorted(set(neighbours))
        if temperature < 1:  # distinct similarities: classes in the order of their nearest neighbour
            expected = sorted(voted, key=lambda c: -max(s for s, n in zip(row, neighbours) if n == c))
        elif temperature < math.inf:  # every weight near 1: the count, then the summed similarity
            expected = sorted(voted, key=lambda c: (-neighbours.count(c), -sum(s for s, n in zip(row, neighbours)
                                                                              if n == c)))
        else:  # every weight exactly 1: a majority vote, ties to the lower class
            expected = sorted(voted, key=lambda c: (-neighbours.count(c), c))
        assert got == (expected + [-1] * 5)[:5]


@pytest.mark.parametrize('temperature', [1e-30, 1e-40, 1e-300])
def test_float32_votes_mps_uses_stay_finite_for_the_smallest_temperatures(temperature):
    queries, bank, labels = random_features(queries=30, bank=200)
    queries, bank = F.normalize(queries, dim=1), F.normalize(bank, dim=1)
    sims, index = knn.nearest_neighbours(queries, bank, 20)
    for dtype in (torch.float32, torch.float64):
        top = knn.ranked_classes(sims, labels[index], 7, temperature, votes_dtype=dtype)
        assert (top[:, 0] == labels[index[:, 0]]).all()  # the nearest neighbour's class first, never NO_CLASS
        voted = [len(set(row)) for row in labels[index].tolist()]
        assert [(row != knn.NO_CLASS).sum().item() for row in top] == [min(v, 5) for v in voted]


def test_any_chunk_sizes_give_the_same_neighbours_and_classes():
    queries, bank, labels = random_features(queries=37, bank=251)
    queries, bank = F.normalize(queries, dim=1), F.normalize(bank, dim=1)
    expected = knn.nearest_neighbours(queries, bank, 20, bank_chunk=251)
    for bank_chunk in (1, 19, 20, 64, 250, 4096):
        sims, index = knn.nearest_neighbours(queries, bank, 20, bank_chunk)
        assert torch.equal(index, expected[1]), bank_chunk
        # float32 products of another width may round the last bit otherwise (the BLAS kernel changes)
        torch.testing.assert_close(sims, expected[0], rtol=0, atol=1e-6)
    hits = [knn.knn_hits(queries, torch.arange(37) % 7, bank, labels, 7, [10, 20], 0.07, qc, bc)  # normalised above
            for qc, bc in ((1024, 16384), (5, 13), (1, 1))]
    assert all(torch.equal(h[20], hits[0][20]) and torch.equal(h[10], hits[0][10]) for h in hits)


def test_a_k_above_the_bank_size_is_refused():
    queries, bank, _ = random_features(bank=10)
    with pytest.raises(ValueError, match='k 11 is more than the 10 images of the bank'):
        knn.nearest_neighbours(queries, bank, 11)


def test_the_chunk_memory_bound_grows_with_the_chunks_not_the_bank():
    assert knn.chunk_bytes(1024, 16384, 20) == 1024 * 16384 * 24 + 1024 * 2 * 20 * 12 * 2  # 384 MiB
    assert knn.chunk_bytes(1024, 16384, 200) < 400 * 2 ** 20


# --- features ----------------------------------------------------------------------------------------------

def test_features_are_the_mae_encoder_output_with_nothing_masked_and_the_classifier_features(images):
    torch.manual_seed(0)
    mae = models_mae.mae_vit_tiny_patch16(**TINY_MAE).eval()
    with torch.no_grad():
        latent, _, ids_restore = mae.forward_encoder(images, mask_ratio=0.0)
        patches = torch.gather(latent[:, 1:], 1, ids_restore[..., None].expand(-1, -1, latent.shape[-1]))
        torch.testing.assert_close(knn.encoder_features(mae, images, 'cls'), latent[:, 0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(knn.encoder_features(mae, images, 'mean'), patches.mean(1), rtol=1e-5, atol=1e-5)
        for global_pool, feature in ((False, 'cls'), (True, 'mean')):
            vit = models_vit.vit_tiny_patch16(num_classes=0, global_pool=global_pool, embed_dim=64, depth=2,
                                              num_heads=4, **TINY).eval()
            assert torch.equal(knn.encoder_features(vit, images, feature), vit.forward_features(images))
    with pytest.raises(ValueError, match='no final norm for the class token'):
        knn.encoder_features(vit, images, 'cls')


def test_features_draw_no_random_number(images):
    mae = models_mae.mae_vit_tiny_patch16(**TINY_MAE).eval()
    state = torch.get_rng_state()
    with torch.no_grad():
        knn.encoder_features(mae, images, 'mean')
    assert torch.equal(torch.get_rng_state(), state)  # forward_encoder(mask_ratio=0) would draw its noise


# --- datasets, labels by name, refusals --------------------------------------------------------------------

def test_val_folders_are_labelled_by_train_class_names_and_capped_in_file_order(texture_data, tmp_path):
    subset = tmp_path / 'subset'
    shutil.copytree(os.path.join(texture_data, 'train'), subset / 'train')
    classes = sorted(os.listdir(subset / 'train'))
    shutil.copytree(os.path.join(texture_data, 'val', classes[2]), subset / 'val' / classes[2])
    data = knn.read_knn_data(str(subset), 32, train_per_class=5, val_per_class=3)
    assert data.classes == classes and set(data.queries.targets) == {2}  # its index in train/, not 0
    assert len(data.bank) == 4 * 5 and [t for _, t in data.bank.samples] == sorted(list(range(4)) * 5)
    first = sorted(os.listdir(subset / 'train' / classes[0]))[:5]
    assert [os.path.basename(p) for p, t in data.bank.samples if t == 0] == first


@pytest.fixture(scope='module')
def knn_places(tmp_path_factory, texture_data):
    tmp_path = tmp_path_factory.mktemp('knn_places')
    unknown = tmp_path / 'unknown'
    shutil.copytree(texture_data, unknown)
    (unknown / 'val' / 'zebra').mkdir()
    shutil.copy(next((unknown / 'val' / 'checkerboard').iterdir()), unknown / 'val' / 'zebra' / 'z.png')
    torch.manual_seed(0)
    mae = models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=4)
    torch.save({'model': mae.state_dict()}, tmp_path / 'mae.pth')
    pooled = models_vit.vit_tiny_patch16(img_size=32, patch_size=4, num_classes=4, global_pool=True)
    torch.save({'model': pooled.state_dict()}, tmp_path / 'pooled.pth')
    torch.save({'model': {'w': torch.zeros(1)}}, tmp_path / 'weights.pth')
    return dict(data=texture_data, unknown=unknown, mae=tmp_path / 'mae.pth', pooled=tmp_path / 'pooled.pth',
                weights=tmp_path / 'weights.pth', tmp=tmp_path)


KNN_CASES = [
    ([], '--resume: required; the checkpoint whose encoder is evaluated'),
    (['--resume', '{mae}', '--nb_knn', '129'], '--nb_knn 129: the memory bank ({data}/train) holds 128 images'),
    (['--resume', '{mae}', '--nb_knn', '20', '0'], '--nb_knn [20, 0]: every k must be >= 1'),
    (['--resume', '{mae}', '--temperature', '0'], '--temperature 0.0: must be >= 1e-300'),
    (['--resume', '{mae}', '--temperature', '5e-324'], '--temperature 5e-324: must be >= 1e-300'),
    (['--resume', '{mae}', '--temperature', 'nan'], '--temperature nan: must be >= 1e-300'),
    (['--resume', '{mae}', '--max_image_pixels', '-1'], '--max_image_pixels -1: must be >= 0 (0: no limit)'),
    (['--resume', '{mae}', '--bank_chunk', '0'], '--bank_chunk 0: must be in [1, 16777216]'),
    (['--resume', '{mae}', '--data_path', '{unknown}'],
     "{unknown}/val: class folder zebra is not among {unknown}/train's 4 classes"),
    (['--resume', '{pooled}', '--feature', 'cls'],
     '--feature cls: {pooled} is a global-pool classifier; its class token has no final norm'),
    (['--resume', '{weights}'], '--resume {weights}: it holds no ViT weights'),
    (['--resume', '{mae}', '--model', 'vit_small_patch16'], '{mae} does not fit --model vit_small_patch16: embed '
     'dim 192 and 12 blocks in the checkpoint, 384 and 12 in the model'),
    (['--resume', '{mae}', '--model', 'vit_gigantic'], '--model vit_gigantic: unknown ViT encoder'),
    (['--resume', '{mae}', '--patch_size', '8'], '{mae} does not fit --model mae_vit_tiny_patch16: patch 4 px in the '
     'checkpoint, 8 px in the model (pass --patch_size 4)'),
]


@pytest.mark.parametrize('flags, expected', KNN_CASES, ids=[' '.join(c[0]) for c in KNN_CASES])
def test_main_knn_refuses_bad_input_in_one_line_with_exit_2(flags, expected, knn_places, capsys):
    argv = ['--data_path', knn_places['data'], *TINY_KNN_ARGS] + [f.format(**knn_places) for f in flags]
    code, out, err = run_in_process(main_knn, argv, capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith('error: ' + expected.format(**knn_places)), err[0]
    assert 'device:' not in out and 'Position interpolate' not in out  # refused before anything is done


MONITOR_CASES = [
    (['--knn_data_path', '{tmp}/nowhere'], '--knn_data_path {tmp}/nowhere: no such folder'),
    (['--knn_data_path', '{unknown}'], "{unknown}/val: class folder zebra is not among {unknown}/train's 4 classes"),
    (['--knn_data_path', '{data}', '--knn_k', '21', '--knn_train_per_class', '5'],
     '--knn_k 21: the memory bank ({data}/train, at most 5 per class) holds 20 images'),
    (['--knn_data_path', '{data}', '--knn_every', '0'], '--knn_every 0: must be >= 1'),
    (['--knn_data_path', '{data}', '--knn_temperature', '-1'], '--knn_temperature -1.0: must be >= 1e-300'),
    (['--knn_every', '1'], '--knn_every 1: the k-NN monitor is off without --knn_data_path'),
]


@pytest.mark.parametrize('flags, expected', MONITOR_CASES, ids=[' '.join(c[0]) for c in MONITOR_CASES])
def test_main_pretrain_refuses_a_bad_monitor_before_any_work(flags, expected, knn_places, capsys, tmp_path):
    out_dir = tmp_path / 'out'
    argv = ['--data_path', knn_places['data'], '--output_dir', out_dir, *TINY_PRETRAIN_ARGS]
    code, _, err = run_in_process(main_pretrain, argv + [f.format(**knn_places) for f in flags], capsys)
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith('error: ' + expected.format(**knn_places)), err[0]
    assert not out_dir.exists()


# --- main_knn on every kind of checkpoint ------------------------------------------------------------------

def knn_args(*argv):
    return cli.parse_with(main_knn.get_args_parser(), [str(a) for a in argv])


def evaluate_checkpoint(path, data_path, *flags):
    """main_knn.main's steps in this process, without its start-up (which installs signal handlers)."""
    args = knn_args('--resume', path, '--data_path', data_path, *TINY_KNN_ARGS, *flags)
    encoder = main_knn.build_encoder(args, load_checkpoint(str(path)))
    data = knn.read_knn_data(args.data_path, args.input_size, args.train_per_class, args.val_per_class)
    return knn.evaluate(encoder, data, args, Runtime('cpu'), args.feature, args.nb_knn,
                        args.temperature)


def test_a_full_mae_its_encoder_alone_a_classifier_from_it_and_the_mae_itself_give_the_same_numbers(texture_data,
                                                                                                    tmp_path):
    torch.manual_seed(0)
    mae = models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=4)
    encoder = {k: v for k, v in mae.state_dict().items() if not k.startswith('decoder') and k != 'mask_token'}
    classifier = models_vit.vit_tiny_patch16(img_size=32, patch_size=4, num_classes=4, global_pool=False)
    load_weights(classifier, {'model': encoder}, 'encoder.pth', 'vit_tiny_patch16', pretrained=True)
    for name, state in (('full', mae.state_dict()), ('encoder', encoder), ('classifier', classifier.state_dict())):
        torch.save({'model': state}, tmp_path / f'{name}.pth')
    few = ['--train_per_class', '6', '--val_per_class', '3']  # 24 bank images, 12 queries
    results = [evaluate_checkpoint(tmp_path / f'{name}.pth', texture_data, '--nb_knn', '5', '20', *few)
               for name in ('full', 'encoder', 'classifier')]
    assert results[0] == results[1] == results[2]
    args = knn_args('--resume', tmp_path / 'full.pth', '--data_path', texture_data, *TINY_KNN_ARGS)
    direct = knn.evaluate(mae, knn.read_knn_data(texture_data, 32, 6, 3), args, Runtime('cpu'), args.feature,
                          [5, 20], 0.07)
    assert direct == results[0] and mae.training  # the monitor's path, on the MAE itself; its mode restored


def test_main_knn_prints_feature_progress_every_print_freq_batches(texture_data, tmp_path, capsys):
    """--print_freq: a progress line (and a stop check) every N batches of features."""
    torch.manual_seed(0)
    torch.save({'model': models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=4).state_dict()},
               tmp_path / 'mae.pth')
    evaluate_checkpoint(tmp_path / 'mae.pth', texture_data, '--print_freq', '3', '--nb_knn', '5')
    lines = [line.split('] ', 1)[1] for line in capsys.readouterr().out.splitlines() if 'k-NN features' in line]
    train, val = os.path.join(texture_data, 'train'), os.path.join(texture_data, 'val')
    assert [line.split('  eta: ')[0] for line in lines] == ([f'k-NN features of {train}: [{i}/8]' for i in (3, 6)]
                                                            + [f'k-NN features of {val}: [3/4]'])
    assert all(re.fullmatch(r'.*\]  eta: \d+:\d\d:\d\d  img/s: \d+\.\d', line) for line in lines), lines


def test_main_knn_starts_with_a_header_like_the_training_scripts(texture_data, tmp_path):
    """It used to print nothing until its results: on ImageNet, hours of silence."""
    torch.manual_seed(0)
    torch.save({'model': models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=4).state_dict()},
               tmp_path / 'mae.pth')
    proc = run_script('main_knn.py', '--resume', tmp_path / 'mae.pth', '--data_path', texture_data,
                      *TINY_KNN_ARGS, '--nb_knn', '5', '--print_freq', '4', check=True)
    lines = [line.split('] ', 1)[1] for line in proc.stdout.splitlines()]
    assert lines[0] == (f"k-NN evaluation: the mae_vit_tiny_patch16 encoder of {tmp_path / 'mae.pth'}, 32 px, "
                        'mean features; k 5, T 0.07')
    assert lines[1].startswith('data: bank ') and lines[2].startswith('device: cpu')
    assert lines[3].startswith('k-NN features of ') and lines[-2].startswith('* k-NN k=5 ')


def test_main_knn_with_one_neighbour_reports_top_5_equal_to_top_1(tmp_path):
    """The issue's instance: --nb_knn 1 on 10 classes gave top-1 6.667 and top-5 53.333 (the four classes with
    no vote filled in by class index)."""
    from tools.synthetic import CLASSES, make_image_folder
    data = make_image_folder(str(tmp_path / 'data'), {'train': 3, 'val': 3}, size=32, classes=CLASSES[:10])
    torch.manual_seed(0)
    torch.save({'model': models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=4).state_dict()},
               tmp_path / 'mae.pth')
    results = evaluate_checkpoint(tmp_path / 'mae.pth', data, '--nb_knn', '1', '2', '20')
    assert results[1]['top5'] == results[1]['top1'] < 100
    assert results[2]['top1'] <= results[2]['top5'] <= 100 and results[20]['top5'] >= results[20]['top1']


def printed_knn(stdout: str) -> list:
    """The '* k-NN ...' lines of main_knn, without their time stamps."""
    return [line.split('] ', 1)[1] for line in stdout.splitlines() if '* k-NN' in line]


def main_knn_numbers(checkpoint, data_path) -> str:
    """'top-1 X top-5 Y' as main_knn prints it for k=20 (a subprocess, as users run it)."""
    (line,) = printed_knn(run_script('main_knn.py', '--resume', checkpoint, '--data_path', data_path,
                                     *TINY_KNN_ARGS, check=True).stdout)
    return line.split(': ', 1)[1].split(' (')[0]


# --- scripts as users run them -----------------------------------------------------------------------------

@pytest.mark.slow
def test_torchrun_two_processes_give_the_one_process_numbers_counting_each_image_once(tmp_path):
    from tools.synthetic import CLASSES, make_image_folder
    # 6 classes x (30 train, 13 val): shares of 90 and 39 images, an odd count per rank
    data = make_image_folder(str(tmp_path / 'data'), {'train': 30, 'val': 13}, size=32, classes=CLASSES[:6])
    torch.manual_seed(0)
    torch.save({'model': models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=4).state_dict()},
               tmp_path / 'mae.pth')
    argv = ['--resume', tmp_path / 'mae.pth', '--data_path', data, *TINY_KNN_ARGS, '--nb_knn', '1', '10', '20',
            '--feature', 'mean']
    single = run_script('main_knn.py', *argv, check=True)
    double = run_torchrun('main_knn.py', *argv, check=True)
    lines = [printed_knn(proc.stdout) for proc in (single, double)]
    assert len(lines[0]) == 3 and lines[0] == lines[1]
    assert '(78 queries, bank of 180 images, 6 classes)' in lines[0][0]


def pretrain_command(data, out, *extra):
    return ['main_pretrain.py', '--data_path', data, '--output_dir', out, *MONITORED, *extra]


@pytest.fixture(scope='module')
def monitored(texture_data, tmp_path_factory):
    """A tiny 3-epoch pretraining with the monitor on, and the same run without it."""
    root = tmp_path_factory.mktemp('monitor')
    with_monitor = run_script(*pretrain_command(texture_data, root / 'with', '--knn_data_path', texture_data,
                                                *MONITOR), check=True)
    run_script(*pretrain_command(texture_data, root / 'without'), check=True)
    return root, with_monitor


def final_weights(out):
    return load_checkpoint(str(out / 'checkpoint-last.pth'))['model']


@pytest.mark.slow
def test_a_run_with_the_monitor_ends_with_weights_bit_identical_to_one_without(monitored):
    root, _ = monitored
    with_monitor, without = final_weights(root / 'with'), final_weights(root / 'without')
    assert with_monitor.keys() == without.keys()
    assert all(torch.equal(with_monitor[k], without[k]) for k in without)
    losses = [[e['train_loss'] for e in read_json_log(root / name)] for name in ('with', 'without')]
    assert losses[0] == losses[1]


@pytest.mark.slow
def test_the_monitor_logs_knn_accuracy_when_due_and_equals_main_knn_on_the_checkpoint(monitored, texture_data):
    root, proc = monitored
    log = read_json_log(root / 'with')
    assert [('knn_top1' in e, 'knn_top5' in e) for e in log] == [(False, False), (True, True), (True, True)]
    printed = [line.split('] ', 1)[1] for line in proc.stdout.splitlines() if 'k-NN monitor' in line]
    assert [line.split(': top-1 ')[0] for line in printed] == ['k-NN monitor, epoch 1', 'k-NN monitor, epoch 2']
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(root / 'with')).Reload()
    assert [e.step for e in events.Scalars('perf/knn_top1')] == [1, 2]
    # the number logged is what main_knn gives for the epoch's checkpoint
    expected = main_knn_numbers(root / 'with' / 'checkpoint-last.pth', texture_data)
    assert expected == f"top-1 {log[-1]['knn_top1']:.3f} top-5 {log[-1]['knn_top5']:.3f}"


@pytest.mark.slow
def test_kill_9_and_relaunch_with_the_monitor_logs_each_due_epoch_once_and_ends_identical(monitored, texture_data,
                                                                                          tmp_path):
    root, _ = monitored
    out = tmp_path / 'run'
    command = [sys.executable, *pretrain_command(texture_data, out, '--knn_data_path', texture_data, *MONITOR)]
    proc = start_process(command, tmp_path / 'first.log')
    wait_for_line(tmp_path / 'first.log', 'k-NN monitor, epoch 1', proc)  # killed after the monitor, before the save
    proc.kill()
    proc.wait()
    relaunch = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=subprocess_env())
    assert relaunch.returncode == 0, relaunch.stderr[-3000:]
    assert 'Continuing at epoch' in relaunch.stdout
    log, reference = read_json_log(out), read_json_log(root / 'with')
    assert [e['epoch'] for e in log] == [0, 1, 2]
    assert [(e.get('knn_top1'), e.get('knn_top5')) for e in log] == [(e.get('knn_top1'), e.get('knn_top5'))
                                                                      for e in reference]
    resumed, uninterrupted = final_weights(out), final_weights(root / 'with')
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)


@pytest.mark.slow
def test_torchrun_monitor_runs_on_every_rank_and_logs_once_with_the_one_process_number(texture_data, tmp_path):
    out = tmp_path / 'ddp'
    proc = run_torchrun('main_pretrain.py', '--data_path', texture_data, '--output_dir', out, '--epochs', '1',
                        *TINY_PRETRAIN_ARGS, '--knn_data_path', texture_data, *MONITOR, check=True)
    assert proc.stdout.count('k-NN monitor, epoch 0') == 1
    (entry,) = read_json_log(out)
    expected = main_knn_numbers(out / 'checkpoint-last.pth', texture_data)
    assert expected == f"top-1 {entry['knn_top1']:.3f} top-5 {entry['knn_top5']:.3f}"


def test_the_evidence_tool_writes_scikit_learns_digits_as_an_image_folder_with_a_fixed_split(tmp_path):
    from PIL import Image

    from tools import knn_evidence
    assert knn_evidence.write_digits(str(tmp_path)) == {'train': 1000, 'val': 797}
    assert sorted(os.listdir(tmp_path / 'train')) == sorted(os.listdir(tmp_path / 'val')) == [str(d) for d in range(10)]
    assert all(len(os.listdir(tmp_path / 'train' / str(d))) == 100 for d in range(10))
    image = Image.open(tmp_path / 'train' / '0' / '0000.png')  # the first scan of the file is a 0
    assert image.size == (32, 32) and image.mode == 'RGB'


@pytest.mark.slow
def test_the_knn_benchmark_reports_the_monitor_share_of_an_epoch_from_its_measurements(tmp_path):
    out = tmp_path / 'knn.json'
    run_script('-m', 'tools.benchmark', '--knn', '--model', 'mae_vit_tiny_patch16', '--input_size', '32',
               '--patch_size', '4', '--batch_size', '4', '--device', 'cpu', '--knn_bank', '5000', '--knn_queries',
               '64', '--warmup', '1', '--steps', '1', '--windows', '1', '--json', out, check=True)
    result = json.loads(out.read_text())['knn']
    similarity, monitor = result['similarity'], result['monitor']
    assert similarity['bank_images'] == 5000 and similarity['queries'] == 64 and similarity['ns_per_pair'] > 0
    assert monitor['images'] == 30 * 1000  # (20 + 10) per class at the default cap, 1000 classes
    feature_s = result['features']['feature_ms_per_image'] / 1000
    expected = 30_000 * feature_s + 10_000 * 20_000 * similarity['ns_per_pair'] / 1e9
    assert monitor['seconds'] == pytest.approx(expected, rel=1e-9)
    assert monitor['fraction_of_epoch'] == pytest.approx(monitor['seconds'] / monitor['epoch_seconds'], rel=1e-9)
