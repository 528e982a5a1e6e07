"""A small FLUX.1 LoRA trainer speaking kohya sd-scripts' `flux_train_network.py` interface.

As kohya's `flux_train_network.py` builds on its `train_network.py`, this one builds on the `train_network.py`
beside it: the same dataset layout, console output (run header, `epoch n/N`, `saving checkpoint: PATH`, the
tqdm `steps:` bar with `avr_loss=`), checkpoint names, TensorBoard scalars and `ss_*` metadata, plus kohya's
FLUX flags (`--guidance_scale`, `--timestep_sampling`, `--sigmoid_scale`, `--discrete_flow_shift`,
`--model_prediction_type`, `--weighting_scheme`, `--t5xxl_max_token_length`) and its FLUX LoRA file format:
kohya's networks.lora_flux names (`lora_unet_double_blocks_N_img_attn_qkv`, `..._single_blocks_N_linear1`, ...),
one LoRA per BFL Linear of every double and single block, fused projections included, with `.alpha`, and
`ss_base_model_version = flux1`.

Training is rectified flow as kohya's: x_t = (1 - t) x0 + t noise, the transformer predicts noise - x0, the
guidance embedding is fed the constant `--guidance_scale` (kohya's recommended 1.0 for LoRAs).

Differences from kohya, because the demo base model is tiny:
- `--pretrained_model_name_or_path` is a diffusers FLUX.1 folder (transformer, VAE, CLIP-L, T5 and tokenizers);
  kohya's takes BFL's transformer file with `--clip_l`, `--t5xxl` and `--ae`, which this trainer refuses.
- the LoRA is applied to diffusers' FluxTransformer2DModel: a fused BFL layer (qkv; a single block's linear1 =
  q, k, v and the MLP input) is one LoRA (one down matrix, one up matrix) whose up rows feed each diffusers
  layer the fused layer was split into, so the file holds exactly what kohya's network would.
- CPU float32 only; text encoders are not trained (kohya's default for FLUX); no validation or sample images.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
from pathlib import Path
from typing import Any

import train_network as base  # kohya's flux_train_network.py imports its train_network.py the same way

logger = logging.getLogger("flux_train_network")

NETWORK_MODULE = "networks.lora_flux"
T5_DEV_TOKENS = 512  # kohya's --t5xxl_max_token_length default for FLUX.1-dev
# kohya's names of the Linear layers in BFL's blocks -> the diffusers layers each one is (in its output-row order)
DOUBLE_BLOCK = (
    ("img_attn_qkv", ("attn.to_q", "attn.to_k", "attn.to_v")),
    ("img_attn_proj", ("attn.to_out.0",)),
    ("img_mlp_0", ("ff.net.0.proj",)),
    ("img_mlp_2", ("ff.net.2",)),
    ("img_mod_lin", ("norm1.linear",)),
    ("txt_attn_qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")),
    ("txt_attn_proj", ("attn.to_add_out",)),
    ("txt_mlp_0", ("ff_context.net.0.proj",)),
    ("txt_mlp_2", ("ff_context.net.2",)),
    ("txt_mod_lin", ("norm1_context.linear",)),
)
SINGLE_BLOCK = (
    ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")),
    ("linear2", ("proj_out",)),
    ("modulation_lin", ("norm.linear",)),
)


def setup_parser() -> argparse.ArgumentParser:
    """train_network.py's flags plus kohya's FLUX ones (library/flux_train_utils.add_flux_train_arguments)."""
    p = base.setup_parser()
    p.add_argument("--clip_l", type=str, default=None)
    p.add_argument("--t5xxl", type=str, default=None)
    p.add_argument("--ae", type=str, default=None)
    p.add_argument("--t5xxl_max_token_length", type=int, default=None)
    p.add_argument("--apply_t5_attn_mask", action="store_true")
    p.add_argument("--cache_text_encoder_outputs", action="store_true")
    p.add_argument("--weighting_scheme", type=str, default="none",
                   choices=["sigma_sqrt", "logit_normal", "mode", "cosmap", "none"])
    p.add_argument("--guidance_scale", type=float, default=3.5)
    p.add_argument("--timestep_sampling", choices=["sigma", "uniform", "sigmoid", "shift"], default="sigma")
    p.add_argument("--sigmoid_scale", type=float, default=1.0)
    p.add_argument("--model_prediction_type", choices=["raw", "additive", "sigma_scaled"], default="sigma_scaled")
    p.add_argument("--discrete_flow_shift", type=float, default=3.0)
    return p


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Reject, with one clear line, what kohya accepts but this trainer does not do; fill kohya's defaults."""
    unsupported = [
        (args.network_module != NETWORK_MODULE, f"--network_module must be {NETWORK_MODULE} for FLUX.1"),
        (args.network_args is not None, "--network_args is not supported (plain LoRA only)"),
        (args.save_model_as != "safetensors", "--save_model_as: only 'safetensors' is supported"),
        (args.lr_scheduler != "constant", "--lr_scheduler: only 'constant' is supported"),
        (args.optimizer_type.lower() not in ("", "adamw"), "--optimizer_type: only AdamW is supported"),
        (args.mixed_precision != "no", "--mixed_precision: only 'no' is supported (CPU float32)"),
        (any((args.clip_l, args.t5xxl, args.ae)),
         "--clip_l/--t5xxl/--ae: give a diffusers FLUX.1 folder in --pretrained_model_name_or_path instead"),
        (args.weighting_scheme != "none", "--weighting_scheme: only 'none' is supported"),
        (args.apply_t5_attn_mask, "--apply_t5_attn_mask is not supported"),
        (args.validation_split > 0, "--validation_split is not supported by the FLUX.1 trainer"),
        (args.sample_prompts is not None or args.sample_at_first,
         "--sample_prompts/--sample_at_first are not supported by the FLUX.1 trainer"),
    ]
    for bad, message in unsupported:
        if bad:
            parser.error(message)
    for name in ("pretrained_model_name_or_path", "train_data_dir", "output_dir", "resolution"):
        if getattr(args, name) is None:
            parser.error(f"--{name} is required")
    for name in ("save_every_n_steps", "save_every_n_epochs", "max_train_steps", "max_train_epochs",
                 "train_batch_size", "network_dim", "save_last_n_steps", "save_last_n_epochs",
                 "t5xxl_max_token_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1, got {value}")
    try:
        reso = tuple(int(r) for r in args.resolution.split(","))
    except ValueError:
        parser.error(f"--resolution must be W or W,H in pixels, got {args.resolution!r}")
    reso = reso * 2 if len(reso) == 1 else reso
    if len(reso) != 2 or any(r < 16 or r % 16 for r in reso):
        parser.error(f"--resolution must be W or W,H, multiples of 16 px, got {args.resolution!r}")
    args.resolution = reso
    args.network_dim = args.network_dim or 4  # networks.lora_flux's default rank
    args.output_name = args.output_name or "last"  # kohya's DEFAULT_LAST_OUTPUT_NAME


