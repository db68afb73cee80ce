"""How images sit in a dataset table, and how a backbone turns them back into pixels.

An image dataset's ``image`` column is an Arrow struct with the raw pixels and their shape:

    image: struct<height: int32, width: int32, channels: int32, pixels: binary>

``pixels`` are uint8, row-major ``[height, width, channels]`` (channels 1 = grayscale, 3 = RGB), with
no compression, so the bytes hashed into the dataset fingerprint are the pixels themselves.
``table.column("image").to_pylist()`` gives one dict per image with those four keys; that list is
what image backbones' ``encode`` takes (they also accept ``[H, W]`` / ``[H, W, C]`` uint8 arrays).

Light on purpose (numpy and pyarrow; Pillow only to decode image files): the driver and the dataset
loader import it.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from unipt.pipeline.errors import UniptError

IMAGE_COLUMN = "image"
IMAGE_TYPE = pa.struct(
    [
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("channels", pa.int32(), nullable=False),
        pa.field("pixels", pa.binary(), nullable=False),
    ]
)
_CHANNELS = (1, 3)


def make_image(pixels: np.ndarray) -> dict[str, Any]:
    """The column value for a uint8 ``[H, W]`` or ``[H, W, C]`` array."""
    array = np.asarray(pixels)
    if array.dtype != np.uint8:
        raise UniptError(f"image pixels must be uint8 (0-255), got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in _CHANNELS or 0 in array.shape:
        raise UniptError(f"an image must be [H, W] or [H, W, 1|3] uint8 pixels, got shape {array.shape}")
    height, width, channels = array.shape
    return {
        "height": int(height),
        "width": int(width),
        "channels": int(channels),
        "pixels": np.ascontiguousarray(array).tobytes(),
    }


def image_array(image: Any) -> np.ndarray:
    """uint8 ``[H, W, C]`` pixels of one column value (a dict as above) or of an array."""
    if isinstance(image, dict):
        try:
            shape = (int(image["height"]), int(image["width"]), int(image["channels"]))
            pixels = image["pixels"]
        except (KeyError, TypeError, ValueError) as exc:
            raise UniptError(
                "an image must be a dict with height, width, channels and pixels (the dataset's image column)"
            ) from exc
        if not isinstance(pixels, (bytes, bytearray, memoryview)) or len(pixels) != int(np.prod(shape)):
            raise UniptError(f"image pixels do not match its shape {list(shape)} (uint8, H*W*C bytes)")
        return np.frombuffer(pixels, dtype=np.uint8).reshape(shape)
    if isinstance(image, np.ndarray):
        value = make_image(image)
        return np.frombuffer(value["pixels"], dtype=np.uint8).reshape(
            value["height"], value["width"], value["channels"]
        )
    if isinstance(image, str):
        raise UniptError(
            "this backbone takes images, but got text; use an image dataset (e.g. bundled:mnist_5k)"
        )
    raise UniptError(
        f"cannot read an image from a {type(image).__name__}; expected the dataset's image column"
    )


def load_image(value: Any, base_dir: Path, row: int) -> dict[str, Any]:
    """The column value for one cell of a data file's image column.

    A cell is a path to a PNG/JPEG/... file (relative to the data file's folder, or absolute) or the
    encoded file's bytes (Parquet). Decoded with Pillow to grayscale or RGB uint8 pixels.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, str) and value.strip():
        path = Path(value).expanduser()
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file():
            raise UniptError(f"row {row}: image file {path} not found; fix the path or drop the row")
        source: Any = path
    elif isinstance(value, (bytes, bytearray)) and value:
        source = io.BytesIO(value)
    else:
        raise UniptError(
            f"row {row}: image is {value!r:.40}, not a file path or image bytes; fill or drop it"
        )
    try:
        with Image.open(source) as image:
            image = image.convert("L" if image.mode in ("1", "L", "I;16", "I", "F") else "RGB")
            return make_image(np.asarray(image, dtype=np.uint8))
    except (UnidentifiedImageError, OSError) as exc:
        raise UniptError(f"row {row}: cannot decode the image ({exc}); re-save it as PNG or JPEG") from exc


def image_digest(image: dict[str, Any]) -> str:
    """sha256 of an image's shape and pixels (what the dataset fingerprint and content ids cover)."""
    digest = hashlib.sha256(f"{image['height']}x{image['width']}x{image['channels']}\x1f".encode("ascii"))
    digest.update(image["pixels"])
    return digest.hexdigest()
