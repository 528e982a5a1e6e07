"""Evaluation speed and memory: the naive per-checkpoint plan vs lora-monitor's Evaluator, side by side.

Naive ("the seed's plan"): per checkpoint, load the LoRA file into the loaded pipeline, generate one image
per prompt in separate calls (each call encodes its prompt), drop the LoRA, score the images.
Ours: `lora_monitor.evaluation.evaluator.Evaluator.generate()` (LoRA swapped in place, prompts batched, prompt
embeddings cached) + the same `lora_monitor.evaluation.metrics.Scorer.score()`.

Modes (all on one device per run):
  --tiny        the demo's tiny SD1.x model on the CPU, 64 px (minutes on a laptop CPU)
  (default)     SD1.5 architecture (UNet2DConditionModel with SD1.5's config, the SD AutoencoderKL, a CLIP
                ViT-L/14 text encoder) with random weights at 512 px, fp16 on a GPU; nothing is downloaded
  --small       the SD1.5 code path with shrunken widths at 64 px: a CPU dry run of the GPU modes
  --concurrent  a LoRA training loop of SD1.5 shape in a second process on the same device; measures its
                step time alone and while the evaluator runs (memory full, then offload), and the
                evaluator's peak memory in each mode

Scoring uses the tiny FashionCLIP/DINO stand-ins unless --fashion-clip-model/--visual-model name local
folders. Timings are wall-clock seconds per checkpoint, after one untimed warm-up checkpoint per side.
`--json PATH` writes every number (naive_s, ours_s, speedup, peak_mem_gib, device, ...).

    python benchmarks/eval_speed.py --tiny --json benchmarks/tiny-cpu.json
    python benchmarks/eval_speed.py --json h100.json            # on a GPU machine
    python benchmarks/eval_speed.py --concurrent --json h100-concurrent.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lora_monitor.config import EvalConfig  # noqa: E402
from lora_monitor.evaluation import evaluator as ev  # noqa: E402
from lora_monitor.evaluation import lora_state as ls  # noqa: E402
from lora_monitor.evaluation import pipeline_loading as pl  # noqa: E402
from lora_monitor.evaluation.prompts import Prompt  # noqa: E402

GIB = 2**30
PROMPTS = [
    "a red summer dress, front view",
    "a navy blue evening dress",
    "a green dress with long sleeves",
    "a yellow dress, side view",
    "a black dress on white background",
    "a white dress with a belt",
    "a pink dress, back view",
    "a grey knitted dress",
]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


# ------------------------------------------------------------------------------------- measurement
class MemoryMeter:
    """Peak and current memory of this process: CUDA allocator on a GPU, resident set size on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        try:  # Linux: "5" resets the VmHWM (peak RSS) counter of this process
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def peak_gib(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / GIB
        status = _proc_status()
        if "VmHWM" in status:
            return status["VmHWM"] / GIB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB

    def current_gib(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated() / GIB
        status = _proc_status()
        return status.get("VmRSS", 0) / GIB

    @property
    def kind(self) -> str:
        return "cuda max_memory_allocated" if self.cuda else "process RSS (VmHWM / VmRSS)"


def _proc_status() -> dict[str, int]:
    """VmRSS/VmHWM of /proc/self/status in bytes; empty where /proc does not exist."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def versions() -> dict[str, str]:
    import diffusers
    import peft
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": str(torch.get_num_threads()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = str(torch.version.cuda)
    return info


# ------------------------------------------------------------------------------------------ models
@dataclass
class Setup:
    pipe: Any
    device: torch.device
    size: int
    loras: list[Path]
    lora_rank: int


def _sd15_components(small: bool) -> dict[str, Any]:
    """SD1.5-shaped UNet/VAE/text encoder with random weights; `small` shrinks widths, keeps the structure."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if small:
        unet = UNet2DConditionModel(
            sample_size=8,
            block_out_channels=(32, 64, 64, 64),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=4,
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 32, 32, 32),
            layers_per_block=1,
            sample_size=64,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        )
        text = CLIPTextConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
        )
    else:  # UNet2DConditionModel's defaults are SD1.x's; SD1.5 adds 64-latent samples and 768-d context
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        )
        text = CLIPTextConfig(  # ViT-L/14's text tower, as in SD1.5
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            projection_dim=768,
            hidden_act="quick_gelu",
        )
    text.update(
        {
            "vocab_size": 49408,
            "max_position_embeddings": 77,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
            "pad_token_id": 49407,
        }
    )
    return {"unet": unet, "vae": vae, "text_encoder": CLIPTextModel(text)}


