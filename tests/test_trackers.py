"""--report_to: TensorBoard, Weights & Biases and MLflow, with the real packages in their offline modes (W&B's
WANDB_MODE=offline, MLflow's local file store): what log.txt says is what each tracker holds, a killed and resumed
run is one tracker run with each step once, and a missing package or a failing tracker is handled."""
import importlib.machinery
import json
import os
import signal
import struct
import sys
import types
from unittest import mock

import pytest

import main_pretrain
from conftest import (TINY_CLASSIFIER_ARGS, free_port, TINY_PRETRAIN_ARGS, read_json_log, run_in_process, run_script,
                      script_command, start_process, wait_for_line)
from util import flags as cli
from util import trackers
from util.checkpoint_files import load_checkpoint
from util.launch import run_main

INJECT = os.path.join(os.path.dirname(__file__), 'nan_injection.py')


def mlflow_env(tmp_path) -> dict:
    return {'MLFLOW_TRACKING_URI': f'file:{tmp_path / "mlruns"}', 'MLFLOW_ALLOW_FILE_STORE': 'true',
            'MLFLOW_EXPERIMENT_NAME': 'mae-tests'}


def mlflow_runs(tmp_path) -> list:
    """(client, runs) of the tests' experiment, read through MLflow's own client."""
    from mlflow.tracking import MlflowClient
    with mock.patch.dict(os.environ, mlflow_env(tmp_path)):  # the file store is opened with the client
        client = MlflowClient(tracking_uri=mlflow_env(tmp_path)['MLFLOW_TRACKING_URI'])
        experiment = client.get_experiment_by_name('mae-tests')
        return client, client.search_runs([experiment.experiment_id])


def history(client, run_id: str, key: str) -> list:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_mlflow_holds_every_epoch_of_log_txt_once_across_a_kill_and_resume(texture_data, tmp_path):
    """Killed in epoch 1 after a mid-epoch checkpoint: the rerun continues the same MLflow run (its id is in the
    checkpoint) and does not send again what the killed run sent past its checkpoint."""
    out = tmp_path / 'run'
    args = ['main_pretrain.py', '--data_path', texture_data, '--output_dir', out, *TINY_PRETRAIN_ARGS, '--epochs',
            '2', '--print_freq', '2', '--save_every_iters', '4', '--report_to', 'mlflow', 'tensorboard']
    killed = run_script(INJECT, *args, env={**mlflow_env(tmp_path), 'KILL_AT': '1:7',
                                            'KILL_MARKER': str(tmp_path / 'killed')})
    assert killed.returncode == -9, killed.stderr[-2000:]
    client, runs = mlflow_runs(tmp_path)
    sent = history(client, runs[0].info.run_id, 'train_loss')
    assert len(runs) == 1 and len(sent) >= 8 + 6  # epoch 1's iterations 4 and 5 were sent after its checkpoint
    proc = run_script(*args, env=mlflow_env(tmp_path), check=True)
    assert 'Continuing at epoch 1, iteration 4' in proc.stdout  # from the mid-epoch checkpoint
    client, runs = mlflow_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == 'FINISHED' and runs[0].info.run_name == 'run'
    run_id = runs[0].info.run_id
    log = read_json_log(out)
    assert history(client, run_id, 'epoch/train_loss') == [(e['epoch'], e['train_loss']) for e in log]
    assert history(client, run_id, 'epoch/train_lr') == [(e['epoch'], e['train_lr']) for e in log]
    steps = [step for step, _ in history(client, run_id, 'train_loss')]
    assert steps == [int((i / 8 + epoch) * 1000) for epoch in range(2) for i in range(8)]  # each once, none missing
    params = runs[0].data.params
    assert params['model'] == 'mae_vit_tiny_patch16' and params['epochs'] == '2' and params['mask_ratio'] == '0.75'


