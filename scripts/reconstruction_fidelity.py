"""How well trained models redraw normal test images: input-reconstruction correlation on hidden patches.

For every normal test image of a category, the scorer's reconstruction (each patch reconstructed by
the view that hides it, with main_infer.py's default views) is compared with the input, in the
model's normalised input space, at fp32:
  patch r  Pearson correlation of each patch's pixels (3 x 7 x 7 values) with its reconstruction,
           averaged over the patches whose input is not flat (std > 0.05): does the model draw the
           detail inside a patch?
  image r  Pearson correlation over all pixels of the image, averaged over images: does it draw
           the image's layout?
A model that reconstructs a blurred template scores a high image r and a low patch r.

  python scripts/reconstruction_fidelity.py --data_path /data/capsule \\
      --checkpoint runs/scratch/checkpoint-last.pth runs/prior/checkpoint-last.pth \\
      --labels scratch prior --figure recon_capsule.png

--figure draws the first --figure_images normal test images and each checkpoint's reconstruction.
"""
import argparse
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import main_infer  # noqa: E402
from models_mae import AnomalyScorer, MaskedAutoencoderViT  # noqa: E402
from scoring import ScoringOptions  # noqa: E402
from util.cli import OneLineArgumentParser, UserError, run_cli  # noqa: E402
from util.datasets import TestDataset, find_test_items  # noqa: E402
from util.visualize import save_reconstruction_grid  # noqa: E402

FLAT_STD = 0.05  # patches whose input std (normalised units) is below this have no detail to draw


def _pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Correlation along the last dimension: [..., D] x [..., D] -> [...]."""
    x = x - x.mean(-1, keepdim=True)
    y = y - y.mean(-1, keepdim=True)
    return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(1e-12)


def fidelity(model: MaskedAutoencoderViT, imgs: torch.Tensor,
             recons: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-patch correlations of the non-flat patches [M], per-image correlations [N])."""
    x, r = model.patchify(imgs), model.patchify(recons)  # [N, L, p*p*3]
    detailed = x.std(-1) > FLAT_STD  # [N, L]
    return _pearson(x, r)[detailed], _pearson(imgs.flatten(1), recons.flatten(1))


@torch.no_grad()
def measure(checkpoint: str, data_path: str, batch_size: int, keep: int = 0) -> dict:
    """Mean patch r and image r of one checkpoint on the normal test images of `data_path`; with
    keep > 0 also the first `keep` images and their reconstructions (`images_kept`, `recons_kept`)."""
    model = main_infer.build_model(checkpoint)[0]  # the reconstructions need no calibration
    defaults = ScoringOptions()  # main_infer.py's global defaults
    scorer = AnomalyScorer(model, num_masks=defaults.num_masks, mask_pattern=defaults.mask_pattern)
    items = [item for item in find_test_items(data_path) if item.label == 0]
    if not items:
        raise UserError(f"{data_path} has no normal test images (test/good)")
    patch_r, image_r, kept_imgs, kept_recons = [], [], [], []
    for batch in DataLoader(TestDataset(items, model.img_size), batch_size=batch_size):
        imgs = batch["image"]
        recons = scorer(imgs).reconstructions.float()
        p, i = fidelity(model, imgs, recons)
        patch_r.append(p)
        image_r.append(i)
        kept_imgs += list(imgs[:keep - len(kept_imgs)])
        kept_recons += list(recons[:keep - len(kept_recons)])
    return {"patch_r": torch.cat(patch_r).mean().item(), "image_r": torch.cat(image_r).mean().item(),
            "images": len(items), "images_kept": kept_imgs, "recons_kept": kept_recons}


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data_path", required=True, help="category folder with test/good/")
    p.add_argument("--checkpoint", nargs="+", required=True, help="main_train.py checkpoints to compare")
    p.add_argument("--labels", nargs="+", help="a short name per checkpoint for the figure (default: the paths)")
    p.add_argument("--figure", help="also write a PNG: normal test images and each checkpoint's reconstruction")
    p.add_argument("--figure_images", type=int, default=3, help="rows of the figure (default: %(default)s)")
    p.add_argument("--batch_size", type=int, default=8, help="images per forward pass (default: %(default)s)")
    p.add_argument("--debug", action="store_true", help="print tracebacks on errors")
    return p


def main(args: argparse.Namespace) -> None:
    labels = args.labels or args.checkpoint
    if len(labels) != len(args.checkpoint):
        raise UserError(f"--labels gives {len(labels)} names for {len(args.checkpoint)} checkpoints")
    keep = args.figure_images if args.figure else 0
    print(f"{'patch r':>8} {'image r':>8}  checkpoint  ({args.data_path}, normal test images, hidden patches)")
    images, reconstructions = [], {}
    for label, checkpoint in zip(labels, args.checkpoint):
        result = measure(checkpoint, args.data_path, args.batch_size, keep=keep)
        print(f"{result['patch_r']:8.3f} {result['image_r']:8.3f}  {checkpoint}", flush=True)
        images = result["images_kept"]
        reconstructions[f"{label}\npatch r {result['patch_r']:.2f}"] = result["recons_kept"]
    if args.figure:
        path = save_reconstruction_grid(args.figure, images, reconstructions,
                                        title=f"{Path(args.data_path).name}: normal test images, hidden patches reconstructed")
        print(f"figure: {path}")


if __name__ == "__main__":
    _args = get_args_parser().parse_args()
    sys.exit(run_cli(main, _args, _args.debug))