def build_pipeline(mode: str, workdir: Path, device: torch.device) -> tuple[Any, int]:
    """The base pipeline on the CPU in the evaluator's dtype for `device`, and its image size (px)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from lora_monitor.demo.sd_model import build_tiny_sd
    from lora_monitor.demo.tokenizer import build_clip_tokenizer

    dtype = pl.device_dtype(device)
    if mode == "tiny":
        folder = workdir / "tiny-sd"
        if not (folder / "model_index.json").exists():
            build_tiny_sd(folder, image_size=64)
        pipe = StableDiffusionPipeline.from_pretrained(
            str(folder),
            torch_dtype=dtype,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        size = 64
    else:
        torch.manual_seed(0)
        parts = _sd15_components(small=mode == "small")
        tokenizer = CLIPTokenizer.from_pretrained(str(build_clip_tokenizer(workdir / "tokenizer")))
        scheduler = PNDMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            skip_prk_steps=True,
            steps_offset=1,
        )
        pipe = StableDiffusionPipeline(
            **parts,
            tokenizer=tokenizer,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.to(dtype=dtype)
        size = 64 if mode == "small" else 512
    pipe.set_progress_bar_config(disable=True)
    pl.ensure_sdpa(pipe)
    return pipe, size


def make_loras(unet: torch.nn.Module, folder: Path, count: int, rank: int) -> list[Path]:
    """`count` kohya-format LoRA files for `unet` (same layout, different random weights), as kohya saves."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model = copy.deepcopy(unet).to("cpu", torch.float32)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=UNET_TARGETS, init_lora_weights=False)
    model = inject_adapter_in_model(config, model)
    paths = []
    for i in range(count):
        torch.manual_seed(100 + i)
        state = {}
        for key, value in get_peft_model_state_dict(model).items():
            # random up and down matrices, scaled so the LoRA changes the images without blowing them up
            state[f"unet.{key}"] = torch.randn_like(value) * (
                0.05 if "lora_B" in key else 1.0 / value.shape[-1]
            )
        kohya = {k: v.to(torch.float16).contiguous() for k, v in convert_state_dict_to_kohya(state).items()}
        path = folder / f"bench-step{(i + 1) * 100:08d}.safetensors"
        save_file(kohya, str(path), metadata={"ss_network_dim": str(rank), "ss_steps": str((i + 1) * 100)})
        paths.append(path)
    return paths


def build_scorer(args: argparse.Namespace, workdir: Path, device: torch.device, size: int) -> Any:
    from lora_monitor.demo.dataset import build_dataset
    from lora_monitor.demo.scoring_models import build_tiny_dino, build_tiny_fashion_clip
    from lora_monitor.evaluation.metrics import Scorer
    from lora_monitor.evaluation.references import find_reference_images

    clip = args.fashion_clip_model or str(build_tiny_fashion_clip(workdir / "tiny-fashion-clip"))
    dino = args.visual_model or str(build_tiny_dino(workdir / "tiny-dino"))
    scorer = Scorer(clip, dino, device=str(device))
    refs = build_dataset(workdir / "references", n=20, size=min(size, 256))
    scorer.reference_files = find_reference_images(refs)  # the naive plan embeds them again per checkpoint
    scorer.set_references(scorer.reference_files)
    return scorer


# ------------------------------------------------------------------------------------- comparison
def naive_checkpoint(
    setup: Setup, path: Path, cfg: EvalConfig, prompts: list[str], name: str
) -> tuple[list, float]:
    """The seed's plan for one checkpoint: load the LoRA file, one call per prompt, drop the LoRA.

    Returns the images and the seconds spent loading + dropping the LoRA.
    """
    started = time.perf_counter()
    with ls.quiet_loaders():
        setup.pipe.load_lora_weights(str(path), adapter_name=name)
    swap = time.perf_counter() - started
    images = []
    for i, text in enumerate(prompts):
        out = setup.pipe(
            prompt=text,
            width=setup.size,
            height=setup.size,
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(cfg.seed + i),
        )
        images.append(out.images[0])
    started = time.perf_counter()
    setup.pipe.delete_adapters(name)
    return images, swap + time.perf_counter() - started


