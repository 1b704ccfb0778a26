"""The speed features keep the numbers: grad checkpointing, bf16, compile, fused AdamW selection, and the
benchmarks themselves (the fast JPEG pipeline's decoding and crops are tested with the others, in test_images.py and
test_transforms.py)."""
import json

import numpy as np
import pytest
import torch
from conftest import TINY_MAE, TINY_PRETRAIN_ARGS, read_json_log, run_script

import models_mae
import models_vit
from tools.synthetic import CLASSES, make_image_folder
from util.device import Runtime
from util.optim import make_adamw


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


def test_benchmark_layouts_reads_the_same_images_in_each_layout_and_counts_what_it_opens(tmp_path, capsys):
    from tools import benchmark
    root = make_image_folder(str(tmp_path / 'jpegs'), {'train': 40}, size=96, classes=CLASSES[:2])
    out = tmp_path / 'layouts.json'
    assert benchmark.main(['--layouts', '--data_path', root, '--num_workers', '1', '--input_size', '64',
                           '--device', 'cpu', '--json', str(out)]) == 0
    rows = {row['layout']: row for row in json.loads(out.read_text())['layouts']}
    assert all(row['images'] == 80 and row['num_workers'] == 1 and row['images_per_sec'] > 0 for row in rows.values())
    assert rows['folders']['files_opened'] == 80  # one file per image; one shard, one Parquet file of one row group
    assert rows['shards']['files_opened'] == rows['parquet']['files_opened'] == rows['parquet']['row_groups_read'] == 1
    assert rows['shards']['first_run'] > 0 and rows['shards']['later_run'] > 0
    assert ' shards, 1 worker: ' in capsys.readouterr().out


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
