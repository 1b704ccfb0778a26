"""torch.hub entry points, from a local clone:

model = torch.hub.load('/path/to/this/clone', 'mae_vit_base_patch16', source='local',
                       checkpoint='mae_visualize_vit_base.pth')
model = torch.hub.load('/path/to/this/clone', 'vit_base_patch16', source='local',
                       checkpoint='mae_finetuned_vit_base.pth')
model = torch.hub.load('/path/to/this/clone', 'vit_base_patch16', source='local', num_classes=100,
                       finetune='mae_pretrain_vit_base.pth')   # MAE encoder + fresh head, as --finetune does
`checkpoint` (path or URL) must match the architecture and loads strictly; weights only, never code.
"""
import models_mae as _models_mae
import models_vit as _models_vit
from util import checkpoint as _checkpoint

dependencies = ['torch', 'timm', 'numpy']


def _with_weights(model, name: str, checkpoint=None, finetune=None):
    if checkpoint:
        state = _checkpoint.model_state_from(_checkpoint.load_checkpoint(checkpoint), checkpoint)
        _checkpoint.load_state_strict(model, state, checkpoint, name)
    if finetune:
        _checkpoint.load_pretrained_encoder(model, finetune)
    return model


def _mae_entry(name: str):
    def entry(checkpoint=None, **kwargs):
        return _with_weights(_models_mae.build_mae(name, **kwargs), name, checkpoint)
    entry.__name__ = name
    entry.__doc__ = f'{name} (models_mae.py). checkpoint: an MAE checkpoint with its decoder; kwargs: img_size, ' \
                    'patch_size, norm_pix_loss, ...'
    return entry


def _vit_entry(name: str):
    def entry(checkpoint=None, finetune=None, **kwargs):
        return _with_weights(_models_vit.build_classifier(name, **kwargs), name, checkpoint, finetune)
    entry.__name__ = name
    entry.__doc__ = f'{name} (models_vit.py). checkpoint: a fine-tuned classifier; finetune: MAE encoder weights; ' \
                    'kwargs: num_classes, global_pool, drop_path_rate, img_size, patch_size'
    return entry


mae_vit_tiny_patch16 = _mae_entry('mae_vit_tiny_patch16')
mae_vit_small_patch16 = _mae_entry('mae_vit_small_patch16')
mae_vit_base_patch16 = _mae_entry('mae_vit_base_patch16')
mae_vit_large_patch16 = _mae_entry('mae_vit_large_patch16')
mae_vit_huge_patch14 = _mae_entry('mae_vit_huge_patch14')
vit_tiny_patch16 = _vit_entry('vit_tiny_patch16')
vit_small_patch16 = _vit_entry('vit_small_patch16')
vit_base_patch16 = _vit_entry('vit_base_patch16')
vit_large_patch16 = _vit_entry('vit_large_patch16')
vit_huge_patch14 = _vit_entry('vit_huge_patch14')
