"""Checkpoints in the official MAE format, synthesised for tests (no download, random values)."""
from pathlib import Path

import torch


def official_mae_state_dict(embed_dim: int, depth: int, patch: int = 16, img_size: int = 224,
                            decoder_dim: int = 0, decoder_depth: int = 0, mlp_ratio: int = 4,
                            seed: int = 0) -> dict[str, torch.Tensor]:
    """The key names and shapes of `mae_pretrain_vit_*.pth` (encoder) and, with decoder_dim > 0,
    of `mae_pretrain_vit_*_full.pth` / `mae_visualize_vit_*.pth` (decoder too)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    num_tokens = (img_size // patch) ** 2 + 1
    state = {
        "cls_token": rand(1, 1, embed_dim),
        "pos_embed": rand(1, num_tokens, embed_dim),
        "patch_embed.proj.weight": rand(embed_dim, 3, patch, patch),
        "patch_embed.proj.bias": rand(embed_dim),
        "norm.weight": 1 + rand(embed_dim),
        "norm.bias": rand(embed_dim),
    }

    def block(prefix, dim):
        hidden = dim * mlp_ratio
        state.update({
            f"{prefix}.norm1.weight": 1 + rand(dim), f"{prefix}.norm1.bias": rand(dim),
            f"{prefix}.attn.qkv.weight": rand(3 * dim, dim), f"{prefix}.attn.qkv.bias": rand(3 * dim),
            f"{prefix}.attn.proj.weight": rand(dim, dim), f"{prefix}.attn.proj.bias": rand(dim),
            f"{prefix}.norm2.weight": 1 + rand(dim), f"{prefix}.norm2.bias": rand(dim),
            f"{prefix}.mlp.fc1.weight": rand(hidden, dim), f"{prefix}.mlp.fc1.bias": rand(hidden),
            f"{prefix}.mlp.fc2.weight": rand(dim, hidden), f"{prefix}.mlp.fc2.bias": rand(dim),
        })

    for i in range(depth):
        block(f"blocks.{i}", embed_dim)
    if decoder_dim:
        state.update({
            "mask_token": rand(1, 1, decoder_dim),
            "decoder_pos_embed": rand(1, num_tokens, decoder_dim),
            "decoder_embed.weight": rand(decoder_dim, embed_dim), "decoder_embed.bias": rand(decoder_dim),
            "decoder_norm.weight": 1 + rand(decoder_dim), "decoder_norm.bias": rand(decoder_dim),
            "decoder_pred.weight": rand(patch * patch * 3, decoder_dim),
            "decoder_pred.bias": rand(patch * patch * 3),
        })
        for i in range(decoder_depth):
            block(f"decoder_blocks.{i}", decoder_dim)
    return state


def write_official_checkpoint(path: Path, **kwargs) -> dict[str, torch.Tensor]:
    """Write {'model': state} like the released files and return the state."""
    state = official_mae_state_dict(**kwargs)
    torch.save({"model": state}, path)
    return state