@pytest.mark.slow
def test_a_resumed_mlflow_run_keeps_its_parameters_notes_changed_ones_and_a_failure_shows(texture_data, tmp_path):
    """MLflow sets a parameter once: --epochs raised on the rerun is kept as a tag and said; the rerun stops on a
    NaN loss (exit 1), and the run shows FAILED, not FINISHED or stopped."""
    out = tmp_path / 'run'
    args = ['main_pretrain.py', '--data_path', texture_data, '--output_dir', out, *TINY_PRETRAIN_ARGS,
            '--report_to', 'mlflow']
    run_script(*args, '--epochs', '1', env=mlflow_env(tmp_path), check=True)
    _, [run] = mlflow_runs(tmp_path)
    assert run.info.status == 'FINISHED'
    proc = run_script(INJECT, *args, '--epochs', '2', env={**mlflow_env(tmp_path), 'NAN_AT': '1:2'})
    assert proc.returncode == 1 and 'Loss is nan at epoch 1, iteration 2' in proc.stderr
    assert (f'MLflow run {run.info.run_id}: parameters are set once; changed since it started, kept as tags '
            'param_changed.<flag>: epochs 1 -> 2') in proc.stdout
    _, [run] = mlflow_runs(tmp_path)
    assert run.info.status == 'FAILED'
    assert run.data.params['epochs'] == '1' and run.data.tags['param_changed.epochs'] == '2'


@pytest.mark.slow
def test_a_resume_from_an_older_checkpoint_goes_on_in_a_new_mlflow_run_holding_the_history_before_it(texture_data,
                                                                                                    tmp_path):
    """Resumed from epoch 0's checkpoint when the run went on to epoch 1: the stopped run's epoch 1 used to be
    skipped as already sent, beside this run's log.txt. MLflow cannot replace it: the run goes on in a new MLflow
    run holding epoch 0, and the old one is ended."""
    out = tmp_path / 'run'
    args = ['main_pretrain.py', '--data_path', texture_data, '--output_dir', out, *TINY_PRETRAIN_ARGS, '--epochs',
            '2', '--report_to', 'mlflow']
    run_script(*args, env=mlflow_env(tmp_path), check=True)
    client, [first] = mlflow_runs(tmp_path)
    proc = run_script(*args, '--resume', out / 'checkpoint-0.pth', '--mask_ratio', '0.5', '--allow_recipe_change',
                      env=mlflow_env(tmp_path), check=True)
    client, runs = mlflow_runs(tmp_path)
    [new] = [run for run in runs if run.info.run_id != first.info.run_id]
    assert (f'MLflow run {first.info.run_id} holds values from step 1000 on that this run replaces (--allow_recipe_'
            f'change): it is ended as killed, and this run goes on in MLflow run {new.info.run_id}, which holds its '
            'values before that point') in proc.stdout
    assert f'MLflow run {new.info.run_id}: parameters are set once; changed since it started' in proc.stdout
    assert new.info.status == 'FINISHED' and new.info.run_name == 'run'
    assert new.data.tags['mae.continues'] == first.info.run_id and new.data.params['mask_ratio'] == '0.75'
    assert new.data.tags['param_changed.mask_ratio'] == '0.5'
    assert client.get_run(first.info.run_id).info.status == 'KILLED'
    log = read_json_log(out)
    assert history(client, new.info.run_id, 'epoch/train_loss') == [(e['epoch'], e['train_loss']) for e in log]
    steps = [step for step, _ in history(client, new.info.run_id, 'train_loss')]
    assert steps == [int((i / 8 + epoch) * 1000) for epoch in range(2) for i in range(8)]
    assert history(client, new.info.run_id, 'train_loss')[:8] == history(client, first.info.run_id, 'train_loss')[:8]
    assert history(client, new.info.run_id, 'train_loss')[8:] != history(client, first.info.run_id, 'train_loss')[8:]
    assert load_checkpoint(str(out / 'checkpoint-last.pth'))['trackers']['mlflow'] == new.info.run_id


