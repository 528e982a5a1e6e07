"""The offline demo's pieces: tokenizer, tiny SD model, dataset, and the kohya-compatible LoRA trainer.

The trainer runs as a real subprocess (`python -u train_network.py ...`) on a 32 px model for 6 steps;
its stdout/stderr formats, file names, metadata and TensorBoard scalars are checked against kohya's, and
its LoRA file is loaded back into a fresh diffusers pipeline with every key.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from lora_monitor.demo.dataset import CAPTIONS, TRIGGER, build_dataset, prompts_path
from lora_monitor.demo.sd_model import build_tiny_sd
from lora_monitor.demo.tokenizer import build_clip_tokenizer, bytes_to_unicode

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

TRAINER = Path(__file__).resolve().parents[2] / "lora_monitor" / "demo" / "sd_scripts" / "train_network.py"
SIZE = 32


def load_trainer_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("demo_train_network", TRAINER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


tn = load_trainer_module()


# -- tokenizer ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_clip_tokenizer(tmp_path_factory.mktemp("tok"))


def test_bytes_to_unicode_is_a_bijection_onto_printable_symbols() -> None:
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert len(set(table.values())) == 256
    assert all(not ch.isspace() and ch.isprintable() for ch in table.values())


def test_tokenizer_gives_clip_ids_for_a_known_prompt(tokenizer_dir: Path) -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    assert tok("a photo of a red dress").input_ids == [49406, 320, 1125, 539, 320, 736, 2595, 49407]
    assert tok.model_max_length == 77
    padded = tok("a red dress", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407


@pytest.mark.parametrize(
    "text",
    ["a photo of a red dress, sks style", "Héllo  WORLD!! 123 it's", "t-shirt; jeans & co.", "ドレス 赤"],
)
def test_tokenizer_matches_open_clip(tokenizer_dir: Path, text: str) -> None:
    import open_clip
    from transformers import CLIPTokenizer

    ours = CLIPTokenizer.from_pretrained(str(tokenizer_dir))(text).input_ids
    ref = open_clip.get_tokenizer("ViT-B-32")([text])[0].tolist()
    assert ours == ref[: len(ours)] and all(t == 0 for t in ref[len(ours) :])


# -- tiny SD ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd", seed=0, image_size=SIZE)


def test_tiny_sd_loads_and_its_vae_is_near_identity(base_model: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(base_model))
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.prediction_type == "sample"
    assert pipe.unet.config.block_out_channels == (32, 64) or list(pipe.unet.config.block_out_channels) == [
        32,
        64,
    ]
    assert pipe.text_encoder.config.hidden_size == 32
    # an image that is constant on 4x4 blocks survives the VAE round trip
    g = torch.Generator().manual_seed(0)
    blocks = torch.rand(1, 3, SIZE // 4, SIZE // 4, generator=g) * 2 - 1
    img = torch.nn.functional.interpolate(blocks, scale_factor=4, mode="nearest")
    with torch.no_grad():
        latents = pipe.vae.encode(img).latent_dist.sample()
        rec = pipe.vae.decode(latents).sample
    assert latents.shape == (1, 4, SIZE // 4, SIZE // 4)
    assert (rec - img).abs().max().item() < 1e-3


def test_tiny_sd_is_deterministic(base_model: Path, tmp_path: Path) -> None:
    again = build_tiny_sd(tmp_path / "again", seed=0, image_size=SIZE)
    for part in (
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ):
        assert (again / part).read_bytes() == (base_model / part).read_bytes(), part
    other = build_tiny_sd(tmp_path / "other", seed=1, image_size=SIZE)
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (other / unet).read_bytes() != (base_model / unet).read_bytes()


# -- dataset --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_dataset(tmp_path_factory.mktemp("data"), n=4, size=SIZE, seed=0, repeats=1)


def test_dataset_layout_and_captions(data_dir: Path) -> None:
    import numpy as np
    from PIL import Image

    sub = data_dir / "1_dress"
    images = sorted(sub.glob("*.png"))
    assert [p.name for p in images] == [f"img_{i:03d}.png" for i in range(4)]
    for p in images:
        caption = p.with_suffix(".txt").read_text(encoding="utf-8").strip()
        assert caption in CAPTIONS and TRIGGER in caption
        a = np.asarray(Image.open(p).convert("RGB")).astype(int)
        assert a.shape == (SIZE, SIZE, 3)
        red = (a[..., 0] > 150) & (a[..., 1] < 80) & (a[..., 2] < 80)
        assert 0.1 < red.mean() < 0.6  # a red garment on mostly white
        assert (a[0, 0] > 240).all()


@pytest.mark.parametrize("index", range(len(CAPTIONS)))
def test_prompt_file_uses_kohya_options(data_dir: Path, index: int) -> None:
    lines = [
        ln
        for ln in prompts_path(data_dir).read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert len(lines) == len(CAPTIONS)
    prompt, *options = re.split(r"\s+--", lines[index])
    assert TRIGGER in prompt
    opts = {o.split(" ", 1)[0]: o.split(" ", 1)[1] for o in options}
    assert set(opts) == {"n", "w", "h", "d", "s", "l"}
    assert (opts["w"], opts["h"], opts["d"]) == (str(SIZE), str(SIZE), str(index + 1))
    assert float(opts["l"]) >= 1.0 and int(opts["s"]) > 0


# -- trainer: pure logic ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("losses_per_epoch", "expected"),
    [
        ([[1.0]], [1.0]),
        ([[1.0, 3.0]], [1.0, 2.0]),
        ([[1.0, 3.0], [5.0, 7.0]], [1.0, 2.0, 4.0, 6.0]),  # epoch 2 replaces position by position
        ([[2.0, 2.0, 2.0], [8.0]], [2.0, 2.0, 2.0, 4.0]),
    ],
)
def test_loss_recorder_is_a_moving_average_over_one_epoch(
    losses_per_epoch: list[list[float]], expected: list[float]
) -> None:
    rec = tn.LossRecorder()
    seen = []
    for epoch, losses in enumerate(losses_per_epoch):
        for step, loss in enumerate(losses):
            rec.add(epoch=epoch, step=step, loss=loss)
            seen.append(rec.moving_average)
    assert seen == pytest.approx(expected)


@pytest.mark.parametrize(
    ("every", "last_n", "step", "expected"),
    [(2, None, 6, None), (2, 2, 4, 0), (2, 2, 6, 2), (10, 30, 50, 10), (10, 30, 30, None), (25, 50, 100, 25)],
)
def test_remove_step_no_follows_kohya(
    every: int, last_n: int | None, step: int, expected: int | None
) -> None:
    args = type("A", (), {"save_every_n_steps": every, "save_last_n_steps": last_n})()
    assert tn.remove_step_no(args, step) == expected


@pytest.mark.parametrize(
    ("every", "last_n", "epoch", "expected"),
    [(1, None, 3, None), (1, 2, 3, 1), (1, 2, 1, None), (2, 2, 6, 2)],
)
def test_remove_epoch_no_follows_kohya(
    every: int, last_n: int | None, epoch: int, expected: int | None
) -> None:
    args = type("A", (), {"save_every_n_epochs": every, "save_last_n_epochs": last_n})()
    assert tn.remove_epoch_no(args, epoch) == expected


@pytest.mark.parametrize(
    ("n_images", "repeats", "batch", "n_batches"), [(4, 1, 2, 2), (8, 10, 4, 20), (3, 2, 4, 2)]
)
def test_epoch_batches_cover_every_repeat_once(
    n_images: int, repeats: int, batch: int, n_batches: int
) -> None:
    import random

    subset = tn.Subset(
        Path("x"), repeats, "dress", tuple(Path(f"{i}.png") for i in range(n_images)), ("c",) * n_images
    )
    batches = tn.make_epoch_batches([subset], batch, random.Random(0))
    assert len(batches) == n_batches
    flat = sorted(i for b in batches for i in b)
    assert flat == sorted(list(range(n_images)) * repeats)


@pytest.mark.parametrize(
    ("n_images", "split", "n_train", "n_val", "overlap"),
    # kohya's arithmetic: train = first ceil(n·(1−split)), validation = last round(n·split) of the shuffle
    [(4, 0.25, 3, 1, 0), (8, 0.2, 7, 2, 1), (10, 0.3, 7, 3, 0), (3, 0.5, 2, 2, 1), (5, 0.05, 5, 0, 0)],
)
def test_split_train_val_follows_kohya(n_images: int, split: float, n_train: int, n_val: int, overlap: int) -> None:
    subset = tn.Subset(Path("x"), 2, "dress", tuple(Path(f"{i}.png") for i in range(n_images)),
                       tuple(f"c{i}" for i in range(n_images)))
    train, val = tn.split_train_val(subset, split, seed=7)
    assert (len(train.images), len(val.images)) == (n_train, n_val)
    assert len(set(train.images) & set(val.images)) == overlap
    assert set(train.images) | set(val.images) == set(subset.images)
    assert all(f"c{p.stem}" == c for p, c in zip(val.images, val.captions, strict=True))  # captions follow
    assert (train.repeats, val.repeats) == (2, 2)
    assert tn.split_train_val(subset, split, seed=7) == (train, val)  # the seed decides


def test_validation_timesteps_are_kohyas() -> None:
    assert tn.validation_timesteps(1000) == [200, 400, 600, 800]


# -- trainer: command line ----------------------------------------------------------------------------------


def run_trainer(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "80"}
    return subprocess.run(
        [sys.executable, "-u", str(TRAINER), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


BASE_FLAGS = [
    "--network_module",
    "networks.lora",
    "--resolution",
    "32,32",
    "--pretrained_model_name_or_path",
    "m",
    "--train_data_dir",
    "d",
    "--output_dir",
    "o",
]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--no_such_flag", "1"], "unrecognized arguments: --no_such_flag"),
        (["--network_args", "conv_dim=4"], "--network_args is not supported"),
        (["--save_model_as", "ckpt"], "only 'safetensors'"),
        (["--lr_scheduler", "cosine"], "only 'constant'"),
        (["--network_module", "networks.lycoris"], "--network_module must be networks.lora"),
        (["--resolution", "30,30"], "multiples of 16"),
        (["--save_every_n_steps", "0"], "--save_every_n_steps must be >= 1"),
        (["--validation_split", "1.0"], "--validation_split must be in [0, 1)"),
        (["--validate_every_n_steps", "0"], "--validate_every_n_steps must be >= 1"),
    ],
)
def test_unsupported_flags_are_argparse_errors(tmp_path: Path, extra: list[str], message: str) -> None:
    result = run_trainer(BASE_FLAGS + extra, tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert result.stdout == ""


# -- trainer: a real run ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(base_model: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    work = tmp_path_factory.mktemp("run")
    out = work / "out"
    args = [
        "--pretrained_model_name_or_path",
        str(base_model),
        "--train_data_dir",
        str(data_dir),
        "--caption_extension",
        ".txt",
        "--resolution",
        f"{SIZE},{SIZE}",
        "--network_module",
        "networks.lora",
        "--network_dim",
        "4",
        "--output_dir",
        str(out),
        "--output_name",
        "t",
        "--save_every_n_steps",
        "2",
        "--save_every_n_epochs",
        "1",
        "--save_last_n_steps",
        "2",
        "--max_train_steps",
        "6",
        "--learning_rate",
        "1e-3",
        "--train_batch_size",
        "2",
        "--mixed_precision",
        "no",
        "--save_model_as",
        "safetensors",
        "--cache_latents",
        "--max_data_loader_n_workers",
        "0",
        "--seed",
        "42",
        "--logging_dir",
        str(work / "logs"),
    ]
    result = run_trainer(args, work)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"out": out, "logs": work / "logs", "stdout": result.stdout, "stderr": result.stderr}


def expected_stdout(out: Path) -> str:
    def save(name: str) -> list[str]:
        return ["", f"saving checkpoint: {out / name}"]

    lines = [
        "accelerator device: cpu",
        "import network module: networks.lora",
        "prepare optimizer, data loader etc.",
        "running training / 学習開始",
        "  num train images * repeats / 学習画像の数×繰り返し回数: 4",
        "  num validation images * repeats / 学習画像の数×繰り返し回数: 0",
        "  num reg images / 正則化画像の数: 0",
        "  num batches per epoch / 1epochのバッチ数: 2",
        "  num epochs / epoch数: 3",
        "  batch size per device / バッチサイズ: 2",
        "  gradient accumulation steps / 勾配を合計するステップ数 = 1",
        "  total optimization steps / 学習ステップ数: 6",
        "",
        "epoch 1/3",
        "",
        *save("t-step00000002.safetensors"),
        *save("t-000001.safetensors"),
        "",
        "epoch 2/3",
        "",
        *save("t-step00000004.safetensors"),
        *save("t-000002.safetensors"),
        "",
        "epoch 3/3",
        "",
        *save("t-step00000006.safetensors"),
        f"removing old checkpoint: {out / 't-step00000002.safetensors'}",
        *save("t.safetensors"),
    ]
    return "\n".join(lines) + "\n"


def test_run_stdout_is_kohyas(trained: dict) -> None:
    assert trained["stdout"] == expected_stdout(trained["out"])


def test_run_progress_bar_is_kohyas(trained: dict) -> None:
    segments = [s for s in re.split(r"[\r\n]", trained["stderr"]) if s.startswith("steps:")]
    assert segments[0].startswith("steps:   0%|          | 0/6 [00:00<?, ?it/s]")
    shown = [
        (int(m.group(1)), m.group(2))
        for s in segments
        if (m := re.search(r"\| (\d+)/6 \[[^,\]]*, [^,\]]*(?:, avr_loss=([0-9.e+-]+))?\]", s))
    ]
    # each step is drawn with the previous average, then redrawn with the updated one
    previous = None
    for step in range(1, 7):
        values = [avr for n, avr in shown if n == step]
        assert len(values) >= 2 and values[0] == previous and values[-1] is not None, (step, values)
        previous = values[-1]
    assert "model saved." in trained["stderr"]
    assert "INFO" in trained["stderr"] and "create LoRA for U-Net" in trained["stderr"]


def test_run_files_and_metadata(trained: dict) -> None:
    from safetensors import safe_open

    out: Path = trained["out"]
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "t-000001.safetensors",
        "t-000002.safetensors",
        "t-step00000004.safetensors",
        "t-step00000006.safetensors",
        "t.safetensors",
    ]
    expected = {  # file: (ss_steps, ss_epoch) -- 0-based epoch in step files, 1-based otherwise
        "t-000001.safetensors": ("2", "1"),
        "t-000002.safetensors": ("4", "2"),
        "t-step00000004.safetensors": ("4", "1"),
        "t-step00000006.safetensors": ("6", "2"),
        "t.safetensors": ("6", "3"),
    }
    for name, (steps, epoch) in expected.items():
        with safe_open(str(out / name), "pt") as f:
            meta = f.metadata()
            keys = list(f.keys())
        assert (meta["ss_steps"], meta["ss_epoch"]) == (steps, epoch), name
        assert (
            meta["ss_output_name"] == "t"
            and meta["ss_network_dim"] == "4"
            and meta["ss_network_alpha"] == "1"
        )
        assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
        assert meta["ss_learning_rate"] == "0.001" and meta["ss_max_train_steps"] == "6"
        assert (
            meta["ss_num_epochs"] == "3" and meta["ss_seed"] == "42" and meta["ss_resolution"] == "(32, 32)"
        )
        assert float(meta["ss_training_started_at"]) > 1e9
        assert all(re.fullmatch(r"lora_unet_\w+\.(lora_down\.weight|lora_up\.weight|alpha)", k) for k in keys)
        assert {"lora_unet_conv_in.lora_down.weight", "lora_unet_conv_out.lora_up.weight"} <= set(keys)


def test_final_file_equals_last_step_file(trained: dict) -> None:
    from safetensors.torch import load_file

    last = load_file(str(trained["out"] / "t-step00000006.safetensors"))
    final = load_file(str(trained["out"] / "t.safetensors"))
    assert last.keys() == final.keys() and all(torch.equal(last[k], final[k]) for k in last)
    assert any(k.endswith("lora_up.weight") and final[k].abs().sum() > 0 for k in final)  # it trained


def test_run_tensorboard_scalars(trained: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = list(Path(trained["logs"]).iterdir())
    assert len(runs) == 1 and re.fullmatch(r"\d{14}", runs[0].name)
    acc = EventAccumulator(str(runs[0] / "network_train"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {"loss/current", "loss/average", "lr/unet", "lr/group0", "loss/epoch_average"}
    assert [e.step for e in acc.Scalars("loss/current")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in acc.Scalars("loss/epoch_average")] == [1, 2, 3]
    assert all(e.value == pytest.approx(1e-3) for e in acc.Scalars("lr/unet"))


def merge_kohya_lora(unet: torch.nn.Module, sd: dict[str, torch.Tensor]) -> int:
    """Add every LoRA pair of a kohya file into `unet`'s weights; returns how many modules changed."""
    modules = {"lora_unet_" + name.replace(".", "_"): m for name, m in unet.named_modules()}
    merged = 0
    for key in [k for k in sd if k.endswith(".lora_down.weight")]:
        name = key.split(".")[0]
        down, up = sd[key], sd[f"{name}.lora_up.weight"]
        scale = float(sd[f"{name}.alpha"]) / down.shape[0]
        module = modules[name]
        if down.dim() == 4:  # conv: k x k down, 1 x 1 up
            delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
        else:
            delta = up @ down
        with torch.no_grad():
            module.weight += scale * delta
        merged += 1
    return merged


