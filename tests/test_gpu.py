"""Checks that only a GPU can answer (`pytest -m gpu`; deselected with a one-line note where there is no CUDA).
tools/gpu_check.py runs them and the benchmarks, and writes one JSON report.

MAE_GPU_TESTS_DEVICE=cpu runs the same code on the CPU (the kernel-selection test then fails by design): a way to
check this file itself on a machine without a GPU."""
import os
import subprocess

import pytest
import torch
from conftest import (
    ROOT,
    TINY_CLASSIFIER_ARGS,
    TINY_PRETRAIN_ARGS,
    kill_tree,
    read_json_log,
    run_script,
    start_process,
    torchrun_command,
    wait_for_line,
)

import models_mae
import models_vit
from util.device import Runtime

DEVICE = os.environ.get('MAE_GPU_TESTS_DEVICE', 'cuda')
pytestmark = pytest.mark.gpu
# relative tolerance of a whole-step loss and the cosine of the gradients, per precision, against fp32
TOLERANCE = {'fp16': (5e-3, 0.999), 'bf16': (3e-2, 0.99)}


def runtime(amp: str) -> Runtime:
    return Runtime(DEVICE, 0 if DEVICE == 'cuda' else None, amp)


def loss_and_grads(model, step, amp: str):
    model.zero_grad(set_to_none=True)
    rt = runtime(amp)
    scaler = rt.grad_scaler()
    with rt.autocast():
        loss = step(model)
    (scaler.scale(loss) if scaler else loss).backward()
    scale = scaler.get_scale() if scaler else 1.0
    grads = torch.cat([p.grad.flatten().float() / scale for p in model.parameters() if p.grad is not None])
    return loss.float().item(), grads


@pytest.mark.parametrize('amp', ['fp16', 'bf16'])
@pytest.mark.parametrize('kind', ['pretraining', 'fine-tuning'])
def test_mixed_precision_vit_b_steps_agree_with_fp32(kind, amp):
    torch.manual_seed(0)
    images = torch.randn(8, 3, 224, 224, device=DEVICE)
    if kind == 'pretraining':
        model = models_mae.mae_vit_base_patch16(norm_pix_loss=True).to(DEVICE)
        noise = torch.rand(8, 196, device=DEVICE)

        def step(m):
            return m(images, mask_ratio=0.75, noise=noise)[0]
    else:
        model = models_vit.vit_base_patch16(num_classes=1000, drop_path_rate=0.0).to(DEVICE)
        labels = torch.randint(0, 1000, (8,), device=DEVICE)

        def step(m):
            return torch.nn.functional.cross_entropy(m(images), labels)
    loss32, grads32 = loss_and_grads(model, step, 'off')
    loss, grads = loss_and_grads(model, step, amp)
    rel_tol, min_cosine = TOLERANCE[amp]
    assert abs(loss - loss32) <= rel_tol * abs(loss32), (loss, loss32)
    assert torch.nn.functional.cosine_similarity(grads, grads32, dim=0).item() >= min_cosine


