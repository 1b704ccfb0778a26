"""The Hugging Face transformers ViTMAE file layout (ViTMAEForPreTraining, ViTMAEModel) mapped to the official
state-dict keys and back, and its config.json read and written. Pure renaming of tensors and json: reading such
weights needs neither transformers nor any code from the file.

The key map, file names on the left (E: the encoder prefix, 'vit.' in ViTMAEForPreTraining files, none in ViTMAEModel;
N: a block index; D: 'decoder.decoder_layers.' as files on the hub name decoder blocks, or
'decoder.decoder_encoder.layer.' as transformers 5's save_pretrained writes them; both are read, the first is written):
  E embeddings.cls_token                        cls_token
  E embeddings.position_embeddings              pos_embed (read from the file, never regenerated)
  E embeddings.patch_embeddings.projection.*    patch_embed.proj.*
  E encoder.layer.N. / D N. + the block part    blocks.N. / decoder_blocks.N. + the block part:
      attention.attention.{query,key,value}.*       attn.qkv.* (the three stacked in that order along dim 0)
      attention.output.dense.*                      attn.proj.*
      layernorm_before.* / layernorm_after.*        norm1.* / norm2.*
      intermediate.dense.* / output.dense.*         mlp.fc1.* / mlp.fc2.*
  E layernorm.*                                 norm.*
  decoder.{decoder_embed, mask_token, decoder_pos_embed, decoder_norm, decoder_pred}   the same names without 'decoder.'

The two directions of one key map and one config are kept side by side so that they cannot drift.
"""
import argparse
import json
import re
from typing import Dict, List, Optional, Tuple

import torch

from util.architecture import StateDict, architecture_of

CONFIG_NAME = 'config.json'
WEIGHT_NAMES = ('model.safetensors', 'pytorch_model.bin')  # what save_pretrained writes, newest first
SHARDED_INDEX = 'model.safetensors.index.json'
MAE_ARCHITECTURE = 'ViTMAEForPreTraining'
ENCODER_ARCHITECTURE = 'ViTMAEModel'
OFFICIAL_EPS = 1e-6  # LayerNorm epsilon of the official MAE (models_mae.py, models_vit.py)
# transformers' default epsilon, which the hub's conversions of the official weights (facebook/vit-mae-*) carry in
# their config although the weights were trained with 1e-6
TRANSFORMERS_DEFAULT_EPS = 1e-12
MLP_RATIO = 4  # every model of this repository

# ViTMAEConfig's defaults (transformers 5.24) for the fields read here: a config.json that leaves one out means it
HF_DEFAULTS = dict(model_type='', hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   hidden_act='gelu', layer_norm_eps=TRANSFORMERS_DEFAULT_EPS, image_size=224, patch_size=16,
                   num_channels=3, qkv_bias=True, decoder_num_attention_heads=16, decoder_hidden_size=512,
                   decoder_num_hidden_layers=8, decoder_intermediate_size=2048, mask_ratio=0.75, norm_pix_loss=False)

# inside a transformer block: our module name -> the file's
BLOCK_PARTS = {'attn.proj': 'attention.output.dense', 'norm1': 'layernorm_before', 'norm2': 'layernorm_after',
               'mlp.fc1': 'intermediate.dense', 'mlp.fc2': 'output.dense'}
QKV = 'attn.qkv'
QKV_PARTS = ('attention.attention.query', 'attention.attention.key', 'attention.attention.value')
# outside the blocks: our name -> the file's (encoder names take the encoder prefix E)
ENCODER_PARTS = {'cls_token': 'embeddings.cls_token', 'pos_embed': 'embeddings.position_embeddings',
                 'patch_embed.proj': 'embeddings.patch_embeddings.projection', 'norm': 'layernorm'}
DECODER_PARTS = {name: f'decoder.{name}' for name in ('decoder_embed', 'mask_token', 'decoder_pos_embed',
                                                       'decoder_norm', 'decoder_pred')}
