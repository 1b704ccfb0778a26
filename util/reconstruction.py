"""The MAE reconstruction figure: original | masked (grey where hidden) | reconstruction | reconstruction with
the visible patches pasted back, titled per column as in the paper's figures (drawn with matplotlib). Used by
main_infer.py and the demo."""
from typing import List, Optional, Tuple

import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

import models_mae
from util.checks import UsageError
from util.transforms import BICUBIC, normalize

MASK_GREY = 0.5  # hidden patches in the "masked" panel, as in the paper's figures
COLUMN_TITLES = ('original', 'masked', 'reconstruction', 'reconstruction + visible')
PANEL_INCHES = 2.4  # 240 px per panel at FIGURE_DPI: a 64-px demo image is shown ~4x, a 224-px photo ~1x
TITLE_INCHES = 0.4
FIGURE_DPI = 100


def reconstruction_transform(input_size: int) -> transforms.Compose:
    """Resize the short side and centre-crop to the model's size: the whole picture, undistorted."""
    return transforms.Compose([transforms.Resize(input_size, interpolation=BICUBIC),
                               transforms.CenterCrop(input_size), transforms.ToTensor(), normalize()])


def mask_noise(seed: int, num_patches: int) -> torch.Tensor:
    """The masking noise for one image: a fixed seed gives a fixed mask, whatever the device."""
    return torch.rand(1, num_patches, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reconstruct(model: models_mae.MaskedAutoencoderViT, x: torch.Tensor, mask_ratio: float, seed: int,
                norm_pix: bool, runtime) -> Tuple[torch.Tensor, Optional[float], torch.Tensor]:
    """x: one normalised image [1, 3, H, W]. Returns the 4 panels [4, 3, H, W] in [0, 1], the loss on the masked
    patches (None when nothing is masked) and the mask [L]."""
    x = x.to(runtime.device)
    noise = mask_noise(seed, model.patch_embed.num_patches).to(runtime.device)
    with runtime.autocast():
        loss, pred, mask = model(x, mask_ratio=mask_ratio, noise=noise)
    pred = pred.float()
    if norm_pix:  # per-patch normalised targets: show them with each patch's own mean and std
        mean, std = models_mae.per_patch_stats(model.patchify(x))
        pred = pred * std + mean
    mask_pixels = model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1]))  # 1 where hidden
    recon = model.unpatchify(pred)
    original = denormalize(x)
    recon = denormalize(recon)
    masked = original * (1 - mask_pixels) + MASK_GREY * mask_pixels
    pasted = original * (1 - mask_pixels) + recon * mask_pixels
    panels = torch.cat([original, masked, recon, pasted]).clamp(0, 1)
    loss_value = float(loss) if mask.sum() > 0 else None
    return panels.cpu(), loss_value, mask[0].cpu()


def denormalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=x.device).view(1, 3, 1, 1)
    return x * std + mean


def figure_class():
    """matplotlib's Figure, imported only when a figure is drawn (--help and classification never need it);
    missing, one line naming what to install (UsageError)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError('the reconstruction figure needs matplotlib, which is not installed: pip install '
                         'matplotlib (or pip install -r requirements.txt)') from None
    return Figure


def save_figure(rows: List[torch.Tensor], path: str, row_labels: Optional[List[str]] = None):
    """Rows of 4 panels [4, 3, H, W] (values in [0, 1]) as one PNG that reads like the paper's figures: a titled
    column per panel (COLUMN_TITLES), each panel PANEL_INCHES wide at FIGURE_DPI (240 px, whatever the image size;
    pixels drawn as crisp squares), optional row labels on the left. Drawn off-screen (Agg): works on clusters."""
    figure = figure_class()(figsize=(4 * PANEL_INCHES, len(rows) * PANEL_INCHES + TITLE_INCHES), dpi=FIGURE_DPI,
                    layout='constrained', facecolor='white')
    axes = figure.subplots(len(rows), 4, squeeze=False)
    for row, panels in enumerate(rows):
        for column, panel in enumerate(panels):
            ax = axes[row][column]
            ax.imshow(panel.permute(1, 2, 0).numpy(), interpolation='nearest')
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(COLUMN_TITLES[column], fontsize=13)
        if row_labels:
            axes[row][0].set_ylabel(row_labels[row], fontsize=12)
    figure.savefig(path)
