"""A small LoRA trainer for SD 1.x diffusers models speaking kohya sd-scripts' `train_network.py` interface.

Run it as kohya's script is run: `python -u train_network.py --pretrained_model_name_or_path DIR
--train_data_dir DIR --output_dir DIR --output_name NAME --network_module networks.lora ...`. It accepts
kohya's flags for what it supports (an unknown flag is an argparse error, as in kohya) and reproduces
kohya's console output (stdout: run header, `epoch n/N`, `saving checkpoint: PATH` printed before the
file is written, `removing old checkpoint: PATH`; stderr: rich-style log lines and the tqdm `steps:` bar
with `avr_loss=`), file names, safetensors keys and `ss_*` metadata, and TensorBoard scalars.

Differences from kohya, all because the demo base model is tiny and random:
- the LoRA wraps every Linear and Conv2d layer of the U-Net (conv_in/conv_out and 3x3 convs included);
  kohya's networks.lora wraps attention/MLP and 1x1 convs unless `conv_dim` is set. Text encoder: none.
- the training target follows the base model's scheduler `prediction_type` (the demo base uses
  x0-prediction, "sample"), and latents are scaled by the VAE's own `scaling_factor`.
- held-out validation (`--validation_split`): the split is drawn with `--validation_seed`, else `--seed`
  (kohya shuffles with the process's global random state when no validation seed is given).
No signal handlers are installed: SIGINT raises KeyboardInterrupt, SIGTERM kills, neither saves.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("train_network")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
NUM_VALIDATION_TIMESTEPS = 4  # kohya: validation at fixed timesteps 200, 400, 600, 800 of 1000
TOKENIZER_ID = "openai/clip-vit-large-patch14"  # kohya's SD1 tokenizer; its cache folder is named after it
SUPPORTED_NETWORK_MODULE = "networks.lora"


def setup_parser() -> argparse.ArgumentParser:
    """kohya's flags for what this trainer supports, with kohya's defaults."""
    p = argparse.ArgumentParser()
    p.add_argument(
        "--console_log_level", type=str, default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    p.add_argument("--config_file", type=str, default=None, help="kohya-style TOML of option values")
    p.add_argument("--pretrained_model_name_or_path", type=str, default=None)
    p.add_argument("--tokenizer_cache_dir", type=str, default=None)
    p.add_argument("--train_data_dir", type=str, default=None)
    p.add_argument("--caption_extension", type=str, default=".caption")
    p.add_argument("--resolution", type=str, default=None)
    p.add_argument("--output_dir", type=str, default=None)
    p.add_argument("--output_name", type=str, default=None)
    p.add_argument(
        "--save_model_as", type=str, default="safetensors", choices=[None, "ckpt", "pt", "safetensors"]
    )
    p.add_argument("--save_every_n_steps", type=int, default=None)
    p.add_argument("--save_every_n_epochs", type=int, default=None)
    p.add_argument("--save_last_n_steps", type=int, default=None)
    p.add_argument("--save_last_n_epochs", type=int, default=None)
    p.add_argument("--max_train_steps", type=int, default=1600)
    p.add_argument("--max_train_epochs", type=int, default=None)
    p.add_argument("--train_batch_size", type=int, default=1)
    p.add_argument("--learning_rate", type=float, default=2.0e-6)
    p.add_argument("--unet_lr", type=float, default=None)
    p.add_argument("--lr_scheduler", type=str, default="constant")
    p.add_argument("--optimizer_type", type=str, default="")
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--cache_latents", action="store_true")
    p.add_argument("--max_data_loader_n_workers", type=int, default=8)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--logging_dir", type=str, default=None)
    p.add_argument("--log_prefix", type=str, default=None)
    p.add_argument("--training_comment", type=str, default=None)
    p.add_argument("--network_module", type=str, default=None)
    p.add_argument("--network_dim", type=int, default=None)
    p.add_argument("--network_alpha", type=float, default=1)
    p.add_argument("--network_args", type=str, default=None, nargs="*")
    p.add_argument("--network_train_unet_only", action="store_true")
    p.add_argument("--validation_seed", type=int, default=None)
    p.add_argument("--validation_split", type=float, default=0.0)
    p.add_argument("--validate_every_n_steps", type=int, default=None)
    p.add_argument("--validate_every_n_epochs", type=int, default=None)
    p.add_argument("--max_validation_steps", type=int, default=None)
    p.add_argument("--sample_every_n_steps", type=int, default=None)
    p.add_argument("--sample_every_n_epochs", type=int, default=None)
    p.add_argument("--sample_at_first", action="store_true")
    p.add_argument("--sample_prompts", type=str, default=None)
    return p


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Reject, with one clear line, what kohya accepts but this trainer does not do."""
    unsupported = [
        (args.network_args is not None, "--network_args is not supported (plain LoRA only)"),
        (args.save_model_as != "safetensors", "--save_model_as: only 'safetensors' is supported"),
        (args.lr_scheduler != "constant", "--lr_scheduler: only 'constant' is supported"),
        (args.optimizer_type.lower() not in ("", "adamw"), "--optimizer_type: only AdamW is supported"),
        (args.mixed_precision != "no", "--mixed_precision: only 'no' is supported (CPU float32)"),
        (
            args.network_module != SUPPORTED_NETWORK_MODULE,
            f"--network_module must be {SUPPORTED_NETWORK_MODULE}",
        ),
    ]
    for bad, message in unsupported:
        if bad:
            parser.error(message)
    for name in ("pretrained_model_name_or_path", "train_data_dir", "output_dir"):
        if getattr(args, name) is None:
            parser.error(f"--{name} is required")
    for name in (
        "save_every_n_steps",
        "save_every_n_epochs",
        "max_train_steps",
        "max_train_epochs",
        "train_batch_size",
        "network_dim",
        "save_last_n_steps",
        "save_last_n_epochs",
        "validate_every_n_steps",
        "validate_every_n_epochs",
        "max_validation_steps",
    ):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    if not 0.0 <= args.validation_split < 1.0:
        parser.error(f"--validation_split must be in [0, 1), got {args.validation_split}")
    if args.resolution is None:
        parser.error("--resolution is required (e.g. 64,64)")
    try:
        reso = tuple(int(r) for r in args.resolution.split(","))
    except ValueError:
        parser.error(f"--resolution must be W or W,H in pixels, got {args.resolution!r}")
    reso = reso * 2 if len(reso) == 1 else reso
    if len(reso) != 2 or any(r < 16 or r % 16 for r in reso):
        parser.error(f"--resolution must be W or W,H, multiples of 16 px, got {args.resolution!r}")
    args.resolution = reso
    if args.network_dim is None:
        args.network_dim = 4  # networks.lora's default rank
    if args.sample_prompts is not None and not args.sample_prompts.endswith(".txt"):
        parser.error("--sample_prompts: only a .txt prompt file is supported")
    args.sample_name = args.output_name  # kohya names samples after output_name as given (None: no prefix)
    if args.output_name is None:
        args.output_name = "last"  # kohya's DEFAULT_LAST_OUTPUT_NAME


