"""Deterministic inference masks: K views that together hide every patch exactly once."""
import torch

MASK_PATTERNS = ("stripes", "grid", "checkerboard")


def _check(grid_size: int, num_masks: int, pattern: str) -> None:
    if pattern not in MASK_PATTERNS:
        raise ValueError(f"unknown mask pattern {pattern!r}; choose one of {', '.join(MASK_PATTERNS)}")
    if num_masks < 2:
        raise ValueError(f"num_masks must be at least 2 (each view hides 1/num_masks), got {num_masks}")
    if pattern == "stripes" and grid_size % num_masks:
        ok = [k for k in range(2, grid_size + 1) if grid_size % k == 0]
        raise ValueError(
            f"mask pattern 'stripes' needs the patch grid side ({grid_size}) to be divisible by "
            f"num_masks ({num_masks}); num_masks that work for this grid: {ok}"
        )
    if pattern == "grid":
        side = round(num_masks**0.5)
        if side * side != num_masks:
            raise ValueError(
                f"mask pattern 'grid' needs a square num_masks (4, 9, 16, ...), got {num_masks}"
            )
        if grid_size % side:
            raise ValueError(
                f"mask pattern 'grid' with num_masks={num_masks} needs the patch grid side "
                f"({grid_size}) to be divisible by {side}"
            )
    if pattern == "checkerboard" and num_masks != 2:
        raise ValueError(f"mask pattern 'checkerboard' works with num_masks=2 only, got {num_masks}")


def make_inference_masks(grid_size: int, num_masks: int = 4, pattern: str = "stripes") -> torch.Tensor:
    """Bool [num_masks, grid_size**2], True = hidden; every patch is hidden in exactly one view.

    Patterns (patch (r, c) in row-major order):
    - stripes: view c mod K (columns of patches), the original project's choice.
    - grid: for K = s*s, view s*(r mod s) + (c mod s); with K=4 all 8 neighbours of a hidden patch
      stay visible, so every hidden patch is reconstructed from its full surroundings.
    - checkerboard: K=2, view (r + c) mod 2.
    Raises ValueError naming the sizes that work when the grid and K do not fit.
    """
    _check(grid_size, num_masks, pattern)
    coords = torch.arange(grid_size)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # [G, G]
    if pattern == "stripes":
        view = cols % num_masks
    elif pattern == "grid":
        side = round(num_masks**0.5)
        view = side * (rows % side) + (cols % side)
    else:
        view = (rows + cols) % 2
    view = view.flatten()  # [L], the view that hides each patch
    return view[None, :] == torch.arange(num_masks)[:, None]  # [K, L]
