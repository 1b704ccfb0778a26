"""torch.hub entry points, from a local clone:

model = torch.hub.load('/path/to/this/clone', 'mae_vit_base_patch16', source='local',
                       checkpoint='mae_visualize_vit_base.pth')
model = torch.hub.load('/path/to/this/clone', 'vit_base_patch16', source='local',
                       checkpoint='mae_finetuned_vit_base.pth')
model = torch.hub.load('/path/to/this/clone', 'vit_base_patch16', source='local', num_classes=100,
                       finetune='mae_pretrain_vit_base.pth')   # MAE encoder + fresh head, as --finetune does
`checkpoint` and `finetune` take a path or URL of a .pth or .safetensors file, or a Hugging Face ViTMAE folder.
With `checkpoint` the image size, patch size, class count and pooling are read off it (keyword
arguments override them; another img_size interpolates the position embeddings) and the weights load strictly;
weights only, never code.
"""
import util  # noqa: F401  first, before torch: device plugins load on demand (see util/__init__.py)
import models_mae as _models_mae
import models_vit as _models_vit
from util import checkpoint_files as _checkpoint_files
from util import weights as _weights
from util.architecture import architecture_of as _architecture_of

dependencies = ['torch', 'timm', 'numpy', 'safetensors']


def _read(checkpoint):
    """(the checkpoint dict, its weights): a .pth, .safetensors or Hugging Face ViTMAE folder, path or URL."""
    loaded = _checkpoint_files.load_checkpoint(checkpoint)
    return loaded, _weights.model_state_from(loaded, checkpoint)


def _sizes(loaded: dict, state, kwargs: dict, keys) -> dict:
    """kwargs, completed with the sizes the checkpoint shows (those the caller did not pass): patch, channels, and
    the image size of its run (a rectangle from its saved args)."""
    shown = _architecture_of(state).size_kwargs()
    if 'img_size' in shown:
        shown['img_size'] = _weights.checkpoint_image_size(loaded, state)
    return {**{k: v for k, v in shown.items() if k in keys}, **kwargs}


def _load(model, loaded: dict, checkpoint, name: str):
    """Strictly, after fitting the position embeddings to an img_size the caller chose."""
    _weights.load_weights(model, loaded, checkpoint, name, fit_grid=True, say=_weights.HUB)
    return model


def _mae_entry(name: str):
    def entry(checkpoint=None, **kwargs):
        loaded, state = _read(checkpoint) if checkpoint else (None, None)
        if state is not None:
            kwargs = _sizes(loaded, state, kwargs, ('patch_size', 'img_size', 'in_chans'))
        model = _models_mae.build_mae(name, **kwargs)
        return _load(model, loaded, checkpoint, name) if state is not None else model
    entry.__name__ = name
    entry.__doc__ = f'{name} (models_mae.py). checkpoint: an MAE checkpoint with its decoder; kwargs: img_size, ' \
                    'patch_size, norm_pix_loss, ...'
    return entry


def _vit_entry(name: str):
    def entry(checkpoint=None, finetune=None, **kwargs):
        loaded, state = _read(checkpoint) if checkpoint else (None, None)
        if state is not None:
            kwargs = _sizes(loaded, state, kwargs, ('patch_size', 'img_size', 'in_chans', 'num_classes', 'global_pool'))
        model = _models_vit.build_classifier(name, **kwargs)
        if state is not None:
            if _architecture_of(state).kind == 'linear probe':
                model = _models_vit.add_batchnorm_head(model)
            _load(model, loaded, checkpoint, name)
        if finetune:
            _weights.load_weights(model, _checkpoint_files.load_checkpoint(finetune), finetune, name, pretrained=True)
        return model
    entry.__name__ = name
    entry.__doc__ = f'{name} (models_vit.py). checkpoint: a fine-tuned classifier; finetune: MAE encoder weights; ' \
                    'kwargs: num_classes, global_pool, drop_path_rate, img_size (side or (H, W)), patch_size, in_chans'
    return entry


mae_vit_tiny_patch16 = _mae_entry('mae_vit_tiny_patch16')
mae_vit_small_patch16 = _mae_entry('mae_vit_small_patch16')
mae_vit_base_patch16 = _mae_entry('mae_vit_base_patch16')
mae_vit_large_patch16 = _mae_entry('mae_vit_large_patch16')
mae_vit_huge_patch14 = _mae_entry('mae_vit_huge_patch14')
mae_vit_giant_patch14 = _mae_entry('mae_vit_giant_patch14')
mae_vit_2b_patch14 = _mae_entry('mae_vit_2b_patch14')
vit_tiny_patch16 = _vit_entry('vit_tiny_patch16')
vit_small_patch16 = _vit_entry('vit_small_patch16')
vit_base_patch16 = _vit_entry('vit_base_patch16')
vit_large_patch16 = _vit_entry('vit_large_patch16')
vit_huge_patch14 = _vit_entry('vit_huge_patch14')
vit_giant_patch14 = _vit_entry('vit_giant_patch14')
vit_2b_patch14 = _vit_entry('vit_2b_patch14')
