"""Fully sharded training (--fsdp, FSDP2 over gloo on the CPU): the numbers of DDP, the official checkpoint
format, exact kill-and-resume, resume at another process count, and the memory each process holds."""
import json

import pytest
import torch
from conftest import (
    TINY_CLASSIFIER_ARGS,
    TINY_PRETRAIN_ARGS,
    kill_tree,
    read_json_log,
    run_in_process,
    run_script,
    run_torchrun,
    start_process,
    torchrun_command,
    wait_for_line,
)

import models_mae
import models_vit

MODEL = ['--model', 'mae_vit_tiny_patch16', '--input_size', '32', '--patch_size', '4', '--num_workers', '0']


def pretrain_flags(batch_size: int, accum_iter: int, epochs: int = 2) -> list:
    return ['--epochs', str(epochs), '--warmup_epochs', '1', '--blr', '1.6e-2', '--seed', '1', *MODEL,
            '--batch_size', str(batch_size), '--accum_iter', str(accum_iter), '--print_freq', '2']


# 2 processes x 8 images, 2 accumulation steps (effective batch 32): 4 optimizer steps per epoch on 128 images
PRETRAIN = pretrain_flags(8, 2)


def weights(out):
    return torch.load(out / 'checkpoint-last.pth', weights_only=False)


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope='module')
def ddp_and_fsdp_pretraining(texture_data, tmp_path_factory):
    out = tmp_path_factory.mktemp('fsdp')
    monitor = ['--knn_data_path', texture_data, '--knn_every', '1']  # the k-NN monitor reads root weights directly
    run_torchrun('main_pretrain.py', '--data_path', texture_data, '--output_dir', out / 'ddp', *PRETRAIN, *monitor,
                 check=True)
    run_torchrun('main_pretrain.py', '--data_path', texture_data, '--output_dir', out / 'fsdp', '--fsdp',
                 '--grad_checkpointing', *PRETRAIN, *monitor, check=True)
    return out / 'ddp', out / 'fsdp'


@pytest.mark.slow
def test_fsdp_pretraining_gives_the_ddp_losses_and_weights(ddp_and_fsdp_pretraining):
    ddp, fsdp = ddp_and_fsdp_pretraining
    for a, b in zip(read_json_log(ddp), read_json_log(fsdp)):
        assert a['train_loss'] == pytest.approx(b['train_loss'], rel=1e-6)
        assert (a['knn_top1'], a['knn_top5']) == (b['knn_top1'], b['knn_top5'])
    difference = max_difference(weights(ddp)['model'], weights(fsdp)['model'])
    print(f'max |FSDP - DDP| after 8 steps of pretraining: {difference:.2e}')
    assert difference <= 1e-5  # fp32 rounding: the gradient sums happen in another order


@pytest.mark.slow
def test_an_fsdp_checkpoint_is_the_official_format_and_loads_without_fsdp(ddp_and_fsdp_pretraining, texture_data,
                                                                         tmp_path):
    ddp, fsdp = ddp_and_fsdp_pretraining
    checkpoint = weights(fsdp)
    model = models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=4)
    model.load_state_dict(checkpoint['model'], strict=True)
    ours, theirs = checkpoint['optimizer'], weights(ddp)['optimizer']
    assert list(ours['state']) == list(theirs['state'])  # integer ids in param-group order, as torch saves them
    assert [g['params'] for g in ours['param_groups']] == [g['params'] for g in theirs['param_groups']]
    # continued without --fsdp, on one process: the optimizer state loads into a plain AdamW
    run_script('main_pretrain.py', '--data_path', texture_data, '--output_dir', tmp_path, '--resume',
               fsdp / 'checkpoint-0.pth', *pretrain_flags(16, 2, epochs=3), '--allow_recipe_change', check=True)
    assert [e['epoch'] for e in read_json_log(tmp_path)] == [1, 2]


@pytest.mark.slow
def test_an_fsdp_run_continues_at_another_process_count(ddp_and_fsdp_pretraining, texture_data, tmp_path):
    _, fsdp = ddp_and_fsdp_pretraining
    # 2 processes x 8 x accum 2 = 1 process x 8 x accum 4: the same effective batch, so no recipe change
    proc = run_torchrun('main_pretrain.py', '--data_path', texture_data, '--output_dir', tmp_path, '--fsdp',
                        '--resume', fsdp / 'checkpoint-last.pth', *pretrain_flags(8, 4, epochs=3), nproc=1,
                        check=True)
    assert 'Continuing at epoch 2' in proc.stdout and 'World size changed' in proc.stdout
    assert [e['epoch'] for e in read_json_log(tmp_path)] == [2]


