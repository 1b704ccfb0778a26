"""Parameter groups: layer-wise learning-rate decay (BEiT-style) for fine-tuning, plain weight-decay split for
pretraining. Biases, norm weights (all 1-D parameters) and the no-decay list get no weight decay."""
from typing import Iterable, List

import torch.nn as nn


def get_layer_id_for_vit(name: str, num_layers: int) -> int:
    """Embeddings are layer 0, block i is layer i + 1, everything after the blocks is `num_layers`."""
    if name in ('cls_token', 'pos_embed') or name.startswith('patch_embed'):
        return 0
    if name.startswith('blocks'):
        return int(name.split('.')[1]) + 1
    return num_layers


def param_groups_lrd(model: nn.Module, weight_decay: float = 0.05, no_weight_decay_list: Iterable[str] = (),
                     layer_decay: float = .75) -> List[dict]:
    """One group per (layer, decay/no-decay) with `lr_scale = layer_decay ** (num_layers - layer_id)`."""
    no_weight_decay_list = set(no_weight_decay_list)
    num_layers = len(model.blocks) + 1
    layer_scales = [layer_decay ** (num_layers - i) for i in range(num_layers + 1)]
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = param.ndim == 1 or name in no_weight_decay_list
        layer_id = get_layer_id_for_vit(name, num_layers)
        group_name = f'layer_{layer_id}_{"no_decay" if no_decay else "decay"}'
        if group_name not in groups:
            groups[group_name] = {'lr_scale': layer_scales[layer_id],
                                  'weight_decay': 0. if no_decay else weight_decay,
                                  'params': []}
        groups[group_name]['params'].append(param)
    return list(groups.values())


def param_groups_weight_decay(model: nn.Module, weight_decay: float = 0.05,
                              no_weight_decay_list: Iterable[str] = ()) -> List[dict]:
    """[no-decay group, decay group] as timm 0.3.2's add_weight_decay built them for MAE pretraining."""
    no_weight_decay_list = set(no_weight_decay_list)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # frozen weights, e.g. the fixed sin-cos position embeddings
        if param.ndim <= 1 or name.endswith('.bias') or name in no_weight_decay_list:
            no_decay.append(param)
        else:
            decay.append(param)
    return [{'params': no_decay, 'weight_decay': 0.}, {'params': decay, 'weight_decay': weight_decay}]
