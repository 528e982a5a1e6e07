"""run_spec: the run's folders, names and settings, worked out once from the TOML and kohya's own files."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from lora_monitor.config import parse_config
from lora_monitor.demo.run import _table
from lora_monitor.run_spec import eval_dir_spec, eval_folder, train_spec
from tests.conftest import cli, write_config


def _kohya_file_config(tmp_path: Path, file_args: dict[str, Any], cli_args: str = "") -> Path:
    sd_scripts = tmp_path / "sd-scripts"
    sd_scripts.mkdir(exist_ok=True)
    (tmp_path / "kohya.toml").write_text(_table("model", file_args), encoding="utf-8")
    config = tmp_path / "run.toml"
    config.write_text(f'[kohya]\nsd_scripts = "sd-scripts"\n[kohya.args]\nconfig_file = "kohya.toml"\n{cli_args}',
                      encoding="utf-8")
    return config


@pytest.mark.parametrize(
    ("file_args", "cli_args", "expected"),
    [
        # every path only in kohya's config_file (relative ones: to kohya's working folder, sd_scripts;
        # the config_file itself is named relative to lora-monitor's TOML)
        ({"output_dir": "out", "output_name": "dress", "pretrained_model_name_or_path": "/models/sd15",
          "logging_dir": "tb", "train_data_dir": "/data/train"}, "",
         {"output_dir": "sd-scripts/out", "output_name": "dress", "base_model": "/models/sd15",
          "logging_dir": "sd-scripts/tb", "best_name": "dress-best.safetensors", "refs": ("/data/train",)}),
        # no logging_dir anywhere: kohya is asked to log into output_dir/logs
        ({"output_dir": "/runs/a", "pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5"}, "",
         {"output_dir": "/runs/a", "output_name": None, "base_model": "runwayml/stable-diffusion-v1-5",
          "logging_dir": "/runs/a/logs", "best_name": "last-best.safetensors", "refs": ()}),
        # an option on the command line wins over the file, as in kohya
        ({"output_dir": "/runs/a", "output_name": "file"}, 'output_name = "cli"\n',
         {"output_dir": "/runs/a", "output_name": "cli", "base_model": None, "logging_dir": "/runs/a/logs",
          "best_name": "cli-best.safetensors", "refs": ()}),
        # wandb only: no TensorBoard run to follow
        ({"output_dir": "/runs/a", "log_with": "wandb"}, "",
         {"output_dir": "/runs/a", "output_name": None, "base_model": None, "logging_dir": None,
          "best_name": "last-best.safetensors", "refs": ()}),
    ],
)
def test_train_spec_reads_kohyas_config_file(tmp_path: Path, file_args: dict[str, Any], cli_args: str,
                                             expected: dict[str, Any]) -> None:
    config_path = _kohya_file_config(tmp_path, file_args, cli_args)
    spec = train_spec(parse_config(config_path.read_text(), config_path))

    def where(value: str | None) -> Path | None:
        return None if value is None else tmp_path / value if not value.startswith("/") else Path(value)

    assert spec.output_dir == where(expected["output_dir"])
    assert spec.output_name == expected["output_name"]
    assert spec.base_model == expected["base_model"]
    assert spec.logging_dir == where(expected["logging_dir"])
    assert spec.best_name == expected["best_name"]
    assert spec.csv_path == spec.output_dir / "loss_tracker.csv"
    assert spec.reference_dirs == tuple(Path(p) for p in expected["refs"])
    assert spec.kohya is not None
    injected = spec.kohya.args.get("logging_dir")
    # the file's own logging_dir is never overridden on the command line
    assert injected == (None if file_args.get("logging_dir") or spec.logging_dir is None else str(spec.logging_dir))


def test_eval_dir_spec_uses_the_config_only_for_its_own_folder(tmp_path: Path) -> None:
    config_path = _kohya_file_config(tmp_path, {"output_dir": str(tmp_path / "run"), "output_name": "dress",
                                                "logging_dir": str(tmp_path / "tb")})
    config = parse_config(config_path.read_text(), config_path)
    own = eval_dir_spec(config, tmp_path / "run")
    assert (own.output_name, own.logging_dir) == ("dress", tmp_path / "tb")
    other = eval_dir_spec(config, tmp_path / "elsewhere", tmp_path / "x.csv")
    assert (other.output_name, other.logging_dir, other.csv_path) == (None, tmp_path / "elsewhere" / "logs",
                                                                     tmp_path / "x.csv")
    assert other.eval_folder("a-step00000010.safetensors") == eval_folder(tmp_path / "elsewhere", "a-step00000010")


def test_schedule_of_the_spec(tmp_path: Path) -> None:
    config = parse_config("[eval]\nevery_n_steps = 10\n", tmp_path / "c.toml")
    schedule = eval_dir_spec(config, tmp_path).schedule()
    assert schedule.should_eval(10, False) and not schedule.should_eval(15, False)
    every = eval_dir_spec(parse_config("", tmp_path / "c.toml"), tmp_path).schedule()
    assert all(every.should_eval(s, False) for s in (1, 2, 3))


@pytest.mark.slow
def test_train_with_every_path_only_in_kohyas_config_file(tmp_path: Path, demo_assets: Any) -> None:
    """How the kohya_ss GUI launches kohya: [kohya.args] names only config_file."""
    demo = tomllib.loads(write_config(tmp_path / "demo", demo_assets).read_text(encoding="utf-8"))
    file_args = {**demo["kohya"]["args"], "output_dir": str(tmp_path / "out"), "output_name": "gui_run",
                 "logging_dir": str(tmp_path / "tb"), "train_data_dir": str(demo_assets.train_data_dir),
                 "pretrained_model_name_or_path": str(demo_assets.base_model)}
    (tmp_path / "kohya.toml").write_text(_table("training", file_args), encoding="utf-8")
    evaluation = {k: v for k, v in demo["eval"].items() if k != "references"}  # references from the file too
    evaluation["prompts"] = str((tmp_path / "demo" / evaluation["prompts"]).resolve())
    metrics = {k: str((tmp_path / "demo" / v).resolve()) for k, v in demo["metrics"].items()}
    config = tmp_path / "gui.toml"
    config.write_text(
        _table("kohya", {"sd_scripts": demo["kohya"]["sd_scripts"], "stop_grace_s": 10.0})
        + _table("kohya.args", {"config_file": str(tmp_path / "kohya.toml")})
        + _table("eval", evaluation) + _table("metrics", metrics),
        encoding="utf-8",
    )
    result = cli("train", "--config", str(config), cwd=tmp_path, timeout=400)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    out = tmp_path / "out"
    rows = pd.read_csv(out / "loss_tracker.csv")
    assert rows["status"].iloc[0] == "baseline"
    rows = rows.iloc[1:]
    assert set(rows["status"]) == {"ok", "duplicate"} and (rows["status"] == "ok").sum() == 4  # final = step 40
    assert rows["learning_rate"].notna().all()  # read from the file's own logging_dir
    assert list((tmp_path / "tb").iterdir()) and not (out / "logs").exists()
    assert (out / "gui_run-best.safetensors").exists() and not (out / "last-best.safetensors").exists()


def _sized_spec(tmp_path: Path, kohya_args: str = "", eval_: str = "", dataset: str | None = None,
                file_args: dict[str, Any] | None = None) -> Any:
    (tmp_path / "sd-scripts").mkdir(exist_ok=True)
    if dataset is not None:
        (tmp_path / "data.toml").write_text(dataset, encoding="utf-8")
        kohya_args += 'dataset_config = "data.toml"\n'
    if file_args is not None:
        (tmp_path / "kohya.toml").write_text(_table("model", file_args), encoding="utf-8")
        kohya_args += 'config_file = "kohya.toml"\n'
    config = tmp_path / "run.toml"
    config.write_text(f'[kohya]\nsd_scripts = "sd-scripts"\n[kohya.args]\noutput_dir = "out"\n{kohya_args}'
                      f"[eval]\n{eval_}", encoding="utf-8")
    return train_spec(parse_config(config.read_text(), config))


@pytest.mark.parametrize(
    ("kohya_args", "eval_", "dataset", "file_args", "size"),
    [
        ('resolution = "512"\n', "", None, None, (512, 512)),
        ('resolution = "1024,768"\n', "", None, None, (1024, 768)),  # kohya's W,H
        ('resolution = "768, 512"\n', "", None, None, (768, 512)),
        ("resolution = 640\n", "", None, None, (640, 640)),
        ("", "", None, {"resolution": "1024,1024"}, (1024, 1024)),  # only in kohya's config_file
        ('resolution = "512"\n', "", None, {"resolution": "1024"}, (512, 512)),  # the command line wins
        # dataset_config: the first dataset's own value, then [general], then the argument (kohya's order)
        ('resolution = "512"\n', "", "[general]\nresolution = 768\n[[datasets]]\nresolution = [1024, 896]\n",
         None, (1024, 896)),
        ('resolution = "512"\n', "", "[general]\nresolution = [768, 640]\n[[datasets]]\nbatch_size = 1\n",
         None, (768, 640)),
        ('resolution = "512"\n', "", "[[datasets]]\nbatch_size = 1\n", None, (512, 512)),
        # [eval] width/height win, each on its own
        ('resolution = "1024"\n', "width = 256\nheight = 384\n", None, None, (256, 384)),
        ('resolution = "1024,768"\n', "width = 256\n", None, None, (256, 768)),
        # nothing known (or not a size kohya accepts): the base model's own size
        ("", "", None, None, (None, None)),
        ('resolution = "big"\n', "", None, None, (None, None)),
        ('resolution = "512,512,3"\n', "", None, None, (None, None)),
    ],
)
def test_eval_size_defaults_to_kohyas_resolution(tmp_path: Path, kohya_args: str, eval_: str,
                                                 dataset: str | None, file_args: dict[str, Any] | None,
                                                 size: tuple[int | None, int | None]) -> None:
    ev = _sized_spec(tmp_path, kohya_args, eval_, dataset, file_args).eval_config
    assert (ev.width, ev.height) == size


@pytest.mark.parametrize(("kohya_args", "eval_", "system"), [
    ("", "", ""),  # kohya's default --system_prompt: none
    ('system_prompt = "You draw clothes."\n', "", "You draw clothes."),
    ('system_prompt = "You draw clothes."\n', 'system_prompt = ""\n', ""),  # [eval] wins, even empty
    ("", 'system_prompt = "Mine."\n', "Mine."),
])
def test_system_prompt_defaults_to_kohyas(tmp_path: Path, kohya_args: str, eval_: str, system: str) -> None:
    assert _sized_spec(tmp_path, kohya_args, eval_, None, None).eval_config.system_prompt == system


def _lora_file(path: Path, metadata: dict[str, str]) -> None:
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_a.lora_down.weight": torch.zeros(4, 8)}, str(path), metadata=metadata)


@pytest.mark.parametrize(
    ("metadata", "size"),
    [
        ({"ss_resolution": "(512, 512)"}, (512, 512)),  # str() of kohya's (W, H) tuple
        ({"ss_resolution": "(1024, 768)"}, (1024, 768)),
        # a dataset_config run: ss_resolution is "None", each dataset's size is in ss_datasets
        ({"ss_resolution": "None", "ss_datasets": '[{"resolution": [896, 640]}]'}, (896, 640)),
        ({"modelspec.resolution": "64x64"}, (64, 64)),
        ({"ss_resolution": "None"}, (None, None)),
        ({}, (None, None)),
    ],
)
def test_eval_dir_size_comes_from_the_files_metadata(tmp_path: Path, metadata: dict[str, str],
                                                     size: tuple[int | None, int | None]) -> None:
    _lora_file(tmp_path / "run" / "a-step00000002.safetensors", metadata)
    ev = eval_dir_spec(parse_config("", tmp_path / "c.toml"), tmp_path / "run").eval_config
    assert (ev.width, ev.height) == size


def test_eval_dir_prefers_the_configs_resolution_for_its_own_folder(tmp_path: Path) -> None:
    _lora_file(tmp_path / "sd-scripts" / "out" / "a-step00000002.safetensors", {"ss_resolution": "(512, 512)"})
    config = tmp_path / "run.toml"
    config.write_text('[kohya]\nsd_scripts = "sd-scripts"\n[kohya.args]\noutput_dir = "sd-scripts/out"\n'
                      'resolution = "1024,768"\n', encoding="utf-8")
    parsed = parse_config(config.read_text(), config)
    own = eval_dir_spec(parsed, tmp_path / "sd-scripts" / "out").eval_config
    assert (own.width, own.height) == (1024, 768)
    _lora_file(tmp_path / "other" / "b.safetensors", {"ss_resolution": "(512, 512)"})
    other = eval_dir_spec(parsed, tmp_path / "other").eval_config  # another run's folder: its own files say
    assert (other.width, other.height) == (512, 512)
