"""Learning-rate schedule: linear warm-up, then a half-cycle cosine down to min_lr, set every iteration."""
import math
from dataclasses import dataclass


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Learning rate at a fractional epoch (epoch + iteration / iterations_per_epoch)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    # keep this operation order: it reproduces the official schedule bit for bit
    return min_lr + (lr - min_lr) * 0.5 * (1. + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def set_learning_rate(optimizer, lr: float):
    """Every param group's lr, scaled by the group's `lr_scale` (layer decay) if it has one."""
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr * param_group.get('lr_scale', 1.0)


def adjust_learning_rate(optimizer, epoch: float, args) -> float:
    """The official entry point: set every param group's lr for this fractional epoch from args.lr (which the
    caller has set), --min_lr, --warmup_epochs and --epochs. The scripts here use LrSchedule, which leaves args
    as typed."""
    lr = lr_at(epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
    set_learning_rate(optimizer, lr)
    return lr


def effective_batch(args, world_size: int) -> int:
    """Images per optimizer step: --batch_size per process x --accum_iter x processes."""
    return args.batch_size * args.accum_iter * world_size


def effective_lr(args, world_size: int) -> float:
    """The peak learning rate: --lr if given, else blr x effective batch / 256 (the official rule)."""
    return args.lr if args.lr is not None else args.blr * effective_batch(args, world_size) / 256


@dataclass(frozen=True)
class LrSchedule:
    """A run's schedule: the peak `lr` (effective_lr), `warmup_epochs` of linear warm-up, then a cosine down to
    `min_lr` at `epochs`."""
    lr: float
    min_lr: float
    warmup_epochs: float
    epochs: float

    @classmethod
    def of(cls, args, world_size: int) -> 'LrSchedule':
        return cls(effective_lr(args, world_size), args.min_lr, args.warmup_epochs, args.epochs)

    def apply(self, optimizer, epoch: float) -> float:
        """Set every param group's lr for this fractional epoch; returns the unscaled lr."""
        lr = lr_at(epoch, self.lr, self.min_lr, self.warmup_epochs, self.epochs)
        set_learning_rate(optimizer, lr)
        return lr
