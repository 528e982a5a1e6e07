"""The live view: plain lines without control codes when piped; a table with deltas, queue, best and countdown."""

import io

from lora_monitor.tracking.live import LiveView

ROW1 = {"step": "20", "checkpoint": "a-step00000020.safetensors", "status": "ok", "visual_loss": "0.5",
        "fashion_clip_loss": "0.2", "color_loss": "40.0", "clip_t": "0.25", "eval_score": "0.3", "eval_seconds": "2.1"}
ROW2 = {**ROW1, "step": "40", "checkpoint": "a-step00000040.safetensors", "color_loss": "30.0", "eval_score": "0.25"}
FAILED = {"step": "60", "checkpoint": "a-step00000060.safetensors", "status": "failed", "note": "corrupt file"}


def feed(view: LiveView) -> None:
    view.set_epoch(1, 2)
    for step in range(0, 41):
        view.progress(step, 40, 1.0 / (step + 1), 2.5)
    view.add_row(ROW1)
    view.add_row(ROW2)
    view.add_row(FAILED)
    view.set_queue(["a-step00000080.safetensors"], "a-step00000070.safetensors")
    view.set_best("a-step00000040.safetensors (step 40, eval_score 0.2500)")
    view.set_patience("2 evaluation(s) without improvement left")
    view.message("kohya: something happened")


def test_plain_mode_is_one_line_per_event_without_control_codes() -> None:
    stream = io.StringIO()
    with LiveView(stream=stream, live=False) as view:
        feed(view)
    text = stream.getvalue()
    assert "\x1b" not in text and "\r" not in text
    lines = text.splitlines()
    assert all(line.startswith("[lora-monitor] ") for line in lines)
    assert sum("step " in line and "/40" in line for line in lines) <= 12  # not every redraw
    assert any("color 30.0000 (-10.0000)" in line for line in lines)
    assert any("FAILED - corrupt file" in line for line in lines)
    assert any(line.endswith("best: a-step00000040.safetensors (step 40, eval_score 0.2500)") for line in lines)


def test_live_table_shows_progress_rows_queue_best_and_countdown() -> None:
    stream = io.StringIO()
    view = LiveView(stream=stream, live=True)
    feed(view)
    view.console.print(view._render())  # noqa: SLF001 - render once, as the live display would
    text = stream.getvalue()
    for expected in ("40/40", "2.50 it/s", "epoch 1/2", "a-step00000040.safetensors", "-10.0000",
                     "corrupt file", "evaluating a-step00000070.safetensors", "a-step00000080.safetensors",
                     "best: a-step00000040", "2 evaluation(s) without improvement left"):
        assert expected in text, expected
