"""Model weights from any checkpoint the project reads, into a model: one function, load_weights, in the role of
timm's checkpoint filter. It finds the weights (under 'model' or another trainer's key; the key names DDP,
torch.compile, FSDP, EMA or Lightning wrappers leave removed; Hugging Face and safetensors files arrive here in
the official key names, util/checkpoint_files.py), fits the position table to the model's patch grid where asked,
and matches strictly, or says in one line what does not fit and why ('patch 8 px in the checkpoint, 4 in the
model'). Resume, --finetune, --eval, k-NN, inference and torch.hub all call it."""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

import models_mae
import models_vit
from util import fsdp as util_fsdp
from util import pixels
from util.architecture import CLASSIFIER_KINDS, KIND_WORDS, Architecture, StateDict, architecture_of, attention_heads
from util.checkpoint_files import SHARDED_CAUSE, CheckpointError
from util.distributed import print0
from util.pos_embed import interpolate_pos_embed

# keys a classifier started from pretrained weights (--finetune) may lack: its fresh head, and fc_norm with
# global pooling
FRESH_IN_A_CLASSIFIER = ('head.weight', 'head.bias', 'fc_norm.weight', 'fc_norm.bias')


def load_weights(model: nn.Module, checkpoint: dict, path: str, model_name: str, fit_grid: bool = False,
                 pretrained: bool = False, keep: Optional[Callable[[str], bool]] = None,
                 say: 'Phrasing' = None) -> List[str]:
    """Load `checkpoint` (a dict as util/checkpoint_files.load_checkpoint returns it, from any file the project reads)
    into `model`, named `model_name` in messages:
    - its weights found and unwrapped (model_state_from); the attention heads a Hugging Face config names checked
      (after the sizes, which name the more basic cause);
    - `keep`: only the keys it accepts are loaded (k-NN keeps an encoder's);
    - `fit_grid`: the position tables interpolated to the model's patch grid (--eval, main_infer, main_knn and
      torch.hub at another image size); resuming a training run stays exact;
    - `pretrained` (--finetune): a classifier starts from an MAE encoder, a full MAE or another classifier: a head
      of another shape is dropped, the head and fc_norm may be missing, the position tables are fitted;
    - else the match is strict.
    Raises CheckpointError, one line leading with the cause; `say` phrases the fixes (CLI flags, or HUB keyword
    arguments). Returns the checkpoint's keys the model did not take (pretrained: the decoder's, ...)."""
    say = say or CLI
    state = model_state_from(checkpoint, path)
    if keep is not None:
        state = {k: v for k, v in state.items() if keep(k)}
    grid = saved_grid(checkpoint, state)
    if pretrained:  # nothing is loaded (or said to be) before every check has passed
        check_attention_heads(model, checkpoint, path, model_name, say)
        return load_pretrained_encoder(model, state, path, model_name, grid)
    if fit_grid:
        fit_pos_embed(model, state, path, grid)
    load_state_strict(model, state, path, model_name, say)
    # after the sizes, the more basic cause (an error here stops the run; the loaded model is not used): weights do
    # not show the heads, only a config names them
    check_attention_heads(model, checkpoint, path, model_name, say)
    return []


# where checkpoints keep their weights, first match wins: the official format and ours, other trainers (timm,
# Lightning), EMA copies saved alone (DeiT-style 'model_ema', timm's 'state_dict_ema'), DeepSpeed
WEIGHT_KEYS = ('model', 'state_dict', 'model_ema', 'state_dict_ema', 'ema', 'module')
# wrappers that put the whole model under one attribute: DDP, DataParallel, timm's ModelEma, torch's AveragedModel
WRAPPER_PREFIX = 'module.'
# module names a wrapper inserts into the keys below it, wherever it wraps (the whole model or each block):
# torch.compile, FSDP (1), activation checkpointing
WRAPPER_SEGMENTS = ('_orig_mod', '_fsdp_wrapped_module', '_checkpoint_wrapped_module')
# what torch.optim.swa_utils.AveragedModel keeps beside the averaged model's weights
AVERAGED_MODEL_EXTRAS = ('n_averaged',)
VIT_MARKER = 'patch_embed.proj.weight'
SHARDED_TYPES = ('DTensor', 'ShardedTensor')


