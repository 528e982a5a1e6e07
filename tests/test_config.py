"""Config loading: strict keys and types, path resolution, defaults derived from kohya's arguments."""

from pathlib import Path

import pytest

from lora_monitor.config import load_config, parse_config
from lora_monitor.errors import UserError
from lora_monitor.run_spec import train_spec

GOOD = """
[kohya]
sd_scripts = "sd-scripts"
[kohya.args]
pretrained_model_name_or_path = "runwayml/stable-diffusion-v1-5"
train_data_dir = "data/train"
output_dir = "out dir/ü"
output_name = "dress"
save_every_n_steps = 20
network_args = ["conv_dim=4", "conv_alpha=1"]
[eval]
prompts = "prompts.txt"
[output]
"""


def test_good_config_resolves_paths_and_defaults(tmp_path: Path) -> None:
    cfg = parse_config(GOOD, tmp_path / "x.toml")
    assert cfg.kohya is not None
    assert cfg.kohya.sd_scripts == tmp_path / "sd-scripts"
    assert cfg.kohya.args["output_dir"] == str(tmp_path / "out dir" / "ü")
    # a hub id is not a path and stays as written
    assert cfg.kohya.args["pretrained_model_name_or_path"] == "runwayml/stable-diffusion-v1-5"
    spec = train_spec(cfg)
    assert spec.base_model == "runwayml/stable-diffusion-v1-5"
    assert spec.reference_dirs == (tmp_path / "data" / "train",)
    assert spec.csv_path == tmp_path / "out dir" / "ü" / "loss_tracker.csv"
    assert cfg.eval.prompts == tmp_path / "prompts.txt"
    assert cfg.eval.steps is None and cfg.eval.guidance_scale is None  # the model family's defaults
    assert cfg.metrics.weights == {"visual_loss": 0.2, "fashion_clip_loss": 0.6, "color_loss": 0.2}
    assert spec.output_name == "dress" and spec.best_name == "dress-best.safetensors"


BAD = [
    # caught at load, before kohya is launched (not when the evaluator starts)
    ("[eval]\nscheduler = 'eulr_a'\n", "eval.scheduler = 'eulr_a': unknown; did you mean 'euler_a'?"),
    ("[metrics.weights]\ncolor_loss = -0.5\n", "metrics.weights.color_loss = -0.5: must be a number >= 0"),
    ("[metrics.weights]\ncolor_loss = 0\nvisual_loss = 0\nfashion_clip_loss = 0\n", "metrics.weights: all are 0"),
    ("[kohya]\nsd_scripts = 'x'\n[eval]\nstepz = 3\n", "eval.stepz: unknown key; did you mean 'steps'?"),
    ("[evall]\n", "unknown section [evall]; did you mean 'eval'?"),
    ("[eval]\nsteps = 'ten'\n", "eval.steps: expected int, got str"),
    ("[eval]\nsteps = 1.5\n", "eval.steps: expected int, got float"),
    ("[eval]\nenabled = 1\n", "eval.enabled: expected bool, got int"),
    ("[eval]\nguidance_scale = 'high'\n", "eval.guidance_scale: expected float"),
    ("[eval]\nbatch_size = 0\n", "eval.batch_size = 0: must be a positive"),
    ("[eval]\nevery_n_steps = -5\n", "eval.every_n_steps = -5: must be a positive"),
    ("[eval]\nmemory = 'lots'\n", "eval.memory = 'lots'"),
    ("[eval]\ndevice = 'tpu'\n", "eval.device = 'tpu'"),
    ("[eval]\ndynamic_schedule = [[100, 0]]\n", "eval.dynamic_schedule[0]"),
    ("[kohya]\nargs = {}\n", "missing required key 'sd_scripts'"),
    ("[kohya]\nsd_scripts = 'x'\nlauncher = 'bash'\n", "kohya.launcher = 'bash'"),
    ("[kohya]\nsd_scripts = 'x'\n[kohya.args]\nsave_every_n_steps = 0\n", "save_every_n_steps = 0"),
    ("[kohya]\nsd_scripts = 'x'\nstop_grace_s = 0\n", "kohya.stop_grace_s = 0"),
    ("[metrics]\nweights = {visual = 1.0}\n", "metrics.weights.visual: unknown metric; did you mean 'visual_loss'?"),
    ("[metrics]\nfashion_model = 'x'\n", "did you mean 'fashion_clip_model'?"),
    ("[early_stopping]\nmode = 'up'\n", "early_stopping.mode = 'up'"),
    ("[early_stopping]\npatience = -1\n", "must be >= 0"),
    ("[early_stopping]\novertraining = 'yes'\n", "early_stopping.overtraining: expected bool, got str"),
    ("[early_stopping]\nmonitor = 'diversty'\n", "did you mean 'diversity'?"),
    ("[best]\nrule = 'lowest'\n", "best.rule = 'lowest': unknown; did you mean 'lowest_score'?"),
    ("[best]\ndiversity_fraction = 1.5\n", "best.diversity_fraction = 1.5: must be in [0, 1]"),
    ("[best]\nholdout_margin = -0.01\n", "best.holdout_margin = -0.01: must be a number >= 0"),
    ("[best]\nval_loss_margin = nan\n", "best.val_loss_margin = nan: must be a number >= 0"),
    ("[best]\nmax_copies = -1\n", "best.max_copies = -1: must be >= 0"),
    ("[best]\nmax_copies = 0.5\n", "best.max_copies: expected int, got float"),
    ("[best]\ncopy_threshold = 0.2\n", "best.copy_threshold: unknown key"),
    ("[output]\ncsv = 3\n", "output.csv: expected Path, got int"),
    ("[eval\n", "not valid TOML"),
    ("eval = 3\n", "expected a table"),
]


@pytest.mark.parametrize(("text", "expected"), BAD)
def test_bad_config_is_one_clear_line(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(UserError) as info:
        parse_config(text, tmp_path / "bad.toml")
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    assert "bad.toml" in message


def test_missing_and_folder_config(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(UserError, match="is a folder"):
        load_config(tmp_path)


def test_best_defaults_and_overrides(tmp_path: Path) -> None:
    from lora_monitor.policies.overtraining import Bounds

    cfg = parse_config("", tmp_path / "x.toml")
    assert cfg.best.rule == "not_overtrained" and not cfg.early_stopping.overtraining
    assert cfg.best.bounds() == Bounds(diversity_fraction=0.25, holdout_margin=0.03, val_loss_margin=0.05, max_copies=0)
    cfg = parse_config("[best]\nrule = 'lowest_score'\nholdout_margin = inf\ndiversity_fraction = 0\n"
                       "[early_stopping]\novertraining = true\nmonitor = 'copy_distance'\n", tmp_path / "x.toml")
    assert cfg.best.rule == "lowest_score" and cfg.best.holdout_margin == float("inf")
    assert cfg.best.diversity_fraction == 0.0 and cfg.early_stopping.overtraining
