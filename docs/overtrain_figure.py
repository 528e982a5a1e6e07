"""Draw docs/overtrain.png from a run of `lora-monitor demo --scenario overtrain`.

    python docs/overtrain_figure.py demo-overtrain/output docs/overtrain.png

Top: eval_score, diversity and copy_distance by step from the run's loss_tracker.csv, the baseline and the
bounds the flags use, flagged checkpoints in red, the best (best.json) circled. Bottom: the training image,
then the first image of the baseline and of each checkpoint (eval/<stem>/00.png).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

COPY_THRESHOLD = 0.15  # [metrics] copy_threshold's default
DIVERSITY_FRACTION = 0.25  # [best] diversity_fraction's default


def _panel(ax, ok: pd.DataFrame, baseline: pd.Series, column: str, flagged: set[int], best_step: int | None,
           bound: tuple[float, str] | None) -> None:
    ax.plot(ok["step"], ok[column], color="0.3", lw=1.2, zorder=1)
    colours = ["tab:red" if s in flagged else "tab:green" for s in ok["step"]]
    ax.scatter(ok["step"], ok[column], c=colours, s=22, zorder=2)
    if best_step is not None:
        at = ok[ok["step"] == best_step]
        ax.scatter(at["step"], at[column], s=140, facecolors="none", edgecolors="k", lw=1.4, zorder=3)
    ax.axhline(baseline[column], color="tab:blue", ls=":", lw=1, label="baseline (no LoRA)")
    if bound is not None:
        ax.axhline(bound[0], color="tab:red", ls="--", lw=1, label=bound[1])
    ax.set_title(column, fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="best")


def draw(output: Path, target: Path) -> None:
    df = pd.read_csv(output / "loss_tracker.csv")
    baseline = df[df["status"] == "baseline"].iloc[-1]
    ok = df[df["status"] == "ok"].sort_values("step")
    best = json.loads((output / "best.json").read_text())
    flagged = {int(e["step"]) for e in best.get("excluded", [])}
    best_step = best.get("step")
    fig = plt.figure(figsize=(9, 4.6), dpi=90)
    grid = fig.add_gridspec(2, 3, height_ratios=[3, 1.3], hspace=0.45)
    bounds = {"eval_score": None,
              "diversity": (DIVERSITY_FRACTION * baseline["diversity"], f"{DIVERSITY_FRACTION} × baseline"),
              "copy_distance": (COPY_THRESHOLD, f"copy threshold {COPY_THRESHOLD}")}
    for i, (column, bound) in enumerate(bounds.items()):
        _panel(fig.add_subplot(grid[0, i]), ok, baseline, column, flagged, best_step, bound)
    # the images: what it was trained on, then what the base model and each checkpoint draw for prompt 1
    reference = next(p for p in sorted(output.parent.glob("data-overtrain/*/*.png")))
    strip = [("training image", reference), ("baseline", output / "eval" / "baseline" / "00.png")]
    strip += [(f"step {int(r.step)}" + (" best" if r.step == best_step else ""),
               output / "eval" / Path(r.checkpoint).stem / "00.png") for r in ok.itertuples()]
    images = fig.add_gridspec(2, len(strip), height_ratios=[3, 1.3], wspace=0.05, hspace=0.45)
    for i, (label, path) in enumerate(strip):
        ax = fig.add_subplot(images[1, i])
        ax.imshow(Image.open(path).convert("RGB"), interpolation="nearest")
        ax.set_title(label, fontsize=7, color="tab:red" if label.startswith("step") and
                     int(label.split()[1]) in flagged else "k")
        ax.axis("off")
    fig.suptitle("lora-monitor demo --scenario overtrain: green = clean, red = flagged as over-trained, "
                 "circle = best", fontsize=9)
    fig.savefig(target, bbox_inches="tight")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python docs/overtrain_figure.py RUN_OUTPUT_DIR TARGET.png")
    draw(Path(sys.argv[1]), Path(sys.argv[2]))
