"""Training speed on a CPU shared with evaluation: alone, beside the evaluator as before, and with the split.

The trainer is the bundled kohya-compatible `train_network.py` (lora_monitor/demo/sd_scripts/), started the
way `lora-monitor train` starts kohya (`KohyaProcess`: `python -u`, its own process group, output parsed by
`KohyaOutputParser`); like kohya it leaves torch at its default thread count. The evaluator is lora-monitor's
own (`EvalWorker` + `build_models`: the demo's tiny SD model, FashionCLIP/DINO stand-ins) in a thread of this
process, evaluating a LoRA file of the run again and again, so it computes the whole time the trainer does.

Phases, one after the other in one run:
  alone        the trainer alone, torch's default threads (what a user gets without lora-monitor)
  alone_split  the trainer alone with the thread count the split gives it (the split's own cost)
  eval_plain   the trainer beside the evaluator, no limits, same priority (lora-monitor before the split)
  eval_split   the trainer beside the evaluator with `cpu_share.plan`: kohya's OMP/MKL threads, the
               evaluator's torch threads, the evaluator thread at nice +10 (what `train` does now)

Ratios are against the faster of the two alone phases. s/step is the trainer's time from its first timed step
to its last (the bar's first draw of each step), over
the steps in between; the first `--warmup` steps are not timed. The evaluator is loaded and has finished one
evaluation before the trainer starts.

    python benchmarks/cpu_split.py --json benchmarks/cpu-split.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from lora_monitor.config import parse_config  # noqa: E402
from lora_monitor.cpu_share import CpuShare, kohya_env, plan, usable_cores  # noqa: E402
from lora_monitor.demo.build import build_demo  # noqa: E402
from lora_monitor.demo.run import demo_config_text  # noqa: E402
from lora_monitor.evaluation.inputs import check_inputs  # noqa: E402
from lora_monitor.evaluation.worker import EvalWorker, build_models  # noqa: E402
from lora_monitor.events import CheckpointReady, EvalResult, TrainProgress  # noqa: E402
from lora_monitor.kohya.args import build_argv  # noqa: E402
from lora_monitor.kohya.process import KohyaProcess  # noqa: E402
from lora_monitor.run_spec import train_spec  # noqa: E402


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def train(config_path: Path, steps: int, warmup: int, env: dict[str, str], out: Path) -> dict[str, Any]:
    """One run of the trainer as `train` starts it; s/step from the bar's first draw of each step."""
    config = parse_config(config_path.read_text(encoding="utf-8"), config_path)
    kohya = config.kohya
    assert kohya is not None
    args = {**kohya.args, "max_train_steps": steps, "save_every_n_steps": steps, "output_dir": str(out)}
    kohya = dataclasses.replace(kohya, args=args)
    first_draw: dict[int, float] = {}

    def on_event(event: object) -> None:
        if isinstance(event, TrainProgress) and event.step >= 1:
            first_draw.setdefault(event.step, time.monotonic())

    proc = KohyaProcess(build_argv(kohya), cwd=kohya.sd_scripts, on_event=on_event, env=env)
    proc.start()
    code = proc.wait()
    if code != 0 or len(first_draw) < steps:
        raise SystemExit(f"trainer failed (exit {code}, {len(first_draw)} steps drawn); last lines: "
                         f"{list(proc.parser.last_lines)[-5:]}")
    timed = [first_draw[s] for s in range(warmup, steps + 1)]
    gaps = [b - a for a, b in zip(timed, timed[1:], strict=False)]
    return {"s_per_step": round((timed[-1] - timed[0]) / (len(timed) - 1), 4),
            "median_s_per_step": round(statistics.median(gaps), 4), "timed_steps": len(gaps),
            "thread_env": {k: v for k, v in env.items() if k.endswith("_NUM_THREADS")}}


