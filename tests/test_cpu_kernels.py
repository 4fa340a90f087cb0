"""CPU bf16 kernels, each against an fp32 reference: the flash attention with a bf16 forward and an
fp32 backward and the model's Attention paths (training), the LoRA layer's forward, and the fused
fc1 + GELU of the model's Mlp (inference); and which of them each CPU kind takes (faked features)."""
import loralib as lora
import pytest
import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from timm.layers import Mlp as TimmMlp

import models_mae
from lora_utils import LoRALinear
from models_mae import Attention, Mlp
from cpu_kinds import BF16_KINDS, CPU_KINDS, fake_cpu
from lora_utils import cast_frozen_weights, merge_lora
from util.cpu_kernels import flash_attention_bf16_forward, linear_gelu, linear_gelu_supported
from util.misc import autocast, resolve_amp

BF16 = torch.bfloat16


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def _inputs(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g).to(BF16) for _ in range(4)]  # q, k, v, grad_out


@pytest.mark.parametrize("scale", [None, 0.3])
def test_flash_forward_bf16_backward_fp32_matches_fp32_attention(scale):
    q, k, v, grad_out = _inputs(2, 3, 70, 16)
    fast = [t.clone().requires_grad_() for t in (q, k, v)]
    out = flash_attention_bf16_forward(*fast, scale=scale)
    out.backward(grad_out)
    ref = [t.float().requires_grad_() for t in (q, k, v)]  # the same bf16 values, fp32 maths
    ref_out = F.scaled_dot_product_attention(*ref, scale=scale)
    ref_out.backward(grad_out.float())
    assert out.dtype == BF16 and all(t.grad.dtype == BF16 for t in fast)
    assert _relative_error(out, ref_out) < 1e-2
    for mine, theirs in zip(fast, ref):
        assert _relative_error(mine.grad, theirs.grad) < 2e-2  # bf16 rounding of the output and grads


def test_flash_attention_bf16_forward_is_cpu_only():
    q = torch.zeros(1, 1, 2, 4, dtype=BF16, device="meta")
    with pytest.raises(ValueError, match="CPU kernel"):
        flash_attention_bf16_forward(q, q, q)


def _fp32_reference(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm's forward in fp32 on the bf16-rounded weights and input: output, grad of x, grad of qkv.weight."""
    ref = Attention(attn.qkv.in_features, num_heads=attn.num_heads, qkv_bias=True)
    ref.load_state_dict({k: v.to(BF16).float() for k, v in attn.state_dict().items()})
    x = x.to(BF16).float().requires_grad_()
    out = TimmAttention.forward(ref, x)
    out.square().sum().backward()
    return out, x.grad, ref.qkv.weight.grad


def _spy_flash_attention(monkeypatch) -> list:
    """Count the model's calls of the flash kernel (each still runs)."""
    calls = []
    monkeypatch.setattr(models_mae, "flash_attention_bf16_forward",
                        lambda *a, **kw: calls.append(1) or flash_attention_bf16_forward(*a, **kw))
    return calls


@pytest.mark.parametrize("length", [40, Attention.SHORT_SEQUENCE + 30])  # matmul path, flash path
def test_cpu_bf16_training_attention_matches_timm_in_fp32(length, monkeypatch):
    torch.manual_seed(0)
    attn = Attention(64, num_heads=4, qkv_bias=True).train()
    x = torch.randn(2, length, 64)
    ref_out, ref_grad_x, ref_grad_w = _fp32_reference(attn, x)

    flash_calls = _spy_flash_attention(monkeypatch)
    monkeypatch.setattr(TimmAttention, "forward", lambda *a, **kw: pytest.fail("took timm's forward"))
    x = x.requires_grad_()
    with torch.autocast("cpu", dtype=BF16):
        out = attn(x)
    out.float().square().sum().backward()

    assert len(flash_calls) == (length > Attention.SHORT_SEQUENCE)
    assert _relative_error(out, ref_out) < 2e-2
    assert _relative_error(x.grad, ref_grad_x) < 3e-2
    assert _relative_error(attn.qkv.weight.grad, ref_grad_w) < 3e-2


def test_inference_and_fp32_take_timms_forward(monkeypatch):
    attn = Attention(32, num_heads=2).train()
    x = torch.randn(1, 10, 32)
    calls = []
    original = TimmAttention.forward
    monkeypatch.setattr(TimmAttention, "forward", lambda self, *a, **kw: calls.append(1) or original(self, *a, **kw))
    attn(x)  # fp32 training
    with torch.no_grad(), torch.autocast("cpu", dtype=BF16):
        attn(x)  # bf16 inference
    attn.attn_drop.p = 0.1
    with torch.autocast("cpu", dtype=BF16):
        attn(x)  # attention dropout while training
    assert len(calls) == 3


def _lora_pair():
    torch.manual_seed(0)
    layer = LoRALinear(24, 36, r=4, lora_alpha=8, merge_weights=False)
    with torch.no_grad():
        layer.lora_B.normal_()  # zero B (loralib's init) would hide a wrong update
    reference = lora.Linear(24, 36, r=4, lora_alpha=8, merge_weights=False)
    reference.load_state_dict(layer.state_dict())
    return layer, reference


def test_models_get_the_lora_linear():
    model = models_mae.create_model("mae_vit_tiny_patch7", img_size=28, lora_rank=2)
    assert type(model.blocks[0].attn.qkv) is LoRALinear and type(model.decoder_blocks[0].attn.proj) is LoRALinear


def test_lora_linear_equals_loralib_in_fp32():
    layer, reference = _lora_pair()
    assert layer.scaling == 2.0
    x = torch.randn(3, 5, 24)
    out, ref = layer(x), reference(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    for name in ("lora_A", "lora_B", "weight"):
        torch.testing.assert_close(getattr(layer, name).grad, getattr(reference, name).grad, rtol=1e-4, atol=1e-4)


def test_lora_linear_under_autocast_is_bf16_and_close_to_loralib():
    layer, reference = _lora_pair()
    x = torch.randn(3, 5, 24)
    with torch.autocast("cpu", dtype=BF16):
        out = layer(x)
    assert out.dtype == BF16
    assert _relative_error(out, reference(x)) < 1e-2
    with torch.no_grad():
        layer.weight += (layer.lora_B @ layer.lora_A) * layer.scaling
    layer.merged = True  # a merged layer is the plain linear
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))