def read_config_from_file(args: argparse.Namespace, parser: argparse.ArgumentParser,
                          argv: list[str] | None) -> argparse.Namespace:
    """As kohya's train_util.read_config_from_file: `.toml` appended when missing, top-level tables flattened,
    and the command line parsed again over the file's values (an option given there wins)."""
    if not args.config_file:
        return args
    import tomllib

    path = args.config_file if args.config_file.endswith(".toml") else args.config_file + ".toml"
    if not os.path.exists(path):
        parser.error(f"config file {path} not found")
    with open(path, "rb") as f:
        data = tomllib.load(f)
    flat: dict = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return parser.parse_args(argv, namespace=argparse.Namespace(**flat))


def setup_logging(level: str | None) -> None:
    """kohya's console logging: rich's handler on stderr when rich is installed, plain lines otherwise."""
    try:
        from rich.console import Console
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=Console(stderr=True))
    except ImportError:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt="%(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    logging.root.setLevel(level or "INFO")
    logging.root.addHandler(handler)


@dataclass(frozen=True)
class Subset:
    """One DreamBooth folder `<repeats>_<class tokens>` and its images with captions."""

    dir: Path
    repeats: int
    class_tokens: str
    images: tuple[Path, ...]
    captions: tuple[str, ...]


def load_subsets(train_data_dir: Path, caption_extension: str) -> list[Subset]:
    """Read kohya's DreamBooth layout; a missing caption falls back to the folder's class tokens."""
    logger.info("Using DreamBooth method.")
    logger.info("prepare images.")
    subsets = []
    for sub in sorted(p for p in train_data_dir.iterdir() if p.is_dir()):
        head, _, tokens = sub.name.partition("_")
        if not head.isdigit() or int(head) < 1:
            logger.warning(f"ignore directory without repeats: {sub.name}")
            continue
        images = tuple(sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS))
        logger.info(f"found directory {sub} contains {len(images)} image files")
        captions = []
        for img in images:
            cap = img.with_suffix(caption_extension)
            captions.append(cap.read_text(encoding="utf-8").strip() if cap.is_file() else tokens)
        subsets.append(Subset(sub, int(head), tokens, images, tuple(captions)))
    n = sum(len(s.images) * s.repeats for s in subsets)
    logger.info(f"{n} train images with repeats.")
    logger.info("0 reg images with repeats.")
    logger.warning("no regularization images / 正則化画像が見つかりませんでした")
    if n == 0:
        raise SystemExit(f"No data found. Please verify arguments (train_data_dir: {train_data_dir})")
    return subsets


