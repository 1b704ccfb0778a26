"""The speed features keep the numbers: grad checkpointing, bf16, compile, device-side normalisation, the fast
JPEG pipeline (same crops as the reference transform), fused AdamW selection, and the benchmark itself."""
import json
import os

import numpy as np
import pytest
import torch
from conftest import PHOTO, TINY_MAE, TINY_PRETRAIN_ARGS, read_json_log, run_script
from PIL import Image
from torchvision import transforms

import models_mae
import models_vit
from tools.synthetic import CLASSES, make_image_folder
from util.datasets import build_image_folder
from util.device import Runtime
from util.images import decode_image_tensor as decode_rgb_tensor
from util.optim import make_adamw
from util.transforms import (
    BICUBIC,
    TensorRandomResizedCrop,
    build_fast_pretrain_transform,
    build_pretrain_transform,
    to_device_normalized,
)


def grads_and_loss(model, images, noise):
    loss, _, _ = model(images, noise=noise)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_grad_checkpointing_gives_the_same_loss_and_gradients(images):
    noise = torch.rand(3, 64)
    torch.manual_seed(0)
    plain = models_mae.mae_vit_tiny_patch16(**TINY_MAE)
    torch.manual_seed(0)
    checkpointed = models_mae.mae_vit_tiny_patch16(**TINY_MAE)
    checkpointed.set_grad_checkpointing(True)
    loss_a, grads_a = grads_and_loss(plain, images, noise)
    loss_b, grads_b = grads_and_loss(checkpointed, images, noise)
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5), name


def test_grad_checkpointing_in_the_classifier_keeps_the_gradients(images):
    torch.manual_seed(0)
    model = models_vit.vit_tiny_patch16(img_size=32, patch_size=4, depth=2, num_classes=3)
    model(images).sum().backward()
    expected = model.patch_embed.proj.weight.grad.clone()
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(images).sum().backward()
    assert torch.allclose(model.patch_embed.proj.weight.grad, expected, atol=1e-6)


def test_bf16_autocast_step_stays_close_to_fp32(images):
    torch.manual_seed(0)
    model = models_mae.mae_vit_tiny_patch16(**TINY_MAE)
    noise = torch.rand(3, 64)
    fp32, _, _ = model(images, noise=noise)
    with Runtime('cpu', None, 'bf16').autocast():
        bf16, pred, _ = model(images, noise=noise)
    assert pred.dtype == torch.bfloat16
    assert abs(bf16.item() - fp32.item()) < 0.02 * fp32.item()


def test_device_normalisation_of_uint8_batches_is_bit_identical_to_totensor_normalize():
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
    official = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406),
                                                                               (0.229, 0.224, 0.225))])
    reference = torch.stack([official(p) for p in pictures])
    uint8 = torch.stack([transforms.PILToTensor()(p) for p in pictures])
    assert torch.equal(to_device_normalized(uint8, torch.device('cpu')), reference)
    assert to_device_normalized(reference, torch.device('cpu')) is reference  # float batches pass through


def test_uint8_pretrain_transform_gives_the_official_crops():
    img = Image.open(PHOTO).convert('RGB')
    torch.manual_seed(5)
    official = torch.stack([build_pretrain_transform(64)(img) for _ in range(10)])
    torch.manual_seed(5)
    ours = torch.stack([build_pretrain_transform(64, uint8_output=True)(img) for _ in range(10)])
    assert ours.dtype == torch.uint8
    assert torch.equal(to_device_normalized(ours, torch.device('cpu')), official)


def test_fast_decode_reads_the_same_pixels_as_pil_and_falls_back_for_png(tmp_path):
    with open(PHOTO, 'rb') as f:
        tensor = decode_rgb_tensor(f)
    assert torch.equal(tensor, transforms.PILToTensor()(Image.open(PHOTO).convert('RGB')))
    png = tmp_path / 'x.png'
    Image.open(PHOTO).convert('L').save(png)
    with open(png, 'rb') as f:
        gray = decode_rgb_tensor(f)
    assert gray.shape == (3, 170, 256) and torch.equal(gray[0], gray[1])


def test_fast_decode_reports_a_truncated_jpeg_as_a_bad_image(tmp_path):
    bad = tmp_path / 'truncated.jpg'
    bad.write_bytes(open(PHOTO, 'rb').read()[:2000])
    with pytest.raises(OSError, match='JPEG decoding failed'), open(bad, 'rb') as f:
        decode_rgb_tensor(f)


def test_fast_crops_draw_the_same_boxes_as_the_reference_transform_and_match_its_pixels():
    """Crop statistics: with the same seed every crop box (and flip) is the reference transform's, and the
    resized pixels agree with PIL's bicubic to a fraction of a grey level on average."""
    pil = Image.open(PHOTO).convert('RGB')
    tensor = transforms.PILToTensor()(pil)
    reference = transforms.RandomResizedCrop(64, scale=(0.2, 1.0), interpolation=BICUBIC)
    ours = TensorRandomResizedCrop(64, scale=(0.2, 1.0))
    boxes_ref, boxes_ours, diffs = [], [], []
    for seed in range(100):
        torch.manual_seed(seed)
        boxes_ref.append(reference.get_params(pil, reference.scale, reference.ratio))
        torch.manual_seed(seed)
        expected = transforms.PILToTensor()(reference(pil)).float()
        torch.manual_seed(seed)
        boxes_ours.append(ours.get_params(tensor, ours.scale, ours.ratio))
        torch.manual_seed(seed)
        diffs.append((ours(tensor).float() - expected).abs().mean().item())
    assert boxes_ours == boxes_ref
    areas = np.array([h * w for _, _, h, w in boxes_ours]) / (256 * 170)
    assert 0.2 <= areas.min() and areas.max() <= 1.0 and 0.3 < areas.mean() < 0.7  # scale (0.2, 1) spread
    assert np.mean(diffs) < 0.25 and np.max(diffs) < 1.0