# oneDNN's bf16 matmul (linear_gelu) needs AVX-512 BF16 or AMX; elsewhere the Mlp takes timm's forward.
NEEDS_ONEDNN_BF16 = pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                                       reason="this CPU has no oneDNN bf16 kernels (AVX-512 BF16 / AMX)")


@NEEDS_ONEDNN_BF16
def test_linear_gelu_matches_fp32_and_refuses_gradients():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(3, 7, 32), torch.randn(48, 32) / 6, torch.randn(48)
    with torch.no_grad():
        out = linear_gelu(x, weight.to(BF16), bias)
    reference = F.gelu(F.linear(x.to(BF16).float(), weight.to(BF16).float(), bias.to(BF16).float()))
    assert out.dtype == BF16 and out.shape == (3, 7, 48)
    assert _relative_error(out, reference) < 1e-2
    assert not linear_gelu_supported(x, weight.to(BF16))  # gradients on
    with pytest.raises(ValueError, match="no gradients"):
        linear_gelu(x, weight.to(BF16), bias)


def _spy_linear_gelu(monkeypatch) -> list:
    """Count the model's calls of the fused kernel (each still runs, or its stand-in on a faked CPU)."""
    calls, kernel = [], models_mae.linear_gelu
    monkeypatch.setattr(models_mae, "linear_gelu", lambda *a: calls.append(1) or kernel(*a))
    return calls


@NEEDS_ONEDNN_BF16
def test_mlp_fuses_fc1_and_gelu_in_bf16_cpu_inference(monkeypatch):
    torch.manual_seed(0)
    mlp = Mlp(32, 64).eval()
    x = torch.randn(2, 9, 32)
    reference = TimmMlp.forward(mlp, x)  # fp32
    mlp.fc1.to(BF16)
    mlp.fc2.to(BF16)
    calls = _spy_linear_gelu(monkeypatch)
    with torch.inference_mode(), torch.autocast("cpu", dtype=BF16):
        out = mlp(x)
    assert calls == [1]
    assert _relative_error(out, reference) < 2e-2


@NEEDS_ONEDNN_BF16
def test_mlp_takes_timms_forward_when_it_cannot_fuse(monkeypatch):
    mlp = Mlp(16, 32).to(BF16)
    calls = _spy_linear_gelu(monkeypatch)
    x = torch.randn(1, 4, 16, dtype=BF16)
    mlp(x)  # gradients recorded (training)
    with torch.no_grad():
        Mlp(16, 32)(x.float())  # fp32 weights
        lora_mlp = Mlp(16, 32)
        lora_mlp.fc1 = LoRALinear(16, 32, r=2, merge_weights=False)
        lora_mlp.to(BF16)(x)  # an unmerged adapter on fc1
        lora_mlp.fc1.merged = True
        lora_mlp(x)
    assert calls == [1]  # only the merged one


