"""Training with a frozen base stores the frozen linears in the autocast dtype for compute, while
checkpoints and adapter files keep the exact fp32 tensors that were loaded (lora_utils.cast_frozen_weights
with keep_exact=True, wired in main_train.build_model); with `--amp auto` that is bf16 only on a CPU
with bf16 instructions (each CPU kind faked)."""
import pytest
import torch

import main_train
from cpu_kinds import BF16_KINDS, CPU_KINDS, fake_cpu
from engine import train_one_epoch
from lora_utils import adapter_state_dict, cast_frozen_weights, export_adapter, unmerged_state_dict
from official_ckpt import write_official_checkpoint
from util.checkpoint import FIXED_BUFFERS
from util.cli import run_cli
from util.misc import resolve_amp

TINY = ["--model", "mae_vit_tiny_patch7", "--input_size", "56", "--batch_size", "4", "--num_workers", "0",
        "--warmup_epochs", "1", "--print_freq", "1", "--blr", "1e-2"]
# mae_vit_tiny_patch7's widths; patch 16 as in the released files, so the patch embedding and
# decoder_pred are re-initialised (trainable) and everything else is loaded and frozen.
OFFICIAL_TINY = {"embed_dim": 192, "depth": 12, "decoder_dim": 128, "decoder_depth": 2}
BF16 = torch.bfloat16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def official(tmp_path) -> tuple[str, dict[str, torch.Tensor]]:
    path = tmp_path / "mae_pretrain_tiny_full.pth"
    return str(path), write_official_checkpoint(path, **OFFICIAL_TINY)


def frozen_keys(official_state: dict[str, torch.Tensor]) -> list[str]:
    """The official tensors that main_train loads and freezes (not the re-initialised ones)."""
    return [k for k in official_state
            if k not in FIXED_BUFFERS and not k.startswith(("patch_embed.", "decoder_pred."))]


