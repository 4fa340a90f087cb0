"""The procedural prior: a tiny pretraining run, its export to the official MAE format, the shipped
weights, and the reconstruction-fidelity measure."""
import re
from pathlib import Path

import pytest
import torch

import main_train
from lora_utils import is_lora_name
from models_mae import create_model
from official_ckpt import official_mae_state_dict
from scripts.export_pretrained import export, sha256_of
from scripts.make_procedural import make_procedural
from scripts import reconstruction_fidelity
from scripts.reconstruction_fidelity import fidelity, measure
from util.checkpoint import load_pretrained
from util.cli import run_cli

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "weights" / "mae_vit_tiny_patch7_procedural_112.pth"
PRETRAIN = ["--model", "mae_vit_tiny_patch7", "--input_size", "28", "--batch_size", "4", "--num_workers", "0",
            "--epochs", "1", "--warmup_epochs", "1", "--train_mask_ratio", "0.75", "--no_jitter",
            "--save_every", "0", "--print_freq", "1", "--holdout", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def pretrain(tmp_path: Path, lora_rank: int) -> Path:
    data = tmp_path / "procedural"
    make_procedural(data, num_images=8, size=28, seed=0)
    out = tmp_path / f"run_r{lora_rank}"
    argv = [*PRETRAIN, "--data_path", str(data), "--output_dir", str(out), "--lora_rank", str(lora_rank)]
    assert run_cli(main_train.main, main_train.get_args_parser().parse_args(argv)) == 0
    return out / "checkpoint-last.pth"


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory) -> Path:
    """A few steps of MAE pretraining (no LoRA) on procedural images: its checkpoint-last.pth."""
    return pretrain(tmp_path_factory.mktemp("pretrain"), lora_rank=0)


@pytest.mark.slow
def test_tiny_pretraining_exports_an_official_checkpoint(pretrained_run, tmp_path):
    weights = tmp_path / "prior.pth"
    digest = export(pretrained_run, weights)
    assert digest == sha256_of(weights) and len(digest) == 64
    saved = torch.load(weights, map_location="cpu", weights_only=True)
    assert list(saved) == ["model"]  # no optimizer, no options
    state = saved["model"]
    # The official key names and shapes of a full (encoder + decoder) MAE file, patch 7 at 28 px.
    official = official_mae_state_dict(embed_dim=192, depth=12, patch=7, img_size=28, decoder_dim=128, decoder_depth=2)
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in official.items()}
    assert all(v.dtype == torch.float32 for v in state.values())
    trained = torch.load(pretrained_run, map_location="cpu", weights_only=True)["model"]
    assert all(torch.equal(state[k], trained[k]) for k in state)
    # `--pretrained` (a LoRA model) loads every tensor: encoder, decoder, the 7x7 patch embedding.
    model = create_model("mae_vit_tiny_patch7", img_size=28, lora_rank=8)
    report = load_pretrained(model, weights, verbose=False)
    assert report.missing == [] and set(report.skipped) == {"pos_embed", "decoder_pos_embed"}
    assert {"patch_embed.proj.weight", "decoder_pred.weight", "decoder_blocks.1.mlp.fc2.weight"} <= set(report.loaded)
    assert torch.equal(model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])


@pytest.mark.slow
def test_lora_is_merged_at_export(tmp_path):
    checkpoint = pretrain(tmp_path, lora_rank=2)
    trained = torch.load(checkpoint, map_location="cpu", weights_only=True)["model"]
    a, b = trained["blocks.0.attn.qkv.lora_A"], trained["blocks.0.attn.qkv.lora_B"]
    assert b.abs().sum() > 0  # the adapter trained, so merging changes the weight
    export(checkpoint, tmp_path / "prior.pth")
    state = torch.load(tmp_path / "prior.pth", map_location="cpu", weights_only=True)["model"]
    assert not any(is_lora_name(k) for k in state)
    merged = trained["blocks.0.attn.qkv.weight"] + b @ a  # alpha = rank: scaling 1
    assert torch.allclose(state["blocks.0.attn.qkv.weight"], merged, atol=1e-6)


def test_shipped_weights_load_and_match_the_readme():
    digest = sha256_of(WEIGHTS)
    assert digest in re.findall(r"\b[0-9a-f]{64}\b", (REPO / "README.md").read_text())
    assert WEIGHTS.stat().st_size <= 25 * 2 ** 20
    model = create_model("mae_vit_tiny_patch7", img_size=112)  # as main_train.py --pretrained builds it
    report = load_pretrained(model, WEIGHTS, verbose=False)
    assert report.missing == [] and set(report.skipped) == {"pos_embed", "decoder_pos_embed"}


def test_fidelity_of_perfect_inverted_and_flat_reconstructions():
    model = create_model("mae_vit_tiny_patch7", img_size=28, lora_rank=0)
    imgs = torch.randn(2, 3, 28, 28)
    patch_r, image_r = fidelity(model, imgs, imgs.clone())
    assert patch_r.shape == (2 * 16,) and torch.allclose(patch_r, torch.ones(32))
    assert torch.allclose(image_r, torch.ones(2))
    patch_r, image_r = fidelity(model, imgs, -imgs)
    assert torch.allclose(patch_r, -torch.ones(32)) and torch.allclose(image_r, -torch.ones(2))
    flat = imgs.clone()
    flat[:, :, :7, :7] = 0.3  # one flat input patch per image: not counted
    patch_r, _ = fidelity(model, flat, torch.zeros_like(flat))
    assert patch_r.shape == (2 * 15,) and torch.all(patch_r == 0)


@pytest.mark.slow
def test_fidelity_of_a_trained_checkpoint(pretrained_run, synthetic_category):
    result = measure(str(pretrained_run), str(synthetic_category), batch_size=4)
    assert result["images"] == 4
    assert -1 <= result["patch_r"] <= 1 and -1 <= result["image_r"] <= 1
    assert result["images_kept"] == [] and result["recons_kept"] == []


@pytest.mark.slow
def test_fidelity_cli_draws_the_reconstructions(pretrained_run, synthetic_category, tmp_path, capsys):
    figure = tmp_path / "recon.png"
    argv = ["--data_path", str(synthetic_category), "--checkpoint", str(pretrained_run), str(pretrained_run),
            "--labels", "a", "b", "--figure", str(figure), "--figure_images", "2"]
    parser = reconstruction_fidelity.get_args_parser()
    assert run_cli(reconstruction_fidelity.main, parser.parse_args(argv)) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[1:3]]
    assert rows[0][:2] == rows[1][:2]  # the same checkpoint twice: the same correlations
    assert figure.stat().st_size > 0 and f"figure: {figure}" in lines
    assert run_cli(reconstruction_fidelity.main, parser.parse_args(argv[:-4] + ["--labels", "a"])) == 2
