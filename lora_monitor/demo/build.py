"""Build (or reuse) everything the offline demo needs inside one work folder.

Layout under `workdir`:
    models/tiny-sd/            diffusers SD 1.x folder (the base model)
    models/tiny-flux/          diffusers FLUX.1 folder (the base model of `--family flux`), only when asked
    models/tiny-fashion-clip/  open_clip folder (FashionCLIP stand-in)
    models/tiny-dino/          transformers ViT folder (DINO stand-in)
    data/10_dress/             training images + captions (kohya DreamBooth layout)
    data/prompts.txt           kohya sample-prompt file
    data-overtrain/            the over-training scenario's data (one image, many repeats), only when asked
The trainer is the package's own `sd_scripts/train_network.py` (FLUX.1: `flux_train_network.py`), not copied.

Each built folder carries a recipe file; a folder whose recipe matches is reused as is, anything else is
rebuilt in a temporary sibling and moved into place, so an interrupted build never looks complete.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_monitor.demo.build_cache import build_once
from lora_monitor.demo.sd_model import VAE_DOWNSCALE

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
EARLY_STOPPING: dict[str, Any] = {"enabled": False, "monitor": "eval_score", "patience": 3}
# FLUX.1 (`demo --family flux`): kohya's recommended FLUX LoRA settings (guidance 1.0 while training, shifted
# sigmoid timesteps, raw prediction) on the tiny FLUX. Measured on 2 shared CPU cores: about 10 s of training for
# 200 steps; the red dress appears out of the base model's noise from the first checkpoints on.
FLUX_KOHYA_ARGS: dict[str, Any] = {
    **KOHYA_ARGS,
    "network_module": "networks.lora_flux",
    "learning_rate": 2e-3,
    "max_train_steps": 200,
    "save_every_n_steps": 25,
    "output_name": "demo_flux_dress",
    "guidance_scale": 1.0,
    "timestep_sampling": "shift",
    "discrete_flow_shift": 3.1582,
    "model_prediction_type": "raw",
}
FAMILY_SCRIPTS = {"sd": "train_network.py", "flux": "flux_train_network.py"}  # the demo's trainer per family
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
    early_stopping: dict[str, Any] = field(default_factory=lambda: dict(EARLY_STOPPING))
    scenario: str = "default"
    family: str = "sd"  # a key of FAMILY_SCRIPTS: the model family the demo trains

    @property
    def script(self) -> str:
        return FAMILY_SCRIPTS[self.family]


@dataclass(frozen=True)
class Scenario:
    """A variant of the demo: its training data and what it changes in the demo's settings."""

    description: str
    data_dir: str  # the dataset folder under the work folder
    n_images: int
    repeats: int
    pixel_block: int = 1  # > 1: images drawn on the VAE's pixel grid (dataset.draw_on_grid)
    kohya_args: dict[str, Any] = field(default_factory=dict)  # over KOHYA_ARGS
    early_stopping: dict[str, Any] = field(default_factory=dict)  # over EARLY_STOPPING


SCENARIOS: dict[str, Scenario] = {
    "default": Scenario("a tiny model learns a red dress; every checkpoint is scored live", "data", N_IMAGES,
                        REPEATS),
    # One image, a high learning rate, 400 steps where about 60 do: the LoRA memorises the image, every seed and
    # prompt draws it, diversity and copy_distance fall, and the over-training flags stop the run.
    # The image is drawn on the VAE's 4 × 4 pixel grid: the tiny model can only draw such blocks, and the default
    # dresses' smooth edges already lie 0.17 from their own VAE round trip (Carlini's tiled distance), above the
    # 0.15 copy threshold, so no generated image could ever count as a copy of one of them.
    # Measured (2 CPU cores shared with other jobs, load average ~9): clean at steps 20-60, copies and collapsed
    # diversity from step 80, stopped at step 100 with step 60 the best; 57 s for the whole demo.
    "overtrain": Scenario(
        "one training image, trained far past its useful point; over-training stops it",
        "data-overtrain", 1, 40, pixel_block=VAE_DOWNSCALE,
        kohya_args={"learning_rate": 1e-3, "max_train_steps": 400, "output_name": "demo_overtrain"},
        early_stopping={"overtraining": True, "patience": 2},
    ),
}


