"""What every workflow script does around its one library call (log to the rule's log, set threads), and the
machine facts the workflow reads while it is parsed."""

from __future__ import annotations

import contextlib
import glob
import itertools
import logging
import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def rule_context(log_file: str | Path, threads: int = 1) -> Iterator[logging.Logger]:
    """Send logging to the rule's log file and stderr; record any failure there too."""
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    handlers: list[logging.Handler] = [logging.FileHandler(log_file, mode="w"), logging.StreamHandler(sys.stderr)]
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, handlers=handlers, force=True)
    logging.captureWarnings(True)
    if "torch" in sys.modules:  # scripts that never use torch skip its ~2 s import
        sys.modules["torch"].set_num_threads(max(1, int(threads)))
    logger = logging.getLogger("bismap.rule")
    try:
        yield logger
    except BaseException:
        logger.exception("rule failed")
        raise
    finally:
        for handler in handlers:
            handler.flush()


def optional_input(inputs: Mapping[str, str], name: str) -> Path | None:
    """A named input a rule declares only in some configurations (GPA statistics, weights), or None."""
    value = inputs.get(name)
    return Path(value) if value else None


def local_cuda_devices() -> int:
    """CUDA devices of this machine: ``CUDA_VISIBLE_DEVICES`` if set (up to a negative id), else ``/dev/nvidia<N>``.

    A file check, not ``torch.cuda``: parsing the workflow should not pay torch's import.
    """
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [device.strip() for device in visible.split(",") if device.strip()]
        return len(list(itertools.takewhile(lambda device: not device.startswith("-"), ids)))
    return len(glob.glob("/dev/nvidia[0-9]*"))
