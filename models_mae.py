"""The masked autoencoder (ViT encoder + light decoder, as in MAE) and the anomaly scorer built on it.

Training: `MaskedAutoencoderViT.forward(imgs, mask_ratio) -> loss, pred, mask`, exactly MAE's recipe.
Scoring: `AnomalyScorer(model, num_masks, mask_pattern, sigma, ...)(imgs)` hides every patch once
across K deterministic views, reconstructs all views in one batch, and turns the errors of the
hidden patches (squared error, MSGMS) into smoothed anomaly maps and image scores, optionally
standardised against held-out normal images (util.calibration).
"""
from functools import partial
from typing import Callable, NamedTuple, Optional

import torch
from timm.layers import PatchEmbed
from timm.layers import Attention as TimmAttention
from timm.layers import Mlp as TimmMlp
from timm.models.vision_transformer import Block
from torch import nn

from lora_utils import inject_lora
from util.calibration import SCORE_METHODS, LevelStats, MapSpec, image_scores, level_map
from util.cpu_kernels import flash_attention_bf16_forward, linear_gelu, linear_gelu_supported
from util.datasets import IMAGENET_MEAN, IMAGENET_STD
from util.error_maps import ERRORS, msgms
from util.masks import make_inference_masks
from util.pos_embed import get_2d_sincos_pos_embed
from util.smoothing import GaussianSmoothing


class Attention(TimmAttention):
    """timm's Attention (same tensors, same names, same function) with CPU bf16 training kernels.

    When gradients are recorded on the CPU under lower-precision autocast (without attention
    dropout), two kernels measured faster with torch 2.14 on an AVX-512-BF16/AMX CPU are used:
    - sequences of up to SHORT_SEQUENCE tokens (the encoder's visible tokens): matmul attention in
      the autocast dtype, the softmax included (the CPU kernel accumulates in fp32 and rounds once,
      where the probabilities were rounded before AV anyway); PyTorch's flash attention backward
      is slower there.
    - longer ones (the decoder's 1 + L tokens): flash attention with the forward in the autocast
      dtype and the backward in fp32 (util.cpu_kernels), the faster half of each.
    On a mae_vit_large_patch7 training step at 224 px these are 6% each against the previous choice
    (fp32 softmax, fp32 flash attention). Inference, CUDA and fp32 run timm's forward unchanged.
    """

    SHORT_SEQUENCE = 512

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if not (self.fused_attn and x.device.type == "cpu" and torch.is_grad_enabled()
                and torch.is_autocast_enabled("cpu") and attn_mask is None and not is_causal
                and not (self.training and self.attn_drop.p > 0) and getattr(self, "gate", None) is None):
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        n, length, _ = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [N, heads, T, head_dim] each, in the autocast dtype
        q, k = self.q_norm(q), self.k_norm(k)
        if length <= self.SHORT_SEQUENCE:
            attn = (q * self.scale) @ k.transpose(-2, -1)  # [N, heads, T, T]
            x = attn.softmax(dim=-1) @ v
        else:
            x = flash_attention_bf16_forward(q.to(v.dtype), k.to(v.dtype), v, scale=self.scale)
        x = self.norm(x.transpose(1, 2).reshape(n, length, self.attn_dim))
        return self.proj_drop(self.proj(x))


