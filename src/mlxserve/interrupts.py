"""Waiting in the main thread without missing a Ctrl-C.

Python runs a Ctrl-C's handler in the main thread only, when that thread runs Python code.
The kernel may hand the signal to any other thread (the engine's, MLX's), which only marks
it pending; a main thread then waiting on a lock without a timeout never wakes to raise
KeyboardInterrupt (`run` and piped `chat` hung so, about one Ctrl-C in ten on a busy
machine). So the main thread's waits for the engine wake every SIGNAL_CHECK_S.
"""

from __future__ import annotations

import threading

SIGNAL_CHECK_S = 0.1


def wait_for(done: threading.Event) -> None:
    """done.wait(), but waking every SIGNAL_CHECK_S so that a Ctrl-C is raised here."""
    while not done.wait(SIGNAL_CHECK_S):
        pass


def join(thread: threading.Thread) -> None:
    """thread.join(), but waking every SIGNAL_CHECK_S so that a Ctrl-C is raised here."""
    while thread.is_alive():
        thread.join(SIGNAL_CHECK_S)
