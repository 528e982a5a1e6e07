"""LoRA weights for models a pipeline's own loader skips (T5 in SD3 and FLUX): split from the rest, injected with
peft, equal to the hand-computed delta, and removed again leaving the base model's output."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from lora_monitor.checkpoints import coverage
from lora_monitor.config import EvalConfig
from lora_monitor.evaluation import evaluator as ev
from lora_monitor.evaluation import lora_attach
from lora_monitor.evaluation import pipeline_loading as pl
from lora_monitor.evaluation.prompts import Prompt
from tests.sd3_model import FIXTURE, build_tiny_sd3

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

T5_MODULES = {"encoder_block_0_layer_0_SelfAttention_q": (32, 64),  # (out, in) in the tiny SD3's T5
              "encoder_block_1_layer_1_DenseReluDense_wo": (64, 64)}


@pytest.mark.parametrize(("pipe", "keys", "for_pipe", "others"), [
    (SimpleNamespace(load_lora_weights=None, _lora_loadable_modules=["transformer", "text_encoder"]),
     ["transformer.a.lora_A.weight", "text_encoder_2.b.lora_B.weight"], ["transformer.a.lora_A.weight"],
     {"text_encoder_2": ["b.lora_B.weight"]}),
    (SimpleNamespace(), ["transformer.a.lora_A.weight"], [], {"transformer": ["a.lora_A.weight"]}),  # no loader
    (SimpleNamespace(load_lora_weights=None, _lora_loadable_modules=["unet"]),  # kohya names: its converter's
     ["lora_te3_x.lora_down.weight", "lora_unet_y.lora_up.weight"], ["lora_te3_x.lora_down.weight",
                                                                     "lora_unet_y.lora_up.weight"], {}),
])
def test_split_by_loader(pipe: object, keys: list[str], for_pipe: list[str], others: dict) -> None:
    got_pipe, got_others = lora_attach.split_by_loader({k: torch.zeros(1) for k in keys}, pipe)
    assert sorted(got_pipe) == for_pipe and {c: sorted(v) for c, v in got_others.items()} == others


def _t5_lora(rank: int = 4, shapes: dict[str, tuple[int, int]] = T5_MODULES) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    state = {}
    for name, (out, inp) in shapes.items():
        state[f"lora_te3_{name}.lora_down.weight"] = torch.randn(rank, inp, generator=g) * 0.1
        state[f"lora_te3_{name}.lora_up.weight"] = torch.randn(out, rank, generator=g) * 0.1
        state[f"lora_te3_{name}.alpha"] = torch.tensor(2.0)
    return state


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3-t5") / "model")


def test_kohya_t5_modules_reach_sd3s_t5_and_come_off_again(tiny: Path, tmp_path: Path) -> None:
    """kohya's `train_t5xxl` modules: StableDiffusion3Pipeline's loader skips T5; applied here, all of them."""
    pipe = pl.load_pipeline(str(tiny), False, torch.device("cpu"), family="sd3")
    evaluator = ev.Evaluator(pipe, [Prompt("a red dress")], EvalConfig(device="cpu", steps=2, width=64, height=64),
                             tmp_path)
    t5 = _t5_lora()
    path = tmp_path / "with-t5.safetensors"
    save_file({**load_file(str(FIXTURE / "tiny-step00000004.safetensors")), **t5}, str(path))
    ids = pipe.tokenizer_3(["a red dress"], return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipe.text_encoder_3(ids)[0]
    evaluator.swap_in(load_file(str(path)))  # raises unless every module, T5's included, reached its layer
    adapted = coverage.adapted_targets(evaluator._components(), evaluator._adapter)
    assert len(adapted) == 25 + 12 + 12 + 2
    layer = pipe.text_encoder_3.encoder.block[0].layer[0].SelfAttention.q
    name = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    want = 2.0 / 4 * t5[f"{name}.lora_up.weight"] @ t5[f"{name}.lora_down.weight"]
    torch.testing.assert_close(layer.get_delta_weight(evaluator._adapter), want)
    with torch.no_grad(), evaluator._merged():
        assert (pipe.text_encoder_3(ids)[0] - before).abs().max() > 1e-4
    evaluator.unload()
    assert not [m for m in pipe.text_encoder_3.modules() if isinstance(m, BaseTunerLayer) and m.lora_A]
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder_3(ids)[0], before, atol=0, rtol=0)
    assert evaluator.generate(path).images  # loads again under a new adapter name and generates


def test_attach_names_a_module_the_model_lacks() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    state = {"1.lora_A.weight": torch.zeros(2, 4), "1.lora_B.weight": torch.zeros(4, 2)}
    with pytest.raises(ValueError, match=r"1 LoRA modules name no layer of the model \(1\)"):
        lora_attach.attach(model, state, "x")


def test_kohya_t5_modules_reach_fluxs_t5(tmp_path: Path) -> None:
    """FLUX names its T5 `text_encoder_2`, which FluxPipeline's loader skips: kohya's `lora_te3_` lands there."""
    from lora_monitor.demo.flux_model import build_tiny_flux

    flux = build_tiny_flux(tmp_path / "flux")
    pipe = pl.load_pipeline(str(flux), False, torch.device("cpu"), family="flux")
    evaluator = ev.Evaluator(pipe, [Prompt("a red dress")], EvalConfig(device="cpu", steps=2, width=64, height=64),
                             tmp_path)
    t5 = _t5_lora(shapes={name: (32, 32) if name.endswith("_q") else (32, 64) for name in T5_MODULES})  # 32 wide
    flux_lora = load_file(str(FIXTURE.parent / "flux" / "tiny-step00000004.safetensors"))
    evaluator.swap_in({**flux_lora, **t5})
    layers = {path for component, path in coverage.adapted_targets(evaluator._components(), evaluator._adapter)
              if component == "text_encoder_2"}
    assert layers == {"encoder_block_0_layer_0_SelfAttention_q", "encoder_block_1_layer_1_DenseReluDense_wo"}