def split_train_val(subset: Subset, split: float, seed: int) -> tuple[Subset, Subset]:
    """kohya's train_util.split_train_val on one subset: shuffle, the first ceil(n·(1−split)) images train,
    the last round(n·split) validate (kohya's own arithmetic, overlap at odd sizes included)."""
    pairs = list(zip(subset.images, subset.captions, strict=True))
    random.Random(seed).shuffle(pairs)
    n = len(pairs)
    train, val = pairs[: math.ceil(n * (1 - split))], pairs[n - round(n * split) :]

    def part(items: list[tuple[Path, str]]) -> Subset:
        return Subset(subset.dir, subset.repeats, subset.class_tokens, tuple(i for i, _ in items),
                      tuple(c for _, c in items))

    return part(train), part(val)


def validation_timesteps(num_train_timesteps: int) -> list[int]:
    """kohya's fixed validation timesteps: NUM_VALIDATION_TIMESTEPS evenly inside (0, T), ends excluded."""
    n = NUM_VALIDATION_TIMESTEPS
    return [int(num_train_timesteps * (i + 1) / (n + 1)) for i in range(n)]


class LossRecorder:
    """kohya's moving average: the mean of the last loss seen at each batch position of an epoch."""

    def __init__(self) -> None:
        self.loss_list: list[float] = []
        self.loss_total = 0.0

    def add(self, *, epoch: int, step: int, loss: float) -> None:
        if epoch == 0:
            self.loss_list.append(loss)
        else:
            while len(self.loss_list) <= step:
                self.loss_list.append(0.0)
            self.loss_total -= self.loss_list[step]
            self.loss_list[step] = loss
        self.loss_total += loss

    @property
    def moving_average(self) -> float:
        return self.loss_total / len(self.loss_list)


def remove_step_no(args: argparse.Namespace, step_no: int) -> int | None:
    """Which step file `--save_last_n_steps` drops when step `step_no` is saved (kohya's rule)."""
    if args.save_last_n_steps is None:
        return None
    remove = step_no - args.save_last_n_steps - 1
    remove -= remove % args.save_every_n_steps
    return remove if remove >= 0 else None


def remove_epoch_no(args: argparse.Namespace, epoch_no: int) -> int | None:
    """Which epoch file `--save_last_n_epochs` drops when epoch `epoch_no` is saved (kohya's rule)."""
    if args.save_last_n_epochs is None:
        return None
    remove = epoch_no - args.save_every_n_epochs * args.save_last_n_epochs
    return remove if remove >= 0 else None


def load_tokenizer(args: argparse.Namespace, model_dir: Path) -> Any:
    """kohya's tokenizer cache: `<cache>/openai_clip-vit-large-patch14` if present, else the model's own."""
    from transformers import CLIPTokenizer

    logger.info("Using v1 tokenizer")
    if args.tokenizer_cache_dir:
        cached = Path(args.tokenizer_cache_dir) / TOKENIZER_ID.replace("/", "_")
        if cached.is_dir():
            logger.info(f"load tokenizer from cache: {cached}")
            return CLIPTokenizer.from_pretrained(str(cached))
        tokenizer = CLIPTokenizer.from_pretrained(str(model_dir / "tokenizer"))
        logger.info(f"save Tokenizer to cache: {cached}")
        tokenizer.save_pretrained(str(cached))
        return tokenizer
    return CLIPTokenizer.from_pretrained(str(model_dir / "tokenizer"))


def load_image(path: Path, size: tuple[int, int]) -> Any:
    """An RGB image resized (cover) and centre-cropped to `size` (W, H), as a CHW tensor in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    img = Image.open(path).convert("RGB")
    w, h = size
    scale = max(w / img.width, h / img.height)
    img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))), Image.BICUBIC)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    img = img.crop((left, top, left + w, top + h))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


def lora_target_modules(unet: Any) -> list[str]:
    """Every Linear and Conv2d of the U-Net (see the module docstring for why all of them)."""
    import torch

    return [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]


def kohya_state_dict(unet: Any, alpha: float) -> dict[str, Any]:
    """The U-Net's LoRA weights with kohya keys (`lora_unet_<path>.lora_down/lora_up.weight`, `.alpha`)."""
    import torch
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft import get_peft_model_state_dict

    peft_sd = {
        "unet." + k: v.detach().to("cpu", torch.float32) for k, v in get_peft_model_state_dict(unet).items()
    }
    sd = convert_state_dict_to_kohya(peft_sd)
    for key in sd:
        if key.endswith(".alpha"):
            # kohya stores --network_alpha as given: an int 1 by default (int64), a float when passed
            sd[key] = torch.tensor(alpha)
    return {k: v.contiguous() for k, v in sd.items()}


