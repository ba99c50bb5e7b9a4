"""A progress line for long decodes: tqdm's bar on a terminal, otherwise (a log file, a CI
job, a Ray worker) one plain line per ~10%, so a log is not flooded with bar redraws."""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO


class Progress:
    """Count finished items from any thread; `close` prints the total and the rate."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None):
        self.total, self.label, self.stream = total, label, stream or sys.stderr
        self.done, self.next_line, self.started = 0, 0.1, time.perf_counter()
        self.lock = threading.Lock()
        self.bar = None
        if total and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit="img", file=self.stream)

    def update(self, n: int = 1) -> None:
        with self.lock:
            self.done += n
            if self.bar is not None:
                self.bar.update(n)
            elif self.total and self.done >= self.next_line * self.total and self.done < self.total:
                print(f"{self.label}: {self.done}/{self.total} ({100 * self.done // self.total}%)",
                      file=self.stream, flush=True)
                self.next_line = (self.done * 10 // self.total + 1) / 10

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        seconds = time.perf_counter() - self.started
        print(f"{self.label}: {self.done}/{self.total} in {seconds:.1f} s ({self.done / max(seconds, 1e-9):.0f}/s)",
              file=self.stream, flush=True)
