"""The file formats the repository reads and writes: safetensors both ways, atomic writes.

- `load_safetensors` / `write_safetensors`: the safetensors format (a u64 little-endian header
  size N, N bytes of JSON {name: {dtype, shape, data_offsets}}, then the raw little-endian tensor
  bytes), with json, struct and numpy; the reader checks the header as the reference
  `safetensors` library does.
- `atomic_write`: a file is always its old content or the whole new one (runs, benchmarks,
  reports).
Not here: the PEFT adapter folder and the checkpoints of runs (rundir.py).
"""
import contextlib
import json
import math
import os
import struct
from pathlib import Path

import numpy as np
import torch


# --------------------------------------------------------------------------------------------------
# safetensors

SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}  # the format's dtype names


def load_safetensors(path):
    """Read a .safetensors file: u64 little-endian header size N, N bytes of JSON {name: {dtype,
    shape, data_offsets: [begin, end]}} (offsets relative to the end of the header), then the raw
    little-endian bytes. numpy reads the bytes as integers of the element size; torch reinterprets
    them (BF16 stays BF16).

    The header is checked before any tensor is read, as the reference `safetensors` library checks
    it: N within the file, a JSON object, then safetensors_layout. A violation raises ValueError
    naming the file and the tensor."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else None
        if n is None or not 2 <= n <= min(size - 8, 100_000_000):
            raise ValueError(f"{path}: not a safetensors file (header size {n} in a file of {size} "
                             f"bytes); the file is truncated or of another format")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: the safetensors header is not valid JSON ({e}); the file is "
                             f"corrupt") from None
        out = {}
        for name, (dtype, shape, begin, end) in (
                safetensors_layout(path, header, size - 8 - n).items()):
            f.seek(8 + n + begin)
            buf = bytearray(f.read(end - begin))  # a writable copy of the bytes
            itemsize = torch.empty((), dtype=dtype).element_size()
            # (numel,) raw ints, then reinterpret, e.g. int16 -> bf16
            a = np.frombuffer(buf, dtype=f"<i{itemsize}").astype(f"=i{itemsize}", copy=False)
            out[name] = torch.from_numpy(a).view(dtype).reshape(shape)
    return out


def safetensors_layout(path, header, data_size):
    """{name: (torch dtype, shape, begin, end)} of a parsed safetensors header, validated as the
    format requires: __metadata__ a {str: str} map; each tensor a known dtype, a shape and [begin,
    end] offsets of non-negative integers, end - begin = numel × itemsize; sorted by offset, the
    tensors start at 0, neither overlap nor leave gaps, and end exactly at the end of the data
    section (data_size bytes). Raises ValueError naming the file and the tensor."""
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is a JSON {type(header).__name__}, not "
                         f"an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: __metadata__ must map strings to strings, found "
                         f"{metadata!r:.80}")

    # a list of non-negative ints (no bools, no floats), of the given length
    def naturals(v, length=None):
        return (isinstance(v, list) and length in (None, len(v))
                and all(type(x) is int and x >= 0 for x in v))

    layout = {}
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise ValueError(f"{where} needs dtype, shape and data_offsets, found {info!r:.80}")
        if not isinstance(info["dtype"], str) or info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{where} has unsupported dtype {info['dtype']}")
        shape, offsets = info["shape"], info["data_offsets"]
        if not (naturals(shape) and naturals(offsets, 2) and offsets[0] <= offsets[1]):
            raise ValueError(f"{where}: shape {shape} and data_offsets {offsets} must be lists of "
                             f"non-negative integers, the offsets [begin, end] with begin <= end")
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if offsets[1] - offsets[0] != nbytes:
            raise ValueError(f"{where} has {offsets[1] - offsets[0]} bytes, shape {shape} needs "
                             f"{nbytes}")
        layout[name] = (dtype, shape, *offsets)
    position = 0
    for name, (_, _, begin, end) in sorted(layout.items(), key=lambda item: item[1][2:]):
        if begin != position:
            raise ValueError(f"{path}: tensor {name!r} starts at byte {begin} of the data, the "
                             f"previous tensor ends at {position} "
                             f"({'they overlap' if begin < position else 'a gap'}); the file is "
                             f"corrupt")
        position = end
    if position != data_size:
        raise ValueError(f"{path}: the tensors cover {position} bytes, the data section has "
                         f"{data_size}; the file is "
                         f"{'truncated' if position > data_size else 'corrupt (trailing bytes)'}")
    return layout


def write_safetensors(tensors, path, metadata=None):
    """Write {name: tensor} to `path` in the safetensors format, atomically (atomic_write).

    The header maps each name to {"dtype", "shape", "data_offsets": [start, end)} in the byte
    buffer that follows it; the optional "__metadata__" entry maps strings to strings. Tensors are
    written row-major in the machine's byte order; the format asks for little-endian, which x86-64
    and ARM64 are.
    """
    metadata = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError(f"write_safetensors: metadata must map strings to strings, got "
                         f"{metadata!r}")
    names = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
    header = {"__metadata__": metadata} if metadata else {}
    chunks, offset = [], 0
    for key, t in tensors.items():
        if t.dtype not in names:
            raise ValueError(f"write_safetensors: {key!r} has dtype {t.dtype}, not one of "
                             f"{list(names)}")
        # own, compact, row-major storage
        t = t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()  # the raw bytes, in one copy
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # pad the header to 8 bytes, as the reference writer does

    def write(f):
        f.write(struct.pack("<Q", len(blob)) + blob)
        for data in chunks:
            f.write(data)

    atomic_write(path, write)


# --------------------------------------------------------------------------------------------------
# atomic writes


def atomic_write(path, data):
    """Write `data` to `path` so that `path` is always either its old content or the whole new one.

    data: bytes, a str (written as UTF-8) or a callable that writes into the binary file object it
    is given, e.g. `lambda f: torch.save(obj, f)`. The bytes go to a new temporary file beside
    `path`, named from the process id and os.urandom and created with O_EXCL (two writers never
    share one), which is flushed, fsync'ed and os.replace'd over `path`. On any exception the
    temporary file is removed and the exception re-raised; a previous `path` is untouched.
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    if not (callable(data) or isinstance(data, (bytes, bytearray, memoryview))):
        raise TypeError(f"atomic_write: data must be bytes, str or a callable taking a file, got "
                        f"{type(data).__name__}")
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{os.urandom(8).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with open(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