def test_bf16_training_step_of_a_model_with_a_long_decoder_matches_fp32(monkeypatch):
    """Both attention paths in one model (168 px: 145 encoder tokens, 577 decoder tokens) and the LoRA
    layers: loss and gradients of a bf16 autocast step against the same step in fp32."""
    torch.manual_seed(0)
    model = models_mae.create_model("mae_vit_tiny_patch7", img_size=168, lora_rank=2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0.0, 0.02)
    imgs = torch.randn(2, 3, 168, 168)
    checked = ("blocks.0.attn.qkv.lora_B", "decoder_blocks.0.attn.qkv.lora_A", "patch_embed.proj.weight")
    flash_calls = _spy_flash_attention(monkeypatch)
    results = []
    for autocast_on in (True, False):
        model.zero_grad()
        torch.manual_seed(1)  # the same random masks
        with torch.autocast("cpu", dtype=BF16, enabled=autocast_on):
            loss, _, _ = model(imgs)
        loss.backward()
        params = dict(model.named_parameters())
        results.append((loss.detach(), {name: params[name].grad.clone() for name in checked}))
    (fast_loss, fast_grads), (ref_loss, ref_grads) = results
    assert len(flash_calls) == len(model.decoder_blocks)  # the decoder took the flash path, fp32 did not
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-2, atol=0)
    for name in checked:
        assert _relative_error(fast_grads[name], ref_grads[name]) < 5e-2, name


def test_mlp_without_onednn_bf16_takes_timms_forward(monkeypatch):
    """On a CPU without oneDNN bf16 kernels, bf16 inference (`--amp bf16` asked for) must not try the
    fused kernel (it would fail)."""
    fake_cpu(monkeypatch, "no_bf16")
    calls = _spy_linear_gelu(monkeypatch)
    mlp = Mlp(16, 32).to(BF16).eval()
    with torch.inference_mode():
        out = mlp(torch.randn(1, 4, 16, dtype=BF16))
    assert calls == [] and out.shape == (1, 4, 16)


@pytest.mark.parametrize("kind", list(CPU_KINDS))
def test_each_cpu_kind_takes_its_kernels(kind, monkeypatch):
    """`--amp auto` on each CPU kind: bf16 and the CPU kernels (training: matmul attention for short
    sequences, the flash kernel for long ones; scoring: the fused fc1 + GELU) where the CPU has bf16
    instructions; fp32 and timm's forwards where it has not."""
    features = fake_cpu(monkeypatch, kind)
    assert features.kind == kind
    amp = resolve_amp("auto", torch.device("cpu"))
    bf16 = kind in BF16_KINDS
    assert amp == (BF16 if bf16 else None)
    flash_calls, fused_calls = _spy_flash_attention(monkeypatch), _spy_linear_gelu(monkeypatch)
    timm_calls, timm_forward = [], TimmAttention.forward
    monkeypatch.setattr(TimmAttention, "forward",
                        lambda self, *a, **kw: timm_calls.append(1) or timm_forward(self, *a, **kw))

    torch.manual_seed(0)
    attn = Attention(32, num_heads=2, qkv_bias=True).train()
    for length in (9, Attention.SHORT_SEQUENCE + 1):  # a training step's encoder and decoder lengths
        with autocast(torch.device("cpu"), amp):
            out = attn(torch.randn(1, length, 32, requires_grad=True))
        out.float().sum().backward()
        assert out.dtype == (BF16 if bf16 else torch.float32)
    assert (len(flash_calls), len(timm_calls)) == ((1, 0) if bf16 else (0, 2))

    model = models_mae.create_model("mae_vit_tiny_patch7", img_size=28, lora_rank=2)
    merge_lora(model)  # as main_infer prepares the model
    model.eval().requires_grad_(False)
    if amp is not None:
        cast_frozen_weights(model, amp)
    scorer = models_mae.AnomalyScorer(model, num_masks=4, mask_pattern="grid").eval()
    with torch.inference_mode(), autocast(torch.device("cpu"), amp):
        scores = scorer(torch.randn(1, 3, 28, 28)).scores
    assert len(fused_calls) == (len(model.blocks) + len(model.decoder_blocks) if bf16 else 0)
    assert torch.isfinite(scores).all()
