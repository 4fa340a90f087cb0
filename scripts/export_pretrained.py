"""A main_train.py checkpoint -> weights in the official MAE checkpoint format, for `--pretrained`.

The output is `{'model': state_dict}` with the official MAE key names (encoder and decoder, the
sin-cos position tables included), LoRA adapters folded into their base weights and dropped, no
optimizer, no options: the layout of `mae_visualize_vit_large.pth`. The script then checks that a
fresh model of the same variant (with the default LoRA rank 8, as `main_train.py --pretrained` builds
it) loads the file with no tensor left at its initialisation, and prints the file's size and sha256.

  python scripts/export_pretrained.py --checkpoint OUT/checkpoint-last.pth \\
      --output weights/mae_vit_tiny_patch7_procedural_112.pth
"""
import argparse
import hashlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lora_utils import is_lora_name, merge_lora  # noqa: E402
from models_mae import create_model  # noqa: E402
from util.checkpoint import (FIXED_BUFFERS, load_pretrained, model_kwargs_from_args, read_checkpoint,  # noqa: E402
                             state_dict_of)
from util.cli import OneLineArgumentParser, UserError, run_cli  # noqa: E402
from util.misc import save_atomic  # noqa: E402


def official_state_dict(checkpoint: dict, path: Path) -> dict[str, torch.Tensor]:
    """The model of a main_train.py checkpoint as fp32 tensors under the official names, LoRA merged."""
    if "args" not in checkpoint:
        raise UserError(f"{path} has no training options ('args'): pass a checkpoint written by main_train.py")
    kwargs = model_kwargs_from_args(checkpoint["args"])
    model = create_model(**kwargs)
    model.load_state_dict(state_dict_of(checkpoint, path))
    merge_lora(model)
    return {k: v.detach().float().clone() for k, v in model.state_dict().items() if not is_lora_name(k)}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_loadable(path: Path, model_name: str, input_size: int) -> None:
    """Load `path` as `main_train.py --pretrained` does; every non-LoRA tensor must come from the file
    (the sin-cos position tables are stored, as in official files, but always rebuilt)."""
    report = load_pretrained(create_model(model_name, img_size=input_size), path, verbose=False)
    skipped = sorted(set(report.skipped) - set(FIXED_BUFFERS))
    if report.missing or skipped:
        raise UserError(f"{path} does not load completely into {model_name}: missing {report.missing}, "
                        f"skipped {skipped}")


def export(checkpoint_path: Path, output: Path) -> str:
    """Write the official-format file; returns its sha256."""
    checkpoint = read_checkpoint(checkpoint_path)
    state = official_state_dict(checkpoint, checkpoint_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    save_atomic({"model": state}, output)
    args = checkpoint["args"]
    check_loadable(output, args["model"], int(args["input_size"]))
    return sha256_of(output)


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="a main_train.py checkpoint (checkpoint-*.pth)")
    p.add_argument("--output", type=Path, required=True, help="the .pth file to write")
    p.add_argument("--debug", action="store_true", help="print tracebacks on errors")
    return p


def main(args: argparse.Namespace) -> None:
    digest = export(args.checkpoint, args.output)
    size_mb = args.output.stat().st_size / 2 ** 20
    print(f"wrote {args.output} ({size_mb:.1f} MiB, fp32), loads with --pretrained with no missing tensor\n"
          f"sha256 {digest}")


if __name__ == "__main__":
    _args = get_args_parser().parse_args()
    sys.exit(run_cli(main, _args, _args.debug))
