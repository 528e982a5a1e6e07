"""The live view: plain lines without control codes when piped; a table with deltas, queue, best and countdown."""

import io

import pytest

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


# --- the loss shown belongs to the step shown (kohya's real output) ----------------------------------------

def _fixture_draws(run: str) -> list[object]:
    from lora_monitor.events import TrainProgress
    from lora_monitor.kohya.output_parser import KohyaOutputParser
    from tests.kohya_replay import merged

    parser = KohyaOutputParser()
    events: list[object] = []
    for chunk in merged(run):
        events += parser.feed(chunk.text, chunk.stream)
    return [e for e in events + parser.flush() if isinstance(e, TrainProgress)]


def _state(tmp_path, view: LiveView):  # noqa: ANN001, ANN202
    from lora_monitor.config import parse_config
    from lora_monitor.run_spec import eval_dir_spec
    from lora_monitor.run_state import RunState

    return RunState(eval_dir_spec(parse_config("", tmp_path / "c.toml"), tmp_path), view)


# kohya's loss/average in TensorBoard at each step, as its bar prints it (3 significant digits)
OWN_LOSS = {1: 1.06, 2: 1.1, 3: 1.15, 4: 1.14, 5: 1.2, 6: 1.22}


@pytest.mark.parametrize("run", ["run-python-u", "run-sigint"])
def test_each_drawn_loss_is_given_the_step_it_belongs_to(tmp_path, run: str) -> None:  # noqa: ANN001
    view = LiveView(stream=io.StringIO(), live=True)
    state = _state(tmp_path, view)
    for draw in _fixture_draws(run):
        loss_step = state.note_progress(draw)
        assert (loss_step is None) == (draw.loss is None)
        if loss_step is not None:
            assert OWN_LOSS[loss_step] == draw.loss  # never another step's value under this step's number
            assert loss_step in (draw.step, draw.step - 1)
        view.progress(draw.step, draw.total, draw.loss, draw.rate, loss_step)
        text = view._progress_text().plain  # noqa: SLF001
        if view.loss is not None:
            of = "" if view.loss_step == draw.step else f" (step {view.loss_step})"
            assert f"{draw.step}/6" in text and f"loss {OWN_LOSS[view.loss_step]:.4g}{of}" in text


def test_plain_progress_lines_show_each_steps_own_loss(tmp_path) -> None:  # noqa: ANN001
    stream = io.StringIO()
    view = LiveView(stream=stream, live=False)
    state = _state(tmp_path, view)
    for draw in _fixture_draws("run-python-u"):
        view.progress(draw.step, draw.total, draw.loss, draw.rate, state.note_progress(draw))
    lines = [line.removeprefix("[lora-monitor] ") for line in stream.getvalue().splitlines()]
    assert lines == [f"step {step}/6 loss {loss:.4g}" for step, loss in OWN_LOSS.items()]


def test_plain_progress_without_a_loss_still_gives_each_due_step_once() -> None:
    stream = io.StringIO()
    view = LiveView(stream=stream, live=False)
    for step in (1, 1, 2, 2, 3, 4, 4):
        view.progress(step, 4, None, None)
    lines = [line.removeprefix("[lora-monitor] ") for line in stream.getvalue().splitlines()]
    assert lines == ["step 1/4", "step 2/4", "step 3/4"]  # step 4's line waits for a loss or a later step


# --- changes against the preceding step, whatever order rows arrive in ---------------------------------------

def _row(step: int, score: float, status: str = "ok", name: str | None = None, note: str = "") -> dict:
    return {"step": str(step), "checkpoint": name or f"a-step{step:08d}.safetensors", "status": status,
            "eval_score": str(score), "eval_seconds": "3.5", "note": note}


@pytest.mark.parametrize(
    ("arrivals", "expected"),
    [
        # newest first while training, then the backfill: 2, 6, 4, 8
        ([(2, 0.5), (6, 0.3), (4, 0.4), (8, 0.25)], {2: None, 6: (0.3 - 0.4, 4), 4: (0.4 - 0.5, 2), 8: (-0.05, 6)}),
        # in step order (newest_first = false)
        ([(2, 0.5), (4, 0.4), (6, 0.3)], {2: None, 4: (-0.1, 2), 6: (-0.1, 4)}),
        # a failed step is skipped over: the change is against the last ok step below
        ([(2, 0.5), (4, None), (6, 0.3)], {2: None, 4: None, 6: (-0.2, 2)}),
    ],
)
def test_changes_are_against_the_preceding_evaluated_step(arrivals: list, expected: dict) -> None:
    view = LiveView(stream=io.StringIO(), live=False)
    for step, score in arrivals:
        view.add_row(_row(step, score) if score is not None else
                     {"step": str(step), "checkpoint": f"a-step{step:08d}.safetensors", "status": "failed",
                      "note": "corrupt"})
    for step, want in expected.items():
        previous = view.previous({"step": str(step)})
        if want is None:
            assert previous is None or view.ok_rows.get(step) is None
            continue
        change, before = want
        assert previous is not None and int(previous["step"]) == before
        assert float(view.ok_rows[step]["eval_score"]) - float(previous["eval_score"]) == pytest.approx(change)


def test_table_lists_rows_by_step_with_changes_duplicates_and_a_named_seconds_column() -> None:
    stream = io.StringIO()
    view = LiveView(stream=stream, live=True)
    for step, score in [(2, 0.5), (6, 0.3), (4, 0.4)]:
        view.add_row(_row(step, score))
    view.add_row(_row(6, 0.3, "duplicate", "a.safetensors",
                      "same weights as a-step00000006.safetensors; not generated again"))
    view.console.width = 200
    view.console.print(view._table())  # noqa: SLF001
    lines = stream.getvalue().splitlines()
    body = [line for line in lines if line.startswith("│")]
    assert [line.split()[1] for line in body] == ["2", "4", "6", "6"]  # by step, not by arrival
    assert "0.3000 (-0.1000)" in body[2] and "0.4000 (-0.1000)" in body[1]  # 6 vs 4, 4 vs 2
    assert "duplicate: same weights as a-step00000006.safetensors" in body[3]
    assert any("eval s" in line for line in lines)


def test_plain_row_line_names_the_step_it_is_compared_with() -> None:
    stream = io.StringIO()
    view = LiveView(stream=stream, live=False)
    for step, score in [(2, 0.5), (6, 0.3), (4, 0.4)]:
        view.add_row(_row(step, score))
    lines = stream.getvalue().splitlines()
    assert lines[1].endswith("; changes vs step 2") and "(-0.2000)" in lines[1]
    assert lines[2].endswith("; changes vs step 2") and "(-0.1000)" in lines[2]
