"""Progress bars on stderr that suit where stderr goes.

On a terminal a bar redraws in place. Redirected to a file or a pipe (a cluster job's log, ``2> log``),
every redraw would become one more line, so there a transient bar (an evaluation, a difficulty
estimate: their results are printed as lines anyway) is not drawn at all, and a lasting one (the
rounds, the ladder's runs) is redrawn at most every 30 seconds.
"""

from __future__ import annotations

import sys

from tqdm.auto import tqdm

#: Seconds between redraws of a lasting bar when stderr is not a terminal.
LOG_INTERVAL = 30.0


def bar(*, transient: bool = False, disable: bool = False, **kwargs) -> tqdm:
    """A tqdm bar on stderr (module docstring); ``transient``: one that disappears when done."""
    terminal = _is_terminal()
    if not terminal:
        disable = disable or transient
        kwargs.setdefault("mininterval", LOG_INTERVAL)
    return tqdm(file=sys.stderr, dynamic_ncols=True, leave=not transient, disable=disable, **kwargs)


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
