"""Progress bars off a terminal (bismap.progress): one redraw per interval, not one per update."""

from __future__ import annotations

import io

from bismap.progress import LOG_INTERVAL_SECONDS, attached_to_terminal, tqdm


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def redraws(stream: io.StringIO) -> int:
    return stream.getvalue().count("\r")


def test_a_bar_written_to_a_file_redraws_once_per_interval_not_per_update(monkeypatch):
    clock = iter(range(0, 10_000_000, 1))  # 1 s per tqdm time() call: many intervals pass during the loop
    monkeypatch.setattr("tqdm.std.time", lambda: next(clock) / 1000)  # 1 ms per call
    log = io.StringIO()
    with tqdm(range(20_000), file=log, miniters=1) as bar:
        for step in bar:
            bar.set_postfix(loss=step)  # as the training loops do every iteration
    terminal = Terminal()
    for _ in tqdm(range(20_000), file=terminal, miniters=1):
        pass
    assert not attached_to_terminal(log) and attached_to_terminal(terminal)
    assert redraws(terminal) > 100  # ~20 s of fake time at the default 0.1 s interval
    assert redraws(log) <= 2 + 20 / LOG_INTERVAL_SECONDS  # the first, the last, one per 30 s
