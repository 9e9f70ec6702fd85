"""Read and write idx files (the MNIST container format), gzipped or plain.

An idx file is: two zero bytes, one type byte, one byte giving the number of dimensions, then
one big-endian uint32 per dimension, then the array in C order, big-endian. Gzip is detected
from the file's first two bytes, not from its name, so a misnamed file still reads.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from dbmpi.data.schema import DataError

# type byte -> numpy dtype as stored (big-endian)
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_OF_KIND = {(d.kind, d.itemsize): code for code, d in IDX_DTYPES.items()}

# The four MNIST-style file stems; each may carry a .gz suffix.
IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(0)
        if head == b"\x1f\x8b":
            try:
                return gzip.GzipFile(fileobj=f).read()
            except (OSError, EOFError) as e:
                raise DataError(
                    f"{path}: gzip stream is corrupt ({e}); fetch the file again") from e
        return f.read()


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Return the array stored in an idx file (native byte order).

    Raises
    ------
    DataError
        If the header is not idx or the payload size does not match the header.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise DataError(f"{path}: not an idx file (bad magic {raw[:4]!r}); "
                        "expected MNIST idx format")
    dtype = IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: idx header truncated ({len(raw)} bytes); fetch the file again")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DataError(
            f"{path}: idx payload is {len(raw)} bytes, header {shape} implies {expected}; "
            "the file is truncated or corrupt, fetch it again"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> None:
    """Write ``array`` as an idx file; gzip it if ``compress`` (default: name ends in .gz).

    The write is atomic (``path.tmp`` then ``os.replace``).
    """
    path = Path(path)
    array = np.asarray(array)
    code = _CODE_OF_KIND.get((array.dtype.kind, array.dtype.itemsize))
    if code is None:
        raise TypeError(f"idx cannot store dtype {array.dtype}")
    if compress is None:
        compress = path.suffix == ".gz"
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    payload = np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    tmp = path.with_name(path.name + ".tmp")
    if compress:
        # mtime=0 keeps the bytes reproducible for a given array
        with (open(tmp, "wb") as raw,
              gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=4, mtime=0) as f):
            f.write(header)
            f.write(payload)
    else:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(payload)
    os.replace(tmp, path)


def find_idx(src: str | os.PathLike, split: str, kind: str) -> Path:
    """Locate ``<stem>`` or ``<stem>.gz``.

    ``split`` is in {train, test}, ``kind`` in {images, labels}.
    """
    stem = IDX_FILES[(split, kind)]
    for name in (stem, stem + ".gz"):
        p = Path(src) / name
        if p.is_file():
            return p
    raise DataError(
        f"{Path(src) / stem}[.gz]: not found; --src must hold the four MNIST-style idx files "
        f"({', '.join(IDX_FILES.values())}, each optionally .gz)"
    )


def read_idx_split(src: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray, list[Path]]:
    """Read images and labels of one split; check they agree in count. Returns (x, y, paths)."""
    ipath, lpath = find_idx(src, split, "images"), find_idx(src, split, "labels")
    x, y = read_idx(ipath), read_idx(lpath)
    if y.ndim != 1:
        raise DataError(f"{lpath}: labels must be 1-D, got shape {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"{ipath}: {x.shape[0]} images but {lpath.name} has {y.shape[0]} labels; "
            "the files come from different releases"
        )
    if y.dtype.kind not in "iu":
        raise DataError(f"{lpath}: labels have dtype {y.dtype}, expected an integer type")
    return x, y, [ipath, lpath]