def model_state_from(checkpoint: dict, path: str) -> Dict[str, torch.Tensor]:
    """The weights of a checkpoint: under one of WEIGHT_KEYS ('model' for the official files and ours) or the dict
    itself (a bare state dict), with what wrappers leave in the keys removed (unwrap_keys). Raises
    CheckpointError when there are no weights."""
    state = next((checkpoint[k] for k in WEIGHT_KEYS if isinstance(checkpoint.get(k), dict)), checkpoint)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f'{path}: {no_weights_cause(checkpoint)}')
    if any(type(v).__name__ in SHARDED_TYPES for v in state.values()):
        raise CheckpointError(f'{path}: {SHARDED_CAUSE}')
    return unwrap_keys(dict(state))


def no_weights_cause(checkpoint: dict) -> str:
    """Why no weights were found: none anywhere, or weights under keys this code does not read (a DINO
    checkpoint's 'student' and 'teacher'), named."""
    elsewhere = [k for k, v in checkpoint.items() if isinstance(v, dict) and v
                 and all(isinstance(t, torch.Tensor) for t in v.values())]
    if not elsewhere:
        return "no model weights found (expected a state dict under 'model')"
    return (f"no model weights under {', '.join(repr(k) for k in WEIGHT_KEYS)}; it holds weights under "
            f"{', '.join(repr(k) for k in elsewhere)} (another trainer's layout): save the ViT's state_dict() under "
            "'model'")