def compare(
    setup: Setup, cfg: EvalConfig, prompts: list[Prompt], scorer: Any, meter: MemoryMeter, checkpoints: int
) -> dict:
    """Per-checkpoint seconds (generation + scoring) and peak memory of both plans on the same pipeline."""
    import numpy as np

    texts = [p.text for p in prompts]
    timed = setup.loras[1 : 1 + checkpoints]
    naive_checkpoint(setup, setup.loras[0], cfg, texts, "naive-warmup")  # first-call costs, untimed
    meter.reset_peak()
    naive_times, naive_swaps, naive_images = [], [], []
    for k, path in enumerate(timed):
        started = time.perf_counter()
        images, swap = naive_checkpoint(setup, path, cfg, texts, f"naive{k}")
        # The seed's plan embedded the reference images at every evaluation (anchors.md: "embeddings for
        # 5 generated + 20 reference images"); no disk cache here, so this recomputes them.
        scorer.set_references(scorer.reference_files)
        scorer.score(images, texts)
        meter.sync()
        naive_times.append(time.perf_counter() - started)
        naive_swaps.append(swap)
        naive_images.append(images)
    naive_peak = meter.peak_gib()

    evaluator = ev.Evaluator(setup.pipe, prompts, cfg, Path(tempfile.mkdtemp(prefix="eval-speed-")))
    first = evaluator.generate(setup.loras[0])  # warm-up, untimed
    scorer.score(first.images, first.prompts)
    meter.reset_peak()
    ours_times, ours_gen, ours_swaps, diffs = [], [], [], []
    for k, path in enumerate(timed):
        started = time.perf_counter()
        generated = evaluator.generate(path)
        scorer.score(generated.images, generated.prompts)
        meter.sync()
        ours_times.append(time.perf_counter() - started)
        ours_gen.append(generated.generate_s)
        ours_swaps.append(generated.swap_s)
        for a, b in zip(generated.images, naive_images[k], strict=True):
            diffs.append(int(np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max()))
    ours_peak = meter.peak_gib()
    naive_s, ours_s = statistics.mean(naive_times), statistics.mean(ours_times)
    return {
        "naive_s": round(naive_s, 4),
        "ours_s": round(ours_s, 4),
        "speedup": round(naive_s / ours_s, 3),
        "peak_mem_gib": round(ours_peak, 3),
        "naive_peak_mem_gib": round(naive_peak, 3),
        "naive_times_s": [round(t, 4) for t in naive_times],
        "ours_times_s": [round(t, 4) for t in ours_times],
        "ours_generate_s": round(statistics.mean(ours_gen), 4),
        "lora_swap_s_ours": round(statistics.mean(ours_swaps), 4),
        "lora_swap_s_naive": round(statistics.mean(naive_swaps), 4),
        "max_pixel_diff_naive_vs_ours": max(diffs),
        "memory_mode": evaluator.memory_mode,
        "_evaluator": evaluator,
    }


def swap_memory(evaluator: ev.Evaluator, loras: list[Path], meter: MemoryMeter, swaps: int) -> dict:
    """Memory after 1 and after `swaps` LoRA swaps, and the seconds per swap (in place / clean reload)."""
    import gc

    from safetensors.torch import load_file

    states = [load_file(str(p)) for p in loras[:3]]
    evaluator.swap_in(states[0])
    gc.collect()
    after_one = meter.current_gib()
    started = time.perf_counter()
    for i in range(swaps):
        evaluator.swap_in(states[(i + 1) % len(states)])
    meter.sync()
    per_swap = (time.perf_counter() - started) / max(1, swaps)
    reloads = []
    for state in states:
        started = time.perf_counter()
        evaluator.unload()
        evaluator.swap_in(state)
        meter.sync()
        reloads.append(time.perf_counter() - started)
    gc.collect()
    after_many = meter.current_gib()
    return {
        "swaps": swaps,
        "mem_after_1_swap_gib": round(after_one, 4),
        "mem_after_n_swaps_gib": round(after_many, 4),
        "mem_growth_pct": round(100 * (after_many - after_one) / after_one, 3) if after_one else None,
        "swap_in_place_s": round(per_swap, 4),
        "swap_reload_s": round(statistics.mean(reloads), 4),
        "memory_measure": meter.kind,
    }