def test_mlflow_continues_from_the_runs_newest_checkpoint_and_forks_from_an_older_one_or_another_recipe(
        tmp_path, monkeypatch):
    """Past its newest checkpoint (token 'b') the stopped run sent epoch 1: resumed from that checkpoint, the run
    continues (epoch 1 is not sent twice, though its epoch time differs); from the one before ('a'), or with
    --allow_recipe_change, epoch 1 is another path's: a new run holds epoch 0 and takes the rest."""
    for name, value in mlflow_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    args = cli.parse_with(main_pretrain.get_args_parser(), ['--output_dir', str(tmp_path / 'run'), '--report_to',
                                                            'mlflow'])
    first = trackers.MlflowTracker(args, None, trackers.Resume())
    first.note_checkpoint('a')
    first.log_epoch(0, {'epoch/train_loss': 0.5, 'epoch/train_epoch_time_sec': 3.0})
    first.note_checkpoint('b')
    first.log_epoch(1, {'epoch/train_loss': 0.4, 'epoch/train_epoch_time_sec': 3.0})
    first.close('stopped')
    resumed = trackers.MlflowTracker(args, first.run_id, trackers.Resume(1000, 'b'))
    resumed.log_epoch(1, {'epoch/train_loss': 0.4, 'epoch/train_epoch_time_sec': 4.0})
    resumed.log_epoch(2, {'epoch/train_loss': 0.3, 'epoch/train_epoch_time_sec': 3.5})
    resumed.close('finished')
    client, [run] = mlflow_runs(tmp_path)
    assert history(client, run.info.run_id, 'epoch/train_loss') == [(0, 0.5), (1, 0.4), (2, 0.3)]
    assert history(client, run.info.run_id, 'epoch/train_epoch_time_sec') == [(0, 3.0), (1, 3.0), (2, 3.5)]
    for resume, recipe_changed in ((trackers.Resume(1000, 'a'), False), (trackers.Resume(1000, 'b'), True)):
        args.allow_recipe_change = recipe_changed
        other = trackers.MlflowTracker(args, first.run_id, resume)
        other.log_epoch(1, {'epoch/train_loss': 0.6})
        other.close('finished')
        assert history(client, other.run_id, 'epoch/train_loss') == [(0, 0.5), (1, 0.6)]
        assert client.get_run(other.run_id).data.tags['mae.continues'] == first.run_id
    assert len(mlflow_runs(tmp_path)[1]) == 3


@pytest.mark.slow
def test_a_checkpoints_mlflow_run_missing_from_the_store_is_said_and_a_new_run_started(texture_data, tmp_path):
    out = tmp_path / 'run'
    args = ['main_pretrain.py', '--data_path', texture_data, '--output_dir', out, *TINY_PRETRAIN_ARGS,
            '--report_to', 'mlflow']
    run_script(*args, '--epochs', '1', env=mlflow_env(tmp_path / 'elsewhere'), check=True)
    _, [old] = mlflow_runs(tmp_path / 'elsewhere')
    proc = run_script(*args, '--epochs', '2', env=mlflow_env(tmp_path), check=True)
    store = mlflow_env(tmp_path)['MLFLOW_TRACKING_URI']
    assert (f'MLflow run {old.info.run_id} (of the resumed checkpoint) is not in {store}: this run goes to a new '
            'MLflow run') in proc.stdout
    client, [run] = mlflow_runs(tmp_path)
    assert [step for step, _ in history(client, run.info.run_id, 'epoch/train_loss')] == [1]


