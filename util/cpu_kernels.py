"""CPU kernels for bf16 compute that PyTorch's eager ops leave on the table.

`flash_attention_bf16_forward` (training): flash attention, forward in bf16, backward in fp32.
Measured with torch 2.14 on an AVX-512-BF16/AMX CPU (2 cores), one decoder attention of
mae_vit_large_patch7 at 224 px, batch 2 ([2, 16, 1025, 32]): PyTorch's CPU flash attention takes
13 ms forward in bf16 but 29 ms in fp32, while its backward takes 70 ms in fp32 but 85 ms in bf16.
`flash_attention_bf16_forward` takes the fast half of each: about 6% off a training step of that
model, against fp32 flash attention for the whole of it.

The backward is the exact gradient of the forward's maths up to bf16 rounding: it recomputes the
attention probabilities in fp32 from the same bf16 q and k and the forward's fp32 log-sum-exp, and
only the output used in the softmax-gradient term (rowsum(dO * O)) carries the forward's bf16
rounding. Gradients are returned in the inputs' dtype, as autograd would for bf16 inputs.

`linear_gelu` (inference): GELU(x W^T + b) as one oneDNN matmul with the bias and the GELU applied
to the fp32 accumulator (the eager ops write x W^T + b in bf16, then read it back for the GELU).
Measured on the same CPU, mae_vit_large_patch7's fc1 for 4 views of 2 images at 224 px
([6152, 1024] x [1024, 4096]): 43 ms against 55 ms; it is also closer to the fp32 result, since
the GELU sees the unrounded sum.
"""
from typing import Optional

import torch

from util import misc

_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _FlashAttentionBf16Forward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float]) -> torch.Tensor:
        out, logsumexp = _FORWARD(q, k, v, 0.0, False, scale=scale)  # logsumexp [N, heads, T] in fp32
        ctx.save_for_backward(q, k, v, out, logsumexp)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        q, k, v, out, logsumexp = ctx.saved_tensors
        grad_q, grad_k, grad_v = _BACKWARD(grad_out.float(), q.float(), k.float(), v.float(), out.float(),
                                           logsumexp, 0.0, False, scale=ctx.scale)
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None


def flash_attention_bf16_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 scale: Optional[float] = None) -> torch.Tensor:
    """softmax(q k^T * scale) v for CPU tensors [N, heads, T, head_dim] of one reduced dtype.

    No mask, no dropout. scale defaults to head_dim ** -0.5. The output has the inputs' dtype.
    """
    if q.device.type != "cpu":
        raise ValueError(f"flash_attention_bf16_forward is a CPU kernel, got a {q.device.type} tensor")
    return _FlashAttentionBf16Forward.apply(q, k, v, scale)


_LINEAR_POINTWISE = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


def linear_gelu_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear_gelu` can run here: a CPU build with oneDNN that has bf16 kernels for this CPU
    (util.misc.cpu_features; an AVX-512 BF16 or AMX CPU has them, an AVX2-only one has no bf16 matmul to
    fuse into), bf16 weights, no gradients."""
    return (_LINEAR_POINTWISE is not None and torch.backends.mkldnn.is_available() and x.device.type == "cpu"
            and weight.dtype == torch.bfloat16 and not torch.is_grad_enabled()
            and misc.cpu_features().onednn_bf16)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """GELU(x W^T + b) (exact, erf GELU) in bf16 for x [..., in], weight [out, in]; see `linear_gelu_supported`."""
    if not linear_gelu_supported(x, weight):
        raise ValueError("linear_gelu needs a CPU build with oneDNN, bf16 weights and no gradients")
    bias = bias.to(weight.dtype) if bias is not None else None
    return _LINEAR_POINTWISE(x.to(weight.dtype), weight, bias, "gelu", [], "none")