# ------------------------------------------------------------------------------------- concurrency
def trainer_child(args: argparse.Namespace) -> None:
    """A kohya-like LoRA training loop (rank 16, AdamW, bf16 autocast on a GPU, batch 1) of SD1.5 shape.

    Writes `<workdir>/trainer.ready` after its warm-up steps, runs until `<workdir>/trainer.stop` appears
    (or --trainer-max-s), then writes the start/end time.monotonic() of every step to trainer.json.
    """
    from peft import LoraConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    workdir = Path(args.workdir)
    unet = _sd15_components(small=args.mode != "sd15")["unet"].to(device)
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=16, lora_alpha=16, target_modules=UNET_TARGETS, init_lora_weights="gaussian")
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    side, context = unet.config.sample_size, unet.config.cross_attention_dim
    cuda = device.type == "cuda"
    steps: list[tuple[float, float]] = []
    deadline = time.monotonic() + args.trainer_max_s
    while time.monotonic() < deadline and not (workdir / "trainer.stop").exists():
        started = time.monotonic()
        latents = torch.randn(1, 4, side, side, device=device)
        noise = torch.randn_like(latents)
        timestep = torch.randint(0, 1000, (1,), device=device)
        text = torch.randn(1, 77, context, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            pred = unet(latents + noise, timestep, text).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        steps.append((started, time.monotonic()))
        if len(steps) == 5:
            (workdir / "trainer.ready").write_text("ready")
    (workdir / "trainer.json").write_text(json.dumps({"steps": steps, "device": str(device)}))


def _phase_step_s(steps: list[list[float]], window: tuple[float, float]) -> tuple[float | None, int]:
    inside = [end - start for start, end in steps if start >= window[0] and end <= window[1]]
    return (statistics.median(inside) if inside else None), len(inside)


def run_concurrent(
    args: argparse.Namespace,
    setup: Setup,
    cfg: EvalConfig,
    prompts: list[Prompt],
    meter: MemoryMeter,
    workdir: Path,
) -> dict:
    """Trainer step time alone and while the evaluator runs (full, then offload) + evaluator peaks."""
    for name in ("trainer.ready", "trainer.stop", "trainer.json"):
        (workdir / name).unlink(missing_ok=True)
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--trainer-child",
        "--mode",
        args.mode,
        "--device",
        str(setup.device),
        "--workdir",
        str(workdir),
        "--trainer-max-s",
        str(args.phase_s * 6 + 600),
    ]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    child = subprocess.Popen(argv)
    result: dict[str, Any] = {"phase_s": args.phase_s}
    try:
        deadline = time.monotonic() + 600
        while not (workdir / "trainer.ready").exists():
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"trainer process ended or did not start (exit code {child.returncode})")
            time.sleep(0.5)
        windows: dict[str, tuple[float, float]] = {}
        start = time.monotonic()
        time.sleep(args.phase_s)
        windows["alone"] = (start, time.monotonic())
        for mode in ("full", "offload"):
            if mode == "offload" and not ev.enable_offload(setup.pipe, setup.device):
                result["eval_offload"] = {"skipped": f"model CPU offload not possible on {setup.device}"}
                continue
            evaluator = ev.Evaluator(setup.pipe, prompts, cfg, workdir / "out")
            result[f"eval_{mode}"], windows[f"eval_{mode}"] = _eval_phase(
                evaluator, setup, meter, args.phase_s
            )
            evaluator.unload()
        (workdir / "trainer.stop").write_text("stop")
        child.wait(timeout=600)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    steps = json.loads((workdir / "trainer.json").read_text())["steps"]
    alone, n_alone = _phase_step_s(steps, windows["alone"])
    result["train_step_alone_s"] = round(alone, 4) if alone else None
    result["train_steps_alone"] = n_alone
    for name, window in windows.items():
        if name == "alone":
            continue
        step, count = _phase_step_s(steps, window)
        result[name].update({"train_step_s": round(step, 4) if step else None, "train_steps": count})
        if step and alone:
            result[name]["train_slowdown_pct"] = round(100 * (step / alone - 1), 2)
    return result


def _eval_phase(
    evaluator: ev.Evaluator, setup: Setup, meter: MemoryMeter, seconds: float
) -> tuple[dict, tuple]:
    evaluator.generate(setup.loras[0])  # warm-up (and the offload hooks' first moves), outside the window
    meter.reset_peak()
    start = time.monotonic()
    times = []
    while time.monotonic() - start < seconds:
        began = time.monotonic()
        evaluator.generate(setup.loras[len(times) % len(setup.loras)])
        meter.sync()
        times.append(time.monotonic() - began)
    window = (start, time.monotonic())
    stats = {
        "checkpoints": len(times),
        "eval_s": round(statistics.mean(times), 4),
        "peak_mem_gib": round(meter.peak_gib(), 3),
        "memory_mode": evaluator.memory_mode,
    }
    return stats, window


