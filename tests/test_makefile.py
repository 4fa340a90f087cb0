"""`make demo` stays in step with the scripts it runs: every command it would run parses with that
script's own argument parser, and the README's overrides reach the right flags."""
import shlex
import subprocess
from pathlib import Path
from typing import Dict, List

import main_infer
import main_train
import main_train_head
from scripts import make_synthetic_mvtec, prepare_mvtec

ROOT = Path(__file__).resolve().parents[1]
PARSERS = {
    "scripts/make_synthetic_mvtec.py": make_synthetic_mvtec.get_args_parser,
    "scripts/prepare_mvtec.py": prepare_mvtec.get_args_parser,
    "main_train.py": main_train.get_args_parser,
    "main_train_head.py": main_train_head.get_args_parser,
    "main_infer.py": main_infer.get_args_parser,
}

def _demo_commands(*overrides: str) -> Dict[str, List[str]]:
    """{script: its argv} for each python command `make -n demo` prints (recipe lines joined)."""
    out = subprocess.run(["make", "-n", "-s", "demo", *overrides], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    commands: Dict[str, List[str]] = {}
    for line in out.replace("\\\n", " ").splitlines():
        words = shlex.split(line)
        if len(words) > 1 and words[0].endswith("python") and words[1] in PARSERS:
            commands[words[1]] = words[2:]
    return commands


def test_demo_commands_parse_with_the_scripts_parsers(tmp_path):
    commands = _demo_commands(f"OUT={tmp_path}")
    assert list(commands) == list(PARSERS)  # generate -> prepare -> train -> head -> evaluate, in order
    parsed = {script: PARSERS[script]().parse_args(argv) for script, argv in commands.items()}
    prepared = parsed["scripts/prepare_mvtec.py"].dst
    assert Path(parsed["main_train.py"].data_path) == Path(prepared) == Path(parsed["main_train_head.py"].data_path)
    assert Path(parsed["main_infer.py"].data_path) == Path(prepared)
    train_dir = Path(parsed["main_train.py"].output_dir)
    assert Path(parsed["main_train_head.py"].checkpoint) == train_dir / "checkpoint-last.pth"
    assert Path(parsed["main_infer.py"].checkpoint) == train_dir / "checkpoint-head.pth"  # the head's output
    # the shipped procedural prior, which exists for the default (tiny) model
    assert (ROOT / parsed["main_train.py"].pretrained).is_file()
    assert parsed["main_train.py"].model == "mae_vit_tiny_patch7"


def test_demo_from_scratch_on_request(tmp_path):
    commands = _demo_commands(f"OUT={tmp_path}", "PRETRAINED=")
    assert main_train.get_args_parser().parse_args(commands["main_train.py"]).pretrained is None


def test_demo_overrides_and_own_data(tmp_path):
    commands = _demo_commands(f"OUT={tmp_path}", f"DATA={tmp_path}/mine", "EPOCHS=7",
                              "MODEL=mae_vit_small_patch7", "INPUT_SIZE=56", "BATCH_SIZE=4")
    assert list(commands) == ["main_train.py", "main_train_head.py", "main_infer.py"]  # DATA=ROOT: no generation
    train = main_train.get_args_parser().parse_args(commands["main_train.py"])
    assert (train.epochs, train.model, train.input_size, train.batch_size) == (
        7, "mae_vit_small_patch7", 56, 4)
    assert train.data_path == f"{tmp_path}/mine"
    assert train.pretrained is None  # the prior is a tiny model: another model starts from scratch
    infer = main_infer.get_args_parser().parse_args(commands["main_infer.py"])
    assert infer.data_path == f"{tmp_path}/mine"


def test_demo_without_the_head_scores_the_mae_checkpoint(tmp_path):
    commands = _demo_commands(f"OUT={tmp_path}", "HEAD=0")
    assert "main_train_head.py" not in commands
    assert Path(commands["main_infer.py"][commands["main_infer.py"].index("--checkpoint") + 1]).name == \
        "checkpoint-last.pth"


def test_make_test_installs_the_export_requirements_and_demo_does_not(tmp_path):
    """The export is tested, so `make test` installs requirements-export.txt; training (`make demo`) never needs it."""
    stamp = tmp_path / ".installed-dev"
    test = subprocess.run(["make", "-n", "-B", "test", f"VENV={tmp_path}"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout
    demo = subprocess.run(["make", "-n", "-B", "demo", f"VENV={tmp_path}", f"OUT={tmp_path}"], cwd=ROOT,
                          check=True, capture_output=True, text=True).stdout
    assert "-r requirements-export.txt" in test and f"touch {stamp}" in test
    assert "requirements-export.txt" not in demo


def test_demo_on_a_category_without_test_images_stops_before_training(tmp_path):
    (tmp_path / "mine" / "train" / "good").mkdir(parents=True)
    done = subprocess.run(["make", "-s", "demo", f"DATA={tmp_path}/mine", f"OUT={tmp_path}/out",
                           f"VENV={ROOT / '.venv'}"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode != 0 and "has no test/ folder" in done.stderr and "--images" in done.stderr
    assert not (tmp_path / "out").exists()  # nothing trained


def _train_args(*overrides: str):
    return main_train.get_args_parser().parse_args(_demo_commands(*overrides)["main_train.py"])


def test_cpu_recipe_is_unchanged(tmp_path):
    train = _train_args(f"OUT={tmp_path}", "RECIPE=cpu")
    assert (train.model, train.input_size, train.epochs, train.batch_size, train.lr, train.warmup_epochs,
            train.train_mask_ratio, train.num_workers) == ("mae_vit_tiny_patch7", 112, 50, 8, 1.5e-3, 4, 0.25, 0)


def test_auto_recipe_follows_the_gpu_check(tmp_path):
    """RECIPE=auto (the default) asks .venv's PyTorch; CUDA_CHECK stands in for it here."""
    cpu = _train_args(f"OUT={tmp_path}", "CUDA_CHECK=echo cpu")
    gpu = _train_args(f"OUT={tmp_path}", "CUDA_CHECK=echo gpu")
    broken = _train_args(f"OUT={tmp_path}", "CUDA_CHECK=false")  # no torch yet, or it fails: the CPU recipe
    assert (cpu.input_size, cpu.batch_size, cpu.epochs) == (112, 8, 50) == (broken.input_size, broken.batch_size,
                                                                            broken.epochs)
    assert (gpu.input_size, gpu.batch_size, gpu.epochs) == (224, 32, 500)
    assert gpu.model == cpu.model and (ROOT / gpu.pretrained).is_file()  # the same prior
    forced = _train_args(f"OUT={tmp_path}", "CUDA_CHECK=echo gpu", "DEVICE=cpu")  # DEVICE=cpu: the CPU recipe
    assert (forced.input_size, forced.device) == (112, "cpu")
    assert _train_args(f"OUT={tmp_path}", "RECIPE=gpu", "EPOCHS=7").epochs == 7  # overrides still win
