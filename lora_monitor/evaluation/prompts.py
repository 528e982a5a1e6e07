"""kohya sample-prompt files: one prompt a line with `--n --w --h --d --l --s` options, or .toml/.json forms.

kohya splits a line on " --" and reads the first letter(s) of each option; `#` lines are comments.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from lora_monitor.errors import UserError


@dataclass(frozen=True)
class Prompt:
    text: str
    negative: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    guidance_scale: float | None = None
    steps: int | None = None


_OPTIONS = {  # kohya's one-letter options -> (field, type)
    "n": ("negative", str),
    "w": ("width", int),
    "h": ("height", int),
    "d": ("seed", int),
    "l": ("guidance_scale", float),
    "s": ("steps", int),
}


def parse_prompt_line(line: str, where: str) -> Prompt:
    parts = re.split(r"\s+--", " " + line.strip())
    text = parts[0].strip()
    if not text:
        raise UserError(f"{where}: prompt text is empty before the options; put the prompt first")
    values: dict[str, object] = {}
    for part in parts[1:]:
        m = re.match(r"([a-z]+)\s*(.*)$", part.strip(), re.S)
        if not m or m.group(1) not in _OPTIONS:
            # kohya ignores options it does not know (e.g. --ss sampler); so do we.
            continue
        name, kind = _OPTIONS[m.group(1)]
        raw = m.group(2).strip()
        try:
            values[name] = kind(raw)
        except ValueError:
            raise UserError(
                f"{where}: option --{m.group(1)} {raw!r} is not a {kind.__name__}; fix the value"
            ) from None
    return Prompt(text=text, **values)  # type: ignore[arg-type]


def _from_dict(item: object, where: str) -> Prompt:
    if not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not item["prompt"].strip():
        raise UserError(f"{where}: each entry needs a non-empty 'prompt' string")
    keys = {
        "negative_prompt": ("negative", str),
        "width": ("width", int),
        "height": ("height", int),
        "seed": ("seed", int),
        "scale": ("guidance_scale", float),
        "sample_steps": ("steps", int),
    }
    values: dict[str, object] = {}
    for key, (name, kind) in keys.items():
        if key in item:
            try:
                values[name] = kind(item[key])
            except (TypeError, ValueError):
                raise UserError(f"{where}: '{key}' must be a {kind.__name__}") from None
    return Prompt(text=item["prompt"].strip(), **values)  # type: ignore[arg-type]


def load_prompts(path: Path) -> list[Prompt]:
    """Read a kohya prompt file (.txt, .toml with [[prompt.subset]], or .json list)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: prompt file not found; fix [eval] prompts") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read prompt file ({exc}); save it as UTF-8 text") from None
    suffix = Path(path).suffix.lower()
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UserError(f"{path}: not valid TOML ({exc})") from None
        items = data.get("prompt", {}).get("subset", [])
        prompts = [_from_dict(item, f"{path}: prompt.subset[{i}]") for i, item in enumerate(items)]
    elif suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
        if not isinstance(items, list):
            raise UserError(f"{path}: expected a JSON list of prompt objects")
        prompts = [_from_dict(item, f"{path}: entry {i}") for i, item in enumerate(items)]
    else:
        prompts = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip() and not line.lstrip().startswith("#"):
                prompts.append(parse_prompt_line(line, f"{path}:{number}"))
    if not prompts:
        raise UserError(f"{path}: no prompts in the file; add one prompt a line")
    return prompts


def prompts_from_captions(captions: list[str], limit: int = 4) -> list[Prompt]:
    """Fallback when no prompt file is given: the reference images' own captions, de-duplicated."""
    seen: list[str] = []
    for caption in captions:
        caption = caption.strip()
        if caption and caption not in seen:
            seen.append(caption)
    return [Prompt(text=c) for c in seen[:limit]]


# ------------------------------------------------------------------------------------------ held-out prompts
# Contexts the training captions never had (clip_t_holdout): shipped beside the sample prompt files.
DEFAULT_HOLDOUT_CONTEXTS = Path(__file__).resolve().parents[2] / "sample_prompts" / "holdout_contexts.list"


def _same_text(text: str) -> str:
    """A prompt as compared with captions: case, runs of spaces and spacing around commas do not count."""
    return re.sub(r"\s*,\s*", ", ", " ".join(text.casefold().split())).strip(" ,")


def trigger_words(captions: list[str]) -> str:
    """The words every caption shares: the comma-separated tags found in all captions (in the first caption's
    order), else the words all captions start with (`sks dress on ...`); "" when they share nothing."""
    texts = [c.strip() for c in captions if c.strip()]
    if not texts:
        return ""
    tag_sets = [{_same_text(t) for t in c.split(",") if t.strip()} for c in texts]
    common = [t.strip() for t in texts[0].split(",") if t.strip() and all(_same_text(t) in s for s in tag_sets)]
    if common:
        return ", ".join(common)
    words = [c.split() for c in texts]
    prefix = []
    for column in zip(*words, strict=False):
        if len({w.casefold().strip(",") for w in column}) != 1:
            break
        prefix.append(column[0].strip(","))
    return " ".join(prefix)


def load_contexts(path: Path = DEFAULT_HOLDOUT_CONTEXTS) -> list[str]:
    """The held-out contexts: one a line; blank lines and `#` comments skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the held-out context list ({exc}); set [eval] holdout_prompts "
                        "to a prompt file instead") from None
    contexts = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not contexts:
        raise UserError(f"{path}: no contexts in the file; add one context a line")
    return contexts


def holdout_prompts_from_captions(captions: list[str], contexts: list[str]) -> list[Prompt]:
    """`<trigger words>, <context>` for each context; none equals a caption. [] when the captions share no
    trigger words (there is no subject to place in new contexts)."""
    subject = trigger_words(captions)
    if not subject:
        return []
    seen = {_same_text(c) for c in captions}
    prompts = []
    for context in contexts:
        text = f"{subject}, {context}"
        if _same_text(text) not in seen:
            seen.add(_same_text(text))
            prompts.append(Prompt(text=text))
    return prompts


def load_holdout_prompts(path: Path | None, captions: list[str],
                         contexts: Path = DEFAULT_HOLDOUT_CONTEXTS) -> list[Prompt]:
    """The held-out prompts: the `[eval] holdout_prompts` file when set (kohya prompt-file syntax), else built
    from the captions' trigger words and the `contexts` list. A prompt that repeats a training caption is not
    held out: in a file it is a UserError naming it."""
    if path is None:
        return holdout_prompts_from_captions(captions, load_contexts(contexts))
    prompts = load_prompts(path)
    seen = {_same_text(c) for c in captions if c.strip()}
    for prompt in prompts:
        if _same_text(prompt.text) in seen:
            raise UserError(f"{path}: holdout prompt {prompt.text!r} is a training caption; held-out prompts "
                            "must describe contexts the captions never had — change or remove it")
    return prompts
