"""Progress on stderr: a tqdm bar when tqdm is installed (the ``bench`` extra) and stderr is a terminal, else one
plain line a measurement (also what a log file gets)."""
from __future__ import annotations

import sys
from typing import Optional


class Progress:
    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.bar = total, 0, None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():  # a bar in a log file is a smear of carriage returns
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, file=sys.stderr, unit="meas", dynamic_ncols=True, leave=True)
            except ImportError:
                self.bar = None

    def step(self, label: Optional[str], result: str = "") -> None:
        """One measurement finished (label None: it was skipped without running)."""
        self.done += 1
        if not self.enabled:
            return
        text = f"{label or 'skipped'}{': ' + result if result else ''}"
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        else:
            print(f"[{self.done}/{self.total}] {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