def test_fast_pretrain_transform_flips_like_the_reference():
    tensor = transforms.PILToTensor()(Image.open(PHOTO).convert('RGB'))
    flips = []
    for seed in range(20):
        torch.manual_seed(seed)
        out = build_fast_pretrain_transform(64)(tensor)
        torch.manual_seed(seed)
        ours = TensorRandomResizedCrop(64, scale=(0.2, 1.0))(tensor)
        flips.append(not torch.equal(out, ours))
    assert 3 < sum(flips) < 17 and out.dtype == torch.uint8 and out.shape == (3, 64, 64)


def test_fast_decode_dataset_yields_uint8_crops(tmp_path):
    root = make_image_folder(str(tmp_path), {'train': 2}, size=48, classes=CLASSES[:2])
    dataset = build_image_folder(os.path.join(root, 'train'), build_fast_pretrain_transform(32),
                                 decode=decode_rgb_tensor)
    img, target = dataset[3]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32) and target == 1


def test_adamw_auto_is_the_torch_default_and_fused_or_foreach_on_request():
    params = [torch.nn.Parameter(torch.zeros(2))]
    auto = make_adamw(params, 1e-3, 'auto', 'cuda').defaults
    assert auto['fused'] is None and auto['foreach'] is None  # torch decides, as in the official code
    assert make_adamw(params, 1e-3, 'fused', 'cpu').defaults['fused'] is True
    assert make_adamw(params, 1e-3, 'fused', 'npu').defaults['foreach'] is True  # no fused kernel there
    assert make_adamw(params, 1e-3, 'foreach', 'cpu').defaults['foreach'] is True


def test_fused_adamw_matches_the_default_to_rounding():
    torch.manual_seed(0)
    weights = torch.randn(64, 64)
    results = []
    for impl in ('auto', 'fused'):
        p = torch.nn.Parameter(weights.clone())
        optimizer = make_adamw([p], 1e-2, impl, 'cpu')
        for step in range(5):
            p.grad = torch.sin(weights * (step + 1))
            optimizer.step()
        results.append(p.detach())
    assert torch.allclose(results[0], results[1], atol=1e-6)


@pytest.mark.slow
def test_bf16_and_fast_decode_pretraining_runs(texture_data, tmp_path):
    run_script('main_pretrain.py', '--data_path', texture_data, '--output_dir', tmp_path, '--epochs', '1',
               '--amp', 'bf16', '--fast_decode', *TINY_PRETRAIN_ARGS, check=True)
    (entry,) = read_json_log(tmp_path)
    assert np.isfinite(entry['train_loss'])


@pytest.mark.slow
def test_compile_runs_a_tiny_pretraining(texture_data, tmp_path):
    proc = run_script('main_pretrain.py', '--data_path', texture_data, '--output_dir', tmp_path, '--epochs', '1',
                      '--compile', *TINY_PRETRAIN_ARGS, check=True)
    assert 'torch.compile: enabled on cpu' in proc.stdout
    checkpoint = torch.load(tmp_path / 'checkpoint-0.pth', weights_only=False)
    assert not any(k.startswith('_orig_mod') for k in checkpoint['model'])  # the plain module's keys


@pytest.mark.slow
def test_benchmark_step_compare_and_pipeline_write_json(tmp_path):
    out = tmp_path / 'b.json'
    proc = run_script('-m', 'tools.benchmark', '--model', 'mae_vit_tiny_patch16', '--input_size', '32',
                      '--patch_size', '4', '--batch_size', '4', '--device', 'cpu', '--compare', '--warmup', '1',
                      '--steps', '2', '--windows', '2', '--json', out, check=True)
    assert 'ours / eager attention:' in proc.stdout
    result = json.loads(out.read_text())
    sdpa, eager = result['steps']
    assert (sdpa['attention'], eager['attention']) == ('sdpa', 'eager')
    assert sdpa['images_per_sec'] > 0 and sdpa['gflops_per_image'] == pytest.approx(eager['gflops_per_image'])
    assert 0 < sdpa['fraction_of_matmul_peak'] and result['matmul_peak_tflops'] > 0
    root = make_image_folder(str(tmp_path / 'jpegs'), {'train': 40}, size=96, classes=CLASSES[:2])
    proc = run_script('-m', 'tools.benchmark', '--pipeline', '--data_path', root, '--num_workers', '0',
                      '--input_size', '64', '--pipeline_batches', '2', '--device', 'cpu', '--json', out, check=True)
    rows = json.loads(out.read_text())['pipeline']
    assert len(rows) == 4 and rows[0]['vs_baseline'] == 1.0 and all(r['images_per_sec'] > 0 for r in rows)


@pytest.mark.slow
def test_the_gpu_check_tool_runs_its_benchmarks_and_writes_the_report(tmp_path):
    """On the CPU with tiny models: every benchmark the report needs runs and lands in the summary."""
    report_path = tmp_path / 'report.json'
    proc = run_script('-m', 'tools.gpu_check', '--device', 'cpu', '--tiny', '--skip_tests', '--num_workers', '1',
                      '--json', report_path, check=True)
    report = json.loads(report_path.read_text())
    figures = report['summary']
    assert figures['synthetic_images_per_sec'] > 0 and figures['speedup_vs_official'] > 0
    assert figures['end_to_end_vs_synthetic'] > 0 and figures['finetune_images_per_sec'] > 0
    assert [t['what'] for t in figures['targets']][0].startswith('MAE ViT-B/16 bf16 pretraining')
    assert 'error' not in json.dumps(report['benchmarks']) and 'report:' in proc.stdout
