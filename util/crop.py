"""RandomResizedCrop that draws one scale and one aspect ratio (no retry loop), as the TF/TPU linear-probing
recipe does; the crop is clipped to the image instead of falling back to a centre crop, and is at least one
pixel a side (on images of a few pixels the rounding could give an empty box, which PIL fills black)."""
import math

import torch
from torchvision import transforms
from torchvision.transforms import functional as F


class RandomResizedCrop(transforms.RandomResizedCrop):

    @staticmethod
    def get_params(img, scale, ratio):
        width, height = F.get_image_size(img)
        area = height * width

        target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
        log_ratio = torch.log(torch.tensor(ratio))
        aspect_ratio = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()

        w = min(max(1, int(round(math.sqrt(target_area * aspect_ratio)))), width)
        h = min(max(1, int(round(math.sqrt(target_area / aspect_ratio)))), height)

        i = torch.randint(0, height - h + 1, size=(1,)).item()
        j = torch.randint(0, width - w + 1, size=(1,)).item()
        return i, j, h, w