def build_metadata(
    args: argparse.Namespace, subsets: list[Subset], val_subsets: list[Subset], n_batches: int, n_epochs: int
) -> dict[str, str]:
    """kohya's `ss_*` training metadata (the fields this trainer can fill truthfully), as strings."""
    tag_frequency: dict[str, dict[str, int]] = {}
    for s in subsets:
        counts = Counter(tag.strip() for cap in s.captions for tag in cap.split(",") if tag.strip())
        tag_frequency[s.dir.name] = dict(counts)
    n_images = sum(len(s.images) * s.repeats for s in subsets)
    model_name = args.pretrained_model_name_or_path
    meta: dict[str, Any] = {
        "ss_session_id": random.randint(0, 2**32),
        "ss_training_started_at": time.time(),
        "ss_output_name": args.output_name,
        "ss_learning_rate": args.learning_rate,
        "ss_text_encoder_lr": None,
        "ss_unet_lr": args.unet_lr,
        "ss_num_train_images": n_images,
        "ss_num_validation_images": sum(len(s.images) * s.repeats for s in val_subsets),
        "ss_num_reg_images": 0,
        "ss_num_batches_per_epoch": n_batches,
        "ss_num_epochs": n_epochs,
        "ss_gradient_checkpointing": False,
        "ss_gradient_accumulation_steps": 1,
        "ss_max_train_steps": args.max_train_steps,
        "ss_lr_warmup_steps": 0,
        "ss_lr_scheduler": args.lr_scheduler,
        "ss_network_module": args.network_module,
        "ss_network_dim": args.network_dim,
        "ss_network_alpha": args.network_alpha,
        "ss_network_dropout": None,
        "ss_mixed_precision": args.mixed_precision,
        "ss_v2": False,
        "ss_base_model_version": "sd_v1",
        "ss_cache_latents": bool(args.cache_latents),
        "ss_seed": args.seed,
        "ss_validation_seed": args.validation_seed,
        "ss_validation_split": args.validation_split,
        "ss_max_validation_steps": args.max_validation_steps,
        "ss_validate_every_n_epochs": args.validate_every_n_epochs,
        "ss_validate_every_n_steps": args.validate_every_n_steps,
        "ss_training_comment": args.training_comment,
        "ss_optimizer": "torch.optim.adamw.AdamW",
        "ss_max_grad_norm": args.max_grad_norm,
        "ss_batch_size_per_device": args.train_batch_size,
        "ss_total_batch_size": args.train_batch_size,
        "ss_resolution": args.resolution,
        "ss_enable_bucket": False,
        "ss_dataset_dirs": json.dumps(
            {s.dir.name: {"n_repeats": s.repeats, "img_count": len(s.images)} for s in subsets}
        ),
        "ss_reg_dataset_dirs": json.dumps({}),
        "ss_tag_frequency": json.dumps(tag_frequency),
        "ss_sd_model_name": os.path.basename(model_name) if os.path.exists(model_name) else model_name,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers",
        "modelspec.title": args.output_name,
        "modelspec.resolution": f"{args.resolution[0]}x{args.resolution[1]}",
    }
    return {k: str(v) for k, v in meta.items()}


