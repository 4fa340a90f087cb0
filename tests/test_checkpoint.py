"""Loading official MAE weights into the patch-7 model."""
import pytest
import torch
from timm.layers import resample_patch_embed

from models_mae import create_model
from official_ckpt import write_official_checkpoint
from util.checkpoint import load_pretrained, read_checkpoint
from util.cli import UserError
from util.pos_embed import get_2d_sincos_pos_embed


@pytest.fixture(scope="module")
def vit_b16(tmp_path_factory):
    """An official-format ViT-B/16 MAE checkpoint with its decoder (as mae_pretrain_vit_base_full.pth)."""
    path = tmp_path_factory.mktemp("ckpt") / "mae_pretrain_vit_base_full.pth"
    state = write_official_checkpoint(path, embed_dim=768, depth=12, decoder_dim=512, decoder_depth=8)
    return path, state


@pytest.mark.parametrize("init", ["random", "resample"])
def test_official_base_loads_into_patch7(vit_b16, init, capsys):
    path, state = vit_b16
    torch.manual_seed(0)
    model = create_model("mae_vit_base_patch7", img_size=224)
    initial_proj = model.patch_embed.proj.weight.detach().clone()
    report = load_pretrained(model, path, patch_embed_init=init)
    own = model.state_dict()
    for key, value in state.items():
        if key.startswith(("pos_embed", "decoder_pos_embed", "patch_embed", "decoder_pred")):
            continue
        assert torch.equal(own[key], value), key  # every other tensor is loaded as it is
    assert torch.equal(model.pos_embed[0], get_2d_sincos_pos_embed(768, 32, cls_token=True))
    assert torch.equal(model.decoder_pos_embed[0], get_2d_sincos_pos_embed(512, 32, cls_token=True))
    assert model.patch_embed.proj.weight.shape == (768, 3, 7, 7)
    if init == "random":
        assert torch.equal(model.patch_embed.proj.weight, initial_proj)
        assert "patch_embed.proj.weight" in report.skipped
    else:
        expected = resample_patch_embed(state["patch_embed.proj.weight"], [7, 7])
        torch.testing.assert_close(model.patch_embed.proj.weight, expected)
        assert "patch_embed.proj.weight" in report.loaded
    assert "decoder_pred.weight" in report.skipped and "pos_embed" in report.skipped
    assert "decoder_pred.weight" in report.missing
    assert not any("lora" in k for k in report.missing)
    printed = capsys.readouterr().out
    assert f"loaded {len(report.loaded)} tensors" in printed and "rebuilt for this model's patch grid" in printed


def test_encoder_only_checkpoint_leaves_the_decoder_initialised(tmp_path):
    path = tmp_path / "enc.pth"
    write_official_checkpoint(path, embed_dim=192, depth=12, patch=16)
    model = create_model("mae_vit_tiny_patch7", img_size=56)
    report = load_pretrained(model, path, verbose=False)
    assert any(k.startswith("decoder_blocks.") for k in report.missing)
    assert "blocks.11.attn.qkv.weight" in report.loaded and "norm.weight" in report.loaded


def test_other_variant_is_a_clear_error(tmp_path):
    path = tmp_path / "small.pth"
    write_official_checkpoint(path, embed_dim=384, depth=12, patch=16)
    model = create_model("mae_vit_tiny_patch7", img_size=56)
    with pytest.raises(UserError, match=r"another model variant \(embed dim 384, 12 blocks, patch 16\).*embed dim 192"):
        load_pretrained(model, path)


def test_file_matching_nothing_is_an_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"head.weight": torch.zeros(3, 3)}}, path)
    with pytest.raises(UserError, match="matches no tensor"):
        load_pretrained(create_model("mae_vit_tiny_patch7", img_size=28), path)


@pytest.mark.parametrize("content, message", [
    (b"", r"is empty \(0 bytes\)"),
    (b"not a checkpoint at all", r"is not a PyTorch checkpoint \(cannot unpickle\)"),
    (bytes(range(256)) * 16, r"is not a PyTorch checkpoint \(cannot unpickle\)"),
    (b"PK\x03\x04truncated", r"looks truncated \(incomplete zip archive\)"),
], ids=["empty", "text", "random_bytes", "zip_header_only"])
def test_not_a_checkpoint(tmp_path, content, message):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as e:
        read_checkpoint(path)
    text = str(e.value)
    assert str(path) in text and "\n" not in text and "weights_only` argument" not in text and len(text) < 300


def test_objects_that_safe_loading_refuses_are_named(tmp_path):
    import numpy as np
    path = tmp_path / "numpy.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "stats": np.zeros(3)}, path)
    with pytest.raises(UserError, match=r"holds a Python object \(numpy\..*\) that safe loading") as e:
        read_checkpoint(path)
    assert "\n" not in str(e.value) and "re-save its tensors" in str(e.value)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pth")
    with pytest.raises(UserError, match="is a folder; pass a .pth file"):
        read_checkpoint(tmp_path)
