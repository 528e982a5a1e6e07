"""`lora-monitor demo --family flux`, run for real: the kohya-style FLUX.1 trainer, the watcher, FLUX evaluation with
the tiny FluxPipeline, the CSV and the report; and the trainer's files checked against kohya's own FLUX LoRA."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from lora_monitor.config import EvalConfig
from lora_monitor.evaluation import evaluator as ev
from lora_monitor.evaluation import pipeline_loading as pl
from lora_monitor.evaluation.prompts import Prompt
from tests.conftest import cli

FIXTURE = Path(__file__).parents[1] / "fixtures" / "kohya-families" / "flux" / "tiny-step00000004.safetensors"
SD_SCRIPTS = Path(__file__).parents[2] / "lora_monitor" / "demo" / "sd_scripts"
METRICS = ("visual_loss", "fashion_clip_loss", "color_loss", "clip_t", "eval_score")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    workdir = tmp_path_factory.mktemp("flux-demo")
    result = cli("demo", "--family", "flux", "--workdir", str(workdir / "w"), cwd=workdir, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir / "w", result.stdout


def test_demo_names_the_family_and_runs_kohyas_flux_trainer(demo_run: tuple[Path, str]) -> None:
    workdir, stdout = demo_run
    assert "FLUX.1 demo finished (exit 0)" in stdout
    config = (workdir / "config.toml").read_text(encoding="utf-8")
    assert 'script = "flux_train_network.py"' in config and 'network_module = "networks.lora_flux"' in config
    assert "saving checkpoint:" in (workdir / "output" / "kohya.log").read_text(encoding="utf-8")


def test_every_checkpoint_row_is_ok_with_finite_metrics_after_the_baseline(demo_run: tuple[Path, str]) -> None:
    workdir, _ = demo_run
    df = pd.read_csv(workdir / "output" / "loss_tracker.csv")
    assert (df.iloc[0]["status"], df.iloc[0]["checkpoint"]) == ("baseline", "baseline")
    rows = df.iloc[1:]
    # 8 step files, then the final file: the same weights as step 200's, so marked a duplicate of it
    statuses = dict(zip(rows["checkpoint"], rows["status"], strict=True))
    assert statuses.pop("demo_flux_dress.safetensors") == "duplicate"
    assert sorted(statuses) == [f"demo_flux_dress-step{s:08d}.safetensors" for s in range(25, 201, 25)]
    assert set(statuses.values()) == {"ok"}, rows[["checkpoint", "status", "note"]]
    assert rows["checkpoint"].str.startswith("demo_flux_dress").all()
    for column in METRICS:
        assert all(math.isfinite(v) for v in df[column]), column
    assert all(math.isfinite(v) for v in rows["total_loss"])  # kohya's avr_loss, parsed from the tqdm bar
    assert (workdir / "output" / "report.html").is_file()


def test_the_lora_changes_the_images_against_the_baseline(demo_run: tuple[Path, str]) -> None:
    eval_root = demo_run[0] / "output" / "eval"
    base = sorted((eval_root / "baseline").glob("*.png"))
    last = sorted((eval_root / "demo_flux_dress-step00000200").glob("*.png"))
    assert base and [p.name for p in base] == [p.name for p in last]
    for a, b in zip(base, last, strict=True):
        diff = np.abs(np.asarray(Image.open(a), dtype=float) - np.asarray(Image.open(b), dtype=float))
        assert diff.mean() > 5.0, a.name


def _lora_unet_shapes(path: Path, rank: int | None = None) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the transformer modules, with the rank written as 'r' so files of other ranks compare."""
    with safe_open(str(path), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("lora_unet_")}
    rank = rank or next(s[0] for k, s in shapes.items() if k.endswith(".lora_down.weight"))
    return {k: tuple("r" if (k.endswith("down.weight") and i == 0) or (k.endswith("up.weight") and i == 1)
                     else n for i, n in enumerate(s)) for k, s in shapes.items()}


def test_trainer_writes_kohyas_flux_key_set_and_metadata(demo_run: tuple[Path, str]) -> None:
    trained = demo_run[0] / "output" / "demo_flux_dress-step00000025.safetensors"
    assert _lora_unet_shapes(trained) == _lora_unet_shapes(FIXTURE)  # same tiny FLUX width, any rank
    with safe_open(str(trained), "pt") as f, safe_open(str(FIXTURE), "pt") as g:
        ours, kohyas = f.metadata(), g.metadata()
        assert set(f.keys()) == {k for k in g.keys() if k.startswith("lora_unet_")}  # unet only, .alpha included
    for key in ("ss_base_model_version", "ss_network_module", "modelspec.architecture", "ss_guidance_scale",
                "ss_timestep_sampling", "ss_discrete_flow_shift", "ss_model_prediction_type"):
        assert ours[key] == kohyas[key], key
    assert (ours["ss_steps"], ours["ss_network_dim"]) == ("25", "8")


def test_every_module_reaches_the_pipeline_and_acts_as_the_trainer_applied_it(demo_run: tuple[Path, str],
                                                                               tmp_path: Path) -> None:
    """Load the file back through the FLUX key mapping and the Evaluator (which fails if a module is left over);
    the merged transformer's output equals the trainer's own LoRA hooks loaded with the file's tensors."""
    sys.path.insert(0, str(SD_SCRIPTS))
    try:
        import flux_train_network as trainer
    finally:
        sys.path.remove(str(SD_SCRIPTS))
    workdir = demo_run[0]
    model, path = workdir / "models" / "tiny-flux", workdir / "output" / "demo_flux_dress.safetensors"
    state = load_file(str(path))
    pipe = pl.load_pipeline(str(model), False, torch.device("cpu"), family="flux")
    evaluator = ev.Evaluator(pipe, [Prompt("a red dress")], EvalConfig(device="cpu", steps=2), tmp_path)
    evaluator.swap_in(state)  # raises EvalError naming any module that reached no layer
    torch.manual_seed(0)
    inputs = {"hidden_states": torch.randn(2, 16, 16), "timestep": torch.tensor([0.3, 0.8]),
              "guidance": torch.tensor([1.0, 1.0]), "pooled_projections": torch.randn(2, 32),
              "encoder_hidden_states": torch.randn(2, 5, 32), "txt_ids": torch.zeros(5, 3),
              "img_ids": torch.rand(16, 3) * 4, "return_dict": False}
    with torch.no_grad(), evaluator._merged():
        merged = pipe.transformer(**inputs)[0]
    from diffusers import FluxTransformer2DModel

    own = FluxTransformer2DModel.from_pretrained(str(model / "transformer"))
    args = type("Args", (), {"network_module": trainer.NETWORK_MODULE, "network_dim": 8, "network_alpha": 8.0})
    loras = trainer.add_lora(args, own)
    with torch.no_grad():
        for lora in loras:
            lora.down.copy_(state[f"lora_unet_{lora.name}.lora_down.weight"])
            lora.up.copy_(state[f"lora_unet_{lora.name}.lora_up.weight"])
        expected = own(**inputs)[0]
        base = FluxTransformer2DModel.from_pretrained(str(model / "transformer"))(**inputs)[0]
    assert len(loras) == len({k.split(".")[0] for k in state})
    assert not torch.allclose(expected, base, atol=1e-3)  # the LoRA does something ...
    torch.testing.assert_close(merged, expected, atol=1e-4, rtol=1e-4)  # ... and the evaluator does the same