class FusedLoRA:
    """kohya's LoRA of one BFL Linear: out += up(down(x)) * alpha / rank, where the BFL Linear may be several
    diffusers layers reading the same input (a fused qkv): each gets the up matrix's rows of its part."""

    def __init__(self, name: str, layers: list[Any], rank: int, alpha: float) -> None:
        import torch

        self.name, self.alpha, self.scale = name, alpha, alpha / rank
        in_features = layers[0].in_features
        widths = [layer.out_features for layer in layers]
        self.down = torch.nn.Parameter(torch.empty(rank, in_features))
        torch.nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))  # kohya's init: random down, zero up
        self.up = torch.nn.Parameter(torch.zeros(sum(widths), rank))
        starts = [sum(widths[:i]) for i in range(len(widths))]
        for layer, start, width in zip(layers, starts, widths, strict=True):
            layer.register_forward_hook(self._hook(start, start + width))

    def _hook(self, start: int, stop: int) -> Any:
        import torch.nn.functional as F

        def add_delta(module: Any, inputs: tuple[Any, ...], output: Any) -> Any:
            return output + F.linear(F.linear(inputs[0], self.down), self.up[start:stop]) * self.scale

        return add_delta

    def state_dict(self) -> dict[str, Any]:
        import torch

        key = f"lora_unet_{self.name}"
        return {f"{key}.lora_down.weight": self.down.detach().clone().contiguous(),
                f"{key}.lora_up.weight": self.up.detach().clone().contiguous(),
                f"{key}.alpha": torch.tensor(float(self.alpha))}


def add_lora(args: argparse.Namespace, transformer: Any) -> list[FusedLoRA]:
    """One FusedLoRA per Linear of every double and single block, named as kohya's networks.lora_flux."""
    print(f"import network module: {args.network_module}")
    logger.info(f"create LoRA network. base dim (rank): {args.network_dim}, alpha: {args.network_alpha}")
    modules = transformer.get_submodule
    loras = []
    for kind, blocks, table in (("double_blocks", "transformer_blocks", DOUBLE_BLOCK),
                                ("single_blocks", "single_transformer_blocks", SINGLE_BLOCK)):
        for i in range(len(getattr(transformer, blocks))):
            for name, paths in table:
                layers = [modules(f"{blocks}.{i}.{path}") for path in paths]
                loras.append(FusedLoRA(f"{kind}_{i}_{name}", layers, args.network_dim, args.network_alpha))
    logger.info(f"create LoRA for FLUX all blocks: {len(loras)} modules.")
    logger.info(f"enable LoRA for U-Net: {len(loras)} modules")
    return loras


