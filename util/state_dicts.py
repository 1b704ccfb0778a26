"""Matching a checkpoint's weights to a model: the architecture read off a state dict, strict loading whose error
leads with the cause ('patch 8 px in the checkpoint, 4 in the model'), an MAE encoder loaded into a classifier
(--finetune), and position embeddings fitted to another image size (--eval, main_infer). (Over 250 lines: every
way a state dict can misfit a model is explained from the one Architecture read off it, so they stay together.)"""
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn

import models_mae
import models_vit
from util import fsdp as util_fsdp
from util.checkpoint_io import CheckpointError
from util.checkpoint_weights import model_state_from, vit_prefix
from util.distributed import print0
from util.hf_layout import StateDict, count_blocks
from util.pos_embed import interpolate_pos_embed

CLASSIFIER_KINDS = ('classifier', 'linear probe')
KIND_WORDS = {
    'mae': 'an MAE checkpoint (encoder and decoder)',
    'encoder': 'an MAE encoder without its decoder (like mae_pretrain_vit_*.pth)',
    'classifier': 'a classifier (it has head.weight)',
    'linear probe': 'a linear-probe classifier (BatchNorm head: head.0.*, head.1.*)',
}


@dataclass
class Architecture:
    """What a ViT / MAE state dict shows of its model (0 or None where it shows nothing)."""
    kind: str  # a key of KIND_WORDS, or '' when the weights are not a ViT
    embed_dim: int = 0
    depth: int = 0
    patch_size: int = 0
    in_chans: int = 0
    grid: int = 0  # patches per side, from the position table
    num_classes: int = 0
    global_pool: Optional[bool] = None  # classifiers: fc_norm and the patch-token mean, or norm and the class token
    decoder_embed_dim: int = 0
    decoder_depth: int = 0

    @property
    def img_size(self) -> int:
        return self.grid * self.patch_size

    def size_kwargs(self) -> dict:
        """What a factory of models_vit / models_mae needs to rebuild these weights' model: patch size, image size
        and, for classifiers, the class count and pooling (the linear probe's BatchNorm head aside)."""
        kwargs = {'patch_size': self.patch_size}
        if self.grid:
            kwargs['img_size'] = self.img_size
        if self.kind in CLASSIFIER_KINDS:
            kwargs.update(num_classes=self.num_classes, global_pool=self.global_pool)
        return kwargs

    def describe(self) -> str:
        return f'embed dim {self.embed_dim}, {self.depth} blocks, patch {self.patch_size}'


def architecture_of(state: StateDict) -> Architecture:
    """Read the architecture off a ViT classifier or MAE state dict (official key names)."""
    kernel = state.get('patch_embed.proj.weight')
    if kernel is None or kernel.ndim != 4:
        return Architecture('')
    pos_embed = state.get('pos_embed')
    grid = int(round((pos_embed.shape[1] - 1) ** 0.5)) if pos_embed is not None and pos_embed.ndim == 3 else 0
    head = state.get('head.1.weight', state.get('head.weight'))
    if any(k.startswith('decoder_') for k in state):
        kind = 'mae'
    elif 'head.1.weight' in state:
        kind = 'linear probe'
    elif head is not None:
        kind = 'classifier'
    else:
        kind = 'encoder'
    decoder_kernel = state.get('decoder_embed.weight')
    return Architecture(
        kind, embed_dim=kernel.shape[0], depth=count_blocks(state, 'blocks.'), patch_size=kernel.shape[-1],
        in_chans=kernel.shape[1], grid=grid, num_classes=head.shape[0] if head is not None else 0,
        global_pool=('fc_norm.weight' in state) if kind in CLASSIFIER_KINDS else None,
        decoder_embed_dim=decoder_kernel.shape[0] if decoder_kernel is not None else 0,
        decoder_depth=count_blocks(state, 'decoder_blocks.'))