@pytest.mark.slow
def test_wandb_offline_history_holds_the_values_of_log_txt(texture_data, tmp_path):
    out = tmp_path / 'run'
    env = {'WANDB_MODE': 'offline', 'WANDB_DIR': str(tmp_path), 'WANDB_PROJECT': 'mae-tests'}
    proc = run_script('main_pretrain.py', '--data_path', texture_data, '--output_dir', out, *TINY_PRETRAIN_ARGS,
                      '--epochs', '2', '--report_to', 'wandb', env=env, check=True)
    assert 'trackers: W&B run ' in proc.stdout
    assert not any(name.startswith('events.out.tfevents') for name in os.listdir(out))  # TensorBoard not asked for
    [path] = [os.path.join(root, name) for root, _, names in os.walk(tmp_path / 'wandb') for name in names
              if name.endswith('.wandb')]
    rows, config = wandb_records(path)
    log = read_json_log(out)
    by_epoch = {row['epoch']: row for row in rows if 'epoch' in row}
    assert sorted(by_epoch) == [0, 1]
    for entry in log:
        assert by_epoch[entry['epoch']]['epoch/train_loss'] == pytest.approx(entry['train_loss'], rel=1e-12)
    assert len([row for row in rows if 'train_loss' in row]) == 2 * 8  # every iteration, as TensorBoard has it
    assert config['model'] == 'mae_vit_tiny_patch16' and config['report_to'] == "['wandb']"


@pytest.mark.slow
def test_a_stopped_wandb_run_ends_before_wandbs_own_exit_step_without_a_false_warning(texture_data, tmp_path):
    """A stop signal saves and exits 143; the W&B run is ended at exit. It was ended after W&B had shut its
    service down, and every stop printed 'warning: --report_to wandb failed (ConnectionResetError ...)'."""
    env = {'WANDB_MODE': 'offline', 'WANDB_DIR': str(tmp_path), 'WANDB_PROJECT': 'mae-tests'}
    log = tmp_path / 'run.log'
    proc = start_process([sys.executable, 'main_pretrain.py', '--data_path', texture_data, '--output_dir',
                          tmp_path / 'run', *TINY_PRETRAIN_ARGS, '--epochs', '50', '--report_to', 'wandb'], log,
                         own_group=True, env=env)
    wait_for_line(log, 'Epoch: [1]', proc)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    output = log.read_text()
    assert 'stopped by SIGTERM; checkpoint saved to' in output
    assert 'warning: --report_to' not in output and 'Traceback' not in output, output[-3000:]


class WandbServer:
    """What a W&B server keeps of a run and gives a resumed one, for the wandb module main_pretrain imports (no
    server can run here): the logged rows, and the next step (`run.step`: one past the last logged)."""

    def __init__(self):
        self.rows = []

    def init(self, id=None, **kwargs):
        server = self

        class Run:
            offline, url, dir = False, 'https://wandb.example/run', '/tmp'

            def __init__(self):
                self.id = id or 'run1'
                self.step = max((step for step, _ in server.rows), default=-1) + 1

            def define_metric(self, *args, **kwargs):
                pass

            def log(self, row, step):
                assert step >= self.step  # W&B drops a step before the run's (with a warning)
                server.rows.append((step, row))
                self.step = step

            def finish(self, exit_code=0):
                pass

        return Run()


def test_wandb_resumed_at_an_epochs_start_sends_its_first_step(texture_data, tmp_path, monkeypatch):
    """The epoch's numbers went at step (epoch + 1) * 1000, the next epoch's first step: a run resumed there got
    run.step 1001 from the server and dropped that step."""
    server = WandbServer()
    wandb = types.ModuleType('wandb')
    wandb.__spec__, wandb.init = importlib.machinery.ModuleSpec('wandb', None), server.init
    monkeypatch.setitem(sys.modules, 'wandb', wandb)
    args = ['--data_path', texture_data, '--output_dir', str(tmp_path / 'run'), *TINY_PRETRAIN_ARGS,
            '--report_to', 'wandb']
    for epochs in ('1', '2'):
        run_main(main_pretrain.main, cli.parse_with(main_pretrain.get_args_parser(), [*args, '--epochs', epochs]))
    steps = [step for step, row in server.rows if 'train_loss' in row]
    assert steps == [int((i / 8 + epoch) * 1000) for epoch in range(2) for i in range(8)]
    assert [(step, row['epoch']) for step, row in server.rows if 'epoch' in row] == [(999, 0), (1999, 1)]


