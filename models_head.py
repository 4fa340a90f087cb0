"""A learnt discriminative head on the frozen MAE (DRAEM-style): a small U-Net that maps an image, its
MAE reconstruction and the per-pixel error maps to an anomaly logit map.

Inputs (what `models_mae.AnomalyScorer.error_maps` gives, at the scorer's views):
    image           [N, 3, H, W]  normalised with the ImageNet mean/std
    reconstruction  [N, 3, H, W]  the merged reconstruction, same space
    error maps      {'mse': [N, H, W], 'msgms': [N, H, W]}, unsmoothed
The head sees 8 channels: image, reconstruction, sqrt(mse) (the error in the image's own units, so it
is of the size of the other inputs) and msgms (already in [0, 1]). Output: logits [N, 1, H, W];
sigmoid(logit) is the probability that a pixel is anomalous.

`HeadScorer(scorer, head, image_kernel)` scores images with it and returns what `AnomalyScorer`
returns (`models_mae.AnomalyOutput`): the head's pixel map is its probability map, its image map the
same map mean-filtered over image_kernel x image_kernel pixels, the score its maximum (DRAEM's image
score; `head_maps`). Either level can stay the reconstruction scorer's (the per-category choice).

Normalisation is GroupNorm: its statistics are per sample, so training (batches of a few images,
half of them normal) and scoring (any batch) compute the same function. The convolutions run in
channels-last layout (`create_head` stores the weights so, the forward lays out its input so): on a
2-core AVX-512-BF16 CPU a bf16 training step of head_unet_tiny on 8 images of 112 px took 0.6 s
against 2.7 s in the default layout.

A checkpoint's `head` entry (main_train_head.py; a plain dict, weights_only-loadable):
    version, name, state_dict    the registered head and its weights (the selected EMA weights)
    input_size, num_masks, mask_pattern, image_kernel
                                 what its inputs and scores are made with
    training                     the training options, the simulation config, time and counts
    selection                    the held-out evidence the weights were chosen by (each checked step's
                                 metrics on held-out normal images with simulated anomalies on them)
    evidence, choice             (version 2) the head's graded evidence on the recipe choice's synthetic
                                 defects (scoring.head_evidence; the strongest strength only where
                                 that rules the head out) and where it replaces the reconstruction
                                 recipe (util.recipe_choice.choose_head)
    holdout_maps                 (version 2) {"pixel", "image": float32 [n, S, S]}, the head's maps of
                                 the held-out normal images: main_infer.py's threshold where it scores
`head_from_entry(entry)` rebuilds the head from it.
"""
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from models_mae import AnomalyOutput, AnomalyScorer
from util.error_maps import ERRORS

HEAD_VERSION = 2  # 2 adds the per-category choice and the held-out maps its threshold comes from
HEAD_INPUTS = ("mse", "msgms")  # the error maps the head reads, besides the image and the reconstruction
IN_CHANNELS = 3 + 3 + len(HEAD_INPUTS)
CHANNELS_PER_GROUP = 8
IMAGE_KERNEL_FRACTION = 0.08  # DRAEM's 21 px window at 256 px


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(max(1, channels // CHANNELS_PER_GROUP), channels)


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each followed by GroupNorm and SiLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), _norm(out_channels), nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), _norm(out_channels), nn.SiLU(),
        )