ENCODER_PREFIX = 'vit.'
HUB_DECODER_LAYERS = 'decoder.decoder_layers.'
SAVED_DECODER_LAYERS = 'decoder.decoder_encoder.layer.'
LAYER_PATTERNS = ((re.compile(r'(?:vit\.)?encoder\.layer\.(\d+)\.'), 'blocks.'),
                  (re.compile(re.escape(HUB_DECODER_LAYERS) + r'(\d+)\.'), 'decoder_blocks.'),
                  (re.compile(re.escape(SAVED_DECODER_LAYERS) + r'(\d+)\.'), 'decoder_blocks.'))
PATCH_KERNELS = ('vit.embeddings.patch_embeddings.projection.weight', 'embeddings.patch_embeddings.projection.weight')


class ConversionError(ValueError):
    """Weights or a config that have no equivalent here; the message is one line, without the file name."""


def is_hf_layout(weights: dict) -> bool:
    """True for a flat dict of tensors in the ViTMAE file layout (ViTMAEForPreTraining or ViTMAEModel)."""
    return any(key in weights for key in PATCH_KERNELS)


# --- reading -----------------------------------------------------------------------------------------------------

def our_name(hf_key: str) -> Optional[Tuple[str, Optional[int]]]:
    """(our key, which of query/key/value it is, or None) for a file's key; None for a key outside the layout."""
    for pattern, ours in LAYER_PATTERNS:
        match = pattern.match(hf_key)
        if match:
            block = f'{ours}{match.group(1)}.'
            module, _, param = hf_key[match.end():].rpartition('.')
            if module in QKV_PARTS:
                return f'{block}{QKV}.{param}', QKV_PARTS.index(module)
            ours_module = next((k for k, v in BLOCK_PARTS.items() if v == module), None)
            return (f'{block}{ours_module}.{param}', None) if ours_module else None
    key = hf_key[len(ENCODER_PREFIX):] if hf_key.startswith(ENCODER_PREFIX) else hf_key
    for ours, theirs in {**ENCODER_PARTS, **DECODER_PARTS}.items():
        if key == theirs or key.startswith(theirs + '.'):
            return ours + key[len(theirs):], None
    return None


def from_hf(weights: StateDict) -> StateDict:
    """ViTMAE file weights -> our keys: renamed, and query/key/value stacked into one qkv (bit for bit)."""
    state: StateDict = {}
    qkv: Dict[str, List[Optional[torch.Tensor]]] = {}
    unknown = []
    for key, tensor in weights.items():
        named = our_name(key)
        if named is None:
            unknown.append(key)
        elif named[1] is None:
            state[named[0]] = tensor
        else:
            qkv.setdefault(named[0], [None, None, None])[named[1]] = tensor
    if unknown:
        raise ConversionError(f'{len(unknown)} weights are not in the ViTMAE file layout ({", ".join(unknown[:4])}'
                              f'{", ..." if len(unknown) > 4 else ""}); save the model with save_pretrained')
    for name, parts in qkv.items():
        missing = [QKV_PARTS[i].split('.')[-1] for i, part in enumerate(parts) if part is None]
        if missing:
            raise ConversionError(f'{name} cannot be assembled: the {" and ".join(missing)} projection is missing')
        state[name] = torch.cat(parts)
    return state


def setting(config: dict, field: str):
    return config.get(field, HF_DEFAULTS[field])


