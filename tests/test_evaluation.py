"""Evaluation: labels by class name (a val split holding some classes scores against the run's list), each image
counted once at any process count and batch size, and --eval reading its sizes off the checkpoint."""

from types import SimpleNamespace

import pytest
import torch
from conftest import (
    COLOURS,
    EVAL_FLAGS,
    TINY_CLASSIFIER_ARGS,
    accuracy_line,
    colour_classifier,
    colour_folder,
    read_json_log,
    run_in_process,
    run_script,
    run_torchrun,
    save_classifier,
)

import main_finetune
import main_linprobe
import main_pretrain
import models_vit

SCRIPTS = {'main_pretrain.py': main_pretrain, 'main_finetune.py': main_finetune, 'main_linprobe.py': main_linprobe}


# --- 1. labels by class name -------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_val_subset_is_scored_against_the_train_class_indices(tmp_path):
    data = colour_folder(tmp_path / 'data', {'train': dict.fromkeys('abcd', 1), 'val': {'b': 1, 'd': 1}})
    weights = save_classifier(tmp_path / 'released_format.pth', colour_classifier())  # no class list stored
    proc = run_script('main_finetune.py', '--eval', '--resume', weights, '--data_path', data, *EVAL_FLAGS, check=True)
    assert '* Acc@1 100.000' in accuracy_line(proc.stdout)  # b -> output 1, d -> output 3, as in train/


@pytest.mark.slow
def test_eval_uses_the_class_list_stored_in_the_checkpoint_without_a_train_folder(tmp_path):
    data = colour_folder(tmp_path / 'data', {'val': {'b': 2, 'd': 1}})
    weights = save_classifier(tmp_path / 'ours.pth', colour_classifier(), classes='abcd')
    proc = run_script('main_finetune.py', '--eval', '--resume', weights, '--data_path', data, *EVAL_FLAGS, check=True)
    assert '* Acc@1 100.000' in accuracy_line(proc.stdout)
    assert 'Accuracy of the network on the 3 test images: 100.000%' in proc.stdout


def test_a_val_class_the_model_does_not_know_is_refused_in_one_line_naming_it(tmp_path, capsys):
    data = colour_folder(tmp_path / 'data', {'val': {'b': 1, 'c': 1}})
    weights = save_classifier(tmp_path / 'ours.pth', colour_classifier(('a', 'b', 'd', 'x')), classes='abdx')
    code, _, err = run_in_process(main_finetune, ['--eval', '--resume', weights, '--data_path', data, *EVAL_FLAGS],
                                  capsys)
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {data / 'val'}: class folder c not among the run's 4 classes (a, b, d, x)")


def test_a_val_subset_without_any_class_list_is_refused(tmp_path, capsys):
    data = colour_folder(tmp_path / 'data', {'val': {'b': 1, 'd': 1}})
    weights = save_classifier(tmp_path / 'released_format.pth', colour_classifier())
    code, _, err = run_in_process(main_finetune, ['--eval', '--resume', weights, '--data_path', data, *EVAL_FLAGS],
                                  capsys)
    assert code == 2 and len(err) == 1
    assert 'holds 2 classes and the model has 4 outputs, but neither the checkpoint nor a train/' in err[0]


@pytest.mark.slow
@pytest.mark.parametrize('script', ['main_finetune.py', 'main_linprobe.py'])
def test_training_logs_the_accuracy_of_a_val_subset_by_class_name_and_stores_the_list(tmp_path, script):
    data = colour_folder(tmp_path / 'data', {'train': dict.fromkeys('abcd', 8), 'val': {'b': 2, 'd': 2}})
    out = tmp_path / 'run'
    run_script(script, '--data_path', data, '--output_dir', out, '--epochs', '1', '--batch_size', '8',
               *TINY_CLASSIFIER_ARGS[:8], '--nb_classes', '4', '--blr', '0.05', check=True)
    (entry,) = read_json_log(out)
    checkpoint = torch.load(out / 'checkpoint-last.pth', weights_only=False)
    assert checkpoint['classes'] == list('abcd')
    model = models_vit.vit_tiny_patch16(img_size=32, patch_size=4, num_classes=4,
                                        global_pool=script == 'main_finetune.py')
    if script == 'main_linprobe.py':
        model = models_vit.add_batchnorm_head(model)
    model.load_state_dict(checkpoint['model'])
    red, blue = (torch.tensor(COLOURS[c], dtype=torch.float32).div(255) for c in 'bd')
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    images = torch.stack([((c - mean) / std).view(3, 1, 1).expand(3, 32, 32) for c in (red, red, blue, blue)])
    predicted = model.eval()(images).argmax(-1)
    expected = 100 * (predicted == torch.tensor([1, 1, 3, 3])).float().mean().item()
    assert entry['test_acc1'] == pytest.approx(expected) and entry['test_num_images'] == 4


