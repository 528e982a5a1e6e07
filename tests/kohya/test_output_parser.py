"""KohyaOutputParser against the two captured kohya runs (tests/fixtures/kohya/) and synthetic edge cases."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from lora_monitor.events import (
    CheckpointRemoved,
    CheckpointSaving,
    EpochStarted,
    TotalSteps,
    TrainerLog,
    TrainProgress,
)
from lora_monitor.kohya.output_parser import LAST_LINES, MAX_PARTIAL, KohyaOutputParser
from tests.kohya_replay import FIXTURES, RUNS, merged

OUT = {"run-python-u": "/home/me/kohya-ws/out/main", "run-sigint": "/home/me/kohya-ws/out/sigint"}

# Every redraw of the `steps` bar: (step, avr_loss shown, tqdm's rate as printed).
PROGRESS = {
    "run-python-u": [
        (0, None, None),
        (1, None, "22.54s/it"), (1, 1.06, "22.54s/it"),
        (2, 1.06, "28.04s/it"), (2, 1.1, "28.14s/it"),
        (3, 1.1, "35.83s/it"), (3, 1.15, "35.84s/it"),
        (4, 1.15, "37.65s/it"), (4, 1.14, "37.69s/it"),
        (5, 1.14, "32.73s/it"), (5, 1.2, "32.73s/it"),
        (6, 1.2, "29.66s/it"), (6, 1.22, "29.69s/it"),
        (6, 1.22, "29.69s/it"),  # tqdm's close() after `model saved.`
    ],
    "run-sigint": [
        (0, None, None),
        (1, None, "1.44s/it"), (1, 1.06, "1.44s/it"),
        (2, 1.06, "1.40s/it"), (2, 1.1, "1.43s/it"),
        (3, 1.1, "1.46s/it"), (3, 1.15, "1.46s/it"),
        (3, 1.15, "1.69s/it"),  # tqdm's close() after the traceback
    ],
}
EXPECTED = {
    "run-python-u": {
        "loss_at_step": {1: 1.06, 2: 1.1, 3: 1.15, 4: 1.14, 5: 1.2, 6: 1.22},
        "epoch_at_step": {1: 1, 2: 1, 3: 1, 4: 1, 5: 2, 6: 2},
        "saves": ["testlora-step00000002", "testlora-step00000004", "testlora-000001",
                  "testlora-step00000006", "testlora"],
        "epochs": [(1, 2), (2, 2)],
        "current_step": 6, "current_epoch": 2,
        "warnings": ["no regularization images / 正則化画像が見つかりませんでした"]
        + ["Failed to get git commit hash, using fallback"] * 5,
        "errors": [],
    },
    "run-sigint": {
        "loss_at_step": {1: 1.06, 2: 1.1, 3: 1.15},
        "epoch_at_step": {1: 1, 2: 1, 3: 1},
        "saves": ["testlora-step00000002"],
        "epochs": [(1, 2)],
        "current_step": 3, "current_epoch": 1,
        "warnings": ["no regularization images / 正則化画像が見つかりませんでした",
                     "Failed to get git commit hash, using fallback"],
        "errors": ["KeyboardInterrupt (in forward, "
                   "/home/me/kohya-ws/sd-scripts/library/original_unet.py:1148)"],
    },
}


def _rate(printed: str | None) -> float | None:
    if printed is None:
        return None
    value = float(printed[:-4])
    return 1 / value if printed.endswith("s/it") else value


def parse(pieces: list[tuple[str, str]]) -> tuple[KohyaOutputParser, list[object]]:
    parser = KohyaOutputParser()
    events: list[object] = []
    for stream, text in pieces:
        events += parser.feed(text, stream)
    events += parser.flush()
    return parser, events


def in_order(run: str) -> list[tuple[str, str]]:
    return [(c.stream, c.text) for c in merged(run)]


def rechunked(run: str, seed: int, largest: int) -> list[tuple[str, str]]:
    """The same text in random pieces of 1..largest characters (stream order kept)."""
    rng = random.Random(seed)
    pieces = []
    for stream, text in in_order(run):
        i = 0
        while i < len(text):
            n = rng.randint(1, largest)
            pieces.append((stream, text[i:i + n]))
            i += n
    return pieces


def check_run(run: str, parser: KohyaOutputParser, events: list[object]) -> None:
    want = EXPECTED[run]
    progress = [e for e in events if isinstance(e, TrainProgress)]
    assert [(e.step, e.total, e.loss) for e in progress] == [(s, 6, loss) for s, loss, _ in PROGRESS[run]]
    assert [e.rate for e in progress] == pytest.approx([_rate(r) for _, _, r in PROGRESS[run]])
    assert [e for e in events if isinstance(e, TotalSteps)] == [TotalSteps(6)]
    assert [(e.epoch, e.total) for e in events if isinstance(e, EpochStarted)] == want["epochs"]
    assert [e.path for e in events if isinstance(e, CheckpointSaving)] == [
        Path(f"{OUT[run]}/{name}.safetensors") for name in want["saves"]
    ]
    logs = [e for e in events if isinstance(e, TrainerLog)]
    assert [e.text for e in logs if e.level == "warning"] == want["warnings"]
    assert [e.text for e in logs if e.level == "error"] == want["errors"]
    assert parser.loss_at_step == want["loss_at_step"]
    assert parser.epoch_at_step == want["epoch_at_step"]
    assert (parser.total_steps, parser.epochs_total) == (6, 2)
    assert (parser.current_step, parser.current_epoch) == (want["current_step"], want["current_epoch"])


@pytest.mark.parametrize("run", RUNS)
def test_fixture_run_in_write_order(run: str) -> None:
    parser, events = parse(in_order(run))
    check_run(run, parser, events)


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize(("seed", "largest"), [(0, 1), (1, 3), (2, 17), (3, 80), (4, 400), (5, 5000)])
def test_random_chunks_give_the_same_events(run: str, seed: int, largest: int) -> None:
    _, expected = parse(in_order(run))
    parser, events = parse(rechunked(run, seed, largest))
    assert events == expected
    check_run(run, parser, events)


@pytest.mark.parametrize("run", RUNS)
def test_whole_files_at_once(run: str) -> None:
    """Two big reads (stdout first): all but the epoch of each step survive losing the interleaving."""
    out = (FIXTURES / run / "stdout.log").read_text(encoding="utf-8")
    err = (FIXTURES / run / "stderr.log").read_text(encoding="utf-8")
    parser, events = parse([("stdout", out), ("stderr", err)])
    assert parser.loss_at_step == EXPECTED[run]["loss_at_step"]
    assert len([e for e in events if isinstance(e, CheckpointSaving)]) == len(EXPECTED[run]["saves"])


def test_step_loss_is_the_average_logged_to_tensorboard_at_3_significant_digits() -> None:
    text = (FIXTURES / "run-python-u" / "tensorboard_scalars.txt").read_text(encoding="utf-8")
    line = next(line for line in text.splitlines() if line.strip().startswith("loss/average"))
    average = {int(s): float(v) for s, v in re.findall(r"\((\d+), ([\d.]+)\)", line)}
    parser, _ = parse(in_order("run-python-u"))
    assert parser.loss_at_step == {step: float(f"{value:.3g}") for step, value in average.items()}


def test_save_is_announced_after_the_step_it_saves() -> None:
    """`saving checkpoint` comes after the step's first redraw: current_step is then the file's ss_steps."""
    parser = KohyaOutputParser()
    seen = {}
    for stream, text in in_order("run-python-u"):
        for event in parser.feed(text, stream):
            if isinstance(event, CheckpointSaving):
                seen[event.path.name] = parser.current_step
    assert seen == {
        "testlora-step00000002.safetensors": 2,
        "testlora-step00000004.safetensors": 4,
        "testlora-000001.safetensors": 4,
        "testlora-step00000006.safetensors": 6,
        "testlora.safetensors": 6,
    }
    inspect = (FIXTURES / "run-python-u" / "lora_inspect.txt").read_text(encoding="utf-8")
    assert "ss_steps = 6" in inspect and "ss_epoch = 2" in inspect  # the final file: 1-based epoch


@pytest.mark.parametrize(
    ("run", "last"),
    [
        ("run-sigint", "KeyboardInterrupt"),
        ("run-python-u", "                    INFO     model saved.                  train_network.py:1729"),
    ],
)
def test_last_lines_are_the_last_20_non_bar_lines(run: str, last: str) -> None:
    parser, _ = parse(in_order(run))
    assert len(parser.last_lines) == LAST_LINES
    assert parser.last_lines[-1] == last
    assert not any("%|" in line for line in parser.last_lines)


def test_sigint_traceback_is_in_last_lines() -> None:
    parser, _ = parse(in_order("run-sigint"))
    assert '  File "/home/me/kohya-ws/sd-scripts/library/original_unet.py", line 1148, in forward' in (
        parser.last_lines
    )


@pytest.mark.parametrize(
    ("text", "level"),
    [
        ("load tokenizer from cache: /home/me/kohya-ws/tokenizer_cache/openai_clip-vit-large-patch14",
         "info"),
        ("found directory /home/me/kohya-ws/train/1_garment contains 4 image files", "info"),
        ("set image size from cache files: 0/4", "info"),
        ("create LoRA network. base dim (rank): 4, alpha: 1", "info"),
        ("load Diffusers pretrained models: /home/me/kohya-ws/sd15-random", "info"),
        ("UNet2DConditionModel: 64, 8, 768, False, False", "info"),
        ("epoch is incremented. current_epoch: 1, epoch: 2", "info"),
        ("fatal: not a git repository (or any of the parent directories): .git", "info"),
        ("total optimization steps / 学習ステップ数: 6", None),  # becomes TotalSteps, not a log line
        ("num epochs / epoch数: 2", "info"),
    ],
)
def test_wrapped_rich_records_are_joined(text: str, level: str | None) -> None:
    _, events = parse(in_order("run-python-u"))
    found = [e.level for e in events if isinstance(e, TrainerLog) and e.text == text]
    assert found == ([level] if level else [])


def test_dataset_dump_keeps_folded_words_whole() -> None:
    _, events = parse(in_order("run-python-u"))
    logs = [e.text for e in events if isinstance(e, TrainerLog)]
    dump = next(text for text in logs if text.startswith("[Dataset 0] batch"))
    assert 'image_dir: "/home/me/kohya-ws/train/1_garment"' in dump
    assert "caption_dropout_every_n_epochs: 0" in dump


# -- synthetic cases --------------------------------------------------------------------------------------

BAR = "steps:  50%|█████     | 3/6 [00:01<00:01,  2.50it/s, avr_loss=0.123]"


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([("stderr", "\r" + BAR)], [TotalSteps(6), TrainProgress(3, 6, 0.123, 2.5)]),
        ([("stderr", "\rvalidation steps:  50%|█████     | 1/2 [00:01<00:01,  1.00it/s, val_loss=0.5]\n")],
         []),
        ([("stderr", "\r 25%|██▌       | 1/4 [00:02<00:08,  2.70s/it]\n")], []),
        ([("stdout", "epoch 1/"), ("stdout", "3\n")], [EpochStarted(1, 3)]),
        ([("stdout", "removing old checkpoint: /o/a-step00000002.safetensors\n")],
         [CheckpointRemoved(Path("/o/a-step00000002.safetensors"))]),
        ([("stdout", "\nsaving checkpoint: /o/my lora $(x).safetensors\n")],
         [CheckpointSaving(Path("/o/my lora $(x).safetensors"))]),
        ([("stdout", "  total optimization steps / 学習ステップ数: 1200\n")], [TotalSteps(1200)]),
        # a rich record coloured as on a terminal (FORCE_COLOR): ANSI codes are dropped
        ([("stderr", "\x1b[2;36m2026-11-26 21:15:00\x1b[0m\x1b[2;36m \x1b[0m\x1b[34mINFO    \x1b[0m Using v1 "
                     "tokenizer  \x1b[2mstrategy_sd.py\x1b[0m\x1b[2m:\x1b[0m\x1b[2m26\x1b[0m\n")],
         [TrainerLog("Using v1 tokenizer", "info", "stderr")]),
        ([("stderr", "/x/lib.py:12: FutureWarning: `foo` is deprecated\n  warnings.warn(\nnext line\n")],
         [TrainerLog("FutureWarning: `foo` is deprecated", "warning", "stderr"),
          TrainerLog("next line", "info", "stderr")]),
        # a record glued to a bar after tqdm's padding, its time column blank (same second as the last one)
        ([("stderr", "2026-11-26 21:18:50 INFO     first                 a.py:1\n\r" + BAR + "  "
                     "                    WARNING  Failed to get git commit      sai_model_spec.py:288\n"
                     "                             hash, using fallback                               \n")],
         [TrainerLog("first", "info", "stderr"), TotalSteps(6), TrainProgress(3, 6, 0.123, 2.5),
          TrainerLog("Failed to get git commit hash, using fallback", "warning", "stderr")]),
        ([("stderr", "[11/26/26 21:15:00] ERROR    out of memory                    train.py:9\n")],
         [TrainerLog("out of memory", "error", "stderr")]),
        ([("stdout", "Error: cannot open file\n")],
         [TrainerLog("Error: cannot open file", "error", "stdout")]),
        ([("stderr", "Traceback (most recent call last):\n"),
          ("stderr", '  File "/k/train_network.py", line 9, in <module>\n    main()\n'),
          ("stderr", '  File "/v/lib/python3.11/site-packages/t.py", line 3, in f\n'),
          ("stderr", '    raise ValueError("x")\n'),
          ("stderr", "ValueError: bad value\n")],
         [TrainerLog("ValueError: bad value (in <module>, /k/train_network.py:9)", "error", "stderr")]),
        ([("stderr", "Traceback (most recent call last):\n  File \"/k/a.py\", line 1, in f\n")],
         [TrainerLog("traceback (incomplete) (in f, /k/a.py:1)", "error", "stderr")]),
    ],
)
def test_synthetic_output(chunks: list[tuple[str, str]], expected: list[object]) -> None:
    _, events = parse(chunks)
    assert events == expected


def test_a_bar_is_reported_before_its_terminator_arrives() -> None:
    parser = KohyaOutputParser()
    assert parser.feed("\r" + BAR[:30], "stderr") == []
    assert parser.feed(BAR[30:], "stderr") == [TotalSteps(6), TrainProgress(3, 6, 0.123, 2.5)]
    assert parser.feed("  ", "stderr") == []  # tqdm's padding: still the same bar
    glued = "2026-11-26 21:16:48 WARNING  hash missing    sai.py:1\n"
    assert parser.feed(glued, "stderr") == []  # the record may go on with continuation lines
    assert parser.feed("\r" + BAR.replace("0.123", "0.2"), "stderr") == [
        TrainerLog("hash missing", "warning", "stderr"),
        TrainProgress(3, 6, 0.2, 2.5),
    ]
    assert parser.loss_at_step == {3: 0.2}


def test_streams_keep_their_own_partial_lines() -> None:
    parser = KohyaOutputParser()
    assert parser.feed("epoch 2/", "stdout") == []
    assert parser.feed("some log line\n", "stderr") == [TrainerLog("some log line", "info", "stderr")]
    assert parser.feed("5\n", "stdout") == [EpochStarted(2, 5)]


def test_open_record_is_emitted_at_flush() -> None:
    parser = KohyaOutputParser()
    record = "                    INFO     model saved.      train_network.py:1729\n"
    assert parser.feed(record, "stderr") == []
    assert parser.flush() == [TrainerLog("model saved.", "info", "stderr")]


def test_a_line_without_end_cannot_grow_forever() -> None:
    parser = KohyaOutputParser()
    events = parser.feed("x" * (MAX_PARTIAL + 10), "stderr")
    assert events == [TrainerLog("x" * (MAX_PARTIAL + 10), "info", "stderr")]
    assert parser.flush() == []


def test_last_lines_keep_only_twenty() -> None:
    parser = KohyaOutputParser()
    parser.feed("".join(f"line {i}\n" for i in range(30)) + "\r" + BAR + "\n", "stdout")
    assert list(parser.last_lines) == [f"line {i}" for i in range(10, 30)]


# kohya's log records as they reach the parser, and what becomes of them. The first three are lines of the
# captured runs, byte for byte (tests/fixtures/kohya/); the caption warnings are what rich prints for kohya's
# `logger.warning(...)` in train_util.py (its RichHandler, COLUMNS=160 as the launcher sets), including the
# CJK half that rich wraps anywhere (printed by rich itself with kohya's handler settings, from a stand-in file
# named train_util.py: hence the line numbers 9 and 10).
CAPTION_WARNING = (
    "No caption file found for 4 images. Training will continue without captions for these images. If class token "
    "exists, it will be used. / 4枚の画像にキャプションファイルが見つかりませんでした。これらの画像については"
    "キャプションなしで学習を続行します。class tokenが存在する場合はそれを使います。"
)
LOG_RECORDS = [
    ("                    WARNING  no regularization images /       train_util.py:2167\n"
     "                             正則化画像が見つかりませんでした                    \n",
     [("warning", "no regularization images / 正則化画像が見つかりませんでした")]),
    ("\rsteps:  33%|███▎      | 2/6 [00:56<01:52, 28.04s/it, avr_loss=1.06]2026-11-26 21:16:48 WARNING  Failed to "
     "get git commit      sai_model_spec.py:288\n"
     "                             hash, using fallback                               \n",
     [("warning", "Failed to get git commit hash, using fallback")]),
    ("2026-11-26 21:15:01 INFO     Using DreamBooth method.       train_network.py:530\n",
     [("info", "Using DreamBooth method.")]),
    ("2026-11-30 15:44:58 WARNING  No caption file found for 4 images. Training will continue without captions "
     "for these images. If class token        train_util.py:9\n"
     "                             exists, it will be used. /                                                      "
     "                                                   \n"
     "                             4枚の画像にキャプションファイルが見つかりませんでした。これらの画像についてはキャ"
     "プションなしで学習を続行します。cl                \n"
     "                             ass tokenが存在する場合はそれを使います。                                       "
     "                                                   \n"
     "                    WARNING  /home/me/kohya-ws/train/1_garment/garment_00.png                                "
     "                                   train_util.py:10\n",
     [("warning", CAPTION_WARNING), ("warning", "/home/me/kohya-ws/train/1_garment/garment_00.png")]),
]


@pytest.mark.parametrize(("text", "expected"), LOG_RECORDS)
def test_log_records_keep_their_level(text: str, expected: list[tuple[str, str]]) -> None:
    parser = KohyaOutputParser()
    events = parser.feed(text, "stderr") + parser.flush()
    assert [(e.level, e.text) for e in events if isinstance(e, TrainerLog)] == expected