def wandb_records(path: str):
    """The history rows and the config of an offline W&B run file: a LevelDB-style log (32 KiB blocks of records
    with a 7-byte header: checksum, length, type) of Record protobufs, after a 7-byte W&B header."""
    from wandb.proto import wandb_internal_pb2
    with open(path, 'rb') as f:
        data = f.read()
    assert data[:4] == b':W&B'
    rows, config, parts, position, block = [], {}, [], 7, 32768
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack('<IHB', data[position:position + 7])
        parts.append(data[position + 7:position + 7 + length])
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last part of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b''.join(parts))
            parts = []
            if record.WhichOneof('record_type') == 'history':
                rows.append({item_key(item): json.loads(item.value_json) for item in record.history.item})
            elif record.WhichOneof('record_type') == 'run':
                config.update({item_key(item): json.loads(item.value_json) for item in record.run.config.update})
    return rows, config


def item_key(item) -> str:
    return item.key or '/'.join(item.nested_key)  # a name with '/' is kept as its parts


@pytest.mark.slow
def test_fine_tuning_sends_its_evaluation_to_mlflow_as_log_txt_has_it(texture_data, pretrained_checkpoint, tmp_path):
    out = tmp_path / 'finetune'
    run_script('main_finetune.py', '--data_path', texture_data, '--output_dir', out, '--finetune',
               pretrained_checkpoint, '--epochs', '1', *TINY_CLASSIFIER_ARGS, '--report_to', 'mlflow',
               env=mlflow_env(tmp_path), check=True)
    client, [run] = mlflow_runs(tmp_path)
    [entry] = read_json_log(out)
    for key in ('test_acc1', 'test_acc5', 'test_loss', 'max_accuracy', 'n_parameters', 'test_num_images'):
        name = trackers.epoch_scalar_name(key)
        assert history(client, run.info.run_id, name) == [(0, pytest.approx(entry[key]))], key
    evaluated = run_script('main_finetune.py', '--eval', '--resume', out / 'checkpoint-0.pth', '--data_path',
                           texture_data, '--model', 'vit_tiny_patch16', '--num_workers', '0', '--report_to', 'mlflow',
                           env=mlflow_env(tmp_path), check=True)
    assert '--eval: nothing is sent to mlflow (--report_to is for training runs; the evaluation is printed)' in \
        evaluated.stdout
    assert len(mlflow_runs(tmp_path)[1]) == 1


@pytest.fixture
def pretrained_checkpoint(texture_data, tmp_path):
    out = tmp_path / 'pretrain'
    run_script('main_pretrain.py', '--data_path', texture_data, '--output_dir', out, *TINY_PRETRAIN_ARGS,
               '--epochs', '1', '--report_to', 'none', check=True)
    assert sorted(os.listdir(out)) == ['checkpoint-0.pth', 'checkpoint-last.pth', 'log.txt', 'run_details.txt']
    return out / 'checkpoint-0.pth'


@pytest.mark.parametrize('package', ['wandb', 'mlflow'])
def test_a_tracker_whose_package_is_missing_is_one_line_and_exit_2(texture_data, tmp_path, monkeypatch, capsys,
                                                                   package):
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed: importlib finds no module
    code, _, errors = run_in_process(main_pretrain, ['--data_path', texture_data, '--output_dir', tmp_path / 'out',
                                                     *TINY_PRETRAIN_ARGS, '--report_to', 'tensorboard', package],
                                     capsys)
    assert code == 2 and errors == [f'error: --report_to {package}: the {package} package is not installed; pip '
                                    f'install {package} (or drop {package} from --report_to)']
    assert not (tmp_path / 'out').exists()
    code, _, errors = run_in_process(main_pretrain, ['--data_path', texture_data, '--output_dir', tmp_path / 'out',
                                                     *TINY_PRETRAIN_ARGS, '--report_to', 'none', 'tensorboard'],
                                     capsys)
    assert code == 2 and errors == ['error: --report_to none tensorboard: none means no tracker; give it alone']


