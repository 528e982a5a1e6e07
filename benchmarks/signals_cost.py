"""What each over-training signal costs per checkpoint, measured side by side in one run.

Plans, all on the demo's tiny SD model and its tiny scoring models, evaluating the same LoRA files of a short
demo training with the real `evaluate_one` (generate, save, score, signals):

  before        seeds_per_prompt = 1, holdout = false, strengths = [1.0]  (lora-monitor before the signals)
  seeds2        seeds_per_prompt = 2                                      (+ diversity)
  holdout       holdout = true (the 4 built-in held-out prompts)          (+ clip_t_holdout)
  default       seeds_per_prompt = 2 and holdout = true                   (the defaults)
  strength      the defaults and strengths = [0.5, 1.0]                   (one extra scale)
  strengths2    the defaults and strengths = [0.5, 1.0, 1.5]              (two extra scales, batched together)

copy_distance/copies run in every plan (no switch: numpy on the images already generated); their share is
timed separately, as is the baseline. Rounds alternate the plans so load changes hit all of them alike.

    python benchmarks/signals_cost.py --json benchmarks/signals-cost.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

PLANS: dict[str, dict[str, Any]] = {
    "before": {"seeds_per_prompt": 1, "holdout": False},
    "seeds2": {"seeds_per_prompt": 2, "holdout": False},
    "holdout": {"seeds_per_prompt": 1, "holdout": True},
    "default": {"seeds_per_prompt": 2, "holdout": True},
    "strength": {"seeds_per_prompt": 2, "holdout": True, "strengths": [0.5, 1.0]},
    "strengths2": {"seeds_per_prompt": 2, "holdout": True, "strengths": [0.5, 1.0, 1.5]},
}


def train_loras(assets: Any, folder: Path, steps: int) -> list[Path]:
    """A short run of the bundled kohya-style trainer: its step files are the checkpoints to evaluate."""
    trainer = assets.sd_scripts / "train_network.py"
    args = {**assets.kohya_args, "max_train_steps": steps, "save_every_n_steps": max(1, steps // 3)}
    argv = [sys.executable, str(trainer), "--pretrained_model_name_or_path", str(assets.base_model),
            "--train_data_dir", str(assets.train_data_dir), "--output_dir", str(folder), "--output_name", "bench"]
    for key, value in args.items():
        if value is True:
            argv.append(f"--{key}")
        elif value is not False:
            argv += [f"--{key}", str(value)]
    subprocess.run(argv, check=True, capture_output=True, timeout=900)
    return sorted(folder.glob("bench-step*.safetensors"))


def spec_for(assets: Any, workdir: Path, plan: dict[str, Any]) -> Any:
    from lora_monitor.config import parse_config
    from lora_monitor.demo.run import demo_config_text
    from lora_monitor.run_spec import train_spec

    paths = dataclasses.replace(assets, eval_settings={**assets.eval_settings, **plan})
    workdir.mkdir(parents=True, exist_ok=True)
    config = parse_config(demo_config_text(paths, workdir), workdir / "config.toml")
    return train_spec(config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds over every plan")
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared CPU)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from lora_monitor.demo.build import build_demo
    from lora_monitor.evaluation.inputs import check_inputs
    from lora_monitor.evaluation.signals import overtraining_signals
    from lora_monitor.evaluation.worker import build_models, evaluate_baseline, evaluate_one, judge
    from lora_monitor.events import CheckpointReady

    root = Path(tempfile.mkdtemp(prefix="lora-monitor-bench-"))
    assets = build_demo(root / "assets")
    loras = train_loras(assets, root / "train", args.train_steps)
    models = {}
    for name, plan in PLANS.items():
        spec = spec_for(assets, root / name, plan)
        models[name] = build_models(spec, check_inputs(spec))
        evaluate_one(models[name], CheckpointReady(loras[0], 0), {})  # warm-up, untimed
    times: dict[str, list[float]] = {name: [] for name in PLANS}
    signal_s: list[float] = []
    baseline_s: list[float] = []
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        for name in PLANS:
            for i, path in enumerate(loras):
                started = time.perf_counter()
                result = evaluate_one(models[name], CheckpointReady(path, i), {})
                times[name].append(time.perf_counter() - started)
                assert result.error is None, result.error
        m = models["default"]
        generated = m.evaluator.generate(loras[-1])
        started = time.perf_counter()
        overtraining_signals(m.scorer, m.copies, m.copy_threshold, m.plan, generated.images)
        signal_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        evaluate_baseline(m)
        baseline_s.append(time.perf_counter() - started)
        judge(m, generated)
    per = {name: statistics.median(t) for name, t in times.items()}
    images = {name: len(models[name].plan.prompts) for name in PLANS}
    result = {
        "seconds_per_checkpoint": per,
        "ratio_to_before": {name: per[name] / per["before"] for name in PLANS},
        "images_per_checkpoint": images,
        "extra_strength_s": per["strength"] - per["default"],
        "two_extra_strengths_batched_s": per["strengths2"] - per["default"],
        "signals_alone_s": statistics.median(signal_s),
        "baseline_once_s": statistics.median(baseline_s),
        "checkpoints": len(loras), "rounds": args.rounds, "threads": args.threads,
        "load_avg_before_after": [load_before, os.getloadavg()[0]],
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "torch": torch.__version__,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
