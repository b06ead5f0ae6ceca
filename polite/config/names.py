"""Names a config lists to select work (task types, sources). A misspelt one selects nothing, silently: the run
goes on with 0 samples, or an exclusion excludes nothing. So an unknown name is an error that says which it meant.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def unknown_names(given: Iterable[str], known: Iterable[str], what: str) -> str | None:
    """``None`` when every name in ``given`` is known, else the message: each unknown name with the closest known
    one, and the known names (``what`` is their kind, e.g. "task type")."""
    known = sorted(set(known))
    unknown = [name for name in dict.fromkeys(given) if name not in known]
    if not unknown:
        return None
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    plural = "s" if len(unknown) > 1 else ""
    return f"unknown {what}{plural} {', '.join(parts)}; known: {', '.join(known) or '(none yet)'}"