@dataclass(frozen=True)
class Phrasing:
    """How the user sets each size where they are: flags on the command line, keyword arguments in torch.hub."""
    model: str = '--model'
    patch: str = '--patch_size {}'
    img: str = '--input_size {}'
    classes: str = '--nb_classes {}'
    global_pool: str = 'drop --cls_token'
    cls_token: str = 'pass --cls_token'


CLI = Phrasing()
HUB = Phrasing(model='entry point', patch='patch_size={}', img='img_size={}', classes='num_classes={}',
               global_pool='global_pool=True', cls_token='global_pool=False')


def no_vit_cause(state: StateDict) -> str:
    """Why weights are not a ViT's: nothing like one in them, or a ViT under a prefix beside other weights (the
    backbone of a bigger model)."""
    prefix = vit_prefix(state)
    if not prefix:
        return 'it holds no ViT weights (no patch_embed.proj.weight)'
    inside = sum(k.startswith(prefix) for k in state)
    return (f"its ViT weights are under '{prefix}' ({inside} of its {len(state)} keys), beside other weights: it is "
            f'a bigger model holding a ViT; save that ViT alone (its state_dict()) and pass that file')


def kind_cause(theirs: Architecture, ours: Architecture, state: Optional[StateDict] = None) -> str:
    if not theirs.kind:
        return no_vit_cause(state or {})
    if ours.kind == 'mae' and theirs.kind != 'mae':
        return (f'it is {KIND_WORDS[theirs.kind]}, and an MAE needs its encoder and decoder (e.g. '
                'mae_visualize_vit_*.pth, or a checkpoint of main_pretrain.py)')
    if ours.kind in CLASSIFIER_KINDS and theirs.kind in ('mae', 'encoder'):
        return (f'it is {KIND_WORDS[theirs.kind]}, not a trained classifier; fine-tune it first '
                '(main_finetune.py --finetune)')
    if ours.kind == 'classifier' and theirs.kind == 'linear probe':
        return f'it is {KIND_WORDS[theirs.kind]}; evaluate it with main_linprobe.py'
    if ours.kind == 'linear probe' and theirs.kind == 'classifier':
        return f'it is {KIND_WORDS[theirs.kind]} without the linear probe\'s BatchNorm; use main_finetune.py'
    return ''


def size_cause(theirs: Architecture, ours: Architecture, say: Phrasing) -> str:
    """Every size in which the checkpoint and the model differ, each with how to match it, most basic first."""
    causes = []
    if theirs.patch_size != ours.patch_size:
        causes.append(f'patch {theirs.patch_size} px in the checkpoint, {ours.patch_size} px in the model '
                      f'(pass {say.patch.format(theirs.patch_size)})')
    if (theirs.embed_dim, theirs.depth) != (ours.embed_dim, ours.depth):
        causes.append(f'embed dim {theirs.embed_dim} and {theirs.depth} blocks in the checkpoint, {ours.embed_dim} '
                      f'and {ours.depth} in the model (another {say.model})')
    if theirs.in_chans != ours.in_chans:
        causes.append(f'{theirs.in_chans} input channels in the checkpoint, {ours.in_chans} in the model')
    if theirs.grid and theirs.grid != ours.grid and theirs.patch_size == ours.patch_size:
        causes.append(f'a {theirs.grid}x{theirs.grid} patch grid ({theirs.img_size} px) in the checkpoint, '
                      f'{ours.grid}x{ours.grid} ({ours.img_size} px) in the model '
                      f'(pass {say.img.format(theirs.img_size)})')
    if theirs.num_classes != ours.num_classes:
        causes.append(f'{theirs.num_classes} classes in the checkpoint, {ours.num_classes} in the model '
                      f'(pass {say.classes.format(theirs.num_classes)})')
    if theirs.global_pool is not None and ours.global_pool is not None and theirs.global_pool != ours.global_pool:
        causes.append(f'global pooling (fc_norm) in the checkpoint, the class token in the model ({say.global_pool})'
                      if theirs.global_pool else
                      f'the class token in the checkpoint, global pooling (fc_norm) in the model ({say.cls_token})')
    if (theirs.decoder_embed_dim, theirs.decoder_depth) != (ours.decoder_embed_dim, ours.decoder_depth):
        causes.append(f'a {theirs.decoder_embed_dim}-d x {theirs.decoder_depth} decoder in the checkpoint, '
                      f'{ours.decoder_embed_dim}-d x {ours.decoder_depth} in the model')
    return '; '.join(causes)


