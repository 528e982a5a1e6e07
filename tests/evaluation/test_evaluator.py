"""Evaluator on the tiny SD1.x model (CPU, 32 px, 2 steps): LoRA swaps without leaks, batching, cached prompt
embeddings, deterministic images, the out-of-memory fallback chain, and clear errors for bad LoRA files."""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_monitor.checkpoints import coverage
from lora_monitor.config import EvalConfig
from lora_monitor.demo.sd_model import build_tiny_sd
from lora_monitor.errors import EvalError, UserError
from lora_monitor.evaluation import evaluator as ev
from lora_monitor.evaluation import lora_state as ls
from lora_monitor.evaluation import pipeline_loading as pl
from lora_monitor.evaluation.prompts import Prompt

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

PROMPTS = [Prompt("a red dress"), Prompt("a blue dress"), Prompt("a green dress, side view")]
CFG = EvalConfig(device="cpu", batch_size=4, steps=2, guidance_scale=5.0, width=32, height=32, seed=7)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
Make = Callable[..., ev.Evaluator]
Loras = dict[str, Path]


def _kohya(model: torch.nn.Module, prefix: str, targets: list[str], rank: int, seed: int) -> dict:
    """A kohya-format LoRA state dict for `model` with random (non-zero) up and down weights."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False)
    model = inject_adapter_in_model(config, model)
    state = {f"{prefix}.{k}": v for k, v in get_peft_model_state_dict(model).items()}
    kohya = convert_state_dict_to_kohya(state)
    return {k.replace("lora_te1_", "lora_te_"): v.detach().contiguous() for k, v in kohya.items()}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"), image_size=32)


@pytest.fixture(scope="module")
def loras(base: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = tmp_path_factory.mktemp("loras")
    config = UNet2DConditionModel.load_config(str(base / "unet"))
    unet = lambda: UNet2DConditionModel.from_config(config)  # noqa: E731
    other = UNet2DConditionModel.from_config({**config, "cross_attention_dim": 48})
    text_encoder = CLIPTextModel.from_pretrained(str(base / "text_encoder"))
    states = {
        "a": _kohya(unet(), "unet", UNET_TARGETS, 4, 1),
        "b": _kohya(unet(), "unet", UNET_TARGETS, 4, 2),
        "r8": _kohya(unet(), "unet", UNET_TARGETS, 8, 3),
        "te": {
            **_kohya(unet(), "unet", UNET_TARGETS, 4, 4),
            **_kohya(text_encoder, "text_encoder", TE_TARGETS, 4, 5),
        },
        "mismatch": _kohya(other, "unet", UNET_TARGETS, 4, 6),
        "foreign": {
            "lora_unet_no_such_layer.lora_down.weight": torch.ones(4, 8),
            "lora_unet_no_such_layer.lora_up.weight": torch.ones(8, 4),
            "lora_unet_no_such_layer.alpha": torch.tensor(4.0),
        },
        "not_lora": {"conv.weight": torch.ones(4, 4), "conv.bias": torch.ones(4)},
    }
    paths = {}
    for name, state in states.items():
        paths[name] = folder / f"{name}.safetensors"
        save_file(state, str(paths[name]), metadata={"ss_network_dim": "4"})
    data = paths["a"].read_bytes()
    paths["truncated"] = folder / "truncated.safetensors"
    paths["truncated"].write_bytes(data[: len(data) // 2])
    return paths


@pytest.fixture(scope="module")
def loaded(base: Path) -> object:
    return pl.load_pipeline(str(base), False, torch.device("cpu"))


@pytest.fixture
def make(base: Path, loaded: object, tmp_path: Path) -> Iterator[Make]:
    """Build Evaluators on pipelines of their own (so tests never share adapter state): a deep copy of the
    module's loaded pipeline, or with `load=True` a pipeline freshly loaded from disk."""
    from diffusers import StableDiffusionPipeline

    def build(prompts: list[Prompt] = PROMPTS, load: bool = False, **changes: object) -> ev.Evaluator:
        cfg = dataclasses.replace(CFG, **changes)
        if load:
            pipe = pl.load_pipeline(str(base), False, torch.device("cpu"))
        else:
            pipe = StableDiffusionPipeline(**copy.deepcopy(loaded.components))  # type: ignore[attr-defined]
            pipe.set_progress_bar_config(disable=True)
        return ev.Evaluator(pipe, prompts, cfg, tmp_path)

    yield build