class Evaluating:
    """lora-monitor's EvalWorker evaluating `lora` over and over (a new step number each time, so nothing is
    skipped as already evaluated) until stopped."""

    def __init__(self, config_path: Path, lora: Path, share: CpuShare) -> None:
        config = parse_config(config_path.read_text(encoding="utf-8"), config_path)
        spec = train_spec(config)
        inputs = check_inputs(spec)
        self.lora, self.results, self.step, self.stopping = lora, [], 0, False
        self.error: str | None = None
        self.first = threading.Event()
        self.worker = EvalWorker(lambda: build_models(spec, inputs), self._on_result,
                                 threads=share.eval_threads, nice=share.eval_nice)

    def _on_result(self, event: object) -> None:
        if not isinstance(event, EvalResult):
            return
        if event.error:
            self.error = event.error
            self.first.set()
            return
        self.results.append((time.monotonic(), event.seconds))
        self.first.set()
        self.worker.fingerprints.clear()
        if not self.stopping:
            self._submit()

    def _submit(self) -> None:
        self.step += 1
        self.worker.submit(CheckpointReady(self.lora, self.step))

    def start(self) -> None:
        self.worker.start()
        self._submit()
        if not self.first.wait(600):
            raise SystemExit("the evaluator did not finish a first evaluation in 10 minutes")
        if self.error:
            raise SystemExit(f"evaluation failed: {self.error}")

    def stop(self, since: float) -> dict[str, Any]:
        self.stopping = True
        self.worker.close(timeout=600)
        if self.error:
            raise SystemExit(f"evaluation failed: {self.error}")
        during = [s for t, s in self.results if t >= since and s is not None]
        return {"evaluations_during_training": len(during),
                "s_per_evaluation": round(statistics.mean(during), 2) if during else None}


def phase(name: str, config: Path, steps: int, warmup: int, out: Path, env: dict[str, str],
          evaluating: tuple[Path, CpuShare] | None) -> dict[str, Any]:
    print(f"{name}: {steps} steps" + (" beside the evaluator" if evaluating else " alone"), flush=True)
    ev = None
    if evaluating:
        ev = Evaluating(config, *evaluating)
        ev.start()
    started = time.monotonic()
    result = train(config, steps, warmup, env, out / name)
    if ev is not None:
        result.update(ev.stop(started))
        result["eval_threads"] = evaluating[1].eval_threads  # type: ignore[index]
        result["eval_nice"] = evaluating[1].eval_nice  # type: ignore[index]
    print(f"  {result}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="trainer steps per phase")
    parser.add_argument("--plain-steps", type=int, default=10,
                        help="trainer steps of eval_plain (many seconds each: oversubscribed)")
    parser.add_argument("--warmup", type=int, default=3, help="first steps not timed")
    parser.add_argument("--workdir", type=Path, help="where the demo's models are built (kept and reused)")
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args()

    load_before = load_average()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cpu-split-"))
    assets = build_demo(workdir / "assets")
    config = workdir / "config.toml"
    config.write_text(demo_config_text(assets, workdir), encoding="utf-8")
    spec = train_spec(parse_config(config.read_text(encoding="utf-8"), config))
    assert spec.kohya is not None
    cores = usable_cores()
    share = plan(spec.kohya, True, os.environ, cores)  # the evaluator runs on the CPU here
    plain = CpuShare()
    base_env = {k: v for k, v in os.environ.items() if k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if base_env:
        print(f"note: {base_env} is set in this environment; the 'alone' phase then is not torch's default")
    runs = workdir / "runs"

    results: dict[str, Any] = {}
    results["alone"] = phase("alone", config, args.steps, args.warmup, runs, {}, None)
    lora = runs / "alone" / f"{spec.output_name}.safetensors"
    results["alone_split"] = phase("alone_split", config, args.steps, args.warmup, runs, kohya_env(share), None)
    results["eval_plain"] = phase("eval_plain", config, args.plain_steps, args.warmup, runs, {}, (lora, plain))
    results["eval_split"] = phase("eval_split", config, args.steps, args.warmup, runs, kohya_env(share),
                                  (lora, share))

    # "training alone" is the faster of the two alone phases: on a loaded machine torch's default threads can
    # be the slower one, and the target must not be met by a slow baseline
    alone = min(results["alone"]["s_per_step"], results["alone_split"]["s_per_step"])
    ratios = {name: round(results[name]["s_per_step"] / alone, 2) for name in ("alone", "alone_split",
                                                                               "eval_plain", "eval_split")}
    report = {
        "benchmark": "cpu_split",
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cores": cores, "cpu_count": os.cpu_count()},
        "share": {"kohya_threads": share.kohya_threads, "eval_threads": share.eval_threads,
                  "eval_nice": share.eval_nice},
        "trainer": {"steps": args.steps, "warmup": args.warmup, **{k: assets.kohya_args[k] for k in
                                                                  ("resolution", "train_batch_size", "network_dim")}},
        "evaluator": {k: assets.eval_settings[k] for k in ("steps", "width", "height")},
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "phases": results,
        "ratio_to_fastest_alone": ratios,
        "target": "eval_split <= 2.0",
        "target_met": ratios["eval_split"] <= 2.0,
    }
    print(json.dumps({"ratio_to_fastest_alone": ratios, "load_average": [load_before, report["load_average_after"]]}))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