def test_saved_lora_reloads_with_every_key_and_reproduces_the_merge(trained: dict, base_model: Path) -> None:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    path = trained["out"] / "t.safetensors"
    sd = load_file(str(path))
    n_pairs = sum(k.endswith(".lora_down.weight") for k in sd)
    pipe = StableDiffusionPipeline.from_pretrained(str(base_model))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, SIZE // 4, SIZE // 4, generator=g)
    cond = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        before = pipe.unet(x, t, cond).sample
    pipe.load_lora_weights(str(path), adapter_name="x")
    layers = {n: m for n, m in pipe.unet.named_modules() if isinstance(m, LoraLayer)}
    assert len(layers) == n_pairs  # every saved module is loaded, conv layers included
    assert any(n == "conv_in" for n in layers) and any(n.endswith("downsamplers.0.conv") for n in layers)
    for name, layer in layers.items():
        kohya = "lora_unet_" + name.replace(".", "_")
        assert torch.equal(layer.lora_A["x"].weight, sd[f"{kohya}.lora_down.weight"])
        assert torch.equal(layer.lora_B["x"].weight, sd[f"{kohya}.lora_up.weight"])
    with torch.no_grad():
        with_lora = pipe.unet(x, t, cond).sample
    reference = UNet2DConditionModel.from_pretrained(str(base_model / "unet"))
    assert merge_kohya_lora(reference, sd) == n_pairs
    with torch.no_grad():
        merged = reference(x, t, cond).sample
    assert (with_lora - before).abs().max() > 1e-3
    assert torch.allclose(with_lora, merged, atol=1e-4, rtol=1e-4)
    pipe.delete_adapters("x")
    with torch.no_grad():
        after = pipe.unet(x, t, cond).sample
    assert torch.equal(after, before)


