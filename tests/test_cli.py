"""Bad input a user can cause: one clear line on stderr (what, where, how to fix) and exit code 2."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_monitor.cli import main
from lora_monitor.evaluation.prompts import load_prompts

ROOT = Path(__file__).resolve().parent.parent


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stderr


@pytest.mark.parametrize(
    ("files", "argv", "expected"),
    [
        ({}, ["train", "--config", "{d}/none.toml"], "config file not found"),
        ({"c.toml": "[eval\n"}, ["train", "--config", "{d}/c.toml"], "not valid TOML"),
        ({"c.toml": "[eval]\nstepz = 1\n"}, ["train", "--config", "{d}/c.toml"], "did you mean 'steps'"),
        ({"c.toml": "[eval]\n"}, ["train", "--config", "{d}/c.toml"], "no [kohya] section"),
        ({"c.toml": "[early_stopping]\nmonitor = 'eval_scor'\n"}, ["eval-dir", "{d}", "--config", "{d}/c.toml"],
         "did you mean 'eval_score'"),
        ({}, ["eval-dir", "{d}/missing"], "not a folder"),
        ({"c.toml": "[kohya]\nsd_scripts = 'nowhere'\n[kohya.args]\noutput_dir = 'out'\n"},
         ["train", "--config", "{d}/c.toml"], "nowhere"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path: Path, files: dict, argv: list, expected: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    code, output = run(*[a.format(d=tmp_path) for a in argv])
    assert code == 2, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("lora-monitor: error: ")
    assert expected in lines[0]


@pytest.mark.parametrize("prompt_file", sorted((ROOT / "sample_prompts").glob("*.txt")))
def test_sample_prompt_files_parse(prompt_file: Path) -> None:
    prompts = load_prompts(prompt_file)
    assert prompts and all("sks style" in p.text for p in prompts)
    assert all(p.seed is not None for p in prompts)
