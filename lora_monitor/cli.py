"""Command line: train, eval-dir, score, report, demo.

User-caused problems end as one line on stderr and exit code 2; bugs still raise with a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from lora_monitor.config import Config, load_config
from lora_monitor.errors import UserError


def _user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            click.echo(f"lora-monitor: error: {exc}", err=True)
            sys.exit(exc.exit_code)

    return wrapper


def _config(path: Path | None) -> Config:
    return load_config(path) if path else Config()


def _view() -> Any:
    from lora_monitor.tracking.live import LiveView

    return LiveView()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lora-monitor")
def main() -> None:
    """Follow kohya sd-scripts LoRA training and score every saved checkpoint against the reference images."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True, help="TOML config file.")
@_user_errors
def train(config_path: Path) -> None:
    """Launch kohya's train_network.py, follow it and evaluate each new LoRA file."""
    from lora_monitor.train_loop import run_train

    config = load_config(config_path)
    with _view() as view:
        code = run_train(config, view)
    sys.exit(code)


@main.command("eval-dir")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML config file.")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), help="CSV to write (default: the run's CSV).")
@click.option("--watch", is_flag=True, help="Keep evaluating new files until Ctrl-C.")
@click.option("--base-model", help="Base model (overrides the config).")
@click.option("--references", type=click.Path(path_type=Path), help="Reference images folder (overrides the config).")
@click.option("--prompts", type=click.Path(path_type=Path), help="kohya prompt file (overrides the config).")
@_user_errors
def eval_dir(
    folder: Path,
    config_path: Path | None,
    csv_path: Path | None,
    watch: bool,
    base_model: str | None,
    references: Path | None,
    prompts: Path | None,
) -> None:
    """Evaluate the LoRA files in FOLDER in step order, skipping those already in the CSV."""
    import dataclasses

    from lora_monitor.eval_dir import run_eval_dir

    config = _config(config_path)
    overrides = {
        k: v
        for k, v in {"base_model": base_model, "references": references and references.resolve(),
                     "prompts": prompts and prompts.resolve()}.items()
        if v
    }
    if overrides:
        config = dataclasses.replace(config, eval=dataclasses.replace(config.eval, **overrides))
    with _view() as view:
        code = run_eval_dir(config, folder, csv_path, watch, view)
    sys.exit(code)


@main.command()
@click.argument("images_dir", type=click.Path(path_type=Path))
@click.option("--references", type=click.Path(path_type=Path), required=True, help="Reference images folder.")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML config ([metrics]).")
@click.option("--prompts", type=click.Path(path_type=Path),
              help="Prompts, one per image in the images' sorted order: clip_t, and one diversity group per prompt.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_user_errors
def score(images_dir: Path, references: Path, config_path: Path | None, prompts: Path | None, as_json: bool) -> None:
    """Score a folder of images against reference images with the same metric code.

    Also diversity (among the images of each prompt; all images one group without --prompts) and
    copy_distance/copies (the nearest an image comes to a reference; [metrics] copy_threshold).
    """
    from lora_monitor.evaluation.scoring import score_folder

    config = _config(config_path)
    result = score_folder(config, images_dir, references, prompts)
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
    else:
        for key, value in result.items():
            if key == "diversity" and value is None:
                value = "n/a (no prompt has two images)"
            click.echo(f"{key:>18}: {value}")


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML config of the run.")
@click.option("--csv", "csv_path", type=click.Path(path_type=Path), help="CSV (default: FOLDER/loss_tracker.csv).")
@_user_errors
def report(folder: Path, config_path: Path | None, csv_path: Path | None) -> None:
    """Write FOLDER/report.html from the run's CSV and images."""
    from lora_monitor.policies.decisions import write_report
    from lora_monitor.run_spec import eval_dir_spec

    path = write_report(eval_dir_spec(_config(config_path), folder, csv_path))
    click.echo(str(path))


@main.command()
@click.option("--workdir", type=click.Path(path_type=Path), help="Folder to build the demo in (default: a new one).")
@click.option("--scenario", type=click.Choice(["default", "overtrain"]),  # demo.build.SCENARIOS (no torch import here)
              default="default", show_default=True,
              help="overtrain: one training image trained far past its useful point, stopped as over-trained.")
@click.option("--family", type=click.Choice(["sd", "flux"]),  # demo.build.FAMILY_SCRIPTS
              default="sd", show_default=True,
              help="flux: a tiny FLUX.1 trained by the bundled flux_train_network.py, scored with a FluxPipeline.")
@_user_errors
def demo(workdir: Path | None, scenario: str, family: str) -> None:
    """Build the offline demo (tiny model, toy garments, config) and run `train` on it."""
    from lora_monitor.demo.run import prepare_demo
    from lora_monitor.families import label
    from lora_monitor.run_spec import train_spec
    from lora_monitor.train_loop import run_train

    config_path = prepare_demo(workdir, echo=lambda m: click.echo(f"[lora-monitor] {m}"), scenario=scenario,
                               family=family)
    config = load_config(config_path)
    with _view() as view:
        code = run_train(config, view)
    spec = train_spec(config)
    name = "" if family == "sd" else f"{label(spec.family)} "  # the SD demo's line is as it always was
    click.echo(f"[lora-monitor] {name}demo finished (exit {code}); config: {config_path}")
    click.echo(f"[lora-monitor] CSV: {spec.csv_path}  report: {spec.output_dir / 'report.html'}")
    sys.exit(code)


if __name__ == "__main__":
    main()
