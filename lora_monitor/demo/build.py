"""Build (or reuse) everything the offline demo needs inside one work folder.

Layout under `workdir`:
    models/tiny-sd/            diffusers SD 1.x folder (the base model)
    models/tiny-fashion-clip/  open_clip folder (FashionCLIP stand-in)
    models/tiny-dino/          transformers ViT folder (DINO stand-in)
    data/10_dress/             training images + captions (kohya DreamBooth layout)
    data/prompts.txt           kohya sample-prompt file
The trainer is the package's own `sd_scripts/train_network.py` (not copied).

Each built folder carries a recipe file; a folder whose recipe matches is reused as is, anything else is
rebuilt in a temporary sibling and moved into place, so an interrupted build never looks complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_monitor.demo.build_cache import build_once

# Bump when a builder's output changes, so existing work folders are rebuilt.
RECIPE_VERSION = 1
IMAGE_SIZE = 64
N_IMAGES = 8
REPEATS = 10
SEED = 0

# Measured on 2 shared CPU cores (one torch thread): 30-36 s of training, 8 step checkpoints + the final
# file; the mean-Lab colour distance of generated garments to the references falls over the checkpoints
# (e.g. 64 -> 27 ΔE, Spearman vs step -0.98..-1.0 over seeds 42, 0, 1).
KOHYA_ARGS: dict[str, Any] = {
    "network_module": "networks.lora",
    "network_dim": 8,
    "network_alpha": 8.0,
    "network_train_unet_only": True,
    "resolution": f"{IMAGE_SIZE},{IMAGE_SIZE}",
    "train_batch_size": 4,
    "learning_rate": 8e-4,
    "lr_scheduler": "constant",
    "max_train_steps": 160,
    "save_every_n_steps": 20,
    "seed": 42,
    "caption_extension": ".txt",
    "mixed_precision": "no",
    "cache_latents": True,
    "max_data_loader_n_workers": 0,
}
EVAL_SETTINGS: dict[str, Any] = {
    "steps": 10,
    "guidance_scale": 1.0,
    "width": IMAGE_SIZE,
    "height": IMAGE_SIZE,
}


@dataclass(frozen=True)
class DemoPaths:
    """Where the demo's parts are, and the settings the demo run uses."""

    base_model: Path
    train_data_dir: Path
    prompts: Path
    fashion_clip: Path
    dino: Path
    sd_scripts: Path
    kohya_args: dict[str, Any] = field(default_factory=lambda: dict(KOHYA_ARGS))
    eval_settings: dict[str, Any] = field(default_factory=lambda: dict(EVAL_SETTINGS))


def sd_scripts_dir() -> Path:
    """The folder holding the demo's kohya-compatible `train_network.py`."""
    return Path(__file__).resolve().parent / "sd_scripts"


def build_demo(workdir: Path) -> DemoPaths:
    """Build the demo's models and data in `workdir` (created; parts already built are reused).

    Deterministic: the same code builds the same bytes of weights and images.
    """
    from lora_monitor.demo.dataset import build_dataset, prompts_path

    # imported here: another module of the demo, kept out of this module's import time
    from lora_monitor.demo.scoring_models import build_tiny_dino, build_tiny_fashion_clip
    from lora_monitor.demo.sd_model import build_tiny_sd

    workdir = Path(workdir)
    models = workdir / "models"
    base = build_once(
        models / "tiny-sd",
        {"kind": "tiny-sd", "version": RECIPE_VERSION, "seed": SEED, "image_size": IMAGE_SIZE},
        lambda d: build_tiny_sd(d, seed=SEED, image_size=IMAGE_SIZE),
    )
    data = build_once(
        workdir / "data",
        {
            "kind": "dataset",
            "version": RECIPE_VERSION,
            "seed": SEED,
            "n": N_IMAGES,
            "size": IMAGE_SIZE,
            "repeats": REPEATS,
        },
        lambda d: build_dataset(d, n=N_IMAGES, size=IMAGE_SIZE, seed=SEED, repeats=REPEATS),
    )
    return DemoPaths(
        base_model=base,
        train_data_dir=data,
        prompts=prompts_path(data),
        fashion_clip=build_tiny_fashion_clip(models / "tiny-fashion-clip"),
        dino=build_tiny_dino(models / "tiny-dino"),
        sd_scripts=sd_scripts_dir(),
    )
