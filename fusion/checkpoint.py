"""Checkpoint I/O: read and write HF model directories of safetensors weights, tensor by tensor.

Reading. :class:`SafetensorsFile` validates a file with ``safetensors.safe_open`` (the reference
parser: header, dtypes, offsets that tile the data) and then reads tensors -- or row ranges of them --
with ``os.preadv`` into fresh buffers. It deliberately does not keep ``safe_open``'s memory map
open: the pages of a mapped file that has been read stay resident in the process, so merging 8
contributions through open maps would show (and, under pressure, hold) 8 models' worth of memory.
Nothing here ever unpickles (no ``torch.load``): a worker's bytes are only ever parsed as safetensors.

:class:`CheckpointReader` is a model directory (``model.safetensors`` or shards plus
``model.safetensors.index.json``) seen as one name -> tensor mapping.

Writing. :class:`SafetensorsWriter` writes the header first (names, dtypes and shapes are known up
front: a merge's output has the base's layout) and then each tensor at its offset as soon as it is
computed, so the writer's buffer is one tensor (or one chunk of rows). :class:`ModelDirWriter`
builds a whole model directory in a temporary sibling directory, copies the base's non-weight files
(config, tokenizer, generation config), fsyncs everything and renames it into place: a crash leaves
either no output or a complete one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from coldswarm.common.durable import fsync_dir
from coldswarm.common.manifest import MANIFEST_NAME

from .errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files of a base directory that a model written from it (a merge; the coordinator's collected pretrain
# state) must not inherit: the weights (rewritten) and pickled weights or the base's own manifest (which
# describes the base, not the new model). ModelDirWriter is the one place this is decided.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
_SKIP_FILES = {INDEX_FILE, "pytorch_model.bin.index.json", MANIFEST_NAME}

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}

if sys.byteorder != "little":  # safetensors is little-endian; so is every machine torch ships for
    raise ImportError(
        "coldswarm.fusion reads safetensors with native byte order and needs a little-endian host"
    )


def dtype_from_name(name: str) -> torch.dtype:
    """A torch dtype from a safetensors dtype string ('F32') or a torch name ('float32', 'bf16')."""
    if name in DTYPES:
        return DTYPES[name]
    aliases = {
        "fp32": "float32",
        "fp16": "float16",
        "bf16": "bfloat16",
        "half": "float16",
        "float": "float32",
    }
    attr = aliases.get(name, name)
    dt = getattr(torch, attr, None)
    if isinstance(dt, torch.dtype) and dt in DTYPE_NAMES:
        return dt
    raise CheckpointError(
        f"unknown dtype {name!r}; use one of {sorted(DTYPES)} or a torch name like 'bfloat16'"
    )


def read_header(path: str | os.PathLike) -> tuple[dict, int]:
    """The parsed safetensors JSON header of ``path`` and the byte offset where its data starts."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: too short to be a safetensors file")
            n = int.from_bytes(raw, "little")
            size = os.fstat(f.fileno()).st_size
            if n > size - 8 or n > 100 * 2**20:
                raise CheckpointError(
                    f"{path}: not a safetensors file (header length {n} for a {size}-byte file)"
                )
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read a safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    return header, 8 + n


def _preadv_exact(fd: int, buf: torch.Tensor, offset: int, path: str | os.PathLike) -> None:
    view = memoryview(buf.numpy()).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise CheckpointError(f"{path}: unexpected end of file at byte {offset + done}")
        done += n


