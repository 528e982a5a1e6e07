"""The captured kohya runs in tests/fixtures/kohya/, put back into the order they were written in.

stdout.log and stderr.log were captured from two pipes, so their relative order is lost. kohya's source fixes
it (train_network.py, commit 48d368f): `saving checkpoint: PATH` is printed right before the save's log record
(`WARNING Failed to get git commit hash`), `epoch n/N` right before the dataset's `epoch is incremented`
record. ANCHORS lists, for each stdout chunk, the stderr text it precedes; timeline.txt gives the seconds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "kohya"
RUNS = ("run-python-u", "run-sigint")
FIXTURE_OUT = {"run-python-u": "/home/me/kohya-ws/out/main", "run-sigint": "/home/me/kohya-ws/out/sigint"}

SAVE_MAIN = "\nsaving checkpoint: /home/me/kohya-ws/out/main/"
SAVE_SIGINT = "\nsaving checkpoint: /home/me/kohya-ws/out/sigint/"
# (where a stdout chunk starts, the stderr text it is written just before); searched in order.
ANCHORS: dict[str, list[tuple[str, str]]] = {
    "run-python-u": [
        ("accelerator device", "2026-11-26 21:15:00 INFO     Using v1"),
        ("import network module", "2026-11-26 21:15:51 INFO     create LoRA network"),
        ("prepare optimizer", "                    INFO     use AdamW optimizer"),
        ("running training", "\rsteps:   0%"),
        ("\nepoch 1/2", "2026-11-26 21:15:52 INFO     epoch is incremented"),
        (SAVE_MAIN + "testlora-step00000002", "2026-11-26 21:16:48 WARNING"),
        (SAVE_MAIN + "testlora-step00000004", "2026-11-26 21:18:22 WARNING"),
        (SAVE_MAIN + "testlora-000001", "2026-11-26 21:18:23 WARNING"),
        ("\nepoch 2/2", "                    INFO     epoch is incremented"),
        (SAVE_MAIN + "testlora-step00000006", "2026-11-26 21:18:50 WARNING"),
        (SAVE_MAIN + "testlora.safetensors", "                    WARNING  Failed"),
    ],
    "run-sigint": [
        ("accelerator device", "2026-11-26 21:25:46 INFO     Using v1"),
        ("import network module", "2026-11-26 21:26:00 INFO     create LoRA network"),
        ("prepare optimizer", "                    INFO     use AdamW optimizer"),
        ("running training", "\rsteps:   0%"),
        ("\nepoch 1/2", "                    INFO     epoch is incremented"),
        (SAVE_SIGINT + "testlora-step00000002", "2026-11-26 21:26:04 WARNING"),
    ],
}

# name -> (ss_steps, ss_epoch) as kohya writes them: ss_epoch 0-based in step files, 1-based otherwise.
SAVES = {
    "testlora-step00000002.safetensors": (2, 0),
    "testlora-step00000004.safetensors": (4, 0),
    "testlora-000001.safetensors": (4, 1),
    "testlora-step00000006.safetensors": (6, 1),
    "testlora.safetensors": (6, 2),
}

TIMELINE_RE = re.compile(r"^\s*(?P<t>\d+(?:\.\d+)?)s  (?P<kind>stdout|stderr|outdir)  (?P<text>.*?)   \(rss")
SAVING_RE = re.compile(r"saving checkpoint: \S+/(?P<name>[^/\s]+)")


@dataclass(frozen=True)
class Chunk:
    stream: str
    text: str
    t: float | None = None  # seconds after launch when it was written (None: not in timeline.txt)


def read_text(run: str, name: str) -> str:
    return (FIXTURES / run / name).read_bytes().decode("utf-8")


def merged(run: str) -> list[Chunk]:
    """stdout and stderr of `run` as one list of chunks in the order kohya wrote them."""
    out_text, err_text = read_text(run, "stdout.log"), read_text(run, "stderr.log")
    out_cuts, err_cuts, pos = [], [], 0
    for out_start, err_anchor in ANCHORS[run]:
        out_cuts.append(out_text.index(out_start))
        pos = err_text.index(err_anchor, pos)
        err_cuts.append(pos)
    out_parts = [out_text[a:b] for a, b in zip(out_cuts, [*out_cuts[1:], len(out_text)], strict=True)]
    assert out_cuts[0] == 0
    err_timed = _timed_cuts(run, err_text)
    chunks: list[Chunk] = []
    prev = 0
    for out_part, cut in zip(out_parts, err_cuts, strict=True):
        chunks += _split_timed(err_text, prev, cut, err_timed)
        chunks.append(Chunk("stdout", out_part, _stdout_time(run, out_part)))
        prev = cut
    chunks += _split_timed(err_text, prev, len(err_text), err_timed)
    return [c for c in chunks if c.text]


def timeline(run: str) -> list[tuple[float, str, str]]:
    path = FIXTURES / run / "timeline.txt"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        m = TIMELINE_RE.match(line)
        if m:
            rows.append((float(m.group("t")), m.group("kind"), m.group("text")))
    return rows


def _timed_cuts(run: str, err_text: str) -> dict[int, float]:
    """Offset in stderr -> seconds, for the stderr lines in timeline.txt.

    Lines sampled at the same instant are listed in no particular order, so each is searched from the end
    of the previous instant's lines.
    """
    cuts: dict[int, float] = {}
    group_t, group_start, pos = None, 0, 0
    for t, kind, text in timeline(run):
        if kind != "stderr":
            continue
        if t != group_t:
            group_t, group_start = t, pos
        found = err_text.index(text, group_start)
        while found in cuts:
            found = err_text.index(text, found + 1)
        # cut at the start of the line (the time column precedes the text) unless that is an earlier cut
        line_start = max(err_text.rfind("\n", 0, found), err_text.rfind("\r", 0, found)) + 1
        cut = line_start if line_start > max(cuts, default=-1) else found
        cuts[cut] = t
        pos = max(pos, found + 1)
    return cuts


def _split_timed(text: str, start: int, end: int, timed: dict[int, float]) -> list[Chunk]:
    cuts = [start, *sorted(p for p in timed if start < p < end), end]
    return [Chunk("stderr", text[a:b], timed.get(a)) for a, b in zip(cuts, cuts[1:], strict=False)]


def _stdout_time(run: str, part: str) -> float | None:
    for t, kind, text in timeline(run):
        if kind == "stdout" and text in part:
            return t
    return None


def replay_plan(run: str, seconds: float) -> list[dict[str, object]]:
    """Actions for a stand-in trainer: write a chunk at `t` or save a file; the run squeezed to `seconds`."""
    chunks = merged(run)
    end = max(c.t for c in chunks if c.t is not None)
    actions: list[dict[str, object]] = []
    t = 0.0
    for chunk in chunks:
        if chunk.t is not None:
            t = max(t, chunk.t * seconds / end)
        actions.append({"t": t, "stream": chunk.stream, "data": chunk.text})
        m = SAVING_RE.search(chunk.text) if chunk.stream == "stdout" else None
        if m:
            steps, epoch = SAVES[m.group("name")]
            actions.append({"t": t, "save": m.group("name"), "ss_steps": steps, "ss_epoch": epoch})
    return actions
