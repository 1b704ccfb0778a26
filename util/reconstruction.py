"""The MAE reconstruction figure: original | masked (grey where hidden) | reconstruction | reconstruction with
the visible patches pasted back, as in the paper. Used by main_infer.py and the demo."""
from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

import models_mae
from util.transforms import BICUBIC, normalize

MASK_GREY = 0.5  # hidden patches in the "masked" panel, as in the paper's figures


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


def panels_to_image(rows: List[torch.Tensor]) -> Image.Image:
    """Rows of 4 panels [4, 3, H, W] -> one RGB image, panels side by side, rows stacked."""
    strips = [torch.cat(list(panels), dim=2) for panels in rows]  # [3, H, 4W] each
    grid = torch.cat(strips, dim=1)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def save_figure(rows: List[torch.Tensor], path: str, scale: int = 1):
    """The rows of 4 panels as one PNG, each pixel enlarged to scale x scale (nearest: crisp patches)."""
    image = panels_to_image(rows)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)