def test_a_tracker_that_cannot_start_is_refused_before_anything_is_written(texture_data, tmp_path, monkeypatch,
                                                                          capsys):
    monkeypatch.delenv('MLFLOW_ALLOW_FILE_STORE', raising=False)
    monkeypatch.setenv('MLFLOW_TRACKING_URI', f'file:{tmp_path / "mlruns"}')  # refused by MLflow 3 without it
    code, _, errors = run_in_process(main_pretrain, ['--data_path', texture_data, '--output_dir', tmp_path / 'out',
                                                     *TINY_PRETRAIN_ARGS, '--report_to', 'mlflow'], capsys)
    assert code == 2 and len(errors) == 1 and errors[0].startswith('error: --report_to mlflow: could not start its '
                                                                   'run (MlflowException: '), errors
    assert errors[0].endswith('file:./mlruns with MLFLOW_ALLOW_FILE_STORE=true)')
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_launched_as_slurm_does_a_tracker_that_cannot_start_stops_every_rank(texture_data, tmp_path):
    """Only rank 0 starts tracker runs: its refusal left rank 1 waiting for it forever at the next collective (srun
    starts each rank itself and, unlike torchrun, does not end the others when one fails)."""
    env = {**mlflow_env(tmp_path), 'MLFLOW_ALLOW_FILE_STORE': 'false', 'SLURM_NTASKS': '2', 'MASTER_ADDR': '127.0.0.1',
           'MASTER_PORT': str(free_port())}
    command = script_command('main_pretrain.py', '--data_path', texture_data, '--output_dir', tmp_path / 'out',
                             *TINY_PRETRAIN_ARGS, '--report_to', 'mlflow')
    ranks = [start_process(command, tmp_path / f'rank{rank}.log', env={**env, 'SLURM_PROCID': str(rank)})
             for rank in range(2)]
    try:
        codes = [rank.wait(timeout=120) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    logs = [(tmp_path / f'rank{rank}.log').read_text() for rank in range(2)]
    assert codes == [2, 2], logs
    assert 'error: --report_to mlflow: could not start its run' in logs[0]
    assert 'error: --report_to: rank 0 could not start a tracker run (its error is above)' in logs[1]
    assert not (tmp_path / 'out').exists()


def test_a_tracker_failing_mid_run_warns_once_and_training_goes_on(texture_data, tmp_path, monkeypatch, capsys):
    """MLflow's store goes away after the first scalar (a network or quota error): one warning, the run finishes,
    log.txt and TensorBoard are complete."""
    for name, value in mlflow_env(tmp_path).items():
        monkeypatch.setenv(name, value)
    sent = []

    def fail_after_the_first(self, name, value, step):
        if sent:
            raise ConnectionError('quota exceeded')
        sent.append(step)
        self.log_batch(metrics=self.unsent({name: value}, step))

    monkeypatch.setattr(trackers.MlflowTracker, 'add_scalar', fail_after_the_first)
    out = tmp_path / 'out'
    run_main(main_pretrain.main, cli.parse_with(main_pretrain.get_args_parser(), [
        '--data_path', texture_data, '--output_dir', str(out), *TINY_PRETRAIN_ARGS, '--epochs', '2',
        '--report_to', 'mlflow', 'tensorboard']))
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == ['warning: --report_to mlflow failed (ConnectionError: quota exceeded); the run goes on without '
                      'it (log.txt and the checkpoints do not depend on it)']
    assert [e['epoch'] for e in read_json_log(out)] == [0, 1] and (out / 'checkpoint-1.pth').is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out)).Reload()
    assert len(events.Scalars('train_loss')) == 16 and [e.step for e in events.Scalars('epoch/train_loss')] == [0, 1]
    client, [run] = mlflow_runs(tmp_path)
    assert history(client, run.info.run_id, 'train_loss') == [(0, pytest.approx(read_first_loss(out)))]
    assert run.info.status == 'FAILED'  # ended where the tracker still could, not left running
    # and still named in the checkpoints: a resumed run continues it
    assert load_checkpoint(str(out / 'checkpoint-1.pth'))['trackers']['mlflow'] == run.info.run_id


def read_first_loss(out) -> float:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    return EventAccumulator(str(out)).Reload().Scalars('train_loss')[0].value
