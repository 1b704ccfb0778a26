"""What the three training scripts share around their engine calls: the epoch sequence (resume position,
reshuffling, unreadable-image budget, clean stops, non-finite loss advice), the optimizer and the output dir."""
import glob
import json
import os

import torch
from timm.layers import trunc_normal_

import models_vit
from util import distributed, preemption
from util.checkpoint import load_pretrained_encoder
from util.datasets import BadImageLog, DataError, start_epoch_of
from util.distributed import print0
from util.logs import truncate_log
from util.progress import NonFiniteLossError

def make_adamw(param_groups, args, runtime, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW as the official recipe sets it up. 'auto' is torch's own choice (foreach on accelerators: the
    official numbers); 'fused' is one kernel per step where the backend has it (CUDA, MPS, CPU), equal to
    rounding."""
    impl = getattr(args, 'adamw_impl', 'auto')
    kwargs = {}
    if impl == 'fused' and runtime.type not in ('cuda', 'mps', 'cpu'):
        print0(f'--adamw_impl fused: not available on {runtime.type}; using foreach')
        impl = 'foreach'
    if impl == 'fused':
        kwargs['fused'] = True
    elif impl == 'foreach':
        kwargs['foreach'] = True
    elif impl == 'loop':
        kwargs['foreach'] = False
    return torch.optim.AdamW(param_groups, lr=args.lr, betas=betas, **kwargs)


def build_classifier(args, head_init_std: float, **kwargs) -> models_vit.VisionTransformer:
    """The --model classifier; with --finetune (and not --eval) it starts from an MAE encoder and a fresh head
    drawn from trunc_normal(std=head_init_std): 2e-5 for fine-tuning, 0.01 for linear probing."""
    if args.patch_size:
        kwargs['patch_size'] = args.patch_size
    model = models_vit.build_classifier(args.model, num_classes=args.nb_classes, global_pool=args.global_pool,
                                        img_size=args.input_size, attn_impl=args.attn, **kwargs)
    if args.finetune and not args.eval:
        load_pretrained_encoder(model, args.finetune)
        trunc_normal_(model.head.weight, std=head_init_std)
    return model


def prepare_output_dir(args):
    """Create output_dir on rank 0 and tidy it: remove temporary files of a save that was killed, drop log
    entries of epochs the resumed run will redo, and with --no_auto_resume --overwrite clear the previous run."""
    if args.output_dir and distributed.is_main_process():
        os.makedirs(args.output_dir, exist_ok=True)
        stale = glob.glob(os.path.join(args.output_dir, '.tmp-*'))
        if not args.auto_resume and getattr(args, 'overwrite', False):
            stale += glob.glob(os.path.join(args.output_dir, 'checkpoint-*.pth'))
            stale += [os.path.join(args.output_dir, n) for n in ('log.txt', 'bad_images.txt')]
        for path in stale:
            if os.path.isfile(path):
                os.remove(path)
        truncate_log(args.output_dir, args.start_epoch)
    distributed.barrier()


class EpochLoop:
    """The epochs of a run, from (start_epoch, start_iter). Each epoch reshuffles (seed + epoch) and reseeds the
    loader workers; after each, unreadable images are checked against --max_bad_images."""

    def __init__(self, args, loader, bad_images: BadImageLog, checkpointer):
        self.args = args
        self.loader = loader
        self.bad_images = bad_images
        self.checkpointer = checkpointer
        self.iters_per_epoch = checkpointer.iters_per_epoch
        self.dataset_size = len(loader.dataset)

    def epochs(self):
        for epoch in range(self.args.start_epoch, self.args.epochs):
            start_iter = self.args.start_iter if epoch == self.args.start_epoch else 0
            start_epoch_of(self.loader, epoch, self.args.rank, self.args.seed, skip_batches=start_iter)
            yield epoch, start_iter

    def run(self, train_fn, *args, **kwargs) -> dict:
        """Call the engine's train_one_epoch; a non-finite loss says where the last good checkpoint is."""
        try:
            stats = train_fn(*args, iters_per_epoch=self.iters_per_epoch, **kwargs)
        except NonFiniteLossError as e:
            e.advice = (f'{self.checkpointer.describe_last_good()} With fp16, try --amp bf16; '
                        'else lower --blr or set --clip_grad.')
            raise
        self.check_bad_images()
        return stats

    def check_bad_images(self):
        """Gather every rank's unreadable files; stop (DataError) above the --max_bad_images budget."""
        self.bad_images.collect()
        gathered = distributed.all_gather_bytes(json.dumps(self.bad_images.files).encode())
        for blob in gathered:
            self.bad_images.files.update(json.loads(blob.decode()))
        limit = self.args.max_bad_images
        allowed = int(limit * self.dataset_size) if limit < 1 else int(limit)
        if len(self.bad_images) <= allowed:
            return
        listing = os.path.join(self.args.output_dir, 'bad_images.txt') if self.args.output_dir else ''
        if listing and distributed.is_main_process():
            with open(listing, 'w', encoding='utf-8') as f:
                f.writelines(f'{path}\t{error}\n' for path, error in self.bad_images.files.items())
        shown = ', '.join(list(self.bad_images.files)[:5])
        raise DataError(f'{len(self.bad_images)} unreadable images, more than --max_bad_images allows '
                        f'({allowed}): {shown}{" ..." if len(self.bad_images) > 5 else ""}'
                        + (f' (full list in {listing})' if listing else '')
                        + '; repair or remove them, or raise --max_bad_images')

    def stop_if_signalled(self, epoch: int):
        """After an epoch's checkpoint: exit cleanly if any rank received SIGTERM / SIGUSR1."""
        flag = torch.tensor([float(preemption.stop_requested())], device=distributed.comm_device())
        if distributed.all_reduce_sum(flag).item() > 0 and epoch + 1 < self.args.epochs:
            raise preemption.TrainingInterrupted(preemption.received_signal(), self.checkpointer.last_path)


def report_bad_images(bad_images: BadImageLog) -> int:
    """Collect and count unreadable images (evaluation sets): they were replaced, so say so."""
    bad_images.collect()
    if len(bad_images):
        print0(f'{len(bad_images)} unreadable images were replaced while evaluating')
    return len(bad_images)