def sd_scripts_dir() -> Path:
    """The folder holding the demo's kohya-compatible `train_network.py`."""
    return Path(__file__).resolve().parent / "sd_scripts"


def build_demo(workdir: Path, scenario: str = "default", family: str = "sd") -> DemoPaths:
    """Build the demo's models and data in `workdir` (created; parts already built are reused).

    `scenario`: a key of SCENARIOS; `family`: "sd" (the tiny SD 1.x) or "flux" (the tiny FLUX.1, default scenario
    only). Deterministic: the same code builds the same bytes of weights and images.
    """
    from lora_monitor.demo.dataset import build_dataset, prompts_path

    # imported here: another module of the demo, kept out of this module's import time
    from lora_monitor.demo.scoring_models import build_tiny_dino, build_tiny_fashion_clip
    from lora_monitor.demo.sd_model import build_tiny_sd

    if scenario not in SCENARIOS:
        raise ValueError(f"unknown demo scenario {scenario!r} (valid: {', '.join(SCENARIOS)})")
    if family not in FAMILY_SCRIPTS:
        raise ValueError(f"unknown demo family {family!r} (valid: {', '.join(FAMILY_SCRIPTS)})")
    if family != "sd" and scenario != "default":
        raise ValueError(f"the {scenario!r} scenario is for the SD demo only; run the {family} demo without it")
    plan = SCENARIOS[scenario]
    workdir = Path(workdir)
    models = workdir / "models"
    base = _build_flux(models) if family == "flux" else build_once(
        models / "tiny-sd",
        {"kind": "tiny-sd", "version": RECIPE_VERSION, "seed": SEED, "image_size": IMAGE_SIZE},
        lambda d: build_tiny_sd(d, seed=SEED, image_size=IMAGE_SIZE),
    )
    data = build_once(
        workdir / plan.data_dir,
        {
            "kind": "dataset",
            "version": RECIPE_VERSION,
            "seed": SEED,
            "n": plan.n_images,
            "size": IMAGE_SIZE,
            "repeats": plan.repeats,
            # only when set, so the default dataset's recipe (and an existing work folder) stays as it was
            **({"pixel_block": plan.pixel_block} if plan.pixel_block != 1 else {}),
        },
        lambda d: build_dataset(d, n=plan.n_images, size=IMAGE_SIZE, seed=SEED, repeats=plan.repeats,
                                block=plan.pixel_block),
    )
    kohya_args = dict(FLUX_KOHYA_ARGS) if family == "flux" else {**KOHYA_ARGS, **plan.kohya_args}
    return DemoPaths(
        base_model=base,
        train_data_dir=data,
        prompts=prompts_path(data),
        fashion_clip=build_tiny_fashion_clip(models / "tiny-fashion-clip"),
        dino=build_tiny_dino(models / "tiny-dino"),
        sd_scripts=sd_scripts_dir(),
        kohya_args=kohya_args,
        early_stopping={**EARLY_STOPPING, **plan.early_stopping},
        scenario=scenario,
        family=family,
    )


def _build_flux(models: Path) -> Path:
    """The tiny FLUX.1 with the SD demo's near-identity VAE (4 x 4 pixel blocks, 4 latent channels = the
    transformer's 16 packed ones): FLUX's own random tiny VAE would decode anything the LoRA learns into noise."""
    from lora_monitor.demo.flux_model import build_tiny_flux
    from lora_monitor.demo.sd_model import _make_vae

    def write(d: Path) -> Path:
        vae = _make_vae()
        vae.register_to_config(shift_factor=0.0)  # FluxPipeline un-shifts latents; this VAE needs no shift
        return build_tiny_flux(d, seed=SEED, vae=vae)

    return build_once(models / "tiny-flux", {"kind": "tiny-flux", "version": RECIPE_VERSION, "seed": SEED,
                                             "vae": "pixel-blocks"}, write)
