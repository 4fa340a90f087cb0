"""scripts/benchmark.py and the fast path it measures: same numbers as the naive baseline, honest
FLOP counts, the promised JSON, the peaks and the fast path of each CPU kind (faked features). No
speed is asserted here (speed targets live in the benchmark); measured shares are checked only for
invariants that hold on every CPU kind (tests/cpu_kinds.py)."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import benchmark  # noqa: E402
from cpu_kinds import BF16_KINDS, CPU_KINDS, check_peak_shares, fake_cpu  # noqa: E402
from benchmark import (build_model, fast_anomaly, fast_scorer, freeze_non_lora, inference_flops,  # noqa: E402
                       naive_anomaly, official_keys, train_flops)
from lora_utils import cast_frozen_weights, unmerged_state_dict  # noqa: E402
from models_mae import Attention, AnomalyScorer, mask_views  # noqa: E402
from util.masks import make_inference_masks  # noqa: E402
from util.smoothing import GaussianSmoothing  # noqa: E402

CPU = torch.device("cpu")


@pytest.mark.parametrize("pattern,num_masks", [("stripes", 4), ("grid", 4), ("checkerboard", 2)])
def test_naive_loop_equals_fast_path_in_fp32(pattern, num_masks):
    """Naive (unmerged LoRA, one pass per mask) == fast path with amp none (merged, one batch)."""
    model = build_model("mae_vit_tiny_patch7", 56, lora_rank=8, seed=0).eval()
    imgs = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    masks = make_inference_masks(model.grid_size, num_masks, pattern)
    scores, maps = naive_anomaly(model, imgs, masks, GaussianSmoothing(4.0))
    scorer = fast_scorer(copy.deepcopy(model), num_masks, pattern, 4.0, amp_dtype=None)
    assert not any(layer.requires_grad for layer in scorer.parameters())
    out = fast_anomaly(scorer, imgs, CPU, None)
    torch.testing.assert_close(out.anomaly_maps, maps, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.scores, scores, atol=1e-5, rtol=0)
    # the LoRA update was really merged (B is non-zero), so this compared two different computations
    assert not torch.equal(scorer.model.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


def test_scorer_precomputes_the_views_once():
    model = build_model("mae_vit_tiny_patch7", 56, lora_rank=4)
    scorer = AnomalyScorer(model, num_masks=4, mask_pattern="grid")
    views = mask_views(scorer.masks)
    for name in ("ids_keep", "ids_restore", "view_of_patch"):
        assert torch.equal(getattr(scorer, name), getattr(views, name))
        assert name not in scorer.state_dict()
    assert scorer.ids_keep.shape == (4, 48)  # 64 patches, 16 hidden per view
    imgs = torch.randn(1, 3, 56, 56)
    with torch.no_grad():  # the public signature with a plain bool mask still works, with the same result
        torch.testing.assert_close(model.anomaly_forward(imgs, scorer.masks)[0], model.anomaly_forward(imgs, views)[0])
    uneven = scorer.masks.clone()
    uneven[0, 0], uneven[1, 0] = ~uneven[0, 0], ~uneven[1, 0]
    uneven[0, 1] = ~uneven[0, 1]
    with pytest.raises(ValueError, match="same number of patches"):
        mask_views(uneven)


def _counted(fn) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def _unfused(model):
    for m in model.modules():  # explicit matmul attention: FlopCounterMode counts it (not the CPU SDPA op)
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    return model


@pytest.mark.parametrize("num_masks,pattern", [(4, "stripes"), (2, "checkerboard")])
def test_inference_flops_match_flop_counter(num_masks, pattern):
    model = _unfused(build_model("mae_vit_tiny_patch7", 56, lora_rank=8))
    scorer = fast_scorer(model, num_masks, pattern, 4.0, amp_dtype=None)
    imgs = torch.randn(3, 3, 56, 56)
    counted = _counted(lambda: fast_anomaly(scorer, imgs, CPU, None))
    assert inference_flops(model, 3, num_masks, scorer.smoothing.kernel.numel()) == counted


@pytest.mark.parametrize("freeze", [True, False])
def test_train_flops_match_flop_counter(freeze):
    model = _unfused(build_model("mae_vit_tiny_patch7", 56, lora_rank=8)).train()
    if freeze:
        freeze_non_lora(model, official_keys(model))
    imgs = torch.randn(2, 3, 56, 56)

    def step():
        loss, _, _ = model(imgs, mask_ratio=0.75)
        loss.backward()

    assert train_flops(model, 2) == _counted(step)


def test_cast_frozen_weights_keeps_checkpoints_and_numbers():
    torch.manual_seed(0)
    model = build_model("mae_vit_tiny_patch7", 28, lora_rank=4).train()
    freeze_non_lora(model, official_keys(model))
    reference = copy.deepcopy(model)
    cast = cast_frozen_weights(model, torch.bfloat16)
    assert cast > 0 and model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert model.blocks[0].attn.qkv.lora_A.dtype == torch.float32  # trainable: fp32 master
    assert model.patch_embed.proj.weight.dtype == torch.float32  # trainable (random 7x7 embedding)
    state, ref_state = unmerged_state_dict(model), reference.state_dict()
    assert list(state) == list(ref_state)
    for key, value in state.items():  # checkpoints hold fp32 under the official names
        assert value.dtype == ref_state[key].dtype, key
    imgs = torch.randn(2, 3, 28, 28)
    outs = []
    for m in (reference, model):  # autocast casts the fp32 weights to bf16 anyway: same numbers
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, pred, _ = m(imgs, mask_ratio=0.75)
        loss.backward()
        outs.append((loss.detach(), pred.detach(), m.blocks[1].attn.qkv.lora_B.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_cpu_training_attention_matches_timm_forward():
    """The CPU autocast training kernels (matmul attention for short sequences, fp32 SDPA for long
    ones) compute the same attention as timm's own forward."""
    torch.manual_seed(0)
    attn = Attention(64, num_heads=4, qkv_bias=True)
    for length in (9, Attention.SHORT_SEQUENCE + 3):
        x = torch.randn(2, length, 64, requires_grad=True)
        outs = []
        for fused in (True, False):  # our CPU path / timm's explicit softmax path
            attn.fused_attn = fused
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = attn(x)
            (grad,) = torch.autograd.grad(y.float().square().sum(), x)
            outs.append((y.float(), grad))
        attn.fused_attn = True
        torch.testing.assert_close(outs[0][0], outs[1][0], atol=0.05, rtol=0.05)
        torch.testing.assert_close(outs[0][1], outs[1][1], atol=0.2, rtol=0.05)


