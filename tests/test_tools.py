"""tools/compare_logs.py (the port acceptance check) and hubconf.py (torch.hub from a local clone)."""
import json

import pytest
import torch
from conftest import ROOT, run_script
from PIL import Image

import models_mae
import models_vit
from tools import compare_logs


def write_log(path, losses, key='train_loss'):
    with open(path, 'w') as f:
        for epoch, loss in enumerate(losses):
            f.write(json.dumps({key: loss, 'train_lr': 1e-4, 'epoch': epoch}) + '\n')
    return path


REFERENCE = [1.20, 0.90, 0.75, 0.66, 0.61, 0.58]


@pytest.mark.parametrize('candidate, code, verdict', [
    (REFERENCE, 0, 'PASS: MRE 0.0000% <= 5.0000% or MAE 0.000e+00 <= 2.000e-04'),
    ([v * 1.03 for v in REFERENCE], 0, 'PASS: MRE 3.0000% <= 5.0000%'),   # within the relative threshold
    ([v + 1e-4 for v in REFERENCE], 0, 'PASS'),                          # within the absolute threshold
    ([v * 1.10 for v in REFERENCE], 1, 'FAIL: MRE 10.0000% > 5.0000% or MAE'),
])
def test_verdict_on_identical_close_and_diverging_curves(tmp_path, capsys, candidate, code, verdict):
    ref = write_log(tmp_path / 'gpu.txt', REFERENCE)
    cand = write_log(tmp_path / 'npu.txt', candidate)
    png = tmp_path / 'curves.png'
    assert compare_logs.main([str(ref), str(cand), '--png', str(png), '--json', str(tmp_path / 'r.json')]) == code
    out = capsys.readouterr().out
    assert verdict in out
    assert len([line for line in out.splitlines() if line.strip()[:1].isdigit()]) == len(REFERENCE)  # per epoch
    image = Image.open(png)
    assert image.size == (800, 650) and len(image.getcolors(2 ** 16)) > 3  # axes, two coloured curves
    result = json.loads((tmp_path / 'r.json').read_text())
    assert result['passed'] == (code == 0) and len(result['rows']) == len(REFERENCE)


def test_errors_are_computed_per_epoch_on_the_shared_epochs():
    result = compare_logs.compare({0: 1.0, 1: 0.5, 2: 0.25}, {0: 1.1, 1: 0.5})
    assert result['epochs'] == [0, 1] and result['missing_in_candidate'] == [2]
    assert result['mean_absolute_error'] == pytest.approx(0.05)
    assert result['mean_relative_error'] == pytest.approx(0.05)


def test_thresholds_are_taken_from_the_command_line(tmp_path, capsys):
    ref = write_log(tmp_path / 'a.txt', REFERENCE)
    cand = write_log(tmp_path / 'b.txt', [v * 1.03 for v in REFERENCE])
    args = [str(ref), str(cand), '--png', str(tmp_path / 'p.png')]
    assert compare_logs.main(args + ['--max_mre', '0.01', '--max_mae', '1e-6']) == 1
    assert compare_logs.main(args + ['--max_mre', '0.04']) == 0


def test_other_keys_and_bad_logs(tmp_path, capsys):
    ref = write_log(tmp_path / 'a.txt', [80.0, 82.0], key='test_acc1')
    cand = write_log(tmp_path / 'b.txt', [80.1, 82.1], key='test_acc1')
    assert compare_logs.main([str(ref), str(cand), '--key', 'test_acc1', '--png', str(tmp_path / 'p.png')]) == 0
    losses = write_log(tmp_path / 'losses.txt', REFERENCE)
    assert compare_logs.main([str(losses), str(tmp_path / 'missing.txt')]) == 2
    (tmp_path / 'junk.txt').write_text('not json\n')
    assert compare_logs.main([str(losses), str(tmp_path / 'junk.txt')]) == 2
    assert compare_logs.main([str(ref), str(cand)]) == 2  # no train_loss in these logs
    err = capsys.readouterr().err
    assert 'missing.txt: no such file' in err and 'junk.txt:1: not a JSON line' in err
    assert 'no "train_loss" values' in err


def test_the_figure_goes_next_to_the_candidate_log_named_for_its_key(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'gpu').mkdir()
    (tmp_path / 'npu').mkdir()
    ref = write_log(tmp_path / 'gpu' / 'log.txt', [80.0, 82.0], key='test_acc1')
    cand = write_log(tmp_path / 'npu' / 'log.txt', [80.1, 82.1], key='test_acc1')
    assert compare_logs.main([str(ref), str(cand), '--key', 'test_acc1']) == 0
    figure = tmp_path / 'npu' / 'compare_test_acc1.png'
    assert f'figure in {figure}' in capsys.readouterr().out
    assert figure.is_file() and sorted(p.name for p in tmp_path.iterdir()) == ['gpu', 'npu']  # nothing in the cwd


