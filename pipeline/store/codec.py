"""How one clip's target and frames are stored as bytes."""

from __future__ import annotations

import io

import numpy as np

from pipeline.store.schema import FRAME_ENCODINGS, TARGET_DTYPES, StoreError


def encode_target(target: np.ndarray, dtype: str) -> np.ndarray:
    """float array -> stored array: float16, or bfloat16 as its uint16 bit pattern (npy/zarr lack bf16)."""
    if dtype == "float16":
        return np.asarray(target, dtype=np.float32).astype(np.float16)
    if dtype == "bfloat16":
        bits = np.ascontiguousarray(target, dtype=np.float32).view(np.uint32)
        # round to nearest even, as torch does when casting to bfloat16
        rounded = bits + (0x7FFF + ((bits >> 16) & 1))
        return (rounded >> 16).astype(np.uint16)
    raise StoreError(f"unknown target dtype {dtype!r} (known: {', '.join(TARGET_DTYPES)})")


def decode_target(array: np.ndarray, dtype: str) -> np.ndarray:
    """Stored target array -> float32."""
    array = np.asarray(array)
    if dtype == "float16":
        return array.astype(np.float32)
    if dtype == "bfloat16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    raise StoreError(f"unknown target dtype {dtype!r} (known: {', '.join(TARGET_DTYPES)})")


def encode_frame(frame: np.ndarray, encoding: str, quality: int = 90) -> bytes:
    if encoding == "npy":
        return npy_bytes(np.asarray(frame, dtype=np.uint8))
    from PIL import Image

    buf = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(frame, dtype=np.uint8), "RGB")
    if encoding == "jpg":
        image.save(buf, format="JPEG", quality=quality)
    elif encoding == "png":
        image.save(buf, format="PNG", compress_level=1)
    else:
        raise StoreError(f"unknown frame encoding {encoding!r} (known: {', '.join(FRAME_ENCODINGS)})")
    return buf.getvalue()


def decode_frame(data: bytes, encoding: str) -> np.ndarray:
    """Encoded frame member -> uint8 [H, W, 3]."""
    if encoding == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def frame_column(i: int) -> str:
    """Name of frame i as a batch column and as the webdataset extension prefix: f00, f01, ..."""
    return f"f{i:02d}"


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()