def unwrap_keys(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Keys as the bare model names them: the segments torch.compile ('_orig_mod'), FSDP and activation
    checkpointing insert are dropped wherever they are; a 'module.' in front of every key (DDP, an EMA copy) is
    dropped, AveragedModel's counter with it; and a prefix in front of every key of a ViT (a Lightning module's
    'model.', a wrapper's attribute) is dropped when nothing else is in the dict."""
    state = {'.'.join(part for part in k.split('.') if part not in WRAPPER_SEGMENTS): v for k, v in state.items()}
    weights = [k for k in state if k not in AVERAGED_MODEL_EXTRAS]
    while weights and all(k.startswith(WRAPPER_PREFIX) for k in weights):
        state = {k[len(WRAPPER_PREFIX):]: state[k] for k in weights}
        weights = list(state)
    prefix = vit_prefix(state)
    if prefix and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def vit_prefix(state: Dict[str, torch.Tensor]) -> str:
    """'' when the ViT's patch embedding is at the top level (or absent), else what precedes it in its key
    ('backbone.' of 'backbone.patch_embed.proj.weight'), for saying where a checkpoint's ViT is."""
    if VIT_MARKER in state:
        return ''
    found = sorted(k[:-len(VIT_MARKER)] for k in state if k.endswith('.' + VIT_MARKER))
    return found[0] if found else ''


@dataclass(frozen=True)
class Phrasing:
    """How the user sets each size where they are: flags on the command line, keyword arguments in torch.hub."""
    model: str = '--model'
    patch: str = '--patch_size {}'
    img: str = '--input_size {}'
    classes: str = '--nb_classes {}'
    global_pool: str = 'drop --cls_token'
    cls_token: str = 'pass --cls_token'
    channels: str = '--in_chans {} with its --mean and --std'


CLI = Phrasing()
HUB = Phrasing(model='entry point', patch='patch_size={}', img='img_size={}', classes='num_classes={}',
               global_pool='global_pool=True', cls_token='global_pool=False', channels='in_chans={}')


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
        causes.append(f'{theirs.in_chans} input channels in the checkpoint, {ours.in_chans} in the model (pass '
                      f'{say.channels.format(theirs.in_chans)})')
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


def saved_grid(checkpoint: dict, state: StateDict) -> Optional[Tuple[int, int]]:
    """The patch grid (rows, columns) the checkpoint's run used, from its saved args (--input_size, the patch
    side of its weights), when they name one that fits its position table; else None (a square table's grid is
    read off its length). A rectangular table's length does not tell its shape; the saved args do."""
    args = checkpoint.get('args') if isinstance(checkpoint, dict) else None
    size = args.get('input_size') if isinstance(args, dict) else getattr(args, 'input_size', None)
    kernel, table = state.get('patch_embed.proj.weight'), state.get('pos_embed')
    if size is None or kernel is None or kernel.ndim != 4 or table is None or table.ndim != 3:
        return None
    try:
        rows, columns = pixels.grid_of(size, kernel.shape[-1])
    except (TypeError, ValueError, IndexError):
        return None
    return (rows, columns) if table.shape[1] - rows * columns in (0, 1) else None


def checkpoint_image_size(checkpoint: dict, state: StateDict) -> Optional[pixels.Size]:
    """The image size the checkpoint's model was built for: its saved args' grid (saved_grid) when they have one,
    else its position table's square grid; None when its weights show neither."""
    arch = architecture_of(state)
    grid = saved_grid(checkpoint, state)
    if grid is not None:
        return pixels.as_size(grid[0] * arch.patch_size, grid[1] * arch.patch_size)
    return arch.img_size or None


def fit_pos_embed(model: nn.Module, state: StateDict, path: str, grid: Optional[Tuple[int, int]] = None):
    """Interpolate state's position tables (in place) to the model's patch grid, or say in one line why not.
    For --finetune, --eval, main_infer and main_knn at another --input_size; resuming a training run stays strict.
    Nothing is resized when the patch sizes differ: the strict load then names the patch size, the real cause.
    grid: the checkpoint's (rows, columns) (saved_grid), which a rectangular table needs."""
    theirs = architecture_of(state)
    if theirs.kind and theirs.patch_size != model.patch_embed.patch_size[0]:
        return
    for key in ('pos_embed', 'decoder_pos_embed'):
        if hasattr(model, key):
            try:
                interpolate_pos_embed(model, state, key, orig_grid=grid)
            except (RuntimeError, ValueError) as e:
                raise CheckpointError(f'{path}: position embeddings cannot be resized ({e})') from None


def adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A patch embedding [D, C, p, p] made to read `in_chans` channels, the way timm adapts pretrained weights to
    another input (its adapt_input_conv): to 1 channel, the sum over the C; from C to N, the C repeated in turn
    (R, G, B, R, ...) and scaled by C / N, so that an image whose channels are equal embeds as before (timm itself
    only adapts C = 3 that way; fit_input_channels keeps to its cases)."""
    channels = weight.shape[1]
    if in_chans == channels:
        return weight
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_chans // channels)
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (channels / in_chans)


def fit_input_channels(model: nn.Module, state: StateDict, path: str):
    """--finetune of a checkpoint pretrained on another channel count (an RGB MAE for 4-band images): the patch
    embedding adapted (adapt_input_channels) and said in one line; the rest loads strictly as usual."""
    key = 'patch_embed.proj.weight'
    ours = model.state_dict().get(key)
    theirs = state.get(key)
    if ours is None or theirs is None or theirs.dim() != 4 or theirs.shape[1] == ours.shape[1] \
            or theirs.shape[2:] != ours.shape[2:] or (theirs.shape[1] != 3 and ours.shape[1] != 1):
        return  # timm adapts RGB to N and anything to 1; others stay a misfit, named by the strict load
    how = 'summed' if ours.shape[1] == 1 else f'repeated in turn, scaled by {theirs.shape[1]}/{ours.shape[1]}'
    print0(f'{path}: its patch embedding reads {theirs.shape[1]} channels; adapted to {ours.shape[1]} as timm adapts '
           f'pretrained weights ({how})')
    state[key] = adapt_input_channels(theirs, ours.shape[1])


def load_pretrained_encoder(model: nn.Module, state: StateDict, path: str, model_name: str,
                            grid: Optional[Tuple[int, int]] = None) -> List[str]:
    """An encoder-only or full MAE's weights (released, ours or converted from Hugging Face), or another
    classifier's, into a ViT classifier (load_weights(pretrained=True)): a head of another shape is dropped, the
    position embeddings are interpolated to the model's grid, and only the head and (with global pooling) fc_norm
    may be missing. Returns the ignored keys."""
    own = model.state_dict()
    for k in ('head.weight', 'head.bias'):
        if k in state and state[k].shape != own[k].shape:
            print0(f'Removing key {k} from pretrained checkpoint (shape {tuple(state[k].shape)} vs '
                   f'{tuple(own[k].shape)})')
            del state[k]
    fit_pos_embed(model, state, path, grid)
    fit_input_channels(model, state, path)
    allowed = set(FRESH_IN_A_CLASSIFIER)
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
    if not cause and {'norm.weight', 'norm.bias'} & set(missing) and theirs.fc_norm:
        cause = 'it was fine-tuned with global pooling (fc_norm.*, no norm.*): pass --global_pool'
    return cause


def summarize_keys(keys: List[str]) -> str:
    """'decoder_blocks.* (96), norm.* (2)': key prefixes with counts, for short log lines."""
    counts: Dict[str, int] = {}
    for k in keys:
        prefix = k.split('.')[0]
        counts[prefix] = counts.get(prefix, 0) + 1
    return ', '.join(f'{p}{".*" if n > 1 or "." in p else ""} ({n})' for p, n in counts.items()) or 'none'