def test_bad_flags_are_one_line_errors(capsys):
    parser = benchmark.get_args_parser()
    for argv, flag in ((["--model", "nope"], "--model"), (["--input_size", "30"], "--input_size"),
                       (["--steps", "0"], "--steps"), (["--input_size", "28", "--num_masks", "3"], "--num_masks"),
                       (["--device", "cuda:7"] if torch.cuda.device_count() < 8 else ["--batch_size", "0"], "--")):
        code = benchmark.run_cli(benchmark.main, parser.parse_args(argv))
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.startswith("error: ") and flag in err and "\n" not in err, (argv, err)


@pytest.mark.slow
def test_script_end_to_end_writes_the_promised_json(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--model", "mae_vit_tiny_patch7",
                          "--input_size", "28", "--steps", "1", "--warmup", "1", "--profile", "3", "--json", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "inference" in run.stdout and "speedup" in run.stdout and "linears" in run.stdout
    result = json.loads(out.read_text())
    for phase in ("inference", "train"):
        for key in ("naive_img_s", "fast_img_s", "speedup", "naive_tflops", "fast_tflops",
                    "fast_frac_bf16_peak", "naive_peak_mem_mib"):
            assert result[phase][key] > 0, (phase, key)
        check_peak_shares(result[phase], result["peak_gflops"]["bf16_native"])
        breakdown = result[f"{phase}_breakdown"]
        shares = [breakdown[f"{k}_share"] for k in ("linears", "attention", "other")]
        assert all(0 <= s <= 1 for s in shares) and sum(shares) == pytest.approx(1.0)
        assert breakdown["linears_s"] > 0 and len(breakdown["top_other_ops_s"]) <= 3
    assert result["peak_gflops"]["fp32"] > 0 and result["peak_gflops"]["bf16"] > 0
    assert "targets" not in result  # the targets are for mae_vit_large_patch7 at 224 px only
    # the training fast path stores the frozen linears in bf16 and keeps exact copies (main_train's storage)
    assert (result["train"]["fast_exact_copies_mib"] > 0) == (result["fast_path"]["amp"] == "bfloat16")
    assert result["model"] == "mae_vit_tiny_patch7" and result["input_size"] == 28 and result["batch_size"] == 2
    assert {"cpu", "cpu_cores", "torch"} <= set(result["machine"])
    assert result["fast_path"]["fused_attention"] is True


def test_profile_categories():
    assert benchmark.op_category("aten::addmm") == "linears" and benchmark.op_category("aten::mm") == "linears"
    assert benchmark.op_category("aten::convolution_backward") == "linears"
    assert benchmark.op_category("mkldnn::_linear_pointwise") == "linears"  # fc1 + GELU in bf16 inference
    for name in ("aten::bmm", "aten::_softmax", "aten::_scaled_dot_product_flash_attention_for_cpu",
                 "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::_efficient_attention_forward"):
        assert benchmark.op_category(name) == "attention", name
    for name in ("aten::copy_", "aten::native_layer_norm", "aten::gelu", "aten::add_"):
        assert benchmark.op_category(name) == "other", name


def test_help_explains_the_comparison():
    text = benchmark.get_args_parser().format_help()
    assert "naive" in text and "--output" in text and "--compile" in text


FAKE_PEAKS = {torch.float32: 300.0, torch.bfloat16: 2000.0}  # GFLOP/s


def _fake_peak_matmul(monkeypatch) -> list:
    """peak_matmul_gflops answering FAKE_PEAKS at once; returns the dtypes it was asked for."""
    asked = []
    monkeypatch.setattr(benchmark, "peak_matmul_gflops",
                        lambda device, dtype, n, min_time=0.5: asked.append(dtype) or FAKE_PEAKS[dtype])
    return asked


@pytest.mark.parametrize("kind", list(CPU_KINDS))
def test_peaks_of_each_cpu_kind(kind, monkeypatch):
    """The bf16 peak is measured where the CPU has bf16 instructions; elsewhere (an emulated bf16 matmul
    takes seconds and is no peak) the fp32 peak stands for it. The end-of-run measurement keeps the better."""
    fake_cpu(monkeypatch, kind)
    asked = _fake_peak_matmul(monkeypatch)
    peaks = benchmark.matmul_peaks(CPU, 64)
    if kind in BF16_KINDS:
        assert peaks == {"fp32": 300.0, "bf16": 2000.0} and asked == [torch.float32, torch.bfloat16]
        assert benchmark.matmul_peaks(CPU, 64, best={"fp32": 310.0, "bf16": 1900.0}) == {"fp32": 310.0, "bf16": 2000.0}
    else:
        assert peaks == {"fp32": 300.0, "bf16": 300.0} and asked == [torch.float32]
        assert benchmark.matmul_peaks(CPU, 64, best=peaks | {"fp32": 310.0}) == {"fp32": 310.0, "bf16": 310.0}


@pytest.mark.parametrize("kind", list(CPU_KINDS))
def test_run_of_each_cpu_kind(kind, monkeypatch, one_thread):
    """A whole (tiny) run on each CPU kind: the fast path in bf16 with the frozen weights stored in bf16
    where the CPU has bf16 instructions, in fp32 elsewhere, where both peak shares are the fp32 one."""
    fake_cpu(monkeypatch, kind)
    _fake_peak_matmul(monkeypatch)
    args = benchmark.get_args_parser().parse_args(["--model", "mae_vit_tiny_patch7", "--input_size", "28",
                                                   "--steps", "1", "--warmup", "1"])
    result = benchmark.run_benchmark(args)
    bf16 = kind in BF16_KINDS
    assert result["machine"]["cpu_kind"] == kind and result["machine"]["bf16_supported"] is bf16
    assert result["fast_path"]["amp"] == ("bfloat16" if bf16 else "none")
    assert result["fast_path"]["cast_frozen_weights"] is bf16 and (result["train"]["fast_exact_copies_mib"] > 0) is bf16
    peaks = result["peak_gflops"]
    assert peaks["bf16_native"] is bf16 and (peaks["fp32"], peaks["bf16"]) == (300.0, 2000.0 if bf16 else 300.0)
    for phase in ("inference", "train"):
        for name in ("naive", "fast"):
            gflops = result[phase][f"{name}_tflops"] * 1e3
            assert result[phase][f"{name}_frac_bf16_peak"] == pytest.approx(gflops / peaks["bf16"])
            assert result[phase][f"{name}_frac_fp32_peak"] == pytest.approx(gflops / peaks["fp32"])
