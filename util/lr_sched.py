"""Learning-rate schedule: linear warm-up, then a half-cycle cosine down to min_lr, set every iteration."""
import math


def lr_at(epoch: float, lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """Learning rate at a fractional epoch (epoch + iteration / iterations_per_epoch)."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    # keep this operation order: it reproduces the official schedule bit for bit
    return min_lr + (lr - min_lr) * 0.5 * (1. + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def adjust_learning_rate(optimizer, epoch: float, args) -> float:
    """Set every param group's lr for this fractional epoch, scaled by the group's `lr_scale` if it has one."""
    lr = lr_at(epoch, args.lr, args.min_lr, args.warmup_epochs, args.epochs)
    for param_group in optimizer.param_groups:
        param_group['lr'] = lr * param_group.get('lr_scale', 1.0)
    return lr


def effective_lr(args, world_size: int) -> float:
    """Set args.lr = blr x effective batch / 256 unless --lr was given (the official rule, computed once here;
    the run's header prints the arithmetic). Returns the lr."""
    if args.lr is None:
        args.lr = args.blr * args.batch_size * args.accum_iter * world_size / 256
    return args.lr
