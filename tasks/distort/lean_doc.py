"""A lighter stand-in for nlpaug's ``Doc``, the per-call token bookkeeping of its text augmenters.

nlpaug's ``Doc`` builds two ``Token`` objects and a ``ChangeLog`` list for every token of every call, and
finds each token's start offset with a slice-and-search of the remaining text; its augmenters only read the
original and the latest token back (offsets matter only with ``include_detail=True``). That bookkeeping was
70% of the augment method's time. ``LeanDoc`` keeps the same interface and the same results: one slotted
record per token, the latest token stored directly, offsets computed only when change logs are asked for.

``with_lean_doc`` makes copies of an augmenter class's action methods whose global ``Doc`` is ``LeanDoc``,
so only our subclasses use it; nlpaug itself, and anyone else using it in the process, are untouched.
tests/test_distort_methods.py checks that every action gives the same text with either ``Doc``.
"""

from __future__ import annotations

import types
from typing import Any


class LeanToken:
    __slots__ = ("token", "start_pos", "action", "change_seq")

    def __init__(self, token: str, start_pos: int = -1, action: str = "", change_seq: int = 0) -> None:
        self.token = token
        self.start_pos = start_pos
        self.action = action
        self.change_seq = change_seq


class LeanChangeLog:
    """One token: its original and its latest form (nlpaug keeps every intermediate form, never read back)."""

    __slots__ = ("orig_token", "latest", "changes")

    def __init__(self, orig_token: LeanToken) -> None:
        self.orig_token = orig_token
        self.latest = orig_token
        self.changes = 0

    def add(self, token: str, action: str, change_seq: int) -> None:
        self.latest = LeanToken(token, -1, action, change_seq)
        self.changes += 1

    def update(
        self, token: str | None = None, action: str | None = None, change_seq: int | None = None
    ) -> None:
        if self.latest is self.orig_token:  # nlpaug's latest entry is a copy: the original stays as it was
            self.latest = LeanToken(self.orig_token.token, self.orig_token.start_pos, "original", 0)
        self.changes = max(self.changes, 1)
        if token:
            self.latest.token = token
        if action:
            self.latest.action = action
        if change_seq:
            self.latest.change_seq = change_seq

    def size(self) -> int:
        return self.changes

    def is_changed(self) -> bool:
        return self.changes > 0

    def get_latest_token(self) -> LeanToken:
        return self.latest

    def to_changed_dict(self) -> dict[str, Any]:
        return {
            "orig_token": self.orig_token.token,
            "orig_start_pos": self.orig_token.start_pos,
            "new_token": self.latest.token,
            "new_start_pos": self.latest.start_pos,
            "change_seq": self.latest.change_seq,
            "action": self.latest.action,
        }


class LeanDoc:
    """nlpaug ``Doc``'s interface, as its augmenters use it."""

    def __init__(self, doc: str = "", tokens: list[str] | None = None) -> None:
        self.doc = doc
        self.tokens = [LeanChangeLog(LeanToken(t)) for t in tokens] if tokens else []
        self.changed_cnt = 0
        self._positions_known = False

    def add_token(self, idx: int, token: str, action: str, change_seq: int) -> None:
        self.tokens.insert(idx, LeanChangeLog(LeanToken(token, -1, action, change_seq)))

    def add_change_log(self, idx: int, new_token: str, action: str, change_seq: int) -> None:
        self.changed_cnt += 1
        self.tokens[idx].add(new_token, action, change_seq)

    def update_change_log(
        self, token_idx: int, change_idx=None, token=None, action=None, change_seq=None
    ) -> None:
        # nlpaug's callers always update the latest entry (change_idx None), the only one we keep.
        if change_idx is not None and change_idx != self.tokens[token_idx].size():
            raise NotImplementedError("LeanDoc keeps only the latest change of a token")
        self.tokens[token_idx].update(token, action, change_seq)

    def get_token(self, idx: int) -> LeanChangeLog:
        return self.tokens[idx]

    def get_original_tokens(self) -> list[str]:
        return [t.orig_token.token for t in self.tokens]

    def get_augmented_tokens(self) -> list[str]:
        return [t.latest.token for t in self.tokens if t.latest.token]

    def size(self) -> int:
        return len(self.tokens)

    def changed_count(self) -> int:
        return self.changed_cnt

    def _locate_original_tokens(self) -> None:
        """The start offsets nlpaug's ``Doc`` computes up front; only change logs need them."""
        start = 0
        for log in self.tokens:
            tok = log.orig_token
            if tok.start_pos == -1 and tok.action == "":
                tok.start_pos = start + self.doc[start:].find(tok.token)
                start += len(tok.token) + 1
        self._positions_known = True

    def get_change_logs(self, start_pos: int = 0) -> list[dict[str, Any]]:
        if not self._positions_known:
            self._locate_original_tokens()
        for log in self.tokens:
            log.latest.start_pos = start_pos
            start_pos += len(log.latest.token)
            if log.latest.token:
                start_pos += 1
        changed = sorted((t for t in self.tokens if t.is_changed()), key=lambda t: t.latest.change_seq)
        return [c.to_changed_dict() for c in changed]


_ACTIONS = ("insert", "substitute", "swap", "delete", "crop", "split")


def with_lean_doc(cls: type) -> type:
    """Give ``cls`` its own copies of the inherited action methods, building ``LeanDoc`` instead of ``Doc``."""
    for name in _ACTIONS:
        method = getattr(cls, name, None)
        if not isinstance(method, types.FunctionType) or "Doc" not in method.__globals__:
            continue
        scope = dict(method.__globals__, Doc=LeanDoc)
        lean = types.FunctionType(
            method.__code__, scope, method.__name__, method.__defaults__, method.__closure__
        )
        lean.__qualname__, lean.__doc__ = method.__qualname__, method.__doc__
        setattr(cls, name, lean)
    return cls