def pixels(generated: ev.Generated) -> list[np.ndarray]:
    return [np.asarray(im) for im in generated.images]


def same(a: ev.Generated, b: ev.Generated) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b), strict=True))


# ------------------------------------------------------------------------------------------ pure logic
@pytest.mark.parametrize(
    ("memory", "device", "weights", "free", "expected"),
    [
        ("auto", "cpu", 2, None, "full"),
        ("offload", "cpu", 2, None, "full"),
        ("full", "cuda", 10, 1, "full"),
        ("offload", "cuda", 1, 100, "offload"),
        ("auto", "cuda", 2, 5, "full"),
        ("auto", "cuda", 2, 4, "offload"),
        ("auto", "cuda", 2, None, "full"),
    ],
)
def test_choose_memory_mode(memory: str, device: str, weights: int, free: int | None, expected: str) -> None:
    assert pl.choose_memory_mode(memory, device, weights, free) == expected


def test_choose_memory_mode_rejects_unknown() -> None:
    with pytest.raises(UserError, match="auto"):
        pl.choose_memory_mode("lots", "cuda", 1, 1)


@pytest.mark.parametrize(
    ("device", "capability", "bf16", "expected"),
    [
        ("cpu", None, False, torch.float32),
        ("cuda", (9, 0), True, torch.float16),
        ("cuda", (5, 3), False, torch.float16),
        ("cuda", (5, 2), True, torch.bfloat16),
        ("cuda", (3, 7), False, torch.float32),
        ("mps", None, False, torch.float16),
    ],
)
def test_pick_dtype(
    device: str, capability: tuple[int, int] | None, bf16: bool, expected: torch.dtype
) -> None:
    assert pl.pick_dtype(device, capability, bf16) == expected


@pytest.mark.parametrize(
    ("keys", "te", "layers"),
    [
        (["lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight", "lora_unet_a.alpha"], False, 1),
        (["lora_te_x.lora_down.weight", "lora_unet_a.lora_down.weight"], True, 2),
        (["lora_te2_x.lora_down.weight"], True, 1),
        (["unet.a.lora_A.weight", "unet.a.lora_B.weight"], False, 1),
        (["text_encoder.x.lora_A.weight"], True, 1),
        (["lora_unet_a.hada_w1_a"], False, 0),
    ],
)
def test_lora_key_classification(keys: list[str], te: bool, layers: int) -> None:
    assert ls.touches_text_encoder(keys) is te
    assert ls.lora_layer_count(keys) == layers


# ------------------------------------------------------------------------------- pipeline and swaps
def test_load_pipeline_cpu_fp32_with_sdpa(base: Path) -> None:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    pipe = pl.load_pipeline(str(base), False, torch.device("cpu"))
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    assert {type(p) for p in pipe.unet.attn_processors.values()} == {AttnProcessor2_0}
    pipe.unet.set_attn_processor(AttnProcessor())
    ev.Evaluator(pipe, PROMPTS, CFG, Path("unused"))
    assert {type(p) for p in pipe.unet.attn_processors.values()} == {AttnProcessor2_0}
    assert {type(p) for p in pipe.vae.attn_processors.values()} == {AttnProcessor2_0}


def test_same_checkpoint_same_images_also_in_fresh_evaluator(make: Make, loras: Loras) -> None:
    first = make()
    a1 = first.generate(loras["a"])
    b = first.generate(loras["b"])  # hotswap path: same layout
    a2 = first.generate(loras["a"])
    r8 = first.generate(loras["r8"])  # rank change: clean reload
    assert len(a1.images) == 3 and a1.images[0].size == (32, 32)
    assert same(a1, a2)
    assert not same(a1, b)
    fresh = make(load=True)
    assert same(fresh.generate(loras["b"]), b)
    fresh.unload()
    assert same(fresh.generate(loras["r8"]), r8)
    assert a1.seeds == [7, 8, 9]


def _leak_snapshot(pipe: object) -> dict[str, int]:
    gc.collect()
    models = [pipe.unet, pipe.text_encoder]  # type: ignore[attr-defined]
    with open("/proc/self/statm") as fh:
        rss_pages = int(fh.read().split()[1])
    return {
        "params": sum(len(list(m.parameters())) for m in models),
        "numel": sum(p.numel() for m in models for p in m.parameters()),
        "modules": sum(len(list(m.modules())) for m in models),
        "tensors": sum(type(o) is torch.Tensor or type(o) is torch.nn.Parameter for o in gc.get_objects()),
        "rss": rss_pages * os.sysconf("SC_PAGE_SIZE"),
    }


