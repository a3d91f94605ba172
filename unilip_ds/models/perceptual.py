"""Frozen networks of the perceptual loss: LPIPS (VGG16) and a ConvNeXt-S classifier.

torchvision / lpips / timm cannot be imported on CPU-only torch here (the torchvision wheel
is a CUDA build), so the backbones are defined in this file with module names that make
their state-dict keys identical to the published files:
  - VGG16 `features.*`      torchvision's vgg16 file (vgg16-397923af.pth; `classifier.*` unused)
  - LPIPS heads `lin{k}.model.1.weight`  lpips' weights/v0.1/vgg.pth
  - ConvNeXt-S              torchvision's convnext_small file (convnext_small-0c510722.pth)
Those files load without renaming. Tests use random weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from unilip_ds.engine.weights import load_state_dict_into

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# --------------------------------------------------------------------------------------
# VGG16 + LPIPS
# --------------------------------------------------------------------------------------
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
# indices in `features` after which LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_LPIPS_TAPS = (3, 8, 15, 22, 29)
_LPIPS_CHANNELS = (64, 128, 256, 512, 512)
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


class VGG16Features(nn.Module):
    """torchvision vgg16().features: the same layer indices, so `features.N.*` keys match."""

    def __init__(self, width_div: int = 1):
        super().__init__()
        layers, c = [], 3
        for v in _VGG16_CFG:
            v = v if v == "M" else v // width_div
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c, v, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                c = v
        self.features = nn.Sequential(*layers)

    def taps(self, x: torch.Tensor):
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in _LPIPS_TAPS:
                out.append(x)
                if i == _LPIPS_TAPS[-1]:
                    break
        return out


class _HeadConv(nn.Conv2d):
    """Published LPIPS heads are non-negative; a random stand-in starts as the plain mean of
    squared normalised-feature differences, so an untrained LPIPS is still a distance."""

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, 1.0 / self.in_channels)


class NetLinLayer(nn.Module):
    """lpips' 1x1 head: `model.1.weight` (model.0 is a dropout, unused at eval)."""

    def __init__(self, chn_in: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), _HeadConv(chn_in, 1, 1, stride=1, padding=0, bias=False))


class LPIPSHeads(nn.Module):
    """lin0..lin4: keys as in lpips/weights/v0.1/vgg.pth."""

    def __init__(self, width_div: int = 1):
        super().__init__()
        for k, c in enumerate(_LPIPS_CHANNELS):
            setattr(self, f"lin{k}", NetLinLayer(c // width_div))

    def __getitem__(self, k: int) -> NetLinLayer:
        return getattr(self, f"lin{k}")


class LPIPS(nn.Module):
    """LPIPS v0.1 with VGG16 (Zhang et al. 2018); inputs in [0, 1], one value per image."""

    def __init__(self, width_div: int = 1):
        super().__init__()
        self.vgg = VGG16Features(width_div)
        self.heads = LPIPSHeads(width_div)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from unilip_ds.models.unilip import normalize
        dtype = self.vgg.features[0].weight.dtype

        def prep(t):  # lpips' ScalingLayer on inputs in [-1, 1]
            return normalize((t.float() * 2 - 1), _LPIPS_SHIFT, _LPIPS_SCALE).to(dtype)

        total = 0.0
        for k, (fx, fy) in enumerate(zip(self.vgg.taps(prep(x)), self.vgg.taps(prep(y)))):
            fx, fy = _unit(fx.float()), _unit(fy.float())
            d = (fx - fy) ** 2
            w = self.heads[k].model[1].weight.float()
            total = total + F.conv2d(d, w).mean(dim=(2, 3))
        return total.flatten()


def _unit(t: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return t / (torch.sqrt((t ** 2).sum(dim=1, keepdim=True)) + eps)


# --------------------------------------------------------------------------------------
# ConvNeXt-S (torchvision layout)
# --------------------------------------------------------------------------------------
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW tensor (torchvision.models.convnext.LayerNorm2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class Permute(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


class CNBlock(nn.Module):
    """torchvision CNBlock: `block.{0,2,3,5}` and `layer_scale`; stochastic depth is a
    training-time op of the classifier and is not needed for a frozen loss network."""

    def __init__(self, dim: int, layer_scale: float = 1e-6):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim, bias=True), Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim),
            Permute([0, 3, 1, 2]))
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)

    def forward(self, x):
        return x + self.layer_scale * self.block(x)


class ConvNeXt(nn.Module):
    """torchvision.models.convnext_small layout (`features`, `avgpool`, `classifier`)."""

    def __init__(self, dims: Tuple[int, ...] = (96, 192, 384, 768), depths: Tuple[int, ...] = (3, 3, 27, 3),
                 num_classes: int = 1000):
        super().__init__()
        layers = [nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=1e-6))]
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            layers.append(nn.Sequential(*[CNBlock(dim) for _ in range(depth)]))
            if i + 1 < len(dims):
                layers.append(nn.Sequential(LayerNorm2d(dim, eps=1e-6),
                                            nn.Conv2d(dim, dims[i + 1], kernel_size=2, stride=2)))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1),
                                        nn.Linear(dims[-1], num_classes))

    def forward(self, x):
        return self.classifier(self.avgpool(self.features(x)))


