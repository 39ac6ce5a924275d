"""The per-step record of a training run: one row per optimizer step, written as a CSV and plotted as a PNG.

Columns: `step` (1-based, counting the steps before a resume), `phase`, `loss` (averaged over the ranks), `lr`,
then one `loss/<term>` column per named term of a loss made of several (refine with `l2_weight`: `loss/contrastive`
and `loss/l2`, weighted, so they sum to `loss`), then what the phase adds (prune: `n_layers`). A cell a row does
not have is empty. The record travels inside each training checkpoint, so a resumed run appends to it and the
final CSV has every step once.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

LOSS_CSV = "loss.csv"
LOSS_PNG = "loss.png"
_FIXED = ("step", "phase", "loss", "lr")


def _number(text: str) -> float:
    """A cell as written: an int stays an int (step, n_layers), so a record read and written again is unchanged."""
    try:
        return int(text)
    except ValueError:
        return float(text)


@dataclass
class LossLog:
    phase: str
    rows: list[dict[str, float]] = field(default_factory=list)  # without `phase`: one log is one phase

    def add(self, step: int, loss: float, lr: float, **more: float) -> None:
        """Record optimizer step `step` (1-based): its loss, learning rate, and `more` (loss terms, stage)."""
        self.rows.append({"step": step, "loss": loss, "lr": lr, **more})

    @property
    def columns(self) -> list[str]:
        extra = {name for row in self.rows for name in row} - set(_FIXED)
        return [*_FIXED, *sorted(extra, key=lambda name: (not name.startswith("loss/"), name))]

    def write_csv(self, path: str | Path) -> Path:
        path = Path(path)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns, restval="")
            writer.writeheader()
            writer.writerows({"phase": self.phase, **row} for row in self.rows)
        return path

    @classmethod
    def read_csv(cls, path: str | Path, phase: str) -> LossLog:
        """The rows of a CSV that `write_csv` wrote; none when there is no such file (a run that has not logged)."""
        log = cls(phase)
        if Path(path).exists():
            with Path(path).open(newline="") as f:
                log.rows = [{k: _number(v) for k, v in row.items() if k != "phase" and v} for row in csv.DictReader(f)]
        return log

    def plot(self, path: str | Path) -> Path:
        """Loss (and its terms) per step, learning rate on a second axis."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [row["step"] for row in self.rows]
        for name in (c for c in self.columns if c == "loss" or c.startswith("loss/")):
            ax.plot(steps, [row.get(name, math.nan) for row in self.rows], label=name,
                    linewidth=1.5 if name == "loss" else 1.0)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8, loc="upper right")
        lr = ax.twinx()
        lr.plot(steps, [row["lr"] for row in self.rows], color="grey", linestyle=":", linewidth=1.0)
        lr.set_ylabel("learning rate (dotted)")
        ax.set_title(f"phase {self.phase}: {len(self.rows)} steps")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return Path(path)