def test_a_one_epoch_comparison_draws_both_runs_and_the_error_panel(tmp_path):
    ref = write_log(tmp_path / 'a.txt', [1.0])
    cand = write_log(tmp_path / 'b.txt', [1.01])
    assert compare_logs.main([str(ref), str(cand), '--png', str(tmp_path / 'one.png')]) == 0
    image = Image.open(tmp_path / 'one.png').convert('RGB')
    colours = {colour for _, colour in image.getcolors(2 ** 16)}
    assert (31, 119, 180) in colours and (214, 39, 40) in colours  # the reference's and the candidate's markers


def test_compare_logs_runs_as_a_module_on_real_training_logs(tmp_path):
    ref = write_log(tmp_path / 'a.txt', REFERENCE)
    proc = run_script('-m', 'tools.compare_logs', ref, ref, '--png', tmp_path / 'p.png')
    assert proc.returncode == 0 and 'PASS' in proc.stdout


HUB_MAE = ['mae_vit_tiny_patch16', 'mae_vit_small_patch16', 'mae_vit_base_patch16', 'mae_vit_large_patch16',
           'mae_vit_huge_patch14', 'mae_vit_giant_patch14', 'mae_vit_2b_patch14']
HUB_VIT = ['vit_tiny_patch16', 'vit_small_patch16', 'vit_base_patch16', 'vit_large_patch16', 'vit_huge_patch14',
           'vit_giant_patch14', 'vit_2b_patch14']


def test_hubconf_exposes_every_factory_and_nothing_else():
    import hubconf  # torch.hub.list's rule: public callables of hubconf.py are the entry points
    entries = [name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith('_')]
    assert sorted(entries) == sorted(HUB_MAE + HUB_VIT)


@pytest.mark.parametrize('name', HUB_MAE + HUB_VIT)
def test_torch_hub_load_builds_each_factory(name):
    with torch.device('meta'):  # the architecture only: no memory, no init time
        model = torch.hub.load(ROOT, name, source='local')
    expected = models_mae.MODELS.get(name) or models_vit.MODELS[name]
    with torch.device('meta'):
        reference = expected()
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in reference.state_dict().items()}


def test_torch_hub_load_with_a_checkpoint_and_kwargs(tmp_path):
    torch.manual_seed(0)
    trained = models_vit.vit_tiny_patch16(img_size=32, patch_size=4, num_classes=10)
    torch.save({'model': trained.state_dict()}, tmp_path / 'vit.pth')
    model = torch.hub.load(ROOT, 'vit_tiny_patch16', source='local', checkpoint=str(tmp_path / 'vit.pth'),
                           img_size=32, patch_size=4, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), trained.eval()(x))
    mae = models_mae.mae_vit_tiny_patch16(img_size=32, patch_size=4)
    torch.save({'model': mae.state_dict()}, tmp_path / 'mae.pth')
    loaded = torch.hub.load(ROOT, 'mae_vit_tiny_patch16', source='local', checkpoint=str(tmp_path / 'mae.pth'),
                            img_size=32, patch_size=4)
    assert torch.equal(loaded.decoder_pred.weight, mae.decoder_pred.weight)
    encoder = {k: v for k, v in mae.state_dict().items() if not k.startswith('decoder') and k != 'mask_token'}
    torch.save({'model': encoder}, tmp_path / 'encoder.pth')
    classifier = torch.hub.load(ROOT, 'vit_tiny_patch16', source='local', finetune=str(tmp_path / 'encoder.pth'),
                                img_size=32, patch_size=4, num_classes=3)
    assert torch.equal(classifier.blocks[0].attn.qkv.weight, mae.blocks[0].attn.qkv.weight)


def test_torch_hub_with_a_mismatched_checkpoint_raises_the_clear_error(tmp_path):
    from util.checkpoint_files import CheckpointError
    torch.save({'model': models_vit.vit_tiny_patch16(num_classes=10).state_dict()}, tmp_path / 'vit.pth')
    with pytest.raises(CheckpointError, match='does not fit entry point vit_small_patch16: embed dim 192 and 12 '
                                              'blocks in the checkpoint, 384 and 12 in the model'):
        torch.hub.load(ROOT, 'vit_small_patch16', source='local', checkpoint=str(tmp_path / 'vit.pth'))
