"""Progress bars that stay readable in a log file.

On a terminal a bar redraws in place; written to a file (a Snakemake job's
stderr, a SLURM output file) every redraw is a new line, so a bar at tqdm's
default 0.1 s interval writes megabytes. Off a terminal the bars here redraw at
most every ``LOG_INTERVAL_SECONDS``.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm as terminal_tqdm

LOG_INTERVAL_SECONDS = 30.0


def attached_to_terminal(stream: Any) -> bool:
    """Whether ``stream`` (None: stderr, tqdm's default) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a file
        return False


class tqdm(terminal_tqdm):  # noqa: N801 - a drop-in for tqdm.tqdm
    """tqdm, throttled to one redraw per LOG_INTERVAL_SECONDS where its stream is not a terminal."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.throttled = not attached_to_terminal(kwargs.get("file"))
        if self.throttled:
            kwargs.setdefault("mininterval", LOG_INTERVAL_SECONDS)
            kwargs.setdefault("maxinterval", LOG_INTERVAL_SECONDS * 2)
        super().__init__(*args, **kwargs)

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        """tqdm redraws on every postfix (a training loop's loss): off a terminal, the next interval shows it."""
        super().set_postfix(ordered_dict, refresh=refresh and not self.throttled, **kwargs)
