"""Core utilities: the image store, atomic shard writes, stable ids, runtime environment, workspace paths."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from polite.images import BadImageError, ImageStore


def _bmp_claiming(width: int, height: int) -> bytes:
    """A tiny BMP whose header claims ``width`` x ``height``: a few corrupt header bytes, nothing more."""
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "BMP")
    data = bytearray(buf.getvalue())
    data[18:22] = width.to_bytes(4, "little")
    data[22:26] = height.to_bytes(4, "little")
    return bytes(data)


def test_an_image_whose_header_claims_a_huge_size_fails_the_sample_not_the_run(tmp_path):
    store = ImageStore(str(tmp_path / "images"))
    with pytest.raises(BadImageError, match="too large"):
        store.put(_bmp_claiming(30000, 30000))
    assert not (tmp_path / "images").exists()