class FluxCheckpointer(base.Checkpointer):
    """train_network's checkpoint names, messages and removal rules, saving the FLUX LoRA modules."""

    def __init__(self, args: argparse.Namespace, loras: list[FusedLoRA], metadata: dict[str, str]) -> None:
        super().__init__(args, None, metadata)
        self.loras = loras

    def save(self, name: str, steps: int, epoch_no: int) -> None:
        import time

        from safetensors.torch import save_file

        os.makedirs(self.args.output_dir, exist_ok=True)
        path = os.path.join(self.args.output_dir, name)
        print(f"\nsaving checkpoint: {path}")
        self.metadata.update(ss_training_finished_at=str(time.time()), ss_steps=str(steps), ss_epoch=str(epoch_no),
                             **{"modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S")})
        state = {k: v for lora in self.loras for k, v in lora.state_dict().items()}
        save_file(state, path, dict(self.metadata))


def flux_metadata(args: argparse.Namespace, metadata: dict[str, str]) -> dict[str, str]:
    """train_network's `ss_*` fields with what kohya's flux_train_network.py writes instead or in addition."""
    flux = {
        "ss_base_model_version": "flux1",
        "ss_network_module": NETWORK_MODULE,
        "ss_model_type": "flux",
        "ss_guidance_scale": args.guidance_scale,
        "ss_timestep_sampling": args.timestep_sampling,
        "ss_sigmoid_scale": args.sigmoid_scale,
        "ss_model_prediction_type": args.model_prediction_type,
        "ss_discrete_flow_shift": args.discrete_flow_shift,
        "ss_weighting_scheme": args.weighting_scheme,
        "ss_apply_t5_attn_mask": args.apply_t5_attn_mask,
        "ss_max_token_length": args.t5xxl_max_token_length,
        "modelspec.architecture": "flux-1-dev/lora",
        "modelspec.implementation": "https://github.com/black-forest-labs/flux",
    }
    return {**metadata, **{k: str(v) for k, v in flux.items()}}


def load_models(args: argparse.Namespace, subsets: list[base.Subset]) -> dict[str, Any]:
    """Load the FLUX.1 folder; cache packed latents, T5 states and CLIP pooled vectors of the dataset."""
    import torch
    from diffusers import FluxPipeline

    model_dir = Path(args.pretrained_model_name_or_path)
    logger.info(f"load Diffusers FLUX.1 models: {model_dir}")
    pipe = FluxPipeline.from_pretrained(str(model_dir))
    for m in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.transformer):
        m.requires_grad_(False)
        m.eval()
    images = [img for s in subsets for img in s.images]
    captions = [cap for s in subsets for cap in s.captions]
    max_tokens = args.t5xxl_max_token_length or min(T5_DEV_TOKENS, pipe.tokenizer_2.model_max_length)
    logger.info("caching latents and text encoder outputs...")
    vae = pipe.vae
    with torch.no_grad():
        pixels = torch.stack([base.load_image(p, args.resolution) for p in images])
        latents = (vae.encode(pixels).latent_dist.sample() - vae.config.shift_factor) * vae.config.scaling_factor
        t5, pooled, text_ids = pipe.encode_prompt(captions, prompt_2=None, device=torch.device("cpu"),
                                                  max_sequence_length=max_tokens)
    n, c, h, w = latents.shape
    img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, torch.device("cpu"), latents.dtype)
    return {"transformer": pipe.transformer, "latents": latents, "t5": t5, "pooled": pooled,
            "text_ids": text_ids, "img_ids": img_ids}


def sample_sigmas(args: argparse.Namespace, n: int, train_sigmas: Any) -> Any:
    """kohya's get_noisy_model_input_and_timesteps: t in (0, 1) per image, by --timestep_sampling."""
    import torch

    if args.timestep_sampling == "uniform":
        return torch.rand(n)
    if args.timestep_sampling == "sigmoid":
        return torch.sigmoid(args.sigmoid_scale * torch.randn(n))
    if args.timestep_sampling == "shift":
        t = torch.sigmoid(torch.randn(n) * args.sigmoid_scale)
        return t * args.discrete_flow_shift / (1 + (args.discrete_flow_shift - 1) * t)
    # "sigma": a uniform index into the shifted flow-matching schedule's 1000 sigmas
    return train_sigmas[(torch.rand(n) * len(train_sigmas)).long()]


