"""Progress for loops that can take minutes outside the Trainer (which has its own bars).

On a terminal: a tqdm bar that appears only once the loop has run `delay` seconds, so quick runs
stay quiet. Into a log file (not a terminal): a log line at most every `every` seconds instead of
bars drawn with carriage returns. On every process but rank 0: nothing.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator

logger = logging.getLogger(__name__)


def progress(items: Iterable, total: int, desc: str, unit: str = "batch", delay: float = 2.0, every: float = 30.0):
    """`items`, yielded unchanged, with progress shown on the main process."""
    if int(os.environ.get("RANK", "0")) != 0:
        return items
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(items, total=total, desc=desc, unit=unit, delay=delay, dynamic_ncols=True)
    return _logged(items, total, desc, unit, every)


def _logged(items: Iterable, total: int, desc: str, unit: str, every: float) -> Iterator:
    started = last = time.monotonic()
    for done, item in enumerate(items, start=1):
        yield item
        now = time.monotonic()
        if now - last >= every and done < total:
            last = now
            rate = done / (now - started)
            logger.info("%s: %d/%d %s (%.0f%%), about %.0f s left", desc, done, total, unit, 100 * done / total, (total - done) / rate)
