"""The model core: factories, MAE training forward, deterministic views and the anomaly scorer."""
import math

import numpy as np
import pytest
import torch

from models_mae import MODELS, AnomalyScorer, create_model
from util.masks import MASK_PATTERNS, make_inference_masks
from util.pos_embed import get_2d_sincos_pos_embed

SMALL = 28  # a 4x4 patch grid: every factory builds and runs quickly


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("mae_vit_tiny_patch7", img_size=56)  # 8x8 grid, LoRA on qkv/proj


BIG = ("mae_vit_large_patch7", "mae_vit_huge_patch7")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in BIG else n for n in MODELS])
def test_factory_shapes_and_gradients(name):
    torch.manual_seed(0)
    model = create_model(name, img_size=SMALL)
    # LoRA's B starts at zero, which makes A's gradient exactly zero at init; give B the small values
    # it has after a few steps so every tensor's gradient can be checked.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(std=0.01)
    imgs = torch.randn(2, 3, SMALL, SMALL)
    loss, pred, mask = model(imgs, mask_ratio=0.75)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert pred.shape == (2, 16, 7 * 7 * 3)
    assert mask.shape == (2, 16)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum())]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"


def test_large_is_the_mae_paper_vit_large_at_224():
    model = MODELS["mae_vit_large_patch7"](img_size=224)
    assert model.grid_size == 32 and model.num_patches == 1024
    assert len(model.blocks) == 24 and model.cls_token.shape[-1] == 1024
    assert model.blocks[0].attn.num_heads == 16
    assert len(model.decoder_blocks) == 8 and model.mask_token.shape[-1] == 512
    encoder = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("decoder", "mask_token")))
    total = sum(p.numel() for p in model.parameters())
    # ViT-L/16 has 303.3M encoder parameters; the 7x7 patch embedding is smaller than the 16x16 one.
    assert 302e6 < encoder < 304e6
    assert 320e6 < total < 335e6
    expected = get_2d_sincos_pos_embed(1024, 32, cls_token=True)
    assert torch.equal(model.pos_embed[0], expected)


def test_base_parameter_count():
    model = MODELS["mae_vit_base_patch7"](img_size=SMALL)
    total = sum(p.numel() for p in model.parameters())
    assert 105e6 < total < 115e6  # ViT-B (85.6M) + MAE's 8-block 512-d decoder (~26M)


def test_pos_embed_matches_the_sincos_formula():
    dim, grid = 16, 3
    emb = get_2d_sincos_pos_embed(dim, grid, cls_token=True).numpy()
    assert emb.shape == (grid * grid + 1, dim) and not emb[0].any()
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))
    for r in range(grid):
        for c in range(grid):
            row = emb[1 + r * grid + c]
            expected = np.concatenate(
                [np.sin(c * omega), np.cos(c * omega), np.sin(r * omega), np.cos(r * omega)]
            )
            np.testing.assert_allclose(row, expected, atol=1e-6)


def test_img_size_must_be_a_multiple_of_the_patch():
    with pytest.raises(ValueError, match="multiple of the patch size 7"):
        create_model("mae_vit_tiny_patch7", img_size=100)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="mae_vit_large_patch7"):
        create_model("mae_vit_gigantic")


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_mask_ratio_reaches_the_masking(tiny, ratio):
    _, _, mask = tiny(torch.randn(3, 3, 56, 56), mask_ratio=ratio)
    assert torch.equal(mask.sum(dim=1), torch.full((3,), 64 - int(64 * (1 - ratio)), dtype=mask.dtype))


