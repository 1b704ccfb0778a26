"""The MAE reconstruction figure: original | masked (grey where hidden) | reconstruction | reconstruction with
the visible patches pasted back, titled per column as in the paper's figures (drawn with matplotlib). Used by
main_infer.py and the demo."""
from typing import List, Optional, Sequence, Tuple

import torch
from torchvision import transforms

import models_mae
from util.checks import UsageError
from util.pixels import IMAGENET_RGB, Normalization, Size, default_shown_channels, height_width
from util.transforms import BICUBIC, ResizeToCover, normalize

MASK_GREY = 0.5  # hidden patches in the "masked" panel, as in the paper's figures
COLUMN_TITLES = ('original', 'masked', 'reconstruction', 'reconstruction + visible')
PANEL_INCHES = 2.4  # 240 px per panel at FIGURE_DPI: a 64-px demo image is shown ~4x, a 224-px photo ~1x
TITLE_INCHES = 0.4
FIGURE_DPI = 100


def reconstruction_transform(input_size: Size, normalization: Normalization = IMAGENET_RGB,
                             arrays: bool = False) -> transforms.Compose:
    """Resize (keeping the aspect) and centre-crop to the model's size: the whole picture, undistorted. arrays: on
    the float tensors of util/arrays.py."""
    height, width = height_width(input_size)
    resize = (transforms.Resize(height, interpolation=BICUBIC) if height == width else
              ResizeToCover((height, width)))
    to_tensor = [] if arrays else [transforms.ToTensor()]
    return transforms.Compose([resize, transforms.CenterCrop(input_size), *to_tensor, normalize(normalization)])


def mask_noise(seed: int, num_patches: int) -> torch.Tensor:
    """The masking noise for one image: a fixed seed gives a fixed mask, whatever the device."""
    return torch.rand(1, num_patches, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reconstruct(model: models_mae.MaskedAutoencoderViT, x: torch.Tensor, mask_ratio: float, seed: int,
                norm_pix: bool, runtime, normalization: Normalization = IMAGENET_RGB,
                channels: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, Optional[float], torch.Tensor]:
    """x: one normalised image [1, C, H, W]. Returns the 4 panels [4, 3, H, W] in [0, 1], the loss on the masked
    patches (None when nothing is masked) and the mask [L]. channels: the 3 channels shown as red, green, blue,
    or 1 shown in grey (default: RGB's, the first 3, or the one of greyscale images). Images of other than 3
    channels, or with `channels` chosen, are shown with each channel stretched from its lowest to its highest value
    in the original."""
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
    original = denormalize(x, normalization)
    recon = denormalize(recon, normalization)
    if normalization.in_chans != 3 or channels is not None:
        original, recon, mask_pixels = shown_channels((original, recon, mask_pixels), normalization.in_chans,
                                                      channels)
    masked = original * (1 - mask_pixels) + MASK_GREY * mask_pixels
    pasted = original * (1 - mask_pixels) + recon * mask_pixels
    panels = torch.cat([original, masked, recon, pasted]).clamp(0, 1)
    loss_value = float(loss) if mask.sum() > 0 else None
    return panels.cpu(), loss_value, mask[0].cpu()


def denormalize(x: torch.Tensor, normalization: Normalization = IMAGENET_RGB) -> torch.Tensor:
    mean = torch.tensor(normalization.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(normalization.std, device=x.device).view(1, -1, 1, 1)
    return x * std + mean


def shown_channels(images: Sequence[torch.Tensor], in_chans: int, channels: Optional[Sequence[int]]) -> list:
    """The chosen channels of the original, the reconstruction and the mask [1, C, H, W] as three display channels
    in [0, 1]: each stretched by the original's own range (one channel is repeated: grey)."""
    chosen = list(channels) if channels is not None else list(default_shown_channels(in_chans))
    original, recon, mask_pixels = (image[:, chosen] for image in images)
    low = original.amin(dim=(2, 3), keepdim=True)
    span = (original.amax(dim=(2, 3), keepdim=True) - low).clamp_min(1e-12)
    original, recon = (original - low) / span, (recon - low) / span
    if len(chosen) == 1:
        original, recon, mask_pixels = (t.expand(-1, 3, -1, -1) for t in (original, recon, mask_pixels))
    return [original, recon, mask_pixels]


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