class SafetensorsFile:
    """One safetensors file: names, shapes, dtypes, metadata, and reads of whole tensors or row ranges."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            # safe_open is the reference validator (offsets tile the data, dtypes known, sizes match).
            with safe_open(str(self.path), framework="pt") as f:
                self.metadata: dict[str, str] = dict(f.metadata() or {})
        except Exception as e:  # safetensors raises its own SafetensorError / OSError
            raise CheckpointError(f"{self.path}: not a valid safetensors file: {e}") from e
        header, self._data_start = read_header(self.path)
        header.pop("__metadata__", None)
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            if info["dtype"] not in DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            start, end = info["data_offsets"]
            self._entries[name] = (DTYPES[info["dtype"]], tuple(info["shape"]), start, end)
        self._fd: int | None = os.open(self.path, os.O_RDONLY)

    _fd: int | None = None  # set last in __init__; close() must work on a half-built object

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        self.close()

    def names(self) -> list[str]:
        """Tensor names in file (offset) order."""
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def _entry(self, name: str):
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name)[0]

    def nbytes(self, name: str) -> int:
        _, _, start, end = self._entry(name)
        return end - start

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole tensor (a fresh copy), optionally converted to ``dtype``."""
        shape = self.shape(name)
        return self.get_rows(name, 0, shape[0] if shape else 1, dtype=dtype).reshape(shape)

    def get_rows(
        self,
        name: str,
        start: int,
        stop: int,
        dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rows ``start:stop`` of the tensor's first dimension (a 0-d tensor has one row).

        ``out``: a contiguous tensor of the rows' shape to fill (its dtype wins over ``dtype``);
        reading into a reused buffer saves the page faults of a fresh allocation per read.
        """
        if self._fd is None:
            raise CheckpointError(f"{self.path}: read after close")
        dt, shape, begin, end = self._entry(name)
        rows = shape[0] if shape else 1
        if not 0 <= start <= stop <= rows:
            raise IndexError(f"{name}: rows {start}:{stop} out of range for shape {shape}")
        row_bytes = (end - begin) // rows if rows else 0
        want = (stop - start, *shape[1:]) if shape else ()
        if out is not None:
            if tuple(out.shape) != want or not out.is_contiguous():
                raise ValueError(f"{name}: out has shape {tuple(out.shape)}, rows {start}:{stop} need {want}")
            if out.dtype == dt:
                raw = out.reshape(-1).view(torch.uint8)
                if raw.numel():
                    _preadv_exact(self._fd, raw, self._data_start + begin + start * row_bytes, self.path)
                return out
            return out.copy_(self.get_rows(name, start, stop))
        buf = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
        if buf.numel():
            _preadv_exact(self._fd, buf, self._data_start + begin + start * row_bytes, self.path)
        t = buf.view(dt).reshape(want)
        return t if dtype is None or dtype == dt else t.to(dtype)


class CheckpointReader:
    """A HF model directory (or a single .safetensors file) as one name -> tensor mapping.

    >>> with CheckpointReader("versions/3") as base:
    ...     for name in base.names():
    ...         w = base.get(name, torch.float32)
    """

    def __init__(self, model_dir: str | os.PathLike):
        path = Path(model_dir)
        self.model_dir = path if path.is_dir() else path.parent
        self.index: dict | None = None
        if path.is_file():
            files = [path.name]
        elif (path / INDEX_FILE).is_file():
            try:
                self.index = json.loads((path / INDEX_FILE).read_text())
                weight_map: dict[str, str] = self.index["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{path / INDEX_FILE}: not a valid safetensors index: {e}") from e
            files = list(dict.fromkeys(weight_map.values()))
        elif (path / SINGLE_FILE).is_file():
            files = [SINGLE_FILE]
        elif path.is_dir():
            found = sorted(p.name for p in path.glob("*.safetensors"))
            if len(found) != 1:
                raise CheckpointError(
                    f"{path}: expected {SINGLE_FILE} or {INDEX_FILE} (found {found or 'no safetensors files'}); "
                    "save the model with save_pretrained(..., safe_serialization=True)"
                )
            files = found
        else:
            raise CheckpointError(f"{path}: no such model directory or file")
        self.files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, str] = {}
        try:
            for fname in files:
                f = SafetensorsFile(self.model_dir / fname)
                self.files[fname] = f
                for name in f.names():
                    if name in self._where:
                        raise CheckpointError(f"{path}: tensor {name!r} is stored in two shards")
                    self._where[name] = fname
        except Exception:
            self.close()
            raise
        if self.index is not None:
            missing = set(self.index["weight_map"]) - set(self._where)
            if missing:
                raise CheckpointError(
                    f"{path}: index names tensors missing from the shards: {sorted(missing)[:5]}"
                )

    def close(self) -> None:
        for f in getattr(self, "files", {}).values():
            f.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def metadata(self) -> dict[str, str]:
        """The first file's safetensors metadata (HF writes {'format': 'pt'})."""
        return next(iter(self.files.values())).metadata if self.files else {}

    def names(self) -> list[str]:
        """All tensor names, shard by shard in file order."""
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> SafetensorsFile:
        try:
            return self.files[self._where[name]]
        except KeyError:
            raise KeyError(f"{self.model_dir}: the base has no tensor named {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file_of(name).shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.file_of(name).dtype(name)

    def nbytes(self, name: str) -> int:
        return self.file_of(name).nbytes(name)

    def total_bytes(self) -> int:
        return sum(self.nbytes(n) for n in self.names())

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.file_of(name).get(name, dtype)

    def get_rows(
        self,
        name: str,
        start: int,
        stop: int,
        dtype: torch.dtype | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.file_of(name).get_rows(name, start, stop, dtype, out)

    def layout(self) -> dict[str, list[str]]:
        """{file name: [tensor names]} -- what a writer needs to mirror this checkpoint's sharding."""
        out: dict[str, list[str]] = {}
        for name, fname in self._where.items():
            out.setdefault(fname, []).append(name)
        return out


# ---------------------------------------------------------------------------------------------
# writing


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


class SafetensorsWriter:
    """Writes one safetensors file whose tensors are declared up front and written in any order.

    ``specs`` maps name -> (dtype, shape). The header is written at once; ``write`` puts a tensor (or
    ``write_rows`` a row range of it) at its offset. ``close`` checks every byte was written and
    fsyncs. The caller handles atomicity (write into a temp path, rename after close).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: Mapping[str, str] | None = None,
    ):
        self.path = Path(path)
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        self._layout: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        offset = 0
        for name, (dt, shape) in specs.items():
            if dt not in DTYPE_NAMES:
                raise CheckpointError(f"{name}: dtype {dt} cannot be stored in safetensors")
            n = math.prod(shape) * torch.empty((), dtype=dt).element_size()
            header[name] = {
                "dtype": DTYPE_NAMES[dt],
                "shape": list(shape),
                "data_offsets": [offset, offset + n],
            }
            self._layout[name] = (dt, tuple(shape), offset, offset + n)
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8-byte alignment with spaces
        self._data_start = 8 + len(raw)
        self._remaining = {name: e - s for name, (_, _, s, e) in self._layout.items()}
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(self._fd, self._data_start + offset)
        os.pwrite(self._fd, len(raw).to_bytes(8, "little") + raw, 0)

    def _pwrite(self, data: memoryview, offset: int) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], offset + done)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        dt, shape, _, _ = self._spec(name)
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"{self.path}: {name!r} declared with shape {shape}, got {tuple(tensor.shape)}"
            )
        self.write_rows(name, 0, tensor.reshape(-1) if not shape else tensor)

    def write_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        """Write ``rows`` as rows ``start:start+len(rows)`` of tensor ``name`` (converted to its dtype)."""
        dt, shape, begin, end = self._spec(name)
        n_rows = shape[0] if shape else 1
        row_bytes = (end - begin) // n_rows if n_rows else 0
        data = _tensor_bytes(rows.to(dt))
        if len(data) % max(row_bytes, 1) or start * row_bytes + len(data) > end - begin:
            raise CheckpointError(f"{self.path}: rows {start}.. of {name!r} do not fit its shape {shape}")
        self._pwrite(data, self._data_start + begin + start * row_bytes)
        self._remaining[name] -= len(data)

    def _spec(self, name: str):
        try:
            return self._layout[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: {name!r} was not declared to this writer") from None

    def close(self) -> None:
        if self._fd is None:
            return
        try:
            short = {n: r for n, r in self._remaining.items() if r != 0}
            if short:
                raise CheckpointError(f"{self.path}: tensors not (fully) written: {sorted(short)[:5]}")
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _copy_non_weight_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for entry in sorted(src.iterdir()):
        if entry.name in _SKIP_FILES or entry.name.endswith(_WEIGHT_SUFFIXES) or entry.name.startswith("."):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dst / entry.name)
        elif entry.is_file():
            shutil.copy2(entry, dst / entry.name)
            with open(dst / entry.name, "rb") as f:
                os.fsync(f.fileno())
        copied.append(entry.name)
    return copied


class ModelDirWriter:
    """Builds a HF model directory atomically, streaming tensors into (possibly sharded) safetensors.

    ``layout`` is {file name: {tensor name: (dtype, shape)}} (one file -> ``model.safetensors``; more
    -> shards plus ``model.safetensors.index.json``). ``base_dir``'s non-weight files are copied in.
    Use as a context manager: the directory appears at ``out_dir`` only when the block exits without
    an exception (then ``commit`` has run); otherwise the temporary directory is removed.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        layout: Mapping[str, Mapping[str, tuple[torch.dtype, tuple[int, ...]]]],
        base_dir: str | os.PathLike | None = None,
        metadata: Mapping[str, str] | None = None,
        overwrite: bool = False,
    ):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise CheckpointError(
                f"{self.out_dir} already exists; remove it or choose another output directory"
            )
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = Path(
            tempfile.mkdtemp(prefix=f".{self.out_dir.name}.", suffix=".tmp", dir=self.out_dir.parent)
        )
        self.overwrite = overwrite
        self._writers: dict[str, SafetensorsWriter] = {}
        self._file_of: dict[str, str] = {}
        self._committed = False
        try:
            if base_dir is not None:
                _copy_non_weight_files(Path(base_dir), self.tmp_dir)
            for fname, specs in layout.items():
                self._writers[fname] = SafetensorsWriter(self.tmp_dir / fname, specs, metadata)
                for name in specs:
                    self._file_of[name] = fname
            self._index = None
            if len(layout) > 1:
                total = sum(
                    math.prod(shape) * torch.empty((), dtype=dt).element_size()
                    for specs in layout.values()
                    for dt, shape in specs.values()
                )
                self._index = {"metadata": {"total_size": total}, "weight_map": dict(self._file_of)}
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._writers[self._file_of[name]].write(name, tensor)

    def write_rows(self, name: str, start: int, rows: torch.Tensor) -> None:
        self._writers[self._file_of[name]].write_rows(name, start, rows)

    def commit(self) -> Path:
        """Close and fsync every file, then rename the temporary directory to ``out_dir``."""
        for w in self._writers.values():
            w.close()
        if self._index is not None:
            (self.tmp_dir / INDEX_FILE).write_text(json.dumps(self._index, indent=2, sort_keys=True))
            with open(self.tmp_dir / INDEX_FILE, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(self.tmp_dir)
        if self.out_dir.exists():
            if not self.overwrite:
                raise CheckpointError(f"{self.out_dir} appeared while writing; not replacing it")
            old = self.out_dir.with_name(f".{self.out_dir.name}.old-{os.getpid()}")
            os.rename(self.out_dir, old)
            os.rename(self.tmp_dir, self.out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(self.tmp_dir, self.out_dir)
        fsync_dir(self.out_dir.parent)
        self._committed = True
        return self.out_dir

    def abort(self) -> None:
        for w in self._writers.values():
            w.abort()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> ModelDirWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._committed:
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        elif exc_type is not None:
            self.abort()


def shard_layout(
    specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], max_shard_bytes: int | None = None
) -> dict[str, dict[str, tuple[torch.dtype, tuple[int, ...]]]]:
    """Split tensor specs into HF-named shards of at most ``max_shard_bytes`` (one file when None)."""
    if not max_shard_bytes:
        return {SINGLE_FILE: dict(specs)}
    shards: list[dict] = [{}]
    size = 0
    for name, (dt, shape) in specs.items():
        n = math.prod(shape) * torch.empty((), dtype=dt).element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = (dt, shape)
        size += n
    if len(shards) == 1:
        return {SINGLE_FILE: shards[0]}
    k = len(shards)
    return {f"model-{i + 1:05d}-of-{k:05d}.safetensors": s for i, s in enumerate(shards)}


def write_model_dir(
    out_dir: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    base_dir: str | os.PathLike | None = None,
    metadata: Mapping[str, str] | None = None,
    max_shard_bytes: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a whole model directory atomically from in-memory tensors (small models, tests, tools).

    For large models stream with :class:`ModelDirWriter` instead, as ``merge_checkpoints`` does.
    """
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    specs = {name: (t.dtype, tuple(t.shape)) for name, t in items}
    meta = {"format": "pt", **(metadata or {})}
    with ModelDirWriter(out_dir, shard_layout(specs, max_shard_bytes), base_dir, meta, overwrite) as w:
        for name, t in items:
            w.write(name, t)
    return Path(out_dir)