class Checkpointer:
    """Saves and removes LoRA files the way kohya does (message first, then the file, written in place)."""

    def __init__(self, args: argparse.Namespace, unet: Any, metadata: dict[str, str]) -> None:
        self.args, self.unet, self.metadata = args, unet, metadata

    def save(self, name: str, steps: int, epoch_no: int) -> None:
        from safetensors.torch import save_file

        os.makedirs(self.args.output_dir, exist_ok=True)
        path = os.path.join(self.args.output_dir, name)
        print(f"\nsaving checkpoint: {path}")
        self.metadata["ss_training_finished_at"] = str(time.time())
        self.metadata["ss_steps"] = str(steps)
        self.metadata["ss_epoch"] = str(epoch_no)
        self.metadata["modelspec.date"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        save_file(kohya_state_dict(self.unet, self.args.network_alpha), path, dict(self.metadata))

    def remove(self, name: str) -> None:
        path = os.path.join(self.args.output_dir, name)
        if os.path.exists(path):
            print(f"removing old checkpoint: {path}")
            os.remove(path)

    def remove_step(self, step: int | None) -> None:
        if step is not None:
            self.remove(self.step_name(step))

    def remove_epoch(self, epoch: int | None) -> None:
        if epoch is not None:
            self.remove(self.epoch_name(epoch))

    def step_name(self, step: int) -> str:
        return f"{self.args.output_name}-step{step:08d}.safetensors"

    def epoch_name(self, epoch: int) -> str:
        return f"{self.args.output_name}-{epoch:06d}.safetensors"


def encode_dataset(
    args: argparse.Namespace, subsets: list[Subset], pipe_parts: dict[str, Any]
) -> tuple[Any, Any]:
    """Cache every image's latents (scaled) and every caption's text-encoder states, in dataset order."""
    import torch

    vae, text_encoder, tokenizer = pipe_parts["vae"], pipe_parts["text_encoder"], pipe_parts["tokenizer"]
    images = [img for s in subsets for img in s.images]
    captions = [cap for s in subsets for cap in s.captions]
    logger.info("caching latents...")
    with torch.no_grad():
        pixels = torch.stack([load_image(p, args.resolution) for p in images])
        latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        states = text_encoder(ids)[0]
    return latents, states


def make_epoch_batches(subsets: list[Subset], batch_size: int, rng: random.Random) -> list[list[int]]:
    """Indices (into the cached tensors) of each batch of one epoch: repeats expanded, then shuffled."""
    order: list[int] = []
    offset = 0
    for s in subsets:
        order += [offset + i for i in range(len(s.images))] * s.repeats
        offset += len(s.images)
    rng.shuffle(order)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def load_models(args: argparse.Namespace, subsets: list[Subset]) -> tuple[Any, Any, Any, Any]:
    """Load the base model, cache latents and text states; returns (unet, scheduler, latents, states)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    model_dir = Path(args.pretrained_model_name_or_path)
    tokenizer = load_tokenizer(args, model_dir)
    logger.info("loading model for process 0/1")
    logger.info(f"load Diffusers pretrained models: {model_dir}")
    vae = AutoencoderKL.from_pretrained(str(model_dir / "vae"))
    text_encoder = CLIPTextModel.from_pretrained(str(model_dir / "text_encoder"))
    unet = UNet2DConditionModel.from_pretrained(str(model_dir / "unet"))
    scheduler = DDPMScheduler.from_pretrained(str(model_dir / "scheduler"))
    for m in (vae, text_encoder, unet):
        m.requires_grad_(False)
        m.eval()
    parts = {"vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer}
    latents, states = encode_dataset(args, subsets, parts)
    return unet, scheduler, latents, states


def add_lora(args: argparse.Namespace, unet: Any) -> list[Any]:
    """Wrap the U-Net's layers in a peft LoRA (rank network_dim, alpha network_alpha); returns its params."""
    from peft import LoraConfig

    print(f"import network module: {args.network_module}")
    logger.info(f"create LoRA network. base dim (rank): {args.network_dim}, alpha: {args.network_alpha}")
    if not args.network_train_unet_only:
        logger.info("this trainer adds no text encoder LoRA: training the U-Net only")
    targets = lora_target_modules(unet)
    config = LoraConfig(
        r=args.network_dim, lora_alpha=args.network_alpha, target_modules=targets, init_lora_weights=True
    )
    unet.add_adapter(config)
    logger.info(f"create LoRA for U-Net: {len(targets)} modules.")
    logger.info(f"enable LoRA for U-Net: {len(targets)} modules")
    unet.train()
    return [p for p in unet.parameters() if p.requires_grad]


def training_loss(unet: Any, scheduler: Any, latents: Any, cond: Any, timestep: int | None = None) -> Any:
    """MSE of the U-Net's prediction at uniformly drawn timesteps (or all at `timestep`), against the
    scheduler's target kind."""
    import torch

    noise = torch.randn_like(latents)
    if timestep is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
    else:
        timesteps = torch.full((latents.shape[0],), timestep, dtype=torch.long)
    pred = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, cond).sample
    kind = scheduler.config.prediction_type
    if kind == "sample":
        target = latents
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    return torch.nn.functional.mse_loss(pred, target)


