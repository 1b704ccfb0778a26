"""Runs a training script with a fault injected where a test chooses, as a real run would meet one:
python tests/nan_injection.py main_pretrain.py ARGS...   (also as torchrun's script)

NAN_AT=EPOCH:ITERATION[,EPOCH:ITERATION...]   the training iterations whose forward pass goes wrong
NAN_MODE=once            the loss is NaN there, the first time only (a transient fault: a rollback's replay skips
                         that step, and a resumed run does not meet it again)
NAN_MODE=from            the loss is NaN at the (first) iteration and every later one (no rollback mends it)
NAN_MODE=gradients       once: the loss stays finite, its gradients are NaN
NAN_RANK=R               only rank R meets it (default: every rank)
KILL_AT=EPOCH:ITERATION  SIGKILL the run when it first gets there, unless the file KILL_MARKER exists (it is made
                         first), so the relaunched run goes through
The models are untouched otherwise: the forward's output is multiplied by NaN (or passed through a function whose
backward gives NaN)."""
import os
import runpy
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models_mae  # noqa: E402
import models_vit  # noqa: E402
from util import progress  # noqa: E402

CURRENT = {'at': None}  # (epoch, iteration) of the training step in progress
MET = set()  # the (epoch, iteration)s met with a fault already


def positions(variable: str) -> list:
    value = os.environ.get(variable)
    return [tuple(int(x) for x in item.split(':')) for item in value.split(',')] if value else []


class NanGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float('nan')


def fault_here() -> bool:
    at, where = positions('NAN_AT'), CURRENT['at']
    rank = os.environ.get('NAN_RANK')
    if not at or where is None or not torch.is_grad_enabled():
        return False
    if rank is not None and int(os.environ.get('RANK', '0')) != int(rank):
        return False
    if os.environ.get('NAN_MODE', 'once') == 'from':
        return where >= at[0]
    if where not in at or where in MET:
        return False
    MET.add(where)
    return True


def spoil(x: torch.Tensor) -> torch.Tensor:
    if os.environ.get('NAN_MODE') == 'gradients':
        return NanGradient.apply(x)
    return x * float('nan')


def patch_forward(cls, first_output_only: bool):
    forward = cls.forward

    def faulty(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        if not fault_here():
            return out
        return (spoil(out[0]), *out[1:]) if first_output_only else spoil(out)
    cls.forward = faulty


def patch_iterate():
    iterate = progress.EpochProgress.iterate

    def tracked(self, loader, accum_iter):
        for it, is_update, batch in iterate(self, loader, accum_iter):
            CURRENT['at'] = (self.epoch, it)
            kill_at, marker = positions('KILL_AT'), os.environ.get('KILL_MARKER')
            if (self.epoch, it) in kill_at and marker and not os.path.exists(marker):
                open(marker, 'w').close()
                os.kill(os.getpid(), signal.SIGKILL)
            yield it, is_update, batch
    progress.EpochProgress.iterate = tracked


if __name__ == '__main__':
    patch_forward(models_mae.MaskedAutoencoderViT, first_output_only=True)  # (loss, pred, mask)
    patch_forward(models_vit.VisionTransformer, first_output_only=False)  # logits
    patch_iterate()
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name='__main__')