def test_attention_runs_on_a_flash_or_memory_efficient_kernel():
    """Restricted to the fused kernels, SDPA must still run our attention (it raises when none applies), and the
    profiler must see one of them."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    model = models_mae.mae_vit_base_patch16().to(DEVICE)
    images = torch.randn(4, 3, 224, 224, device=DEVICE)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]), runtime('bf16').autocast():
        with torch.profiler.profile() as prof:
            model(images)[0].backward()
    names = ' '.join(event.key.lower() for event in prof.key_averages())
    assert 'flash' in names or 'efficient' in names, names[:500]


def test_compile_gives_the_eager_loss():
    torch.manual_seed(0)
    model = models_mae.mae_vit_base_patch16().to(DEVICE)
    images = torch.randn(8, 3, 224, 224, device=DEVICE)
    noise = torch.rand(8, 196, device=DEVICE)
    eager = model(images, noise=noise)[0].item()
    compiled = torch.compile(model)(images, noise=noise)[0].item()
    assert compiled == pytest.approx(eager, rel=1e-4)


@pytest.mark.slow
def test_fast_decode_pretraining_runs_on_the_gpu(texture_data, tmp_path):
    run_script('main_pretrain.py', '--data_path', texture_data, '--output_dir', tmp_path, '--epochs', '1',
               '--device', DEVICE, '--fast_decode', '--amp', 'bf16', *TINY_PRETRAIN_ARGS[:-2], '--num_workers', '2',
               check=True)
    (entry,) = read_json_log(tmp_path)
    assert entry['train_loss'] > 0


@pytest.mark.slow
def test_torchrun_one_process_kill_and_resume_ends_with_the_uninterrupted_weights(texture_data, tmp_path):
    """nccl on one GPU, fp32: SIGKILL mid-run, relaunch, compare with an uninterrupted run."""
    def command(out):
        return torchrun_command('main_pretrain.py', '--data_path', texture_data, '--output_dir', out, '--epochs', '3',
                                '--save_every_iters', '2', '--device', DEVICE, '--amp', 'off', '--seed', '3',
                                *TINY_PRETRAIN_ARGS, nproc=1)
    reference = subprocess.run([str(c) for c in command(tmp_path / 'reference')], cwd=ROOT, capture_output=True,
                               text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    proc = start_process(command(tmp_path / 'run'), tmp_path / 'first.log')
    wait_for_line(tmp_path / 'first.log', 'Epoch: [1]  [4/8]', proc)
    kill_tree(proc)
    relaunch = start_process(command(tmp_path / 'run'), tmp_path / 'second.log')
    assert relaunch.wait(timeout=600) == 0, open(tmp_path / 'second.log').read()[-3000:]
    assert 'Continuing at epoch' in open(tmp_path / 'second.log').read()
    final = torch.load(tmp_path / 'run' / 'checkpoint-last.pth', weights_only=False)['model']
    expected = torch.load(tmp_path / 'reference' / 'checkpoint-last.pth', weights_only=False)['model']
    worst = max((final[k] - expected[k]).abs().max().item() for k in expected)
    assert worst <= 1e-4, f'max abs difference {worst} (GPU kernels may sum in another order)'


@pytest.mark.slow
def test_evaluation_on_the_gpu_gives_the_cpu_numbers(texture_data, tmp_path):
    torch.manual_seed(0)
    model = models_vit.vit_tiny_patch16(img_size=32, patch_size=4, num_classes=4)
    torch.save({'model': model.state_dict()}, tmp_path / 'w.pth')
    lines = {}
    for device in ('cpu', DEVICE):
        proc = run_script('main_finetune.py', '--eval', '--resume', tmp_path / 'w.pth', '--data_path', texture_data,
                          '--device', device, '--amp', 'off', *TINY_CLASSIFIER_ARGS, check=True)
        lines[device] = next(line for line in proc.stdout.splitlines() if '* Acc@1' in line)
    cpu, gpu = (lines[d].split('* Acc@1 ')[1].split() for d in ('cpu', DEVICE))
    assert cpu[0] == gpu[0] and cpu[2] == gpu[2]  # Acc@1 and Acc@5 to 3 decimals
    assert float(cpu[4]) == pytest.approx(float(gpu[4]), abs=2e-3)  # loss (TF32 convolutions on the GPU)


@pytest.mark.parametrize('name', ['mae_vit_base_patch16', 'mae_vit_large_patch16', 'mae_vit_huge_patch14'])
def test_gradient_checkpointing_lowers_the_peak_memory_of_pretraining_at_batch_64(name):
    """The README's per-GPU batch (64) at the default precision (fp16); peak bytes recorded by the report."""
    peaks = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = models_mae.build_mae(name).to(DEVICE)
        model.set_grad_checkpointing(checkpointing)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        rt = runtime('fp16')
        scaler = rt.grad_scaler()
        rt.reset_peak_memory_stats()
        with rt.autocast():
            loss = model(torch.randn(64, 3, 224, 224, device=DEVICE))[0]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        rt.synchronize()
        peaks[checkpointing] = rt.max_memory_allocated()
        del model, optimizer, loss
    print(f'{name} batch 64 fp16: peak {peaks[False] / 2 ** 30:.1f} GiB, with --grad_checkpointing '
          f'{peaks[True] / 2 ** 30:.1f} GiB')
    assert peaks[True] < 0.8 * peaks[False]
