"""kohya prompt files: options, comments, toml/json forms, and one clear line for bad files."""

from pathlib import Path

import pytest

from lora_monitor.errors import UserError
from lora_monitor.evaluation.prompts import Prompt, load_prompts, parse_prompt_line, prompts_from_captions


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("a red dress", Prompt("a red dress")),
        ("a red dress --n blurry, lowres --d 7", Prompt("a red dress", negative="blurry, lowres", seed=7)),
        ("a coat --w 512 --h 768 --l 6.5 --s 20", Prompt("a coat", width=512, height=768, guidance_scale=6.5,
                                                        steps=20)),
        ("sks style skirt --ss euler_a --d 3", Prompt("sks style skirt", seed=3)),  # unknown option ignored
        # kohya splits on " --" too, so text after a bare " --" is not part of the prompt
        ("a dress with -- dashes", Prompt("a dress with")),
    ],
)
def test_parse_line(line: str, expected: Prompt) -> None:
    assert parse_prompt_line(line, "f:1") == expected


def test_file_with_comments_and_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("# garments\n\na red dress --d 1\n  # indented comment\nblue jeans\n", encoding="utf-8")
    assert [p.text for p in load_prompts(f)] == ["a red dress", "blue jeans"]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("e.txt", "# only comments\n\n", "no prompts in the file"),
        ("b.txt", "ok prompt\na dress --d seven\n", "b.txt:2: option --d 'seven' is not a int"),
        ("c.txt", "--n only a negative\n", "c.txt:1: prompt text is empty"),
        ("d.json", "{not json", "not valid JSON"),
        ("f.toml", "[prompt\n", "not valid TOML"),
    ],
)
def test_bad_prompt_files(tmp_path: Path, name: str, content: str, message: str) -> None:
    f = tmp_path / name
    f.write_text(content, encoding="utf-8")
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_prompts(f)


def test_toml_and_json_forms(tmp_path: Path) -> None:
    t = tmp_path / "p.toml"
    t.write_text('[[prompt.subset]]\nprompt = "a red dress"\nseed = 5\nscale = 4\n', encoding="utf-8")
    assert load_prompts(t) == [Prompt("a red dress", seed=5, guidance_scale=4.0)]
    j = tmp_path / "p.json"
    j.write_text('[{"prompt": "jeans", "width": 256, "negative_prompt": "bad"}]', encoding="utf-8")
    assert load_prompts(j) == [Prompt("jeans", width=256, negative="bad")]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="prompt file not found"):
        load_prompts(tmp_path / "none.txt")


def test_captions_fallback() -> None:
    assert prompts_from_captions(["a", " a ", "b", ""], limit=4) == [Prompt("a"), Prompt("b")]