def convnext_small() -> ConvNeXt:
    return ConvNeXt()


# --------------------------------------------------------------------------------------
# the loss network
# --------------------------------------------------------------------------------------
class PerceptualNets(nn.Module):
    """LPIPS(VGG16) and ConvNeXt-S logits distance; frozen. `forward(x, y)` with images in
    [0, 1] returns (lpips, logits_mse), both fp32 scalars (batch means)."""

    def __init__(self, vgg_width_div: int = 1, convnext_dims: Tuple[int, ...] = (96, 192, 384, 768),
                 convnext_depths: Tuple[int, ...] = (3, 3, 27, 3), classifier_size: int = 224):
        super().__init__()
        self.lpips = LPIPS(vgg_width_div)
        self.convnext = ConvNeXt(tuple(convnext_dims), tuple(convnext_depths))
        self.classifier_size = classifier_size
        self.requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen loss networks stay in eval mode

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x.float(), size=(self.classifier_size,) * 2, mode="bilinear", align_corners=False,
                          antialias=True)
        from unilip_ds.models.unilip import normalize
        x = normalize(x, IMAGENET_MEAN, IMAGENET_STD).to(self.convnext.features[0][0].weight.dtype)
        return self.convnext(x).float()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        lp = self.lpips(x, y).mean()
        lg = F.mse_loss(self.logits(x), self.logits(y))
        return lp, lg

    def load_pretrained(self, vgg_path: str, lpips_path: str, convnext_path: str) -> None:
        """Published files: torchvision vgg16, lpips v0.1 vgg heads, torchvision convnext_small."""
        for leaf, path in (("vgg_path", vgg_path), ("lpips_path", lpips_path), ("convnext_path", convnext_path)):
            self.load_part(leaf, path)

    def load_part(self, leaf: str, path: str) -> None:
        """One published file, by its config key's leaf (model.vgg_path / lpips_path / convnext_path)."""
        if leaf == "vgg_path":
            vgg = _read_torch(path, "model.vgg_path")
            load_state_dict_into(self.lpips.vgg, {k: v for k, v in vgg.items() if k.startswith("features.")},
                                 what=f"VGG16 {path}")
        elif leaf == "lpips_path":
            load_state_dict_into(self.lpips.heads, _read_torch(path, "model.lpips_path"),
                                 what=f"LPIPS heads {path}")
        elif leaf == "convnext_path":
            load_state_dict_into(self.convnext, _read_torch(path, "model.convnext_path"),
                                 what=f"ConvNeXt-S {path}")
        else:
            raise KeyError(leaf)


def _read_torch(path, what: str):
    from unilip_ds.engine.weights import read_torch
    from unilip_ds.models.unilip import WeightsNotFound
    if not path or not Path(path).is_file():
        raise WeightsNotFound(f"{what}: no such file {path!r}")
    return read_torch(path)
