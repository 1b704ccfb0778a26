"""Random-number state: seeding every generator a run draws from (torch, the device's, numpy, python), and
capturing / restoring them so a resumed run continues the interrupted one's streams exactly."""
import io
import random
from typing import List, Optional

import numpy as np
import torch

from util import distributed
from util.checkpoint_files import SAFE_GLOBALS
from util.distributed import print0


def seed_everything(seed: int):
    """Seed torch (every device), numpy and python's random for this process."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def loader_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of a rank's DataLoader workers in an epoch: their augmentation draws, reproducible on resume."""
    return (seed * 1_000_003 + epoch * 1_009 + rank) % (2 ** 63)


def rng_state(runtime) -> dict:
    """This process's RNG states as tensors and lists, so a checkpoint holding them loads with weights_only."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {'torch': torch.get_rng_state(), 'device': runtime.get_rng_state(),
            'numpy': [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                      int(np_state[3]), float(np_state[4])],
            'python': [py_state[0], list(py_state[1]), py_state[2]]}


def set_rng_state(state: dict, runtime):
    torch.set_rng_state(state['torch'])
    if state.get('device') is not None:
        runtime.set_rng_state(state['device'])
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state['python']
    random.setstate((version, tuple(internal), gauss_next))


def gather_rng_states(runtime) -> List[torch.Tensor]:
    """Every rank's RNG state, serialised to a uint8 tensor, on every rank (a collective)."""
    buffer = io.BytesIO()
    torch.save(rng_state(runtime), buffer)
    return [torch.frombuffer(bytearray(blob), dtype=torch.uint8)
            for blob in distributed.all_gather_bytes(buffer.getvalue())]


def restore_rng_states(states: Optional[List[torch.Tensor]], saved_world_size: int, runtime):
    """Give this rank the state it had when the checkpoint was taken. At another world size the ranks do not
    correspond, so the streams start afresh from the seed (training continues exactly otherwise)."""
    if not states:
        return
    if saved_world_size != distributed.get_world_size():
        print0('World size changed since the checkpoint: RNG streams start afresh (training continues exactly '
               'otherwise)')
        return
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        state = torch.load(io.BytesIO(states[distributed.get_rank()].numpy().tobytes()), weights_only=True)
    set_rng_state(state, runtime)
