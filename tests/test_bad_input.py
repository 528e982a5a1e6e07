"""Bad input, as a table: each case is one clear line on stderr (what, where, the fix) and exit code 2.

Every case starts from a working demo-style config and breaks one thing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_monitor.cli import main
from tests.conftest import write_config

Setup = Callable[[Path, Path], list[str]]  # (workdir, config) -> argv


def _replace(config: Path, old: str, new: str) -> None:
    text = config.read_text(encoding="utf-8")
    assert re.search(old, text, flags=re.M), old
    config.write_text(re.sub(old, new, text, count=1, flags=re.M), encoding="utf-8")


def _append(config: Path, text: str) -> None:
    config.write_text(config.read_text(encoding="utf-8") + text, encoding="utf-8")


def _train(w: Path, c: Path) -> list[str]:
    return ["train", "--config", str(c)]


def _lora_folder(w: Path) -> Path:
    folder = w / "loras"
    folder.mkdir(exist_ok=True)
    return folder


CASES: list[tuple[str, Callable[[Path, Path], list[str]], str]] = [
    ("missing config", lambda w, c: ["train", "--config", str(w / "nope.toml")], "config file not found"),
    ("unparseable toml", lambda w, c: (_append(c, "[eval\n"), _train(w, c))[1], "not valid TOML"),
    ("toml line number", lambda w, c: (_append(c, "x = = 1\n"), _train(w, c))[1], "line"),
    ("unknown key", lambda w, c: (_replace(c, r"^\[output\]", "[output]\ncvs = 'a.csv'"), _train(w, c))[1],
     "did you mean 'csv'"),
    ("unknown section", lambda w, c: (_append(c, "[metric]\n"), _train(w, c))[1], "did you mean 'metrics'"),
    ("wrong type", lambda w, c: (_replace(c, r"^steps = \d+", "steps = 'many'"), _train(w, c))[1],
     "eval.steps: expected int"),
    ("missing sd-scripts folder", lambda w, c: (_replace(c, r'^sd_scripts = ".*"', 'sd_scripts = "no/such"'),
                                                _train(w, c))[1], "no/such"),
    ("sd-scripts without the script", lambda w, c: ((w / "empty").mkdir(), _replace(
        c, r'^sd_scripts = ".*"', f'sd_scripts = "{w / "empty"}"'), _train(w, c))[2], "train_network.py"),
    ("missing base model", lambda w, c: (_replace(c, r'^pretrained_model_name_or_path = ".*"',
                                                  'pretrained_model_name_or_path = "./models/none"'),
                                         _train(w, c))[1], "none"),
    ("no reference images", lambda w, c: ((w / "refs").mkdir(), _replace(c, r'^references = ".*"',
                                                                          'references = "refs"'),
                                          _train(w, c))[2], "no reference images"),
    ("references folder missing", lambda w, c: (_replace(c, r'^references = ".*"', 'references = "gone"'),
                                                _train(w, c))[1], "reference folder not found"),
    ("empty prompt file", lambda w, c: ((w / "p.txt").write_text("# nothing\n"),
                                        _replace(c, r'^prompts = ".*"', 'prompts = "p.txt"'), _train(w, c))[2],
     "no prompts in the file"),
    ("malformed prompt file", lambda w, c: ((w / "p.txt").write_text("a dress\nskirt --d x\n"),
                                            _replace(c, r'^prompts = ".*"', 'prompts = "p.txt"'),
                                            _train(w, c))[2], "p.txt:2"),
    ("missing prompt file", lambda w, c: (_replace(c, r'^prompts = ".*"', 'prompts = "gone.txt"'),
                                          _train(w, c))[1], "prompt file not found"),
    ("negative interval", lambda w, c: (_replace(c, r"^\[eval\]", "[eval]\nevery_n_steps = -10"),
                                        _train(w, c))[1], "every_n_steps = -10"),
    ("zero save interval", lambda w, c: (_replace(c, r"^save_every_n_steps = \d+", "save_every_n_steps = 0"),
                                         _train(w, c))[1], "save_every_n_steps = 0"),
    ("output folder is a file", lambda w, c: ((w / "output").write_text("x"), _train(w, c))[1], "output"),
    ("save_model_as ckpt", lambda w, c: (_replace(c, r'^save_model_as = ".*"', 'save_model_as = "ckpt"'),
                                         _train(w, c))[1], "safetensors"),
    ("unknown metric weight", lambda w, c: (_replace(c, r"^\[metrics\]", "[metrics]\nweights = {colour_loss = 1.0}"),
                                            _train(w, c))[1], "did you mean 'color_loss'"),
    ("early-stop monitor not a metric", lambda w, c: (_replace(c, r'^monitor = ".*"', 'monitor = "accuracy"'),
                                                      _train(w, c))[1], "is not a metric"),
    ("early-stop mode", lambda w, c: (_replace(c, r'^monitor = ".*"', 'monitor = "clip_t"\nmode = "up"'),
                                      _train(w, c))[1], "early_stopping.mode"),
    ("bad device", lambda w, c: (_replace(c, r"^\[eval\]", "[eval]\ndevice = 'gpu'"), _train(w, c))[1],
     "eval.device"),
    ("bad memory mode", lambda w, c: (_replace(c, r"^\[eval\]", "[eval]\nmemory = 'max'"), _train(w, c))[1],
     "eval.memory"),
    ("bad dynamic schedule", lambda w, c: (_replace(c, r"^\[eval\]", "[eval]\ndynamic_schedule = [[0, 10]]"),
                                           _train(w, c))[1], "dynamic_schedule[0]"),
    ("eval-dir folder missing", lambda w, c: ["eval-dir", str(w / "nothing"), "--config", str(c)],
     "not a folder"),
    ("eval-dir without LoRA files", lambda w, c: ["eval-dir", str(_lora_folder(w)), "--config", str(c)],
     "no LoRA .safetensors files"),
    ("only pickle checkpoints", lambda w, c: ((_lora_folder(w) / "a.ckpt").write_bytes(b"x"),
                                              ["eval-dir", str(_lora_folder(w)), "--config", str(c)])[1],
     "only .safetensors LoRA files"),
    ("CSV from another tool", lambda w, c: ((_lora_folder(w) / "x-step00000010.safetensors").write_bytes(b"x"),
                                            (w / "other.csv").write_text("epoch,loss\n1,2\n"),
                                            ["eval-dir", str(_lora_folder(w)), "--config", str(c),
                                             "--csv", str(w / "other.csv")])[2], "different header"),
    ("CSV path is a folder", lambda w, c: ((_lora_folder(w) / "x-step00000010.safetensors").write_bytes(b"x"),
                                           ["eval-dir", str(_lora_folder(w)), "--config", str(c),
                                            "--csv", str(w)])[1], "is a folder"),
    ("FashionCLIP model not downloaded",
     lambda w, c: (_replace(c, r'^fashion_clip_model = ".*"', 'fashion_clip_model = "hf-hub:Marqo/marqo-fashionCLIP"'),
                   _train(w, c))[1], "hf download Marqo/marqo-fashionCLIP"),
    ("DINO model not downloaded", lambda w, c: (_replace(c, r'^visual_model = ".*"',
                                                         'visual_model = "facebook/dino-vits16"'),
                                                _train(w, c))[1], "hf download facebook/dino-vits16"),
    ("score without references", lambda w, c: ["score", str(w), "--references", str(w / "none"),
                                               "--config", str(c)], "reference folder not found"),
]


@pytest.mark.parametrize(("name", "setup", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input(tmp_path: Path, demo_assets, name: str, setup: Setup, expected: str) -> None:
    workdir = tmp_path / "run dir ü"  # paths with spaces and non-ASCII must work everywhere
    config = write_config(workdir, demo_assets)
    argv = setup(workdir, config)
    before = {p for p in workdir.rglob("*")}
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lora-monitor: error: ")
    assert expected in lines[0], lines[0]
    created = {p for p in workdir.rglob("*")} - before
    assert not [p for p in created if p.suffix == ".csv"], created  # nothing half-written


def test_long_prompt_is_a_warning_not_an_error(tmp_path: Path, demo_assets) -> None:
    import torch

    from lora_monitor.demo.sd_model import build_tiny_sd  # noqa: F401 - the tokenizer comes with the model
    from lora_monitor.evaluation.pipeline_loading import load_pipeline
    from lora_monitor.evaluation.prompts import Prompt
    from lora_monitor.evaluation.worker import long_prompt_warnings

    pipe = load_pipeline(str(demo_assets.base_model), False, torch.device("cpu"))
    long = Prompt(" ".join(["a red silk dress with pleats"] * 20))
    warnings = long_prompt_warnings(pipe, [Prompt("a red dress"), long])
    assert len(warnings) == 1
    assert warnings[0].startswith("prompt 2 is ") and "reads 77" in warnings[0]