# --- 2. distributed evaluation counts every image once --------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('images_per_class', [(4, 4, 4, 3), (1, 0, 0, 0)], ids=['15 images', '1 image'])
def test_dist_eval_on_two_processes_equals_one_process(tmp_path, images_per_class):
    data = colour_folder(tmp_path / 'data', {'val': {c: n for c, n in zip('abcd', images_per_class) if n}})
    torch.manual_seed(3)
    model = models_vit.vit_tiny_patch16(num_classes=4, img_size=32, patch_size=4)
    weights = save_classifier(tmp_path / 'w.pth', model, classes='abcd')
    flags = ['--eval', '--resume', weights, '--data_path', data, *EVAL_FLAGS[:-4], '--batch_size', '2',
             '--nb_classes', '4']
    single = run_script('main_finetune.py', *flags, check=True)
    double = run_torchrun('main_finetune.py', *flags, '--dist_eval', check=True)
    total = sum(images_per_class)
    for proc in (single, double):
        assert f'Accuracy of the network on the {total} test images' in proc.stdout
    acc_single, acc_double = accuracy_line(single.stdout), accuracy_line(double.stdout)
    assert acc_single.split('*')[1] == acc_double.split('*')[1]  # Acc@1, Acc@5 and loss, printed to 3 decimals


def test_evaluate_sums_per_image_and_shards_without_padding(tmp_path):
    from engine_finetune import evaluate
    from util.bad_images import BadImageLog
    from util.datasets import ShardedEvalSampler
    from util.device import Runtime
    shards = [ShardedEvalSampler(15, 2, rank).indices for rank in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(15)) and ShardedEvalSampler(1, 2, 1).indices == []
    torch.manual_seed(0)
    images, targets = torch.randn(5, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0])
    model = models_vit.vit_tiny_patch16(num_classes=4, img_size=32, patch_size=4, depth=1).eval()
    dataset = torch.utils.data.TensorDataset(images, targets)
    dataset.bad_images = BadImageLog()
    loader = torch.utils.data.DataLoader(dataset, batch_size=2)  # batches of 2, 2 and 1
    stats = evaluate(loader, model, Runtime('cpu'), SimpleNamespace(dist_eval=False, max_bad_images=0, print_freq=50,
                                                                    output_dir=''))
    logits = model(images)
    assert stats['num_images'] == 5
    assert stats['loss'] == pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-6)
    assert stats['acc1'] == pytest.approx(100 * (logits.argmax(-1) == targets).float().mean().item())


# --- 3. runs that would take no optimizer step ----------------------------------------------------------------


# --- 5. one decoding for every path ----------------------------------------------------------------------------


# --- 6. inference fits image sizes as evaluation does ---------------------------------------------------------


# --- 7. errors that name the real cause ---------------------------------------------------------------------------


# --- 8. no empty crops ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_reads_image_size_patch_classes_and_pooling_off_the_checkpoint(texture_data, tmp_path):
    torch.manual_seed(0)
    model = models_vit.vit_tiny_patch16(img_size=32, patch_size=4, num_classes=4, global_pool=False)
    torch.save({'model': model.state_dict()}, tmp_path / 'cls_token_32px.pth')
    proc = run_script('main_finetune.py', '--eval', '--resume', tmp_path / 'cls_token_32px.pth', '--data_path',
                      texture_data, '--model', 'vit_tiny_patch16', '--num_workers', '0', check=True)
    assert 'Accuracy of the network on the 64 test images' in proc.stdout
    assert 'Position interpolate' not in proc.stdout  # evaluated at its own 32 px


@pytest.mark.slow
def test_a_process_without_an_evaluation_image_takes_part_in_training_with_dist_eval(tmp_path):
    """Two processes, one val image: under DDP the second process reads none and still adds its (zero) sums."""
    data = colour_folder(tmp_path / 'data', {'train': dict.fromkeys('abcd', 4), 'val': {'b': 1}})
    out = tmp_path / 'run'
    proc = run_torchrun('main_finetune.py', *TINY_CLASSIFIER_ARGS[:-4], '--batch_size', '4', '--nb_classes', '4',
                        '--data_path', data, '--output_dir', out, '--epochs', '1', '--dist_eval', check=True)
    assert 'Accuracy of the network on the 1 test images' in proc.stdout
    assert read_json_log(out)[0]['test_num_images'] == 1