def training_loss(args: argparse.Namespace, data: dict[str, Any], idx: list[int], train_sigmas: Any) -> Any:
    """Rectified flow: the transformer sees (1 - t) x0 + t noise and is trained towards noise - x0."""
    import torch
    from diffusers import FluxPipeline

    latents = data["latents"][idx]
    n, c, h, w = latents.shape
    noise = torch.randn_like(latents)
    t = sample_sigmas(args, n, train_sigmas)
    noisy = (1 - t.view(-1, 1, 1, 1)) * latents + t.view(-1, 1, 1, 1) * noise
    packed = FluxPipeline._pack_latents(noisy, n, c, h, w)
    pred = data["transformer"](
        hidden_states=packed, timestep=t, guidance=torch.full((n,), float(args.guidance_scale)),
        pooled_projections=data["pooled"][idx], encoder_hidden_states=data["t5"][idx], txt_ids=data["text_ids"],
        img_ids=data["img_ids"], return_dict=False,
    )[0]
    if args.model_prediction_type == "additive":
        pred = pred + packed
    elif args.model_prediction_type == "sigma_scaled":
        pred = pred * (-t.view(-1, 1, 1)) + packed
    target = FluxPipeline._pack_latents(noise - latents, n, c, h, w)
    return torch.nn.functional.mse_loss(pred, target)


def train(args: argparse.Namespace) -> None:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler
    from tqdm import tqdm

    if args.seed is None:
        args.seed = random.randint(0, 2**32)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    print("accelerator device: cpu")
    subsets = base.load_subsets(Path(args.train_data_dir), args.caption_extension)
    data = load_models(args, subsets)
    loras = add_lora(args, data["transformer"])
    params = [p for lora in loras for p in (lora.down, lora.up)]
    print("prepare optimizer, data loader etc.")
    logger.info("use AdamW optimizer | {}")
    lr = args.unet_lr if args.unet_lr is not None else args.learning_rate
    optimizer = torch.optim.AdamW(params, lr=lr)
    train_sigmas = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=args.discrete_flow_shift).sigmas
    n_batches = math.ceil(sum(len(s.images) * s.repeats for s in subsets) / args.train_batch_size)
    if args.max_train_epochs is not None:
        args.max_train_steps = args.max_train_epochs * n_batches
        print(f"override steps. steps for {args.max_train_epochs} epochs is / 指定エポックまでのステップ数: "
              f"{args.max_train_steps}")
    n_epochs = math.ceil(args.max_train_steps / n_batches)
    base.print_header(subsets, [], n_batches, n_epochs, args)
    metadata = flux_metadata(args, base.build_metadata(args, subsets, [], n_batches, n_epochs))
    ckpt = FluxCheckpointer(args, loras, metadata)
    writer = base.make_summary_writer(args)
    data["transformer"].train()
    progress_bar = tqdm(range(args.max_train_steps), smoothing=0, desc="steps", mininterval=0)
    loss_recorder = base.LossRecorder()
    global_step = 0
    for epoch in range(n_epochs):
        print(f"\nepoch {epoch + 1}/{n_epochs}\n")
        ckpt.metadata["ss_epoch"] = str(epoch + 1)
        logger.info(f"epoch is incremented. current_epoch: {epoch}, epoch: {epoch + 1}")
        batches = base.make_epoch_batches(subsets, args.train_batch_size, random.Random(args.seed + epoch))
        for step, idx in enumerate(batches):
            loss = training_loss(args, data, idx, train_sigmas)
            loss.backward()
            if args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress_bar.update(1)  # kohya's order: the bar (old average), save, then the new average
            global_step += 1
            if args.save_every_n_steps is not None and global_step % args.save_every_n_steps == 0:
                ckpt.save(ckpt.step_name(global_step), global_step, epoch)
                ckpt.remove_step(base.remove_step_no(args, global_step))
            current = loss.detach().item()
            loss_recorder.add(epoch=epoch, step=step, loss=current)
            progress_bar.set_postfix(avr_loss=loss_recorder.moving_average)
            base.log_step(writer, global_step, current, loss_recorder.moving_average, lr)
            if global_step >= args.max_train_steps:
                break
        if writer is not None:
            writer.add_scalar("loss/epoch_average", loss_recorder.moving_average, epoch + 1)
            writer.flush()
        every = args.save_every_n_epochs
        if every is not None and (epoch + 1) % every == 0 and (epoch + 1) < n_epochs:
            ckpt.save(ckpt.epoch_name(epoch + 1), global_step, epoch + 1)
            ckpt.remove_epoch(base.remove_epoch_no(args, epoch + 1))
    if writer is not None:
        writer.close()
    ckpt.save(f"{args.output_name}.safetensors", global_step, n_epochs)
    logger.info("model saved.")
    progress_bar.close()


def main(argv: list[str] | None = None) -> None:
    parser = setup_parser()
    args = base.read_config_from_file(parser.parse_args(argv), parser, argv)
    check_args(args, parser)
    base.setup_logging(args.console_log_level)
    train(args)


if __name__ == "__main__":
    sys.exit(main())