def build(pretrained: str, amp_dtype, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return main_train.build_model("mae_vit_tiny_patch7", 56, False, 4, 4.0, 0.0, ["qkv", "proj"], pretrained,
                                  "random", freeze=True, verbose=False, amp_dtype=amp_dtype)


def cli(argv) -> int:
    return run_cli(main_train.main, main_train.get_args_parser().parse_args(argv))


def test_rounding_would_be_caught(official):
    """The random official values are not bf16 numbers: a rounded checkpoint fails the equality below."""
    _, state = official
    weight = state["blocks.0.attn.qkv.weight"]
    assert not torch.equal(weight.to(BF16).float(), weight)


def test_frozen_linears_are_stored_for_compute_and_saved_exactly(official, tmp_path):
    path, state = official
    model = build(path, BF16)
    assert model.blocks[0].attn.qkv.weight.dtype == BF16 and model.blocks[0].mlp.fc2.bias.dtype == BF16
    assert model.decoder_embed.weight.dtype == BF16
    assert model.blocks[0].attn.qkv.lora_A.dtype == torch.float32  # trainable: fp32 master
    assert model.patch_embed.proj.weight.dtype == torch.float32  # re-initialised, trainable
    assert model.norm.weight.dtype == torch.float32  # norms stay as they are (autocast runs them in fp32)
    saved = unmerged_state_dict(model)
    for key in frozen_keys(state):
        assert saved[key].dtype == torch.float32 and torch.equal(saved[key], state[key]), key
    # adapter files carry the trainable tensors only, in fp32, and none of the frozen base
    adapter = adapter_state_dict(model)
    assert adapter and not set(adapter) & set(frozen_keys(state))
    assert all(t.dtype == torch.float32 for t in adapter.values())
    export_adapter(model, tmp_path / "adapter.pth")
    written = torch.load(tmp_path / "adapter.pth", weights_only=True)["adapter"]
    assert set(written) == set(adapter) and all(torch.equal(written[k], adapter[k]) for k in adapter)


@pytest.mark.parametrize("kind", list(CPU_KINDS))
def test_frozen_linears_are_bf16_only_on_a_cpu_with_bf16(kind, official, monkeypatch):
    """main_train's `--amp auto` on each CPU kind: bf16 autocast, and with it the frozen linears stored
    in bf16, where the CPU has bf16 instructions; fp32 weights and no autocast elsewhere (an emulated
    bf16 matmul is slower than fp32). The checkpoint holds the exact tensors either way."""
    fake_cpu(monkeypatch, kind)
    path, state = official
    amp_dtype = resolve_amp("auto", torch.device("cpu"))
    assert amp_dtype == (BF16 if kind in BF16_KINDS else None)
    model = build(path, amp_dtype)
    stored = BF16 if kind in BF16_KINDS else torch.float32
    assert model.blocks[0].attn.qkv.weight.dtype == stored and model.decoder_blocks[0].mlp.fc1.weight.dtype == stored
    assert model.blocks[0].attn.qkv.lora_A.dtype == torch.float32
    saved = unmerged_state_dict(model)
    assert all(saved[key].dtype == torch.float32 and torch.equal(saved[key], state[key]) for key in frozen_keys(state))


def test_load_state_dict_replaces_the_exact_copies(official):
    """A resume loads the checkpoint into a cast model: the exact copies follow it, the compute copies round it."""
    path, state = official
    model = build(path, BF16)
    key = "blocks.3.mlp.fc1.weight"
    new = torch.randn_like(state[key])
    model.load_state_dict({key: new}, strict=False)
    assert torch.equal(model.state_dict()[key], new)
    assert torch.equal(model.blocks[3].mlp.fc1.weight, new.to(BF16))


def test_checkpoints_after_training_and_resume_hold_the_official_tensors(official, synthetic_category, tmp_path):
    """The fast path end to end: every frozen tensor of every checkpoint is bit-identical to the file."""
    path, state = official
    out = tmp_path / "run"
    common = ["--data_path", str(synthetic_category), "--output_dir", str(out), *TINY, "--pretrained", path,
              "--freeze_non_lora", "--amp", "bf16", "--save_every", "1"]
    assert cli([*common, "--epochs", "2"]) == 0
    assert cli([*common, "--epochs", "3", "--resume", "auto"]) == 0  # resumed: loads, casts, saves again
    checkpoints = sorted(out.glob("checkpoint-*.pth"))
    assert [p.name for p in checkpoints] == ["checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-2.pth",
                                             "checkpoint-last.pth"]
    first = torch.load(checkpoints[0], weights_only=True)["model"]
    for ckpt_path in checkpoints:
        saved = torch.load(ckpt_path, weights_only=True)["model"]
        for key in frozen_keys(state):
            assert saved[key].dtype == torch.float32 and torch.equal(saved[key], state[key]), (ckpt_path.name, key)
        assert all(v.dtype == torch.float32 for v in saved.values())
    last = torch.load(out / "checkpoint-last.pth", weights_only=True)["model"]
    assert not torch.equal(last["blocks.0.attn.qkv.lora_B"], first["blocks.0.attn.qkv.lora_B"])  # it trained


def test_losses_equal_autocast_only_training(official):
    """Same seeds, same batches: frozen linears stored in bf16 vs fp32 weights cast by autocast."""
    path, _ = official
    batches = [torch.randn(4, 3, 56, 56, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    runs = []
    for amp_for_storage in (BF16, None):  # fast path / autocast only
        model = build(path, amp_for_storage)
        optimizer = main_train.build_optimizer(model, 1e-3, 0.001, torch.device("cpu"))
        torch.manual_seed(1)  # the same random masks in both runs
        losses = [train_one_epoch(model, [imgs], optimizer, device=torch.device("cpu"), epoch=epoch, epochs=4,
                                  base_lr=1e-3, min_lr=0.0, warmup_epochs=0, mask_ratio=0.75, amp_dtype=BF16,
                                  show_progress=False)["train_loss"] for epoch, imgs in enumerate(batches)]
        runs.append((torch.tensor(losses), model.blocks[5].attn.qkv.lora_B.detach().clone()))
    (fast_losses, fast_b), (ref_losses, ref_b) = runs
    assert fast_losses[-1] < fast_losses[0]  # the steps really trained
    torch.testing.assert_close(fast_losses, ref_losses, rtol=1.6e-2, atol=1e-3)  # bf16 tolerance
    torch.testing.assert_close(fast_b, ref_b, rtol=1.6e-2, atol=1e-4)
    assert torch.count_nonzero(ref_b) > 0


def test_inference_cast_still_upcasts_the_rounded_values():
    """keep_exact=False (main_infer): no host copies; state_dict gives the rounded values as fp32."""
    layer = torch.nn.Linear(8, 8).requires_grad_(False)
    exact = layer.weight.detach().clone()
    assert cast_frozen_weights(layer, BF16) == 2
    assert layer.state_dict()["weight"].dtype == torch.float32
    assert torch.equal(layer.state_dict()["weight"], exact.to(BF16).float())
