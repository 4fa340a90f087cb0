"""Fixed 2-D sin-cos position embeddings (MAE / "Attention is all you need" style).

They are rebuilt for whatever patch grid the model uses (32x32 for patch 7 at 224 px), never loaded
from a checkpoint made for another grid.
"""
import torch


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, embed_dim]: sin of every frequency, then cos of every frequency."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # [D/2]
    angles = positions.to(torch.float64)[:, None] * omega[None, :]  # [M, D/2]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, cls_token: bool = False) -> torch.Tensor:
    """Position embedding of a grid_size x grid_size patch grid, float32 [grid_size**2 (+1), embed_dim].

    Patches are in row-major order (the order of `PatchEmbed`'s flatten). As in the official MAE
    code, the first half of the channels encodes the column index and the second half the row index.
    With `cls_token` a zero row is prepended for the class token.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4, got {embed_dim}")
    coords = torch.arange(grid_size)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # [G, G] each
    emb = torch.cat(
        [sincos_1d(embed_dim // 2, cols.flatten()), sincos_1d(embed_dim // 2, rows.flatten())], dim=1
    )
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()