def side(value, field: str) -> int:
    """An int, or a square [n, n] list; anything else (non-square patches or images) is refused."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConversionError(f'config.json: {field} {list(value)} is not square; the models here have square '
                                  'images and patches')
        value = value[0]
    return int(value)


def check_config(config: dict, has_decoder: bool):
    """Refuse, in one line, a config.json whose model the architecture here cannot represent."""
    model_type = setting(config, 'model_type')
    if model_type != 'vit_mae':
        raise ConversionError(f"config.json: model_type {model_type!r} is another architecture; only Hugging Face "
                              "ViTMAE ('vit_mae') weights are converted")
    if setting(config, 'hidden_act') != 'gelu':
        raise ConversionError(f"config.json: hidden_act {setting(config, 'hidden_act')!r}; the MAE here uses 'gelu' "
                              '(the exact erf form)')
    if not setting(config, 'qkv_bias'):
        raise ConversionError('config.json: qkv_bias false; the MAE here has biases on query, key and value')
    eps = setting(config, 'layer_norm_eps')
    if eps not in (OFFICIAL_EPS, TRANSFORMERS_DEFAULT_EPS):
        raise ConversionError(f'config.json: layer_norm_eps {eps:g} makes another model; the MAE here normalises with '
                              f'{OFFICIAL_EPS:g} (the official value)')
    side(setting(config, 'patch_size'), 'patch_size')
    side(setting(config, 'image_size'), 'image_size')
    sizes = [('intermediate_size', 'hidden_size')]
    if has_decoder:
        sizes.append(('decoder_intermediate_size', 'decoder_hidden_size'))
    for inner, width in sizes:
        if setting(config, inner) != MLP_RATIO * setting(config, width):
            raise ConversionError(f'config.json: {inner} {setting(config, inner)} is not {MLP_RATIO} x {width} '
                                  f'{setting(config, width)}; the models here have an MLP ratio of {MLP_RATIO}')


def check_weights_fit_config(state: StateDict, config: dict):
    """The sizes the weights show must be those the config names: a mismatch means the two were not saved together."""
    arch = architecture_of(state)
    shown = {'hidden_size': arch.embed_dim, 'patch_size': arch.patch_size, 'image_size': arch.img_size,
             'num_hidden_layers': arch.depth, 'num_channels': arch.in_chans}
    if arch.kind == 'mae':
        shown.update(decoder_hidden_size=arch.decoder_embed_dim, decoder_num_hidden_layers=arch.decoder_depth)
    for field, value in shown.items():
        named = side(setting(config, field), field) if field in ('patch_size', 'image_size') else setting(config, field)
        if named != value:
            raise ConversionError(f'config.json says {field} {named}, the weights have {value}: they do not belong '
                                  'together')


def eps_note(config: dict) -> Optional[str]:
    """What to tell the user when the config names transformers' default epsilon instead of the official one."""
    if setting(config, 'layer_norm_eps') == OFFICIAL_EPS:
        return None
    return (f'config.json names layer_norm_eps {TRANSFORMERS_DEFAULT_EPS:g} (transformers\' default, which the hub\'s '
            f'conversions of the official weights carry); the MAE here normalises with {OFFICIAL_EPS:g}, the value '
            'the official weights were trained with')


def checkpoint_from_hf(weights: StateDict, config: dict) -> dict:
    """A checkpoint in our layout from ViTMAE weights and their config.json: the weights under 'model', the
    prediction target under 'args' (as our checkpoints keep it), the attention heads the config names (weights do not
    show them; the loaders check them against the model) and the config itself. Raises ConversionError."""
    state = from_hf(weights)
    has_decoder = any(k.startswith('decoder_') for k in state)
    check_config(config, has_decoder)
    check_weights_fit_config(state, config)
    heads = {'encoder': setting(config, 'num_attention_heads')}
    if has_decoder:
        heads['decoder'] = setting(config, 'decoder_num_attention_heads')
    # our checkpoints keep the run's settings in an argparse.Namespace under 'args'
    args = argparse.Namespace(norm_pix_loss=bool(setting(config, 'norm_pix_loss')),
                              mask_ratio=float(setting(config, 'mask_ratio')),
                              in_chans=int(setting(config, 'num_channels')))
    return {'model': state, 'args': args, 'attention_heads': heads, 'hf_config': config}


