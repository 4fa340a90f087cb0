"""Per-pixel reconstruction errors: what an anomaly map measures before smoothing and calibration.

Both take the reconstruction and the input as [N, C, H, W] in the model's (ImageNet-normalised)
space and return [N, H, W] float32.

- `squared_error` (`mse`, the original method): mean over the colour channels of (x_hat - x)^2,
  in the normalised space, so one unit is about (0.22 of the [0, 1] range)^2.
- `msgms` (RIAD, Zavrtanik et al. 2021; also DRAEM's scoring): a structural error that compares
  image gradients instead of intensities. Images are mapped back to [0, 1] and reduced to one
  channel by averaging R, G and B (a colour change that keeps the grey-level structure scores
  low; `mse` sees it). At scale s (s = 0..3; scale s+1 is scale s average-pooled 2x2):

      g(I)  = sqrt((I * P_x)^2 + (I * P_y)^2)      Prewitt P_x = [[1, 0, -1]] x 3 rows / 3, P_y = P_x^T
                                                    (borders: the edge pixel repeated)
      GMS_s = (2 g(x) g(x_hat) + c) / (g(x)^2 + g(x_hat)^2 + c),    c = 0.0026

  and msgms = 1 - mean_s upsample(GMS_s), each GMS_s resized to H x W bilinearly (half-pixel
  centres). 0 where the gradients agree, up to 1 where one image has an edge the other lacks.
"""
import torch
import torch.nn.functional as F

ERRORS = ("mse", "msgms")
MSGMS_C = 0.0026
MSGMS_SCALES = 4


def squared_error(reconstructions: torch.Tensor, imgs: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] x 2 -> [N, H, W]: squared error averaged over channels."""
    return ((reconstructions.float() - imgs.float()) ** 2).mean(dim=1)


def _prewitt_magnitude(gray: torch.Tensor) -> torch.Tensor:
    """[N, 1, H, W] -> gradient magnitude [N, 1, H, W] with Prewitt filters, replicated borders."""
    kx = torch.tensor([[1.0, 0.0, -1.0]] * 3, dtype=gray.dtype, device=gray.device) / 3.0
    kernels = torch.stack([kx, kx.t()])[:, None]  # [2, 1, 3, 3]
    grad = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)  # [N, 2, H, W]
    return torch.sqrt((grad**2).sum(dim=1, keepdim=True))


def msgms(reconstructions: torch.Tensor, imgs: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Multi-scale gradient-magnitude dissimilarity [N, H, W] (module docstring).

    `mean` and `std` [C] are the normalisation the images carry; they are undone to compare in [0, 1].
    """
    scale = std.float().view(1, -1, 1, 1)
    shift = mean.float().view(1, -1, 1, 1)
    x = (imgs.float() * scale + shift).mean(dim=1, keepdim=True)  # [N, 1, H, W] in [0, 1]
    y = (reconstructions.float() * scale + shift).mean(dim=1, keepdim=True)
    size = x.shape[-2:]
    total = torch.zeros_like(x)
    for s in range(MSGMS_SCALES):
        if s:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        gx, gy = _prewitt_magnitude(x), _prewitt_magnitude(y)
        gms = (2 * gx * gy + MSGMS_C) / (gx**2 + gy**2 + MSGMS_C)
        total = total + (gms if s == 0 else F.interpolate(gms, size=size, mode="bilinear", align_corners=False))
    return 1.0 - total[:, 0] / MSGMS_SCALES