# -------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="the demo's tiny SD1.x model, 64 px")
    size.add_argument("--small", action="store_true", help="SD1.5 code path with small widths, 64 px")
    parser.add_argument("--concurrent", action="store_true", help="also measure training slowdown")
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:N (default: cpu for --tiny, else auto)"
    )
    parser.add_argument("--prompts", type=int, default=5, help=f"prompts per checkpoint (max {len(PROMPTS)})")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per image")
    parser.add_argument("--cfg", type=float, default=7.0, help="guidance scale")
    parser.add_argument("--batch-size", type=int, default=8, help="the evaluator's [eval] batch_size")
    parser.add_argument("--checkpoints", type=int, default=3, help="timed checkpoints per side")
    parser.add_argument("--swaps", type=int, default=200, help="LoRA swaps for the memory check")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default 16; 4 with --tiny)")
    parser.add_argument("--phase-s", type=float, default=30.0, help="seconds per --concurrent phase")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--workdir", type=Path, default=None, help="models and LoRA files (default: temp)")
    parser.add_argument(
        "--fashion-clip-model", default=None, help="open_clip folder (default: tiny stand-in)"
    )
    parser.add_argument("--visual-model", default=None, help="ViT folder (default: tiny stand-in)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--trainer-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--trainer-max-s", type=float, default=900.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.mode = args.mode or ("tiny" if args.tiny else "small" if args.small else "sd15")
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts must be 1..{len(PROMPTS)}")
    return args


def _write(path: Path | None, results: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({k: v for k, v in results.items() if not k.startswith("_")}, indent=1))


def _section(results: dict, name: str, fn: Any) -> Any:
    """Run one part of the benchmark; a failure is recorded in the results and the run goes on."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a benchmark on borrowed hardware should report, not die
        import traceback

        results.setdefault("errors", {})[name] = traceback.format_exc(limit=4)
        print(f"{name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    if args.trainer_child:
        trainer_child(args)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pl.resolve_device(args.device or ("cpu" if args.tiny else "auto"))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="eval-speed-"))
    workdir.mkdir(parents=True, exist_ok=True)
    pipe, size = build_pipeline(args.mode, workdir, device)
    rank = args.rank or (4 if args.tiny else 16)
    loras = make_loras(pipe.unet, workdir / f"loras-{args.mode}-r{rank}", args.checkpoints + 1, rank)
    pl.place_pipeline(pipe, device, "full")
    setup = Setup(pipe=pipe, device=device, size=size, loras=loras, lora_rank=rank)
    cfg = EvalConfig(
        device=str(device),
        batch_size=args.batch_size,
        steps=args.steps,
        guidance_scale=args.cfg,
        width=size,
        height=size,
        seed=42,
    )
    prompts = [Prompt(t) for t in PROMPTS[: args.prompts]]
    meter = MemoryMeter(device)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.machine()})",
        "mode": args.mode,
        "size_px": size,
        "prompts": args.prompts,
        "steps": args.steps,
        "cfg": args.cfg,
        "batch_size": args.batch_size,
        "checkpoints": args.checkpoints,
        "lora_rank": rank,
        "dtype": str(pipe.unet.dtype),
        "memory_measure": meter.kind,
        "versions": versions(),
        "attention": sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()}),
    }
    scorer = _section(results, "scorer", lambda: build_scorer(args, workdir, device, size))
    if scorer is not None:
        results.update(
            _section(
                results, "compare", lambda: compare(setup, cfg, prompts, scorer, meter, args.checkpoints)
            )
            or {}
        )
    _write(args.json, results)
    evaluator = results.pop("_evaluator", None) or ev.Evaluator(pipe, prompts, cfg, workdir / "out")
    results["swap_memory"] = _section(
        results, "swap_memory", lambda: swap_memory(evaluator, loras, meter, args.swaps)
    )
    evaluator.unload()
    _write(args.json, results)
    if args.concurrent:
        results["concurrent"] = _section(
            results, "concurrent", lambda: run_concurrent(args, setup, cfg, prompts, meter, workdir)
        )
        _write(args.json, results)
    print(json.dumps({k: v for k, v in results.items() if not k.startswith("_")}, indent=1))
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