@pytest.mark.slow
def test_kill_and_resume_under_fsdp_ends_with_the_uninterrupted_weights(ddp_and_fsdp_pretraining, texture_data,
                                                                        tmp_path):
    _, uninterrupted = ddp_and_fsdp_pretraining
    command = torchrun_command('main_pretrain.py', '--data_path', texture_data, '--output_dir', tmp_path / 'run',
                               '--fsdp', '--grad_checkpointing', '--save_every_iters', '2', *PRETRAIN)
    proc = start_process(command, tmp_path / 'first.log')
    wait_for_line(tmp_path / 'first.log', 'Epoch: [1]  [4/8]', proc)
    kill_tree(proc)
    relaunch = start_process(torchrun_command(*command[command.index('main_pretrain.py'):]), tmp_path / 'second.log')
    assert relaunch.wait(timeout=600) == 0, open(tmp_path / 'second.log').read()[-3000:]
    assert 'Continuing at epoch 1, iteration' in open(tmp_path / 'second.log').read()  # a mid-epoch checkpoint
    assert max_difference(weights(tmp_path / 'run')['model'], weights(uninterrupted)['model']) == 0.0


@pytest.mark.slow
def test_fsdp_fine_tuning_with_layer_decay_mixup_and_clipping_gives_the_ddp_numbers(texture_data, tmp_path):
    torch.manual_seed(0)
    torch.save({'model': models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=4).state_dict()}, tmp_path / 'e.pth')
    flags = ['--data_path', texture_data, '--finetune', tmp_path / 'e.pth', '--epochs', '1', '--mixup', '0.8',
             '--cutmix', '1.0', '--clip_grad', '1.0', '--layer_decay', '0.65', '--dist_eval', '--blr', '5e-3',
             *TINY_CLASSIFIER_ARGS[:-6], '--batch_size', '8', '--print_freq', '2', '--nb_classes', '4']
    run_torchrun('main_finetune.py', '--output_dir', tmp_path / 'ddp', *flags, check=True)
    run_torchrun('main_finetune.py', '--output_dir', tmp_path / 'fsdp', '--fsdp', *flags, check=True)
    (a,), (b,) = read_json_log(tmp_path / 'ddp'), read_json_log(tmp_path / 'fsdp')
    assert a['train_loss'] == pytest.approx(b['train_loss'], rel=1e-6) and a['test_acc1'] == b['test_acc1']
    difference = max_difference(weights(tmp_path / 'ddp')['model'], weights(tmp_path / 'fsdp')['model'])
    print(f'max |FSDP - DDP| after 8 fine-tuning steps: {difference:.2e}')
    assert difference <= 1e-5


def test_fsdp_needs_a_launcher(texture_data, tmp_path, capsys):
    import main_pretrain
    code, _, err = run_in_process(main_pretrain, ['--data_path', texture_data, '--output_dir', tmp_path / 'out',
                                                  '--fsdp', *TINY_PRETRAIN_ARGS], capsys)
    assert code == 2 and err == ['error: --fsdp: shards over the processes of a launch; start the run with torchrun '
                                 '(e.g. torchrun --nproc_per_node=8 ...) or SLURM']


@pytest.mark.parametrize('factory, width, depth, heads, mlp, params', [
    (models_vit.vit_giant_patch14, 1408, 40, 16, 6144, 1.01e9),
    (models_vit.vit_2b_patch14, 2560, 24, 32, 10240, 1.89e9),
    (models_mae.mae_vit_giant_patch14, 1408, 40, 16, 6144, 1.04e9),
    (models_mae.mae_vit_2b_patch14, 2560, 24, 32, 10240, 1.92e9)])
def test_the_large_factories_have_the_published_shapes(factory, width, depth, heads, mlp, params):
    with torch.device('meta'):
        model = factory()
    block = model.blocks[0]
    assert (model.patch_embed.proj.out_channels, len(model.blocks), block.attn.num_heads) == (width, depth, heads)
    assert block.mlp.fc1.out_features == mlp and model.patch_embed.patch_size == (14, 14)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.01)
    if hasattr(model, 'decoder_blocks'):  # the official 512-d x 8 decoder, MLP ratio 4
        assert (model.decoder_embed.out_features, len(model.decoder_blocks)) == (512, 8)
        assert model.decoder_blocks[0].mlp.fc1.out_features == 2048


@pytest.mark.slow
def test_the_memory_benchmark_shows_fsdp_holding_half_per_process_on_two(tmp_path):
    out = tmp_path / 'memory.json'
    run_script('-m', 'tools.benchmark', '--memory', '--model', 'mae_vit_tiny_patch16', '--input_size', '32',
               '--patch_size', '4', '--device', 'cpu', '--memory_processes', '1', '2', '--json', out, check=True)
    rows = {(r['sharding'], r['processes']): r for r in json.loads(out.read_text())['memory']}
    assert rows['ddp', 2]['total_bytes'] == rows['ddp', 1]['total_bytes'] == rows['fsdp', 1]['total_bytes']
    assert rows['fsdp', 2]['total_bytes'] == pytest.approx(rows['ddp', 2]['total_bytes'] / 2, rel=0.01)
    assert rows['ddp', 1]['bytes_per_parameter'] == pytest.approx(16, rel=0.01)  # 4 weights + 4 grads + 8 AdamW
