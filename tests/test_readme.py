"""The README's promises: its example config is valid, and its test command is the one CI runs."""

from pathlib import Path

from lora_monitor.config import parse_config
from lora_monitor.run_spec import train_spec

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_example_config_is_valid(tmp_path: Path) -> None:
    block = README.split("```toml\n", 1)[1].split("```", 1)[0]
    config = parse_config(block, tmp_path / "dress.toml")
    assert config.kohya is not None and config.kohya.args["output_name"] == "red_dress"
    assert config.early_stopping.enabled and config.eval.every_n_steps == 50
    assert train_spec(config).csv_path == tmp_path / "output" / "loss_tracker.csv"


def test_ci_runs_the_readme_test_command() -> None:
    lines = README.splitlines()
    test_command = lines[lines.index("# 2. set up and run the tests") + 1]
    assert test_command in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "lora-monitor demo" in README.split("\n\n", 3)[2]  # the first lines give the demo command


def test_every_eval_and_output_key_is_documented() -> None:
    import dataclasses

    from lora_monitor.config import EvalConfig, OutputConfig

    table = README.split("Every `[eval]` key, and `[output]`:", 1)[1].split("\n\n", 2)[1]
    documented = {line.split("|")[1].strip() for line in table.splitlines()[2:]}
    keys = {k.strip(" `") for cell in documented for k in cell.split(",")}
    for field in dataclasses.fields(EvalConfig):
        assert field.name in keys, f"[eval] {field.name} is not in the README's key table"
    for field in dataclasses.fields(OutputConfig):
        assert f"[output] {field.name}" in keys, f"[output] {field.name} is not in the README's key table"