class Mlp(TimmMlp):
    """timm's Mlp (same tensors, same names, same function); in bf16 CPU inference fc1's bias and
    GELU run inside its matmul (util.cpu_kernels.linear_gelu), about 4% off a mae_vit_large_patch7
    scoring call. Training, CUDA, fp32 and an unmerged LoRA fc1 run timm's forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        unmerged_lora = getattr(self.fc1, "r", 0) > 0 and not self.fc1.merged
        if (unmerged_lora or type(self.act) is not nn.GELU or self.act.approximate != "none"
                or not linear_gelu_supported(x, self.fc1.weight)):
            return super().forward(x)
        x = linear_gelu(x, self.fc1.weight, self.fc1.bias)  # = act(fc1(x))
        return self.drop2(self.fc2(self.norm(self.drop1(x))))


class MaskedAutoencoderViT(nn.Module):
    """MAE with a ViT backbone; tensor names follow the official MAE checkpoints."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 7,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(
                f"input size {img_size} is not a multiple of the patch size {patch_size}; "
                f"use e.g. {patch_size * (img_size // patch_size)} or {patch_size * (img_size // patch_size + 1)}"
            )
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.grid_size = img_size // patch_size
        self.norm_pix_loss = norm_pix_loss

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # Fixed sin-cos embeddings for this grid. Persistent so our checkpoints carry the official key
        # names; official weights made for another grid are never loaded into them.
        self.register_buffer("pos_embed", torch.zeros(1, num_patches + 1, embed_dim))
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer,
                  attn_layer=Attention, mlp_layer=Mlp)
            for _ in range(depth)
        )
        self.norm = norm_layer(embed_dim)

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.register_buffer("decoder_pos_embed", torch.zeros(1, num_patches + 1, decoder_embed_dim))
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer,
                  attn_layer=Attention, mlp_layer=Mlp)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAE's initialisation: xavier for linears and the patch projection, N(0, 0.02) tokens."""
        self.pos_embed.copy_(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], self.grid_size, cls_token=True))
        self.decoder_pos_embed.copy_(
            get_2d_sincos_pos_embed(self.decoder_pos_embed.shape[-1], self.grid_size, cls_token=True)
        )
        # The patch projection is a linear map of the flattened patch, so it gets a linear's init.
        proj = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_linear_and_norm)

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    # ---- patches ------------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, L, p*p*C], each patch flattened as (row, col, channel)."""
        n, c, g, p = imgs.shape[0], self.in_chans, self.grid_size, self.patch_size
        x = imgs.reshape(n, c, g, p, g, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(n, g * g, p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, p*p*C] -> [N, C, H, W]; the inverse of `patchify`."""
        n, c, g, p = x.shape[0], self.in_chans, self.grid_size, self.patch_size
        x = x.reshape(n, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, c, g * p, g * p)

    def patch_targets(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruction targets [N, L, P] and each patch's mean and std [N, L, 1].

        With norm_pix_loss the target is the patch normalised by its own mean and std (MAE);
        otherwise mean 0 and std 1, so `pred * std + mean` is the identity.
        """
        target = self.patchify(imgs).float()
        if not self.norm_pix_loss:
            return target, torch.zeros_like(target[..., :1]), torch.ones_like(target[..., :1])
        mean = target.mean(dim=-1, keepdim=True)
        std = (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
        return (target - mean) / std, mean, std

    # ---- encoder / decoder --------------------------------------------------------------------
    def embed_patches(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> patch tokens with position embedding [N, L, D] (no class token)."""
        return self.patch_embed(imgs) + self.pos_embed[:, 1:, :]

    def forward_encoder(self, tokens: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encode the visible tokens: tokens [N, L, D], ids_keep [N, L_vis] -> latent [N, 1 + L_vis, D]."""
        x = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [N, 1 + L_vis, D], ids_restore [N, L] -> patch predictions [N, L, p*p*C].

        Each sample is put back in its OWN patch order: ids_restore is per sample.
        """
        x = self.decoder_embed(latent)
        n, num_visible = x.shape[0], x.shape[1] - 1
        mask_tokens = self.mask_token.to(x.dtype).expand(n, ids_restore.shape[1] - num_visible, -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # [N, L, D'] in shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x)[:, 1:, :]  # drop the class token

    # ---- training -----------------------------------------------------------------------------
    def random_masking(self, n: int, mask_ratio: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample random masking: ids_keep [N, L_vis], ids_restore [N, L], mask [N, L] (1 = hidden)."""
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        num_keep = int(self.num_patches * (1 - mask_ratio))
        noise = torch.rand(n, self.num_patches, device=device)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the first num_keep are kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        mask = torch.ones(n, self.num_patches, device=device)
        mask[:, :num_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # back to patch order
        return ids_shuffle[:, :num_keep], ids_restore, mask

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the hidden patches only (MAE)."""
        target, _, _ = self.patch_targets(imgs)
        loss = ((pred.float() - target) ** 2).mean(dim=-1)  # [N, L], loss per patch
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """MAE training step: returns loss, pred [N, L, p*p*C], mask [N, L] (1 = hidden)."""
        ids_keep, ids_restore, mask = self.random_masking(imgs.shape[0], mask_ratio, imgs.device)
        latent = self.forward_encoder(self.embed_patches(imgs), ids_keep)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    # ---- deterministic views for scoring ------------------------------------------------------
    def reconstruct_views(self, imgs: torch.Tensor, masks: "torch.Tensor | MaskViews") -> torch.Tensor:
        """Reconstruct every image under each of K fixed masks in ONE batch of N*K sequences.

        imgs [N, C, H, W]; masks bool [K, L] (True = hidden), each view hiding the same number of
        patches, or a `MaskViews` with the indices already derived (no host sync at all; this is
        what `AnomalyScorer` passes). Returns pred [N, K, L, p*p*C].
        """
        views = masks if isinstance(masks, MaskViews) else mask_views(masks)
        n, num_views = imgs.shape[0], views.ids_keep.shape[0]
        tokens = self.embed_patches(imgs)  # [N, L, D], computed once for all views
        tokens = tokens.repeat_interleave(num_views, dim=0)  # [N*K, L, D], view k of image i at i*K+k
        ids_keep = views.ids_keep.repeat(n, 1)  # [N*K, L_vis]
        latent = self.forward_encoder(tokens, ids_keep)
        pred = self.forward_decoder(latent, views.ids_restore.repeat(n, 1))  # [N*K, L, P]
        return pred.reshape(n, num_views, self.num_patches, -1)

    def anomaly_forward(self, imgs: torch.Tensor, masks: "torch.Tensor | MaskViews") -> tuple[torch.Tensor, torch.Tensor]:
        """Per-pixel error of each patch from the view that hid it.

        masks: bool [K, L] or a `MaskViews` (see `reconstruct_views`).
        Returns error_maps [N, H, W] (squared error averaged over colour channels, not smoothed) and
        reconstructions [N, C, H, W] (every patch taken from the view that hid it), both float32.
        With norm_pix_loss the prediction is de-normalised with the target patch's mean and std.
        """
        views = masks if isinstance(masks, MaskViews) else mask_views(masks)
        pred = self.reconstruct_views(imgs, views)  # [N, K, L, P]
        patches = torch.arange(self.num_patches, device=pred.device)
        pred = pred[:, views.view_of_patch, patches].float()  # [N, L, P], each patch from the view hiding it
        target, mean, std = self.patch_targets(imgs)
        pred = pred * std + mean
        target = target * std + mean
        error = self.unpatchify((pred - target) ** 2).mean(dim=1)  # [N, H, W]
        return error, self.unpatchify(pred)


class MaskViews(NamedTuple):
    """K inference masks with the indices the batched views need, derived once by `mask_views`.

    Everything the forward pass needs as a Python number (the visible length) is a shape here, so
    reconstructing from a MaskViews never reads a device tensor back to the host.
    """

    masks: torch.Tensor  # [K, L] bool, True = hidden
    ids_keep: torch.Tensor  # [K, L_vis], each view's visible patches in patch order
    ids_restore: torch.Tensor  # [K, L], undoes the (visible, then hidden) order of each view
    view_of_patch: torch.Tensor  # [L], the view that hides each patch

    @property
    def shape(self) -> torch.Size:
        """The masks' shape [K, L], so code written for a mask tensor keeps working."""
        return self.masks.shape


def mask_views(masks: torch.Tensor) -> MaskViews:
    """Check that K masks [K, L] each hide the same number of patches and derive their indices.

    Call it once per set of masks (`AnomalyScorer` does so on the CPU at construction): on a GPU
    tensor the check reads the K hidden counts back to the host, one synchronisation.
    """
    hidden_per_view = masks.sum(dim=1).tolist()  # host ints: the visible length is a tensor shape
    if len(set(hidden_per_view)) != 1:
        raise ValueError("every inference view must hide the same number of patches")
    num_keep = masks.shape[1] - int(hidden_per_view[0])
    order = masks.to(torch.uint8)
    # Stable sort puts visible patches (False) first, each group in patch order.
    ids_shuffle = torch.argsort(order, dim=1, stable=True)  # [K, L]
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    view_of_patch = order.argmax(dim=0)  # [L]
    return MaskViews(masks, ids_shuffle[:, :num_keep].contiguous(), ids_restore, view_of_patch)


def _init_linear_and_norm(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class AnomalyOutput(NamedTuple):
    scores: torch.Tensor  # [N], image anomaly scores (reduced from the image-level map)
    anomaly_maps: torch.Tensor  # [N, H, W], the pixel-level map
    reconstructions: torch.Tensor  # [N, C, H, W], in the model's (normalised) input space
    image_maps: torch.Tensor  # [N, H, W], the image-level map the scores are reduced from


class CalibratedMap(nn.Module):
    """One map recipe (util.calibration) with its held-out statistics as buffers: smoothed error
    maps {error: [N, H, W]} -> the recipe's map [N, H, W]. A raw single-error recipe needs none."""

    def __init__(self, spec: MapSpec, stats: Optional[LevelStats] = None) -> None:
        super().__init__()
        if spec.needs_calibration and stats is None:
            raise ValueError(f"map recipe {spec} needs statistics of held-out normal images")
        self.spec = spec
        for error in spec.errors if spec.norm != "raw" else ():
            self.register_buffer(f"mean_{error}", stats.mean[error].float(), persistent=False)
            self.register_buffer(f"std_{error}", stats.std[error].float(), persistent=False)
        self.scale = dict(stats.scale) if len(spec.errors) > 1 else {}

    def stats(self) -> LevelStats:
        errors = self.spec.errors if self.spec.norm != "raw" else ()
        return LevelStats({e: getattr(self, f"mean_{e}") for e in errors},
                          {e: getattr(self, f"std_{e}") for e in errors}, self.scale)

    def forward(self, error_maps: dict[str, torch.Tensor]) -> torch.Tensor:
        return level_map(error_maps, self.spec, self.stats())


class AnomalyScorer(nn.Module):
    """Scores images with a trained MAE: K deterministic views, smoothed per-pixel error maps.

    Each patch is reconstructed by the view that hides it; the errors (`mse`, `msgms`: see
    util.error_maps) of the composite reconstruction are turned into two maps by recipes
    (util.calibration): the pixel-level map (smoothed by a Gaussian of `sigma`, returned as
    `anomaly_maps`) and the image-level map (smoothed by `image_sigma`, default `sigma`), reduced to
    the image score by its max or the mean of its top `topk_fraction` pixels. Recipes other than raw
    mse/msgms need held-out statistics (`pixel_stats`, `image_stats`). Decisions (thresholds) are the
    caller's.
    """

    def __init__(
        self,
        model: MaskedAutoencoderViT,
        num_masks: int = 4,
        mask_pattern: str = "grid",
        sigma: float = 4.0,
        image_sigma: Optional[float] = None,
        score: str = "max",
        topk_fraction: float = 0.01,
        pixel_map: str = "mse",
        image_map: str = "mse",
        pixel_stats: Optional[LevelStats] = None,
        image_stats: Optional[LevelStats] = None,
    ) -> None:
        super().__init__()
        if score not in SCORE_METHODS:
            raise ValueError(f"unknown score {score!r}; choose one of {', '.join(SCORE_METHODS)}")
        if not 0.0 < topk_fraction <= 1.0:
            raise ValueError(f"topk_fraction must be in (0, 1], got {topk_fraction}")
        self.model = model
        self.score = score
        self.topk_fraction = topk_fraction
        # Masks and their indices are derived here once, on the CPU; as buffers they follow the
        # scorer to its device, so scoring never synchronises with the device to read them.
        views = mask_views(make_inference_masks(model.grid_size, num_masks, mask_pattern))
        for name, tensor in views._asdict().items():
            self.register_buffer(name, tensor, persistent=False)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD), persistent=False)
        self.smoothing = GaussianSmoothing(sigma)
        self.image_smoothing = GaussianSmoothing(sigma if image_sigma is None else image_sigma)
        self.pixel_level = CalibratedMap(MapSpec.parse(pixel_map), pixel_stats)
        self.image_level = CalibratedMap(MapSpec.parse(image_map), image_stats)

    def views(self) -> MaskViews:
        return MaskViews(self.masks, self.ids_keep, self.ids_restore, self.view_of_patch)

    def error_maps(self, imgs: torch.Tensor, errors: tuple[str, ...] = ERRORS
                   ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-pixel error maps {error: [N, H, W]} (float32, not smoothed) and the reconstructions [N, C, H, W]."""
        squared, reconstructions = self.model.anomaly_forward(imgs, self.views())
        # The errors are convolutions and sums that autocast would run in bf16: keep the maps (and so
        # the scores, whose ties would distort the metrics) at fp32.
        with torch.autocast(device_type=imgs.device.type, enabled=False):
            maps = {"mse": squared.float()} if "mse" in errors else {}
            if "msgms" in errors:
                maps["msgms"] = msgms(reconstructions, imgs, self.pixel_mean, self.pixel_std)
        return maps, reconstructions

    @property
    def errors(self) -> tuple[str, ...]:
        """The error maps the two levels' recipes read."""
        needed = self.pixel_level.spec.errors + self.image_level.spec.errors
        return tuple(e for e in ERRORS if e in needed)

    def map_recipes(self) -> tuple[str, str]:
        """(pixel-level, image-level) map recipes, as --pixel_map/--image_map name them."""
        return str(self.pixel_level.spec), str(self.image_level.spec)

    def map_names(self) -> tuple[str, str]:
        """(pixel-level, image-level) map names, as reports show them."""
        return (f"{self.pixel_level.spec}, sigma {self.smoothing.sigma:g}",
                f"{self.image_level.spec}, sigma {self.image_smoothing.sigma:g}")

    def forward(self, imgs: torch.Tensor) -> AnomalyOutput:
        return self.score_maps(*self.error_maps(imgs, self.errors))

    def score_maps(self, maps: dict[str, torch.Tensor], reconstructions: torch.Tensor) -> AnomalyOutput:
        """The output for unsmoothed error maps {error: [N, H, W]} (`error_maps`, holding `errors`)."""
        pixel_errors, image_errors = self.pixel_level.spec.errors, self.image_level.spec.errors
        with torch.autocast(device_type=reconstructions.device.type, enabled=False):  # smoothing in fp32 too
            anomaly_maps = self.pixel_level({e: self.smoothing(maps[e]) for e in pixel_errors})
            image_maps = self.image_level({e: self.image_smoothing(maps[e]) for e in image_errors})
            scores = image_scores(image_maps, self.score, self.topk_fraction)
        return AnomalyOutput(scores, anomaly_maps, reconstructions, image_maps)


# ---- factories: numbers only ------------------------------------------------------------------
def mae_vit_tiny_patch7(**kwargs) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(patch_size=7, embed_dim=192, depth=12, num_heads=3,
                                decoder_embed_dim=128, decoder_depth=2, decoder_num_heads=4, **kwargs)


def mae_vit_small_patch7(**kwargs) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(patch_size=7, embed_dim=384, depth=12, num_heads=6,
                                decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8, **kwargs)


def mae_vit_base_patch7(**kwargs) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(patch_size=7, embed_dim=768, depth=12, num_heads=12,
                                decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, **kwargs)


def mae_vit_large_patch7(**kwargs) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(patch_size=7, embed_dim=1024, depth=24, num_heads=16,
                                decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, **kwargs)


def mae_vit_huge_patch7(**kwargs) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(patch_size=7, embed_dim=1280, depth=32, num_heads=16,
                                decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, **kwargs)


MODELS: dict[str, Callable[..., MaskedAutoencoderViT]] = {
    "mae_vit_tiny_patch7": mae_vit_tiny_patch7,
    "mae_vit_small_patch7": mae_vit_small_patch7,
    "mae_vit_base_patch7": mae_vit_base_patch7,
    "mae_vit_large_patch7": mae_vit_large_patch7,
    "mae_vit_huge_patch7": mae_vit_huge_patch7,
}


def create_model(
    name: str,
    img_size: int = 224,
    norm_pix_loss: bool = False,
    lora_rank: int = 8,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    lora_targets: tuple[str, ...] = ("qkv", "proj"),
) -> MaskedAutoencoderViT:
    """Build a registered model and put LoRA adapters on its attention linears (rank 0: none)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    model = MODELS[name](img_size=img_size, norm_pix_loss=norm_pix_loss)
    if lora_rank > 0:
        inject_lora(model, rank=lora_rank, alpha=lora_alpha, dropout=lora_dropout, targets=lora_targets)
    return model