def describe_keys(model: nn.Module, state: StateDict, limit: int = 6) -> str:
    """'missing 2: head.weight, ...; unexpected 1: ...; shape mismatch (checkpoint vs model) 1: ...'."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f'{k} {tuple(state[k].shape)} vs {tuple(v.shape)}' for k, v in expected.items()
              if k in state and state[k].shape != v.shape]

    def show(keys):
        return ', '.join(keys[:limit]) + (f' (+{len(keys) - limit} more)' if len(keys) > limit else '')
    parts = []
    if missing:
        parts.append(f'missing {len(missing)}: {show(missing)}')
    if unexpected:
        parts.append(f'unexpected {len(unexpected)}: {show(unexpected)}')
    if shapes:
        parts.append(f'shape mismatch (checkpoint vs model) {len(shapes)}: {show(shapes)}')
    return '; '.join(parts)


def misfit_message(model: nn.Module, state: StateDict, path: str, model_name: str, say: Phrasing = CLI) -> str:
    """'<path> does not fit --model <name>: <the cause, in words>; <the keys that do not fit>'."""
    theirs, ours = architecture_of(state), architecture_of(model.state_dict())
    cause = kind_cause(theirs, ours, state) or size_cause(theirs, ours, say)
    keys = describe_keys(model, state)
    return f'{path} does not fit {say.model} {model_name}: ' + '; '.join(part for part in (cause, keys) if part)


def attention_heads(model: nn.Module) -> Dict[str, int]:
    """{'encoder': heads of the first block[, 'decoder': heads of the first decoder block]}."""
    heads = {'encoder': model.blocks[0].attn.num_heads}
    if hasattr(model, 'decoder_blocks') and len(model.decoder_blocks):
        heads['decoder'] = model.decoder_blocks[0].attn.num_heads
    return heads


def check_attention_heads(model: nn.Module, checkpoint: dict, path: str, model_name: str, say: Phrasing = CLI):
    """Weights do not show how many heads split the attention; a Hugging Face config names them
    (checkpoint['attention_heads'], util/hf_layout.py), and another number would compute other outputs."""
    named, ours = checkpoint.get('attention_heads') or {}, attention_heads(model)
    wrong = [f'{n} attention heads in the {part} of the checkpoint, {ours[part]} in the model'
             for part, n in named.items() if part in ours and ours[part] != n]
    if wrong:
        raise CheckpointError(f'{path} does not fit {say.model} {model_name}: {"; ".join(wrong)} (another {say.model})')


def check_heads_up_front(checkpoint: dict, path: str, model_name: str):
    """check_attention_heads against --model built on the meta device (no memory, no init time), before any work."""
    factory = models_mae.MODELS.get(model_name) or models_vit.MODELS.get(model_name)
    if factory is not None and checkpoint.get('attention_heads'):
        with torch.device('meta'):
            check_attention_heads(factory(), checkpoint, path, model_name)


def load_state_strict(model: nn.Module, state: StateDict, path: str, model_name: str, say: Phrasing = CLI):
    """load_state_dict(strict=True), with a one-line error leading with the cause instead of a traceback."""
    if describe_keys(model, state):
        raise CheckpointError(misfit_message(model, state, path, model_name, say))
    if util_fsdp.is_sharded(model):  # --fsdp: the full weights are cut into this rank's shards
        util_fsdp.load_model_state(model, state)
    else:
        model.load_state_dict(state, strict=True)


def fit_pos_embed(model: nn.Module, state: StateDict, path: str):
    """Interpolate state's position tables (in place) to the model's patch grid, or say in one line why not.
    For --finetune, --eval, main_infer and main_knn at another --input_size; resuming a training run stays strict.
    Nothing is resized when the patch sizes differ: the strict load then names the patch size, the real cause."""
    kernel = state.get('patch_embed.proj.weight')
    if kernel is not None and kernel.shape[-1] != model.patch_embed.patch_size[0]:
        return
    for key in ('pos_embed', 'decoder_pos_embed'):
        if hasattr(model, key):
            try:
                interpolate_pos_embed(model, state, key)
            except RuntimeError as e:
                raise CheckpointError(f'{path}: position embeddings cannot be resized ({e})') from None


def load_pretrained_encoder(model: nn.Module, checkpoint: dict, path: str, model_name: str) -> List[str]:
    """Load an encoder-only or full MAE checkpoint (released, ours or converted from Hugging Face), or another
    classifier, into a ViT classifier for --finetune: a head of another shape is dropped, the position embeddings are
    interpolated to the model's grid, and only the head and (with global pooling) fc_norm may be missing. Returns
    the ignored keys."""
    check_attention_heads(model, checkpoint, path, model_name)
    state = model_state_from(checkpoint, path)
    own = model.state_dict()
    for k in ('head.weight', 'head.bias'):
        if k in state and state[k].shape != own[k].shape:
            print0(f'Removing key {k} from pretrained checkpoint (shape {tuple(state[k].shape)} vs '
                   f'{tuple(own[k].shape)})')
            del state[k]
    fit_pos_embed(model, state, path)
    allowed = {'head.weight', 'head.bias', 'fc_norm.weight', 'fc_norm.bias'}
    misfit = [k for k in own if k in state and state[k].shape != own[k].shape]
    missing = sorted(k for k in own if k not in state and k not in allowed)
    if misfit or missing:
        cause = encoder_cause(state, own, missing)
        shapes = ', '.join(f'{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}' for k in misfit[:6])
        keys = (f'shape mismatch (checkpoint vs model) {len(misfit)}: {shapes}' if misfit
                else f'missing {len(missing)} encoder keys: {", ".join(missing[:6])}')
        raise CheckpointError(f'{path} is not an encoder of --model {model_name}: '
                              + '; '.join(part for part in (cause, keys) if part))
    msg = model.load_state_dict(state, strict=False)
    print0(f'Loaded pre-trained checkpoint from {path}: missing {sorted(msg.missing_keys)} (initialised fresh), '
           f'ignored {len(msg.unexpected_keys)} keys not used by the classifier '
           f'({summarize_keys(msg.unexpected_keys)})')
    return list(msg.unexpected_keys)


def encoder_cause(state: StateDict, own: StateDict, missing: List[str]) -> str:
    """Why `state` is not an encoder of the model: sizes only (the head and the decoder do not matter here), or the
    pooling a fine-tuned classifier was trained with."""
    theirs, ours = architecture_of(state), architecture_of(own)
    if not theirs.kind:
        return kind_cause(theirs, ours, state)
    for arch in (theirs, ours):
        arch.num_classes, arch.global_pool, arch.decoder_embed_dim, arch.decoder_depth = 0, None, 0, 0
    cause = size_cause(theirs, ours, CLI)
    if not cause and {'norm.weight', 'norm.bias'} & set(missing) and 'fc_norm.weight' in state:
        cause = 'it was fine-tuned with global pooling (fc_norm.*, no norm.*): pass --global_pool'
    return cause


def summarize_keys(keys: List[str]) -> str:
    """'decoder_blocks.* (96), norm.* (2)': key prefixes with counts, for short log lines."""
    counts: Dict[str, int] = {}
    for k in keys:
        prefix = k.split('.')[0]
        counts[prefix] = counts.get(prefix, 0) + 1
    return ', '.join(f'{p}{".*" if n > 1 or "." in p else ""} ({n})' for p, n in counts.items()) or 'none'