class Validator:
    """kohya's validation pass: every validation batch at each fixed timestep, without gradients, with the
    torch and Python RNGs reseeded (`--validation_seed`, else `--seed`) for the pass and restored after it, so
    every pass draws the same noise and training's randomness is untouched."""

    def __init__(self, args: argparse.Namespace, model: tuple[Any, Any, Any, Any], batches: list[list[int]]):
        self.unet, self.scheduler, self.latents, self.states = model
        self.batches = batches[: args.max_validation_steps] if args.max_validation_steps else batches
        self.seed = args.validation_seed if args.validation_seed is not None else args.seed
        self.timesteps = validation_timesteps(self.scheduler.config.num_train_timesteps)
        self.step_recorder, self.epoch_recorder = LossRecorder(), LossRecorder()

    def run(self, recorder: LossRecorder, epoch: int, desc: str, postfix: str) -> float:
        import torch
        from tqdm import tqdm

        cpu_state, py_state = torch.get_rng_state(), random.getstate()
        torch.manual_seed(self.seed)
        random.seed(self.seed)
        bar = tqdm(range(len(self.batches) * len(self.timesteps)), smoothing=0, desc=desc, mininterval=0)
        self.unet.eval()
        k = 0
        with torch.no_grad():
            for idx in self.batches:
                for t in self.timesteps:
                    loss = training_loss(self.unet, self.scheduler, self.latents[idx], self.states[idx], t)
                    recorder.add(epoch=epoch, step=k, loss=loss.item())  # kohya's recorder, quirks included
                    k += 1
                    bar.update(1)
                    bar.set_postfix({postfix: recorder.moving_average, "timestep": t})
        bar.close()
        self.unet.train()
        torch.set_rng_state(cpu_state)
        random.setstate(py_state)
        return recorder.moving_average


def validation_batches(train: list[Subset], val: list[Subset], batch_size: int) -> list[list[int]]:
    """Indices of the validation images (cached after the training ones), repeats expanded, in order."""
    order: list[int] = []
    offset = sum(len(s.images) for s in train)
    for s in val:
        order += [offset + i for i in range(len(s.images))] * s.repeats
        offset += len(s.images)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def log_step(writer: Any, step: int, current: float, average: float, lr: float) -> None:
    """kohya's per-step TensorBoard scalars for a U-Net-only network (one parameter group)."""
    if writer is None:
        return
    for tag, value in (
        ("loss/current", current),
        ("loss/average", average),
        ("lr/unet", lr),
        ("lr/group0", lr),
    ):
        writer.add_scalar(tag, value, step)


def sample_prompt_line(line: str) -> dict[str, Any]:
    """kohya's line_to_prompt_dict for the options this trainer uses: --w --h --d --s --l --n."""
    import re

    parts = line.split(" --")
    out: dict[str, Any] = {"prompt": parts[0]}
    for part in parts[1:]:
        for key, pattern, kind in (("width", r"w (\d+)", int), ("height", r"h (\d+)", int), ("seed", r"d (\d+)", int),
                                   ("sample_steps", r"s (\d+)", int), ("scale", r"l ([\d\.]+)", float),
                                   ("negative_prompt", r"n (.+)", str)):
            if m := re.match(pattern, part, re.IGNORECASE):
                out[key] = kind(m.group(1))
                break
    return out


