"""Content-addressed image store: each distinct image is stored once, named by the hash of its bytes."""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass

import pyarrow as pa
from fsspec.core import url_to_fs
from PIL import Image, UnidentifiedImageError

from polite.shards import write_bytes_atomic

IMAGE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("path", pa.string()),
        ("format", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("n_bytes", pa.int64()),
    ]
)

_EXT = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}


class BadImageError(ValueError):
    """The bytes are missing, empty, truncated or not an image: the sample fails, the run goes on."""


def to_rgb(image):
    """``image`` in RGB. 16-bit grayscale (modes ``I;16*``, and ``I`` as older Pillow opens such PNGs) keeps its
    top 8 bits: a plain RGB conversion clips every value above 255 to white."""
    if image.mode == "I" or image.mode.startswith("I;16"):
        import numpy as np

        levels = np.asarray(image).astype(np.int64) >> 8
        image = Image.fromarray(levels.clip(0, 255).astype(np.uint8))  # mode L
    return image.convert("RGB")


@dataclass(frozen=True, slots=True)
class StoredImage:
    image_id: str
    path: str
    format: str
    width: int
    height: int
    n_bytes: int

    def to_row(self) -> dict:
        return {
            "image_id": self.image_id,
            "path": self.path,
            "format": self.format,
            "width": self.width,
            "height": self.height,
            "n_bytes": self.n_bytes,
        }


def decode_check(data: bytes | None) -> Image.Image:
    """Fully decode ``data`` (so a truncated file fails here, not in the GPU worker) and return the image."""
    if data is None:
        raise BadImageError("image missing (null)")
    if len(data) == 0:
        raise BadImageError("image file is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Image.DecompressionBombError as exc:
        # not an OSError: a few corrupt header bytes claiming a huge size would crash the whole shard
        raise BadImageError(f"image too large to decode: {exc}") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        # PIL names the buffer by its address ("<_io.BytesIO object at 0x7f...>"): the same bad row would get
        # another error text on every ingest
        reason = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))
        raise BadImageError(f"image cannot be decoded: {reason}") from exc
    if image.width == 0 or image.height == 0:
        raise BadImageError("image has zero width or height")
    return image


class ImageStore:
    """Images under ``<root>/<first 2 hex of the hash>/<id>.<ext>``; writes are atomic and idempotent."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self._known: set[str] = set()

    def path_for(self, image_id: str, ext: str) -> str:
        # ids are "i_<hex>": fan out on the hex, not the constant prefix, to keep folders small.
        return f"{self.root}/{image_id[2:4]}/{image_id}.{ext}"

    def put(self, data: bytes | None) -> StoredImage:
        image = decode_check(data)
        assert data is not None
        image_id = "i_" + hashlib.blake2b(data, digest_size=16).hexdigest()
        fmt = image.format or "PNG"
        path = self.path_for(image_id, _EXT.get(fmt, "bin"))
        if image_id not in self._known:
            fs, local = url_to_fs(path)
            if not fs.exists(local):
                write_bytes_atomic(data, path)
            self._known.add(image_id)
        return StoredImage(image_id, path, fmt, image.width, image.height, len(data))

    def open(self, path: str) -> Image.Image:
        fs, local = url_to_fs(path)
        with fs.open(local, "rb") as handle:
            return to_rgb(Image.open(io.BytesIO(handle.read())))