def test_each_sample_is_restored_in_its_own_order(tiny, monkeypatch):
    """The original project unshuffled every sample with sample 0's order; catch that."""
    torch.manual_seed(1)
    imgs = torch.randn(3, 3, 56, 56)
    ids_keep, ids_restore, mask = tiny.random_masking(3, 0.75, imgs.device)
    assert not torch.equal(ids_restore[0], ids_restore[1])

    monkeypatch.setattr(tiny, "random_masking", lambda n, r, d: (ids_keep, ids_restore, mask))
    loss, pred, _ = tiny(imgs)
    losses = []
    for i in range(3):
        monkeypatch.setattr(tiny, "random_masking", lambda n, r, d, i=i: (ids_keep[i:i + 1], ids_restore[i:i + 1], mask[i:i + 1]))
        loss_i, pred_i, _ = tiny(imgs[i:i + 1])
        torch.testing.assert_close(pred_i[0], pred[i], atol=1e-5, rtol=1e-5)
        losses.append(loss_i)
    # every sample hides the same number of patches, so the batch loss is the mean of the losses
    torch.testing.assert_close(loss, torch.stack(losses).mean(), atol=1e-6, rtol=1e-5)


def test_loss_is_the_mse_over_hidden_patches(tiny):
    torch.manual_seed(2)
    imgs = torch.randn(2, 3, 56, 56)
    loss, pred, mask = tiny(imgs)
    target = tiny.patchify(imgs)
    per_patch = ((pred - target) ** 2).mean(-1)
    torch.testing.assert_close(loss, per_patch[mask.bool()].mean())