def read_config(path: str) -> dict:
    """config.json as a dict; ConversionError when it is not one."""
    try:
        with open(path, encoding='utf-8') as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f'{path} is not a readable config.json ({type(e).__name__}: '
                              f'{str(e).splitlines()[0] if str(e) else ""})') from None
    if not isinstance(config, dict):
        raise ConversionError(f'{path} is not a config.json (it holds a {type(config).__name__}, not an object)')
    return config


# --- writing -----------------------------------------------------------------------------------------------------

def hf_name(key: str, encoder_prefix: str) -> List[str]:
    """The file key(s) of one of our keys: three for a fused qkv (query, key, value), one otherwise."""
    for ours, theirs in ((r'blocks\.(\d+)\.', encoder_prefix + 'encoder.layer.{}.'),
                         (r'decoder_blocks\.(\d+)\.', HUB_DECODER_LAYERS + '{}.')):
        match = re.match(ours, key)
        if match:
            block = theirs.format(match.group(1))
            module, _, param = key[match.end():].rpartition('.')
            if module == QKV:
                return [f'{block}{part}.{param}' for part in QKV_PARTS]
            if module not in BLOCK_PARTS:
                raise ConversionError(f'{key} has no place in the ViTMAE layout')
            return [f'{block}{BLOCK_PARTS[module]}.{param}']
    for parts, prefix in ((ENCODER_PARTS, encoder_prefix), (DECODER_PARTS, '')):
        for ours, theirs in parts.items():
            if key == ours or key.startswith(ours + '.'):
                return [prefix + theirs + key[len(ours):]]
    raise ConversionError(f'{key} has no place in the ViTMAE layout (only an MAE or its encoder converts; a classifier '
                          'goes to timm: --to timm)')


def to_hf(state: StateDict) -> StateDict:
    """Our MAE (or encoder) weights -> the ViTMAE file layout (a full MAE: ViTMAEForPreTraining's, with 'vit.';
    an encoder: ViTMAEModel's). qkv is split in three; every tensor is its own contiguous copy (safetensors refuses
    shared storage)."""
    prefix = ENCODER_PREFIX if any(k.startswith('decoder_') for k in state) else ''
    weights: StateDict = {}
    for key, tensor in state.items():
        names = hf_name(key, prefix)
        for name, part in zip(names, tensor.chunk(len(names))):
            weights[name] = part.detach().clone().contiguous()
    return weights


def hf_config(state: StateDict, heads: Dict[str, int], norm_pix_loss: bool, mask_ratio: float) -> dict:
    """config.json (ViTMAEConfig's fields) for our MAE or encoder weights; heads: {'encoder': n[, 'decoder': m]}."""
    arch = architecture_of(state)
    has_decoder = arch.kind == 'mae'
    config = {'architectures': [MAE_ARCHITECTURE if has_decoder else ENCODER_ARCHITECTURE], 'model_type': 'vit_mae',
              'hidden_size': arch.embed_dim, 'num_hidden_layers': arch.depth, 'num_attention_heads': heads['encoder'],
              'intermediate_size': arch.mlp_dim, 'hidden_act': 'gelu', 'hidden_dropout_prob': 0.0,
              'attention_probs_dropout_prob': 0.0, 'initializer_range': 0.02, 'layer_norm_eps': OFFICIAL_EPS,
              'image_size': arch.img_size, 'patch_size': arch.patch_size, 'num_channels': arch.in_chans,
              'qkv_bias': True, 'mask_ratio': mask_ratio, 'norm_pix_loss': norm_pix_loss, 'dtype': 'float32'}
    if has_decoder:
        config.update(decoder_hidden_size=arch.decoder_embed_dim, decoder_num_hidden_layers=arch.decoder_depth,
                      decoder_num_attention_heads=heads['decoder'], decoder_intermediate_size=arch.decoder_mlp_dim)
    return config
