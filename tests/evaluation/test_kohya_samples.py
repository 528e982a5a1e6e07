"""kohya_samples: kohya's sample file names, complete samplings, the plan, the row's checkpoint, the config key."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import save_file

from lora_monitor.config import parse_config
from lora_monitor.errors import UserError
from lora_monitor.evaluation.kohya_samples import (
    SampleFolder,
    complete_sets,
    lora_at,
    parse_sample_name,
    png_complete,
    sample_plan,
    settle_name,
)
from lora_monitor.evaluation.prompts import Prompt
from lora_monitor.events import EvalResult


@pytest.mark.parametrize(
    ("name", "expected"),
    [  # (prefix, kind, number, index, seed)
        ("demo_000100_00_20240102030405_42.png", ("demo_", "step", 100, 0, 42)),
        ("demo_000100_03_20240102030405.png", ("demo_", "step", 100, 3, None)),
        ("demo_e000002_01_20240102030405_7.png", ("demo_", "epoch", 2, 1, 7)),
        ("demo_e000000_00_20240102030405.png", ("demo_", "epoch", 0, 0, None)),  # --sample_at_first
        ("000050_00_20240102030405_1.png", ("", "step", 50, 0, 1)),  # kohya without output_name
        ("my_run_000001_001000_12_20240102030405.png", ("my_run_000001_", "step", 1000, 12, None)),
        ("demo_1234567_00_20240102030405.png", ("demo_", "step", 1234567, 0, None)),  # past 6 digits
        ("demo_000100_00_20240102030405_42.jpg", None),
        ("demo_000100_00_2024010203040_42.png", None),  # 13-digit time stamp
        ("demo-step00000100.safetensors", None),
        ("demo_00100_00_20240102030405.png", None),  # 5-digit step
    ],
)
def test_kohya_sample_names(name: str, expected: tuple | None) -> None:
    parsed = parse_sample_name(Path(name))
    got = None if parsed is None else (parsed.prefix, parsed.kind, parsed.number, parsed.index, parsed.seed)
    assert got == expected


def _png(path: Path, color: tuple[int, int, int] = (200, 10, 10)) -> Path:
    Image.new("RGB", (16, 16), color).save(path)
    return path


def test_png_complete_only_with_its_end_chunk(tmp_path: Path) -> None:
    whole = _png(tmp_path / "a.png")
    half = tmp_path / "b.png"
    half.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert png_complete(whole) and not png_complete(half) and not png_complete(tmp_path / "missing.png")


def test_a_sampling_is_complete_when_every_prompt_has_its_newest_image(tmp_path: Path) -> None:
    names = ["r_000010_00_20240101000000_1.png", "r_000010_01_20240101000001_2.png",  # step 10: complete
             "r_000020_00_20240101000100_1.png",  # step 20: prompt 1 missing
             "r_000030_00_20240101000200_1.png", "r_000030_01_20240101000201_2.png",
             "r_000030_01_20240101090000_2.png"]  # a later run's prompt 1 of step 30
    files = [parse_sample_name(_png(tmp_path / n)) for n in names]
    half = tmp_path / "r_000040_00_20240101000300_1.png"
    half.write_bytes(_png(tmp_path / "x.png").read_bytes()[:20])
    files += [parse_sample_name(half), parse_sample_name(_png(tmp_path / "r_000040_01_20240101000301_2.png"))]
    sets = complete_sets(files, n_prompts=2)
    assert sorted(sets) == [("step", 10), ("step", 30)]
    assert [p.name for p in sets[("step", 30)]] == [names[3], names[5]]


@pytest.mark.parametrize(
    ("prompts", "keep", "texts"),
    [
        ([Prompt("a", seed=1), Prompt("a", seed=2), Prompt("b", seed=3)], [0, 1, 2], ["a", "a", "b"]),
        ([Prompt("a", seed=1), Prompt("a", seed=1), Prompt("b")], [0, 2], ["a", "b"]),  # same image twice
        ([Prompt("a"), Prompt("a")], [0, 1], ["a", "a"]),  # no --d: kohya draws random seeds
    ],
)
def test_sample_plan_drops_a_repeated_prompt_and_seed(prompts: list, keep: list, texts: list) -> None:
    plan, kept = sample_plan(prompts)
    assert kept == keep and [p.text for p in plan.prompts] == texts and set(plan.kinds) == {"main"}


def _lora(path: Path, steps: int, epoch: int) -> Path:
    import torch

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(path),
              {"ss_steps": str(steps), "ss_epoch": str(epoch)})
    return path


def test_lora_at_a_step_or_an_epoch(tmp_path: Path) -> None:
    _lora(tmp_path / "r-step00000020.safetensors", 20, 0)
    _lora(tmp_path / "r-000001.safetensors", 25, 1)
    _lora(tmp_path / "r.safetensors", 50, 2)  # the final file: ss_epoch = the epoch count
    _lora(tmp_path / "r-step00000050.safetensors", 50, 1)
    cases = {("step", 20): "r-step00000020.safetensors", ("step", 50): "r-step00000050.safetensors",
             ("step", 30): None, ("epoch", 1): "r-000001.safetensors", ("epoch", 2): "r.safetensors",
             ("epoch", 3): None}
    for (kind, number), name in cases.items():
        found = lora_at(tmp_path, "r", kind, number)
        assert (found.name if found else None) == name, (kind, number)


def test_settle_name_renames_a_row_and_moves_its_images(tmp_path: Path) -> None:
    pseudo = EvalResult(tmp_path / "sample@step 20", 20, {"eval_score": 1.0})
    (tmp_path / "eval" / "sample@step 20").mkdir(parents=True)
    _png(tmp_path / "eval" / "sample@step 20" / "00.png")
    assert settle_name(pseudo, tmp_path, "r") == pseudo  # kohya saved nothing at step 20 (yet)
    lora = _lora(tmp_path / "r-step00000020.safetensors", 20, 0)
    named = settle_name(pseudo, tmp_path, "r")
    assert named.checkpoint == lora and named.metrics == pseudo.metrics
    assert (tmp_path / "eval" / "r-step00000020" / "00.png").exists()
    assert not (tmp_path / "eval" / "sample@step 20").exists()
    plain = EvalResult(lora, 20)
    assert settle_name(plain, tmp_path, "r") is plain


class _Spec:
    def __init__(self, output_dir: Path, output_name: str | None) -> None:
        self.output_dir, self.output_name, self.kohya = output_dir, output_name, None


def test_sample_folder_hands_each_sampling_over_once_in_training_order(tmp_path: Path) -> None:
    samples = tmp_path / "sample"
    samples.mkdir()
    for name in ["r_000020_00_20240101000100.png", "r_e000000_00_20240101000000.png", "r_000010_00_20240101000050.png",
                 "other_000010_00_20240101000050.png"]:
        _png(samples / name)
    _lora(tmp_path / "r-step00000020.safetensors", 20, 0)
    folder = SampleFolder(_Spec(tmp_path, "r"), n_prompts=1)  # type: ignore[arg-type]
    sets = folder.new_sets()
    assert [(s.path.name, s.step, s.baseline) for s in sets] == [
        ("baseline", 0, True), ("sample@step 10", 10, False), ("r-step00000020.safetensors", 20, False)]
    assert folder.new_sets() == []
    _png(samples / "r_000030_00_20240101000200.png")
    assert [s.step for s in folder.new_sets()] == [30]
    resumed = SampleFolder(_Spec(tmp_path, "r"), n_prompts=1, resumed=True,  # type: ignore[arg-type]
                           done={"sample@step 10"})
    assert [s.path.name for s in resumed.new_sets()] == ["r-step00000020.safetensors", "sample@step 30"]
    unknown = SampleFolder(_Spec(tmp_path, None), n_prompts=1)  # type: ignore[arg-type]  # eval-dir: newest run
    assert [s.step for s in unknown.new_sets()] == [0, 10, 20, 30]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[eval]\nsource = 'kohya'\n", "eval.source = 'kohya': unknown; did you mean 'kohya_samples'?"),
        ("[eval]\nsource = 'kohya_samples'\nstrengths = [0.5, 1.0]\n", "remove eval.strengths"),
        ("[eval]\nsource = 'kohya_samples'\n[kohya]\nsd_scripts = '.'\n[kohya.args]\nsample_every_n_steps = 5\n",
         "needs kohya's prompt file; set kohya.args.sample_prompts"),
        ("[eval]\nsource = 'kohya_samples'\n", "needs kohya's prompt file"),
    ],
)
def test_source_is_checked_at_load(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace("?", r"\?").replace(".", r"\.")):
        parse_config(text, tmp_path / "c.toml")


def test_source_defaults_and_accepts_kohya_samples(tmp_path: Path) -> None:
    assert parse_config("", tmp_path / "c.toml").eval.source == "generate"
    text = ("[eval]\nsource = 'kohya_samples'\n[kohya]\nsd_scripts = '.'\n[kohya.args]\nsample_prompts = 'p.txt'\n"
            "sample_every_n_epochs = 1\n")
    assert parse_config(text, tmp_path / "c.toml").eval.source == "kohya_samples"
