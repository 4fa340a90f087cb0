"""LoRA adapters: injection, freezing, merging, saving unmerged, adapter files."""
import pytest
import torch

from lora_utils import (adapter_state_dict, export_adapter, freeze_non_lora, import_adapter, inject_lora,
                        is_lora_name, merge_lora, parameter_table, unmerged_state_dict)
from models_mae import MaskedAutoencoderViT, create_model
from util.masks import make_inference_masks

IMG = 28


def _pair():
    """The same random weights with and without LoRA."""
    torch.manual_seed(0)
    base = create_model("mae_vit_tiny_patch7", img_size=IMG, lora_rank=0)
    lora_model = create_model("mae_vit_tiny_patch7", img_size=IMG, lora_rank=4)
    missing, unexpected = lora_model.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(is_lora_name(k) for k in missing)
    return base, lora_model


def _views(model, imgs):
    with torch.no_grad():
        return model.anomaly_forward(imgs, make_inference_masks(4, 4))[0]


def test_injection_keeps_the_official_key_names():
    _, model = _pair()
    keys = model.state_dict().keys()
    assert {"blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.lora_A", "blocks.0.attn.qkv.lora_B",
            "blocks.0.attn.proj.lora_A", "decoder_blocks.1.attn.qkv.lora_B"} <= set(keys)
    assert not any(k.startswith("blocks.0.mlp.fc1.lora") for k in keys)
    mlp = create_model("mae_vit_tiny_patch7", img_size=IMG, lora_rank=2, lora_targets=("fc1",))
    assert "blocks.0.mlp.fc1.lora_A" in mlp.state_dict() and "blocks.0.attn.qkv.lora_A" not in mlp.state_dict()
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        inject_lora(MaskedAutoencoderViT(img_size=IMG, embed_dim=64, depth=1, num_heads=2), 2, targets=("q",))


def test_lora_model_equals_base_model_at_init():
    base, lora_model = _pair()
    imgs = torch.randn(2, 3, IMG, IMG)
    torch.testing.assert_close(_views(lora_model, imgs), _views(base, imgs), atol=0, rtol=0)


def test_freeze_non_lora_trains_only_adapters_and_random_parts():
    _, model = _pair()
    loaded = {k for k in model.state_dict() if not is_lora_name(k) and not k.startswith("patch_embed")}
    freeze_non_lora(model, loaded)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):  # two steps: A only moves once B is non-zero
        loss, _, _ = model(torch.randn(2, 3, IMG, IMG))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, param in model.named_parameters():
        if is_lora_name(name) or name.startswith("patch_embed"):
            assert not torch.equal(param, before[name]), f"{name} should have been trained"
        else:
            assert torch.equal(param, before[name]), f"{name} should be frozen"
    table = parameter_table(model)
    assert "trainable (LoRA)" in table and "frozen" in table


def _trained_lora_model():
    _, model = _pair()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if is_lora_name(name):
                param.normal_(std=0.05)
    return model


def test_merged_and_unmerged_outputs_match():
    model = _trained_lora_model()
    imgs = torch.randn(2, 3, IMG, IMG)
    unmerged = _views(model, imgs)
    assert merge_lora(model) == 2 * (12 + 2)  # qkv and proj of 12 encoder and 2 decoder blocks
    torch.testing.assert_close(_views(model, imgs), unmerged, atol=1e-5, rtol=1e-4)


def test_state_dict_is_saved_unmerged_whatever_the_mode(tmp_path):
    model = _trained_lora_model()
    imgs = torch.randn(2, 3, IMG, IMG)
    expected = _views(model, imgs)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    merge_lora(model)
    torch.save(unmerged_state_dict(model), tmp_path / "ckpt.pth")
    fresh = create_model("mae_vit_tiny_patch7", img_size=IMG, lora_rank=4)
    fresh.load_state_dict(torch.load(tmp_path / "ckpt.pth", weights_only=True))
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(value, reference[key], atol=1e-6, rtol=0)
    torch.testing.assert_close(_views(fresh, imgs), expected, atol=1e-5, rtol=1e-4)


def test_adapter_export_import_roundtrip(tmp_path):
    model = _trained_lora_model()
    base_state = {k: v for k, v in model.state_dict().items() if not is_lora_name(k)}
    freeze_non_lora(model, set(base_state))
    adapter = adapter_state_dict(model)
    assert adapter and all(is_lora_name(k) for k in adapter)
    export_adapter(model, tmp_path / "adapter.pth", args={"model": "mae_vit_tiny_patch7"})
    saved = torch.load(tmp_path / "adapter.pth", weights_only=True)
    assert saved["args"] == {"model": "mae_vit_tiny_patch7"}

    fresh = create_model("mae_vit_tiny_patch7", img_size=IMG, lora_rank=4)
    fresh.load_state_dict(base_state, strict=False)
    import_adapter(fresh, saved["adapter"])
    imgs = torch.randn(1, 3, IMG, IMG)
    torch.testing.assert_close(_views(fresh, imgs), _views(model, imgs), atol=0, rtol=0)

    wrong_rank = create_model("mae_vit_tiny_patch7", img_size=IMG, lora_rank=2)
    with pytest.raises(ValueError, match="shape mismatches"):
        import_adapter(wrong_rank, saved["adapter"])