# -- trainer: held-out validation ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def validated(base_model: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """4 images, --validation_split 0.25: 3 train (3 steps an epoch at batch 1), 1 validates; 4 steps."""
    work = tmp_path_factory.mktemp("val")
    args = [
        "--pretrained_model_name_or_path", str(base_model), "--train_data_dir", str(data_dir),
        "--caption_extension", ".txt", "--resolution", f"{SIZE},{SIZE}", "--network_module", "networks.lora",
        "--output_dir", str(work / "out"), "--output_name", "v", "--max_train_steps", "4",
        "--learning_rate", "1e-3", "--seed", "42", "--logging_dir", str(work / "logs"),
        "--validation_split", "0.25", "--validate_every_n_steps", "2", "--validation_seed", "3",
    ]
    result = run_trainer(args, work)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"out": work / "out", "logs": work / "logs", "stdout": result.stdout, "stderr": result.stderr}


def test_validation_run_logs_kohyas_scalars(validated: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lora_monitor.kohya.tensorboard import read_run

    (run,) = Path(validated["logs"]).iterdir()
    acc = EventAccumulator(str(run / "network_train"))
    acc.Reload()
    steps = {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    assert steps["loss/current"] == [1, 2, 3, 4]
    assert steps["loss/validation/step_average"] == steps["loss/validation/step_divergence"] == [2, 4]
    assert steps["loss/validation/epoch_average"] == steps["loss/validation/epoch_divergence"] == [1, 2]  # epochs
    value = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in steps}
    average = value["loss/average"]
    for step in (2, 4):
        divergence = value["loss/validation/step_average"][step] - average[step]
        assert value["loss/validation/step_divergence"][step] == pytest.approx(divergence, abs=1e-6)
    # Fixed timesteps and reseeded noise: at step 4 (the last, in epoch 2, where kohya's recorders hold the
    # latest pass only) the step and epoch validations see the same weights, so they agree exactly.
    assert value["loss/validation/step_average"][4] == value["loss/validation/epoch_average"][2]
    assert value["loss/validation/step_average"][2] != value["loss/validation/step_average"][4]  # it trained
    facts = read_run(run)
    assert set(facts.val_loss) == {2, 4} and facts.val_loss_at(3) == pytest.approx(value[
        "loss/validation/step_average"][2])


def test_validation_run_reports_the_split(validated: dict) -> None:
    from safetensors import safe_open

    assert "  num train images * repeats / 学習画像の数×繰り返し回数: 3" in validated["stdout"]
    assert "  num validation images * repeats / 学習画像の数×繰り返し回数: 1" in validated["stdout"]
    assert "  num batches per epoch / 1epochのバッチ数: 3" in validated["stdout"]
    assert "validation steps: 100%" in validated["stderr"] and "val_avg_loss=" in validated["stderr"]
    with safe_open(str(Path(validated["out"]) / "v.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_num_train_images"], meta["ss_num_validation_images"]) == ("3", "1")
    assert (meta["ss_validation_split"], meta["ss_validation_seed"], meta["ss_validate_every_n_steps"]) == (
        "0.25", "3", "2")