class Sampler:
    """kohya's sample images (`--sample_every_n_steps`/`--sample_every_n_epochs`/`--sample_at_first`), drawn
    with this trainer's own pipeline into `<output_dir>/sample/` under kohya's names."""

    def __init__(self, args: argparse.Namespace, unet: Any) -> None:
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
        from transformers import CLIPTextModel

        model_dir = Path(args.pretrained_model_name_or_path)
        self.args, self.unet = args, unet
        self.pipe = StableDiffusionPipeline(
            vae=AutoencoderKL.from_pretrained(str(model_dir / "vae")),
            text_encoder=CLIPTextModel.from_pretrained(str(model_dir / "text_encoder")),
            tokenizer=load_tokenizer(args, model_dir), unet=unet,
            scheduler=DDIMScheduler.from_pretrained(str(model_dir / "scheduler")),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        self.pipe.set_progress_bar_config(disable=True)

    def due(self, epoch: int | None, steps: int) -> bool:
        """kohya's sample_images_common: step 0 only with --sample_at_first; epochs rule over steps."""
        args = self.args
        if steps == 0:
            return args.sample_at_first
        if args.sample_every_n_epochs is not None:
            return epoch is not None and epoch % args.sample_every_n_epochs == 0
        return args.sample_every_n_steps is not None and steps % args.sample_every_n_steps == 0 and epoch is None

    def sample(self, epoch: int | None, steps: int) -> None:
        import torch

        if not self.due(epoch, steps):
            return
        logger.info(f"generating sample images at step / サンプル画像生成 ステップ: {steps}")
        with open(self.args.sample_prompts, encoding="utf-8") as f:
            lines = [line.strip() for line in f.readlines() if len(line.strip()) > 0 and line[0] != "#"]
        save_dir = os.path.join(self.args.output_dir, "sample")
        os.makedirs(save_dir, exist_ok=True)
        rng_state = torch.get_rng_state()
        self.unet.eval()
        for i, line in enumerate(lines):
            self.draw(sample_prompt_line(line), i, epoch, steps, save_dir)
        self.unet.train()
        torch.set_rng_state(rng_state)

    def draw(self, prompt: dict[str, Any], i: int, epoch: int | None, steps: int, save_dir: str) -> None:
        import torch

        seed = prompt.get("seed")
        if seed is not None:
            torch.manual_seed(seed)
        else:
            torch.seed()  # kohya: a random image when the line has no --d
        width, height = prompt.get("width", 512), prompt.get("height", 512)
        with torch.no_grad():
            image = self.pipe(prompt["prompt"], height=max(64, height - height % 8), width=max(64, width - width % 8),
                              num_inference_steps=prompt.get("sample_steps", 30),
                              guidance_scale=prompt.get("scale", 7.5),
                              negative_prompt=prompt.get("negative_prompt")).images[0]
        ts_str = time.strftime("%Y%m%d%H%M%S", time.localtime())
        num_suffix = f"e{epoch:06d}" if epoch is not None else f"{steps:06d}"
        seed_suffix = "" if seed is None else f"_{seed}"
        prefix = "" if self.args.sample_name is None else self.args.sample_name + "_"
        image.save(os.path.join(save_dir, f"{prefix}{num_suffix}_{i:02d}_{ts_str}{seed_suffix}.png"))


def train(args: argparse.Namespace) -> None:
    import torch

    # Threads as kohya's: torch's default (OMP_NUM_THREADS when set). lora-monitor sets that variable when it
    # evaluates on the same CPU (lora_monitor/cpu_share.py).
    from tqdm import tqdm

    if args.seed is None:
        args.seed = random.randint(0, 2**32)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    print("accelerator device: cpu")
    subsets = load_subsets(Path(args.train_data_dir), args.caption_extension)
    val_subsets: list[Subset] = []
    if args.validation_split > 0:
        seed = args.validation_seed if args.validation_seed is not None else args.seed
        split = [split_train_val(s, args.validation_split, seed) for s in subsets]
        subsets, val_subsets = [t for t, _ in split], [v for _, v in split if v.images]
        n_val = sum(len(s.images) * s.repeats for s in val_subsets)
        logger.info(f"{n_val} validation images with repeats.")
    unet, scheduler, latents, states = load_models(args, subsets + val_subsets)
    validator = Validator(args, (unet, scheduler, latents, states),
                          validation_batches(subsets, val_subsets, args.train_batch_size))
    params = add_lora(args, unet)
    print("prepare optimizer, data loader etc.")
    logger.info("use AdamW optimizer | {}")
    lr = args.unet_lr if args.unet_lr is not None else args.learning_rate
    optimizer = torch.optim.AdamW(params, lr=lr)
    n_batches = math.ceil(sum(len(s.images) * s.repeats for s in subsets) / args.train_batch_size)
    if args.max_train_epochs is not None:
        args.max_train_steps = args.max_train_epochs * n_batches
        print(
            f"override steps. steps for {args.max_train_epochs} epochs is / 指定エポックまでのステップ数: "
            f"{args.max_train_steps}"
        )
    n_epochs = math.ceil(args.max_train_steps / n_batches)
    print_header(subsets, val_subsets, n_batches, n_epochs, args)
    ckpt = Checkpointer(args, unet, build_metadata(args, subsets, val_subsets, n_batches, n_epochs))
    writer = make_summary_writer(args)
    logger.info(f"unet dtype: {unet.dtype}, device: {unet.device}")
    # kohya's bar; mininterval=0 because these steps can be faster than tqdm's 0.1 s redraw limit and
    # every step must be drawn twice (with the previous average, then the updated one) as kohya's are
    progress_bar = tqdm(range(args.max_train_steps), smoothing=0, desc="steps", mininterval=0)
    sampler = Sampler(args, unet) if args.sample_prompts else None
    if sampler is not None:
        sampler.sample(0, 0)
    loss_recorder = LossRecorder()
    global_step = 0
    for epoch in range(n_epochs):
        print(f"\nepoch {epoch + 1}/{n_epochs}\n")
        ckpt.metadata["ss_epoch"] = str(epoch + 1)
        logger.info(f"epoch is incremented. current_epoch: {epoch}, epoch: {epoch + 1}")
        batches = make_epoch_batches(subsets, args.train_batch_size, random.Random(args.seed + epoch))
        for step, idx in enumerate(batches):
            loss = training_loss(unet, scheduler, latents[idx], states[idx])
            loss.backward()
            if args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            # kohya's order: advance the bar (drawn with the old average), save, then show the new average
            progress_bar.update(1)
            global_step += 1
            if sampler is not None:
                sampler.sample(None, global_step)
            if args.save_every_n_steps is not None and global_step % args.save_every_n_steps == 0:
                ckpt.save(ckpt.step_name(global_step), global_step, epoch)
                ckpt.remove_step(remove_step_no(args, global_step))
            current_loss = loss.detach().item()
            loss_recorder.add(epoch=epoch, step=step, loss=current_loss)
            progress_bar.set_postfix(avr_loss=loss_recorder.moving_average)
            log_step(writer, global_step, current_loss, loss_recorder.moving_average, lr)
            every_val = args.validate_every_n_steps
            if validator.batches and every_val is not None and global_step % every_val == 0:
                val = validator.run(validator.step_recorder, epoch, "validation steps", "val_avg_loss")
                log_validation(writer, "step", global_step, val, val - loss_recorder.moving_average)
            if global_step >= args.max_train_steps:
                break
        every_val_epochs = args.validate_every_n_epochs
        if validator.batches and (every_val_epochs is None or (epoch + 1) % every_val_epochs == 0):
            val = validator.run(validator.epoch_recorder, epoch, "epoch validation steps", "val_epoch_avg_loss")
            log_validation(writer, "epoch", epoch + 1, val, val - loss_recorder.moving_average)
        if writer is not None:
            writer.add_scalar("loss/epoch_average", loss_recorder.moving_average, epoch + 1)
            writer.flush()
        every = args.save_every_n_epochs
        if every is not None and (epoch + 1) % every == 0 and (epoch + 1) < n_epochs:
            ckpt.save(ckpt.epoch_name(epoch + 1), global_step, epoch + 1)
            ckpt.remove_epoch(remove_epoch_no(args, epoch + 1))
        if sampler is not None:
            sampler.sample(epoch + 1, global_step)

    if writer is not None:
        writer.close()
    ckpt.save(f"{args.output_name}.safetensors", global_step, n_epochs)
    logger.info("model saved.")
    progress_bar.close()


def log_validation(writer: Any, kind: str, step: int, average: float, divergence: float) -> None:
    """kohya's validation scalars: `step` is the global step for kind "step", the 1-based epoch for "epoch"."""
    if writer is None:
        return
    writer.add_scalar(f"loss/validation/{kind}_average", average, step)
    writer.add_scalar(f"loss/validation/{kind}_divergence", divergence, step)
    writer.flush()


def print_header(subsets: list[Subset], val_subsets: list[Subset], n_batches: int, n_epochs: int,
                 args: argparse.Namespace) -> None:
    n_images = sum(len(s.images) * s.repeats for s in subsets)
    n_val = sum(len(s.images) * s.repeats for s in val_subsets)
    print("running training / 学習開始")
    print(f"  num train images * repeats / 学習画像の数×繰り返し回数: {n_images}")
    print(f"  num validation images * repeats / 学習画像の数×繰り返し回数: {n_val}")
    print("  num reg images / 正則化画像の数: 0")
    print(f"  num batches per epoch / 1epochのバッチ数: {n_batches}")
    print(f"  num epochs / epoch数: {n_epochs}")
    print(f"  batch size per device / バッチサイズ: {args.train_batch_size}")
    print("  gradient accumulation steps / 勾配を合計するステップ数 = 1")
    print(f"  total optimization steps / 学習ステップ数: {args.max_train_steps}")


def make_summary_writer(args: argparse.Namespace) -> Any:
    """kohya's TensorBoard layout: `<logging_dir>/<log_prefix><YYYYmmddHHMMSS>/network_train`."""
    if args.logging_dir is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    run = (args.log_prefix or "") + time.strftime("%Y%m%d%H%M%S", time.localtime())
    return SummaryWriter(log_dir=os.path.join(args.logging_dir, run, "network_train"))


def main(argv: list[str] | None = None) -> None:
    parser = setup_parser()
    args = read_config_from_file(parser.parse_args(argv), parser, argv)
    check_args(args, parser)
    setup_logging(args.console_log_level)
    train(args)


if __name__ == "__main__":
    main()
