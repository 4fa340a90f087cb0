"""Training logs: TensorBoard scalars, `log.txt` (one JSON object per epoch), optional wandb, and
the console progress (a tqdm bar on a terminal, plain periodic lines otherwise).

Only the main process logs; on other ranks every method is a no-op, so callers need no rank checks.
"""
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

from util.cli import UserError


def _finite_scalars(values: dict[str, Any]) -> dict[str, float]:
    """The numeric, finite entries of `values` (None, strings and NaN are not plotted)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[key] = float(value)
    return out


class RunLogger:
    """Writes per-epoch records to log.txt, TensorBoard (log_dir) and, if wandb_name is set, wandb.

    wandb is imported here only when asked for; it honours WANDB_MODE=offline / disabled itself,
    and writes its run folder under output_dir (offline runs: output_dir/wandb/offline-run-*).
    """

    def __init__(
        self,
        output_dir: str | Path,
        log_dir: str | Path,
        enabled: bool = True,
        wandb_name: Optional[str] = None,
        wandb_project: str = "mae-ad",
        config: Optional[dict[str, Any]] = None,
    ) -> None:
        self.enabled = enabled
        self.log_path = Path(output_dir) / "log.txt"
        self.tb = None
        self.wandb_run = None
        if not enabled:
            return
        if wandb_name:
            self.wandb_run = _start_wandb(wandb_name, wandb_project, Path(output_dir), config or {})
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard; only on the main process

        Path(log_dir).mkdir(parents=True, exist_ok=True)
        self.tb = SummaryWriter(log_dir=str(log_dir))

    def log_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        """One epoch: the whole record as a JSON line in log.txt, its numbers as scalars (step = epoch)."""
        if not self.enabled:
            return
        record = {"epoch": epoch, **record}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = _finite_scalars({k: v for k, v in record.items() if k != "epoch"})
        for key, value in scalars.items():
            self.tb.add_scalar(key, value, epoch)
        self.tb.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=epoch)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _start_wandb(name: str, project: str, output_dir: Path, config: dict[str, Any]):
    try:
        import wandb
    except ImportError as e:
        raise UserError("--wandb_name needs the wandb package: pip install wandb "
                        "(or drop --wandb_name; TensorBoard and log.txt are always written)") from e
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        return wandb.init(project=project, name=name, dir=str(output_dir), config=config)
    except Exception as e:  # login / network problems: say how to run without the network
        raise UserError(f"wandb could not start ({type(e).__name__}: {' '.join(str(e).split())}); "
                        f"set WANDB_MODE=offline to log locally, or drop --wandb_name") from e


class Progress:
    """Per-epoch console progress for the main process.

    On a terminal: a tqdm bar advanced every step, its postfix (loss, lr, img/s) refreshed whenever
    the loop reports numbers. Otherwise (a file, CI): one plain line per report. The training loop
    reports every print_freq steps and at the end of the epoch, so there is no per-step host sync.
    """

    def __init__(self, epoch: int, epochs: int, total_steps: int, enabled: bool = True,
                 tty: Optional[bool] = None) -> None:
        self.enabled = enabled
        self.epoch, self.epochs, self.total = epoch, epochs, total_steps
        self.bar = None
        if enabled and (sys.stdout.isatty() if tty is None else tty):
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc=f"epoch {epoch}/{epochs - 1}", leave=True,
                            dynamic_ncols=True, file=sys.stdout)
        self.start = time.perf_counter()

    def step(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def report(self, step: int, loss: float, lr: float, images_per_s: float) -> None:
        """Numbers at `step` (1-based count of finished steps)."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}", refresh=True)
        else:
            print(f"epoch {self.epoch}/{self.epochs - 1} [{step}/{self.total}] loss {loss:.4f} lr {lr:.3e} "
                  f"{images_per_s:.1f} img/s {time.perf_counter() - self.start:.1f}s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