def test_200_swaps_do_not_leak_and_base_weights_stay_bit_identical(make: Make, loras: Loras) -> None:
    from safetensors.torch import load_file

    evaluator = make()
    base_weights = {k: v.clone() for k, v in evaluator.pipe.unet.state_dict().items()}
    states = [load_file(str(loras[name])) for name in ("a", "r8", "b")]
    evaluator.swap_in(states[0])
    after_one = _leak_snapshot(evaluator.pipe)
    for i in range(200):
        # a <-> b swap in place (hotswap); every 25th is a rank-8 LoRA, which forces two clean reloads
        evaluator.swap_in(states[1] if i % 25 == 24 else states[2 * (i % 2)])
    evaluator.swap_in(states[0])
    after_many = _leak_snapshot(evaluator.pipe)
    for key in ("params", "numel", "modules"):
        assert after_many[key] == after_one[key], key
    assert abs(after_many["tensors"] - after_one["tensors"]) <= 0.01 * after_one["tensors"]
    if os.path.exists("/proc/self/statm"):
        assert after_many["rss"] <= 1.01 * after_one["rss"]
    evaluator.unload()
    now = {k.replace(".base_layer", ""): v for k, v in evaluator.pipe.unet.state_dict().items()}
    assert set(now) == set(base_weights)
    assert all(torch.equal(now[k], v) for k, v in base_weights.items())
    assert evaluator.pipe.get_list_adapters() in ({}, {"unet": []})