def test_norm_pix_loss_normalises_each_patch():
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch7", img_size=SMALL, norm_pix_loss=True)
    imgs = torch.randn(1, 3, SMALL, SMALL) * 3 + 5
    target, mean, std = model.patch_targets(imgs)
    torch.testing.assert_close(target.mean(-1), torch.zeros(1, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(target * std + mean, model.patchify(imgs))


def test_patchify_roundtrip(tiny):
    imgs = torch.randn(2, 3, 56, 56)
    torch.testing.assert_close(tiny.unpatchify(tiny.patchify(imgs)), imgs)
    # patch 1 is the second patch of the first row
    torch.testing.assert_close(tiny.patchify(imgs)[0, 1], imgs[0, :, :7, 7:14].permute(1, 2, 0).flatten())


@pytest.mark.parametrize("pattern,num_masks", [("stripes", 2), ("stripes", 4), ("stripes", 8), ("grid", 4), ("grid", 16), ("checkerboard", 2)])
def test_masks_partition_the_grid(pattern, num_masks):
    masks = make_inference_masks(16, num_masks, pattern)
    assert masks.shape == (num_masks, 256) and masks.dtype == torch.bool
    assert torch.equal(masks.sum(0), torch.ones(256, dtype=torch.long))  # hidden exactly once
    assert torch.equal(masks.sum(1), torch.full((num_masks,), 256 // num_masks))


def test_stripes_are_patch_columns_and_grid_keeps_all_neighbours():
    stripes = make_inference_masks(8, 4, "stripes").view(4, 8, 8)
    assert stripes[1, :, 1].all() and stripes[1, :, 5].all() and not stripes[1, :, 2].any()
    grid = make_inference_masks(8, 4, "grid").view(4, 8, 8)
    assert grid[2 * 1 + 0, 3, 4]  # patch (3, 4) hidden in view 2*(3 % 2) + (4 % 2)
    for view in grid:  # no two hidden patches touch, diagonals included
        hidden = view.nonzero().tolist()
        for r, c in hidden:
            neighbours = view[max(r - 1, 0):r + 2, max(c - 1, 0):c + 2]
            assert neighbours.sum() == 1


@pytest.mark.parametrize("grid_size,num_masks,pattern,hint", [
    (30, 4, "stripes", r"\[2, 3, 5, 6, 10, 15, 30\]"),
    (16, 3, "grid", "square num_masks"),
    (15, 4, "grid", "divisible by 2"),
    (16, 4, "diagonal", "stripes, grid"),
])
def test_incompatible_masks_say_what_works(grid_size, num_masks, pattern, hint):
    with pytest.raises(ValueError, match=hint):
        make_inference_masks(grid_size, num_masks, pattern)


@pytest.mark.parametrize("pattern", ["stripes", "grid"])
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_batched_views_equal_a_loop_over_masks(pattern, norm_pix_loss):
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch7", img_size=56, norm_pix_loss=norm_pix_loss).eval()
    imgs = torch.randn(2, 3, 56, 56)
    masks = make_inference_masks(8, 4, pattern)
    with torch.no_grad():
        error, recon = model.anomaly_forward(imgs, masks)
        expected_error = torch.zeros(2, 56, 56)
        expected_recon = torch.zeros(2, 3, 56, 56)
        target = model.patchify(imgs)
        for view in masks:  # one plain encoder+decoder pass per mask
            keep = (~view).nonzero().squeeze(1)
            latent = model.forward_encoder(model.embed_patches(imgs), keep.expand(2, -1))
            ids_restore = torch.argsort(torch.cat([keep, view.nonzero().squeeze(1)]))
            pred = model.forward_decoder(latent, ids_restore.expand(2, -1))
            if norm_pix_loss:
                mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
                pred = pred * (var + 1e-6) ** 0.5 + mean
            hidden = view[None, :, None].float()
            expected_error += model.unpatchify((pred - target) ** 2 * hidden).mean(1)
            expected_recon += model.unpatchify(pred * hidden)
    torch.testing.assert_close(error, expected_error, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(recon, expected_recon, atol=1e-5, rtol=1e-4)


def test_scorer_scores_are_the_maximum_of_the_smoothed_map(tiny):
    scorer = AnomalyScorer(tiny, num_masks=4, mask_pattern="stripes", sigma=4).eval()
    imgs = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        out = scorer(imgs)
        error, _ = tiny.anomaly_forward(imgs, scorer.masks)
    assert out.anomaly_maps.shape == (3, 56, 56) and out.reconstructions.shape == (3, 3, 56, 56)
    torch.testing.assert_close(out.scores, out.anomaly_maps.flatten(1).amax(1))
    torch.testing.assert_close(out.anomaly_maps, scorer.smoothing(error))
    topk = AnomalyScorer(tiny, score="topk", topk_fraction=0.5)
    with torch.no_grad():
        top = topk(imgs)
    assert (top.scores < out.scores).all()
    assert "masks" not in scorer.state_dict()  # fixed buffers are not part of a checkpoint


def test_scorer_buffers_follow_the_module(tiny):
    scorer = AnomalyScorer(tiny).to(torch.float64)
    assert scorer.smoothing.kernel.dtype == torch.float64
    assert scorer.masks.dtype == torch.bool  # .to(dtype) leaves bool buffers alone


def test_invalid_scorer_settings(tiny):
    with pytest.raises(ValueError, match="max, topk"):
        AnomalyScorer(tiny, score="mean")
    with pytest.raises(ValueError, match="divisible by num_masks"):
        AnomalyScorer(tiny, num_masks=3, mask_pattern="stripes")
    with pytest.raises(ValueError, match="square num_masks"):
        AnomalyScorer(tiny, num_masks=3)  # the default grid pattern
    assert set(MASK_PATTERNS) >= {"stripes", "grid"}


def test_anomaly_map_highlights_a_pasted_defect():
    """A model that reconstructs perfectly except where the image changed gives a map peaked there."""
    torch.manual_seed(0)
    model = create_model("mae_vit_tiny_patch7", img_size=56, lora_rank=0)
    clean = torch.zeros(1, 3, 56, 56)
    # Replace the reconstruction with the clean image: the error is then exactly the "defect".
    model.reconstruct_views = lambda imgs, masks: model.patchify(clean)[:, None].expand(-1, masks.shape[0], -1, -1)
    defect = clean.clone()
    defect[..., 30:34, 10:14] = 1.0
    out = AnomalyScorer(model, sigma=1)(defect)
    peak = divmod(int(out.anomaly_maps[0].argmax()), 56)
    assert 30 <= peak[0] < 34 and 10 <= peak[1] < 14
    assert math.isclose(float(model.anomaly_forward(defect, make_inference_masks(8, 4))[0].max()), 1.0)