class DiscriminativeHead(nn.Module):
    """U-Net with `levels` resolutions (channels base, 2 base, 4 base, ...): max-pool down, bilinear up,
    skip connections by concatenation, a 1x1 convolution to one logit per pixel.

    Any input size works: the input is padded (edge pixels repeated) to a multiple of 2^(levels-1) and
    the logits cropped back.
    """

    def __init__(self, base_channels: int = 16, levels: int = 4) -> None:
        super().__init__()
        if levels < 2:
            raise ValueError(f"a U-Net needs at least 2 levels, got {levels}")
        self.base_channels = base_channels
        self.levels = levels
        widths = [base_channels * 2**i for i in range(levels)]
        self.down = nn.ModuleList([ConvBlock(IN_CHANNELS, widths[0])] +
                                  [ConvBlock(widths[i - 1], widths[i]) for i in range(1, levels)])
        self.up = nn.ModuleList(ConvBlock(widths[i] + widths[i + 1], widths[i]) for i in reversed(range(levels - 1)))
        self.out = nn.Conv2d(widths[0], 1, 1)
        # Start near the prior that anomalous pixels are rare (about 1%): the first steps then learn
        # where anomalies are instead of the overall rate.
        nn.init.constant_(self.out.bias, -4.6)

    @staticmethod
    def inputs(image: torch.Tensor, reconstruction: torch.Tensor, error_maps: dict[str, torch.Tensor]) -> torch.Tensor:
        """The head's input channels [N, IN_CHANNELS, H, W] (module docstring), float32."""
        mse = error_maps["mse"].float().clamp_min(0).sqrt()[:, None]
        return torch.cat([image.float(), reconstruction.float(), mse, error_maps["msgms"].float()[:, None]], dim=1)

    def forward(self, image: torch.Tensor, reconstruction: torch.Tensor,
                error_maps: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits [N, 1, H, W] from image, reconstruction [N, 3, H, W] and error maps {name: [N, H, W]}."""
        x = self.inputs(image, reconstruction, error_maps).contiguous(memory_format=torch.channels_last)
        h, w = x.shape[-2:]
        multiple = 2 ** (self.levels - 1)
        pad_h, pad_w = -h % multiple, -w % multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for block in self.up:
            skip = skips.pop()
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([skip, x], dim=1))
        return self.out(x)[..., :h, :w]


# ---- factories: numbers only ------------------------------------------------------------------
def head_unet_tiny(**kwargs) -> DiscriminativeHead:
    return DiscriminativeHead(base_channels=16, levels=4, **kwargs)


def head_unet_small(**kwargs) -> DiscriminativeHead:
    return DiscriminativeHead(base_channels=32, levels=4, **kwargs)


HEADS: dict[str, Callable[..., DiscriminativeHead]] = {
    "head_unet_tiny": head_unet_tiny,
    "head_unet_small": head_unet_small,
}


def create_head(name: str) -> DiscriminativeHead:
    """Build a registered head, its weights in channels-last layout (module docstring)."""
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; known heads: {', '.join(HEADS)}")
    return HEADS[name]().to(memory_format=torch.channels_last)


def head_from_entry(entry: dict) -> DiscriminativeHead:
    """The head stored in a checkpoint's `head` entry (module docstring), weights loaded, on the CPU."""
    if entry.get("version") != HEAD_VERSION:
        raise ValueError(f"head entry version {entry.get('version')!r}; this code reads version {HEAD_VERSION}")
    head = create_head(entry["name"])
    head.load_state_dict(entry["state_dict"])
    return head


def head_maps(logits: torch.Tensor, image_kernel: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The head's logits [N, 1, H, W] -> (anomaly_maps [N, H, W], image_maps [N, H, W], scores [N]), in fp32:
    the probabilities, their mean over image_kernel x image_kernel windows (at the borders over the
    pixels inside the image) and its maximum."""
    _check_kernel(image_kernel)
    with torch.autocast(device_type=logits.device.type, enabled=False):  # maps and scores in fp32
        probabilities = torch.sigmoid(logits.float())
        image_maps = F.avg_pool2d(probabilities, image_kernel, stride=1, padding=image_kernel // 2,
                                  count_include_pad=False)[:, 0]
    return probabilities[:, 0], image_maps, image_maps.flatten(1).amax(dim=1)


def default_image_kernel(input_size: int) -> int:
    """The odd window nearest IMAGE_KERNEL_FRACTION of the input size (9 at 112 px, 17 at 224)."""
    return 2 * round((IMAGE_KERNEL_FRACTION * input_size - 1) / 2) + 1


def _check_kernel(image_kernel: int) -> None:
    if image_kernel < 1 or image_kernel % 2 == 0:
        raise ValueError(f"image_kernel must be an odd number of pixels, got {image_kernel}")


class HeadScorer(nn.Module):
    """Scores images with the MAE's reconstruction (`scorer`, an AnomalyScorer whose views the head
    was trained on) and the head on top: the head gives the pixel-level map (`head_pixel`), the
    image-level map and score (`head_image`), or both, and `scorer`'s own recipes the other level,
    all from one reconstruction pass. Returns `AnomalyOutput`; decisions (thresholds) are the caller's."""

    def __init__(self, scorer: AnomalyScorer, head: DiscriminativeHead, image_kernel: int,
                 head_pixel: bool = True, head_image: bool = True) -> None:
        super().__init__()
        _check_kernel(image_kernel)
        if not (head_pixel or head_image):
            raise ValueError("a HeadScorer uses the head at one level at least; score with the AnomalyScorer")
        self.scorer = scorer
        self.head = head
        self.image_kernel = image_kernel
        self.head_pixel = head_pixel
        self.head_image = head_image

    @property
    def model(self) -> nn.Module:
        return self.scorer.model

    def map_recipes(self) -> tuple[str, str]:
        """(pixel-level, image-level) map recipes: "head" where the head gives the level."""
        pixel_recipe, image_recipe = self.scorer.map_recipes()
        return "head" if self.head_pixel else pixel_recipe, "head" if self.head_image else image_recipe

    def map_names(self) -> tuple[str, str]:
        """(pixel-level, image-level) map names, as reports show them."""
        pixel_name, image_name = self.scorer.map_names()
        return ("head" if self.head_pixel else pixel_name,
                f"head, mean over {self.image_kernel} px" if self.head_image else image_name)

    def forward(self, imgs: torch.Tensor) -> AnomalyOutput:
        both = self.head_pixel and self.head_image
        errors = HEAD_INPUTS if both else tuple(e for e in ERRORS if e in HEAD_INPUTS + self.scorer.errors)
        maps, reconstructions = self.scorer.error_maps(imgs, errors)
        logits = self.head(imgs, reconstructions, maps)  # [N, 1, H, W]
        anomaly_maps, image_maps, scores = head_maps(logits, self.image_kernel)
        if not both:
            own = self.scorer.score_maps(maps, reconstructions)
            if not self.head_pixel:
                anomaly_maps = own.anomaly_maps
            if not self.head_image:
                image_maps, scores = own.image_maps, own.scores
        return AnomalyOutput(scores, anomaly_maps, reconstructions, image_maps)
