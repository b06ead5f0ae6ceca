"""Stable ids: the column-wise hasher gives exactly the ids of ``stable_hash``, so workspaces made before it
resume with the same rewrite ids."""

from __future__ import annotations

import pytest

from polite.ids import stable_hash, stable_hashes


def test_stable_hashes_equals_stable_hash_row_by_row():
    awkward = [
        "s_00ab",
        "",
        'quote " and \\ backslash',
        "tab\tnewline\n\x00",
        "é ü 中 😀",
        "{braces} {0}",
        "\u2028",
    ]
    attempts = [1, 2, -3, 0, 10**20, 7, 1]
    got = stable_hashes("rewrite", awkward, "m_{x}", "pf-v1", "h", attempts)
    assert got == [
        stable_hash("rewrite", s, "m_{x}", "pf-v1", "h", a) for s, a in zip(awkward, attempts, strict=True)
    ]
    assert stable_hashes("x", 3, length=8) == [stable_hash("x", 3, length=8)]
    assert stable_hashes("x", [], ["a"][:0]) == []


def test_stable_hashes_refuses_what_json_would_spell_differently():
    with pytest.raises(TypeError, match="strings and ints"):
        stable_hashes("rewrite", ["s_1"], [True])
    with pytest.raises(TypeError, match="strings and ints"):
        stable_hashes("rewrite", [1.5])
    with pytest.raises(ValueError, match="argument 2 is shorter than argument 1"):  # columns of different lengths
        stable_hashes(["a", "b"], [1])


def test_stable_hash_of_a_set_is_the_same_in_every_process():
    """A set's iteration order follows ``PYTHONHASHSEED``: its id may not."""
    import os
    import subprocess
    import sys

    code = (
        "from polite.ids import stable_hash; print(stable_hash({'k': {'alpha', 'beta', 'gamma', 'delta'}}))"
    )
    got = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2", "3", "4")
    }
    assert len(got) == 1
    assert stable_hash(frozenset({"b", "a"})) == stable_hash({"a", "b"})


def test_ids_are_pinned_across_versions():
    """Resume matches ids made by earlier versions: a change to the hash (algorithm, digest size, encoding)
    that both hashers share would keep them equal to each other yet orphan every id already in a lineage."""
    from polite.ids import sample_id

    # blake2b-256 of the compact JSON '["rewrite","s_00ab","m_{x}","pf-v1","h",1]', first 16 hex digits
    assert stable_hash("rewrite", "s_00ab", "m_{x}", "pf-v1", "h", 1) == "6041ce14f15586f2"
    assert stable_hashes("rewrite", ["s_00ab"], "m_{x}", "pf-v1", "h", [1]) == ["6041ce14f15586f2"]
    assert sample_id("vqav2", "train", 262148000) == "s_e409d9f860c3624d"
