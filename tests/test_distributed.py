"""Distributed start-up: launcher detection, and real 2-process runs on gloo via torchrun and SLURM variables."""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, free_port, run_torchrun, subprocess_env

from util.distributed import LaunchInfo, detect_launch, first_slurm_host

WORKER = os.path.join(ROOT, 'tests', 'dist_worker.py')


def test_torchrun_variables_win_over_slurm():
    env = {'RANK': '3', 'WORLD_SIZE': '8', 'LOCAL_RANK': '1', 'MASTER_ADDR': 'h0', 'MASTER_PORT': '1234',
           'SLURM_PROCID': '0', 'SLURM_NTASKS': '1'}
    assert detect_launch(env) == LaunchInfo(3, 8, 1, 'torchrun', 'h0', '1234')


def test_slurm_variables_give_rank_world_local_rank_and_the_first_host():
    env = {'SLURM_PROCID': '5', 'SLURM_NTASKS': '16', 'SLURM_LOCALID': '1',
           'SLURM_JOB_NODELIST': 'gpu[007-008,012]'}
    assert detect_launch(env) == LaunchInfo(5, 16, 1, 'slurm', 'gpu007', '29500')


def test_a_single_slurm_task_is_a_single_process():
    assert detect_launch({'SLURM_PROCID': '0', 'SLURM_NTASKS': '1'}).launcher == 'single'


def test_openmpi_variables_are_read():
    env = {'OMPI_COMM_WORLD_RANK': '2', 'OMPI_COMM_WORLD_SIZE': '4', 'OMPI_COMM_WORLD_LOCAL_RANK': '0',
           'MASTER_ADDR': 'h1'}
    assert detect_launch(env) == LaunchInfo(2, 4, 0, 'openmpi', 'h1', '29500')


def test_no_launcher_means_one_process():
    assert detect_launch({}) == LaunchInfo()


@pytest.mark.parametrize('nodelist, host', [('node01', 'node01'), ('gpu[003-005,009],cpu1', 'gpu003'),
                                            ('n[1-2]-ib', 'n1-ib'), ('a,b', 'a'), ('x[7]', 'x7')])
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def read_results(out_dir):
    return [json.load(open(os.path.join(out_dir, f'rank{r}.json'))) for r in range(2)]


def check_two_ranks(results, launcher):
    for rank, result in enumerate(results):
        assert result['launcher'] == launcher and result['rank'] == rank and result['world_size'] == 2
        assert result['backend'] == 'gloo'
        assert result['sum'] == 3.0  # 1.0 + 2.0
        assert result['loss_count'] == 4 and result['loss_global_avg'] == pytest.approx((1 + 3 + 2 + 6) / 4)
        assert result['main'] == (rank == 0)
        # rank 0 logged 1, 2 and rank 1 logged 2, 4 before the save
        assert result['resumed_loss'] == pytest.approx(9 / 4) and result['resumed_loss_per_rank'] == [1.5, 3.0]


@pytest.mark.slow
def test_torchrun_two_processes_all_reduce_a_metric_on_gloo(tmp_path):
    run_torchrun(WORKER, tmp_path, timeout=180, check=True)
    check_two_ranks(read_results(tmp_path), 'torchrun')


@pytest.mark.slow
def test_slurm_style_two_processes_all_reduce_a_metric_on_gloo(tmp_path):
    env = subprocess_env(dict(SLURM_NTASKS='2', SLURM_JOB_NODELIST='localhost', MASTER_PORT=str(free_port())))
    procs = [subprocess.Popen([sys.executable, WORKER, str(tmp_path)], cwd=ROOT, text=True,
                              env=dict(env, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
    check_two_ranks(read_results(tmp_path), 'slurm')