def test_batches_follow_batch_size_and_prompt_groups(
    make: Make, loras: Loras, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import StableDiffusionPipeline

    extra = [Prompt("a black dress"), Prompt("a wide dress", width=48), Prompt("a dress", steps=3)]
    prompts = [*PROMPTS, *extra]
    evaluator = make(prompts, batch_size=2)
    calls: list[tuple[int, int, int]] = []
    original = StableDiffusionPipeline.__call__

    def spy(self: object, *args: object, **kwargs: Any) -> Any:
        calls.append((len(kwargs["prompt_embeds"]), kwargs["width"], kwargs["num_inference_steps"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", spy)
    out = evaluator.generate(loras["a"])
    assert calls == [(2, 32, 2), (2, 32, 2), (1, 48, 2), (1, 32, 3)]
    assert [im.size for im in out.images] == [(32, 32)] * 4 + [(48, 32), (32, 32)]


def test_prompt_embeddings_once_per_run_unless_lora_changes_text_encoder(
    make: Make, loras: Loras, monkeypatch: pytest.MonkeyPatch
) -> None:
    evaluator = make()
    runs = {"n": 0}  # forward passes of the text encoder
    evaluator.pipe.text_encoder.register_forward_hook(lambda *_: runs.__setitem__("n", runs["n"] + 1))
    a1 = evaluator.generate(loras["a"])
    once = runs["n"]
    assert once == 2  # prompts and negatives (CFG), all prompts of the group in one pass each
    evaluator.generate(loras["b"])
    assert runs["n"] == once
    te1 = evaluator.generate(loras["te"])
    evaluator.generate(loras["te"])
    assert runs["n"] == 3 * once  # a text-encoder LoRA: encoded per checkpoint
    assert same(evaluator.generate(loras["a"]), a1)  # the run's cache holds the base text encoder's output
    assert runs["n"] == 3 * once
    fresh = make(load=True)
    assert same(fresh.generate(loras["te"]), te1)
    assert not same(te1, a1)


# --------------------------------------------------------------------------------- out of memory
def _oom_pipeline(monkeypatch: pytest.MonkeyPatch, fits: Callable[[int], bool]) -> list[int]:
    from diffusers import StableDiffusionPipeline

    sizes: list[int] = []
    original = StableDiffusionPipeline.__call__

    def flaky(self: object, *args: object, **kwargs: Any) -> Any:
        sizes.append(len(kwargs["prompt_embeds"]))
        if not fits(sizes[-1]):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", flaky)
    return sizes


def test_oom_halves_the_batch_and_keeps_it(make: Make, loras: Loras, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = make().generate(loras["a"])
    evaluator = make(batch_size=4)
    sizes = _oom_pipeline(monkeypatch, lambda n: n <= 1)
    out = evaluator.generate(loras["a"])
    assert sizes == [3, 2, 1, 1, 1]
    assert evaluator.batch_size == 1
    pairs = zip(pixels(out), pixels(reference), strict=True)
    assert all(np.abs(x.astype(int) - y).max() <= 2 for x, y in pairs)  # batch 1 vs 3: same up to rounding
    sizes.clear()
    evaluator.generate(loras["b"])
    assert sizes == [1, 1, 1]


def test_oom_then_offload_then_fails_with_reason(
    make: Make, loras: Loras, monkeypatch: pytest.MonkeyPatch
) -> None:
    evaluator = make(batch_size=2)
    offloads: list[str] = []
    monkeypatch.setattr(ev, "enable_offload", lambda pipe, device: offloads.append(str(device)) or True)
    sizes = _oom_pipeline(monkeypatch, lambda n: False)
    with pytest.raises(EvalError, match="out of memory even with batch size 1 and model CPU offload"):
        evaluator.generate(loras["a"])
    assert sizes == [2, 1, 1]
    assert offloads == ["cpu"] and evaluator.memory_mode == "offload"


def test_oom_without_offload_possible_fails_with_reason(
    make: Make, loras: Loras, monkeypatch: pytest.MonkeyPatch
) -> None:
    evaluator = make(batch_size=1)
    _oom_pipeline(monkeypatch, lambda n: False)
    with pytest.raises(EvalError, match=r"out of memory even with batch size 1 \(no offload on cpu\)"):
        evaluator.generate(loras["a"])


def test_memory_offload_setting_is_applied(make: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    """`memory = "offload"` asks for offload on the evaluator's own device and reports what it got."""
    assert make(memory="offload").memory_mode == "full"  # the real enable_offload: nothing to offload to on a CPU
    calls: list[tuple[object, str]] = []
    answer = {"value": True}

    def fake(pipe: object, device: torch.device) -> bool:
        calls.append((pipe, str(device)))
        return answer["value"]

    monkeypatch.setattr(ev, "enable_offload", fake)
    offloaded = make(memory="offload")
    assert calls == [(offloaded.pipe, "cpu")] and offloaded.memory_mode == "offload"
    answer["value"] = False
    assert make(memory="offload").memory_mode == "full"  # offload refused: the mode says so
    calls.clear()
    assert make(memory="auto").memory_mode == "full" and make(memory="full").memory_mode == "full"
    assert calls == []  # only "offload" asks for it at start; "auto" decided when the pipeline was placed


class _OffloadPipe:
    def __init__(self, error: Exception | None = None) -> None:
        self.error = error
        self.devices: list[str] = []

    def enable_model_cpu_offload(self, device: torch.device) -> None:
        self.devices.append(str(device))
        if self.error is not None:
            raise self.error


@pytest.mark.parametrize(
    ("device", "error", "expected", "called"),
    [
        ("cpu", None, False, []),  # nothing to offload to
        ("cuda:1", None, True, ["cuda:1"]),  # on the evaluator's own GPU
        ("cuda:0", RuntimeError("accelerate too old"), False, ["cuda:0"]),
        ("cuda:0", ImportError("no accelerate"), False, ["cuda:0"]),
    ],
)
def test_enable_offload(device: str, error: Exception | None, expected: bool, called: list[str]) -> None:
    pipe = _OffloadPipe(error)
    assert ev.enable_offload(pipe, torch.device(device)) is expected
    assert pipe.devices == called


# ---------------------------------------------------------------------------------- bad LoRA files
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("mismatch", "does not fit the base model"),
        ("foreign", "does not fit the base model"),
        ("not_lora", "not a LoRA"),
        ("truncated", "corrupt|not a readable"),
    ],
)
def test_bad_lora_files_fail_clearly_and_leave_the_base_intact(
    make: Make, loras: Loras, name: str, message: str
) -> None:
    evaluator = make()
    before = evaluator.generate(loras["a"])
    with pytest.raises(EvalError, match=message):
        evaluator.generate(loras[name])
    assert same(evaluator.generate(loras["a"]), before)
    evaluator.unload()
    assert evaluator.pipe.get_list_adapters() in ({}, {"unet": []})


def test_missing_file_fails_clearly(make: Make, tmp_path: Path) -> None:
    with pytest.raises(EvalError, match="deleted"):
        make().generate(tmp_path / "gone.safetensors")


def test_save_writes_images_and_manifest(make: Make, loras: Loras, tmp_path: Path) -> None:
    import json

    evaluator = make()
    generated = evaluator.generate(loras["a"])
    folder = evaluator.save(loras["a"], 100, generated)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["step"] == 100 and manifest["seeds"] == [7, 8, 9]
    assert sorted(p.name for p in folder.glob("*.png")) == ["00.png", "01.png", "02.png"]


def test_merged_generation_matches_the_adapter_and_restores_the_base_exactly(make: Make, loras: Loras) -> None:
    """generate() folds the LoRA into the weights for speed; the images match the unmerged adapter's and
    the base weights come back bit for bit, checkpoint after checkpoint."""
    evaluator = make()
    base_weights = {k.replace(".base_layer", ""): v.clone() for k, v in evaluator.pipe.unet.state_dict().items()
                    if "lora_" not in k}
    for name in ("a", "b", "a"):
        merged = evaluator.generate(loras[name])
        assert evaluator._adapter_modules()  # noqa: SLF001 - the LoRA is loaded ...
        assert not any(m.merged_adapters for m in evaluator._adapter_modules())  # noqa: SLF001 - ... unmerged
        unmerged = evaluator._run_batches(te_lora=False)  # noqa: SLF001 - the same LoRA through the adapter
        for a, b in zip(pixels(merged), [np.asarray(im, dtype=np.int16) for im in unmerged], strict=True):
            assert np.abs(a.astype(np.int16) - b).max() <= 2
        now = {k.replace(".base_layer", ""): v for k, v in evaluator.pipe.unet.state_dict().items()
               if "lora_" not in k}
        assert all(torch.equal(now[k], v) for k, v in base_weights.items())


# ----------------------------------------------------------------------------- baseline and strengths
def test_baseline_is_the_base_model_and_leaves_it_unchanged(make: Make, loras: Loras) -> None:
    evaluator = make()
    base = evaluator.generate_base()
    with_lora = evaluator.generate(loras["a"])
    assert not same(base, with_lora)
    assert same(evaluator.generate_base(), base)  # the LoRA was dropped and the exact base weights remain
    assert base.seeds == with_lora.seeds and base.prompts == with_lora.prompts


def test_strength_scales_the_lora(make: Make, loras: Loras) -> None:
    evaluator = make()
    full = evaluator.generate(loras["a"])
    half = evaluator.at_strength(0.5)
    assert not same(half, full)
    assert same(evaluator.at_strength(1.0), full)  # back at 1.0: the checkpoint's own images
    nothing = evaluator.at_strength(0.0)
    base = evaluator.generate_base()
    assert all(np.abs(x.astype(int) - y).max() <= 2 for x, y in zip(pixels(nothing), pixels(base), strict=True))
    with pytest.raises(RuntimeError, match="needs a LoRA"):
        evaluator.at_strength(0.5)  # generate_base() unloaded it


# ------------------------------------------------------------------------- every module applied, by name
FAMILY_FIXTURES = Path(__file__).parent.parent / "fixtures" / "kohya-families"


def _with_extra_modules(state: dict, names: list[str]) -> dict:
    """`state` plus kohya modules of the same shapes as its first one, under names the base model lacks."""
    first = next(k[: -len(".lora_down.weight")] for k in state if k.endswith(".lora_down.weight"))
    extra = dict(state)
    for name in names:
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            if first + suffix in state:
                extra[name + suffix] = state[first + suffix].clone()
    return extra


def test_sd1_fixture_from_kohya_is_applied_module_by_module(make: Make) -> None:
    """kohya's own SD1 file (UNet mid block at SD1.5's 1280 channels + a tiny CLIP): all 24 modules applied."""
    import json

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = FAMILY_FIXTURES / "sd1"
    clip = json.loads((folder / "model.json").read_text())["text_encoders"]["clip_l"]["CLIPTextConfig"]
    unet_config = {"sample_size": 8, "block_out_channels": (1280,), "layers_per_block": 1,
                   "down_block_types": ("DownBlock2D",), "up_block_types": ("UpBlock2D",),
                   "cross_attention_dim": 768, "attention_head_dim": 8}
    with torch.device("meta"):  # SD1.5's mid block is 1280 wide; the weights' values do not matter here
        unet = UNet2DConditionModel.from_config(unet_config)
    evaluator = make()
    evaluator.pipe.unet = unet.to_empty(device="cpu")
    evaluator.pipe.text_encoder = CLIPTextModel(CLIPTextConfig(**clip))
    state = ls.load_lora_state(folder / "tiny-step00000004.safetensors", evaluator.family)
    evaluator.swap_in(state)
    layers = sum(len(t) for t in coverage.expected_targets(state, "sd").values())
    assert len(coverage.adapted_targets(evaluator._components(), evaluator._adapter)) == layers == 24
    with pytest.raises(EvalError, match=r"1 of its 25 LoRA modules .*\(lora_unet_mid_block_attentions_0_nope\)"):
        evaluator.swap_in(_with_extra_modules(state, ["lora_unet_mid_block_attentions_0_nope"]))


def test_modules_the_base_lacks_fail_the_checkpoint_naming_them(make: Make, loras: Loras, tmp_path: Path) -> None:
    """diffusers applies the modules it finds and skips the rest without an error: the row names the rest."""
    from safetensors.torch import load_file

    state = load_file(str(loras["te"]))
    absent = [f"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q{i}" for i in range(6)]
    absent.append("lora_te_text_model_encoder_layers_0_self_attn_qq_proj")
    path = tmp_path / "extra.safetensors"
    save_file(_with_extra_modules(state, absent), str(path))
    evaluator = make()
    with pytest.raises(EvalError) as err:
        evaluator.generate(path)
    message = str(err.value)
    assert message.startswith("does not fit the base model: 7 of its ")
    assert "lora_te_text_model_encoder_layers_0_self_attn_qq_proj, " in message and "and 2 more" in message
    assert evaluator.pipe.get_list_adapters() in ({}, {"unet": []}, {"unet": [], "text_encoder": []})


@pytest.mark.parametrize(
    ("folder", "family"),
    [("flux", "FLUX.1"), ("sd3", "SD3.x"), ("lumina", "Lumina 2"), ("anima", "Anima"),
     ("hunyuan_image", "HunyuanImage 2.1")],
)
@pytest.mark.parametrize("metadata", [True, False], ids=["metadata", "key-layout"])
def test_lora_of_another_family_fails_naming_both_families(
    make: Make, tmp_path: Path, folder: str, family: str, metadata: bool
) -> None:
    from safetensors.torch import load_file

    path = FAMILY_FIXTURES / folder / "tiny-step00000004.safetensors"
    if not metadata:  # the same tensors without kohya's ss_base_model_version: the key names say it
        path = tmp_path / "bare.safetensors"
        save_file(load_file(str(FAMILY_FIXTURES / folder / "tiny-step00000004.safetensors")), str(path))
    evaluator = make()
    with pytest.raises(EvalError, match=f"^a LoRA for {re.escape(family)} cannot be applied to this run's "
                                        r"SD 1\.x/2\.x base model"):
        evaluator.generate(path)
    assert evaluator.pipe.get_list_adapters() in ({}, {"unet": []})


def test_strengths_batched_together_match_one_pass_per_strength(make: Make, loras: Loras) -> None:
    evaluator = make(batch_size=4)  # 3 prompts x 2 scales: mixed-scale batches
    evaluator.generate(loras["a"])
    one_by_one = {s: evaluator.at_strength(s) for s in (0.5, 1.5)}
    batched = evaluator.at_strengths([0.5, 1.5], batched=True)
    for s in (0.5, 1.5):
        assert batched[s].seeds == one_by_one[s].seeds
        pairs = zip(pixels(batched[s]), pixels(one_by_one[s]), strict=True)
        assert all(np.abs(x.astype(int) - y).max() <= 2 for x, y in pairs), s  # merged vs unmerged: rounding
    assert not same(batched[0.5], batched[1.5])
    assert same(evaluator.at_strength(1.0), evaluator.generate(loras["a"]))  # the hooks are gone, scale restored


def test_strengths_with_a_text_encoder_lora_go_one_pass_each(make: Make, loras: Loras) -> None:
    evaluator = make()
    evaluator.generate(loras["te"])
    batched = evaluator.at_strengths([0.5, 1.5], batched=True)
    assert same(batched[0.5], evaluator.at_strength(0.5)) and same(batched[1.5], evaluator.at_strength(1.5))
