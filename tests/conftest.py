"""Shared fixtures: tiny models and small generated images, so the suite runs on a 2-core CPU."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import models_mae  # noqa: E402
import models_vit  # noqa: E402

# 32-px images cut into 4-px patches: an 8x8 grid of 64 patches
TINY = dict(img_size=32, patch_size=4)
TINY_MAE = dict(TINY, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=1,
                decoder_num_heads=4)
TINY_VIT = dict(TINY, embed_dim=64, depth=2, num_heads=4)


@pytest.fixture
def tiny_mae():
    torch.manual_seed(0)
    return models_mae.mae_vit_tiny_patch16(**TINY_MAE)


@pytest.fixture
def tiny_vit():
    torch.manual_seed(0)
    return models_vit.vit_tiny_patch16(num_classes=10, **TINY_VIT)


@pytest.fixture
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 32, 32, generator=g)
