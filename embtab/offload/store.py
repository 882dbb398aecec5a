"""Backing stores: the whole table and its optimizer state, outside the fast memory.

A store holds ``rows x dim`` float32 weights and ``rows x state_width`` float32 optimizer state
(0 for SGD, 1 for row-wise Adagrad, ``dim`` for Adagrad). The cache (`embtab.offload.cache`) reads
the rows it admits and writes back the dirty rows it evicts; between those two moments the cached
copy is the only authoritative one.

- `RamStore`: host tensors (pinned when CUDA is present, so copies to the GPU are asynchronous).
- `MmapStore`: a memory-mapped file for tables larger than RAM, created, opened, flushed and
  closed explicitly. A 4 KiB header records the shape; `open` rejects a file that does not match
  the table; `create` never replaces an existing file unless told to (``overwrite=True``). Every
  read, write and flush first checks that the file is still the one mapped, whole: a file deleted,
  replaced or truncated under the store raises `StoreChangedError` instead of losing the writes
  (or of a SIGBUS on reading a truncated page). Opening drops the file's page cache (see `_drop_page_cache`), reads touch only the
  pages of the rows read (``MADV_RANDOM``: no read-ahead), and the mapping drops its resident
  pages every `resident_bytes` of traffic, so the process's RSS stays near the cache's size rather
  than growing towards the table's (the pages stay in the kernel's page cache and are re-read
  from there or from disk).
"""

from __future__ import annotations

import json
import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch

from embtab.checks import is_integer
from embtab.files import atomic_write

MAGIC = b"EMBTAB-ROW-STORE"
HEADER_BYTES = 4096
FORMAT_VERSION = 1
INIT_CHUNK_ROWS = 1 << 18


def default_init_bound(rows: int) -> float:
    """torchrec's default initialization range: U(-sqrt(1/rows), sqrt(1/rows))."""
    return (1.0 / rows) ** 0.5


class StoreChangedError(RuntimeError):
    """The file behind an `MmapStore` was deleted, replaced or truncated while it was open."""


class RowStore:
    """Common interface of the backing stores: gather and scatter whole rows with their state.

    Each row's weights and optimizer state lie next to each other (``rows x (dim + state_width)``),
    so moving a row touches one place in memory (or one page of the file).
    """

    name: str
    rows: int
    dim: int
    state_width: int
    data: torch.Tensor

    @property
    def weights(self) -> torch.Tensor:
        """``[rows, dim]`` view of the weights."""
        return self.data[:, : self.dim]

    @property
    def state(self) -> torch.Tensor:
        """``[rows, state_width]`` view of the optimizer state."""
        return self.data[:, self.dim :]

    @property
    def row_bytes(self) -> int:
        """Bytes one row moves (weights and optimizer state)."""
        return (self.dim + self.state_width) * 4

    @torch.no_grad()
    def read(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights ``[n, dim]`` and state ``[n, state_width]`` of `rows` (int64, on the CPU)."""
        both = self.data.index_select(0, rows)
        return both[:, : self.dim], both[:, self.dim :]

    @torch.no_grad()
    def write(self, rows: torch.Tensor, weights: torch.Tensor, state: torch.Tensor) -> None:
        """Overwrite `rows` with `weights` and `state` (CPU tensors)."""
        self.data.index_copy_(0, rows, torch.cat([weights, state], 1) if self.state_width else weights)

    def flush(self) -> None:
        """Make every write durable (a no-op in RAM)."""

    def close(self) -> None:
        """Release the store's memory or mapping."""

    def check_table(self, table: str, rows: int, dim: int, state_width: int) -> None:
        """Raise unless this store has the shape of `table` with `state_width` state floats per row."""
        if (self.rows, self.dim, self.state_width) != (rows, dim, state_width):
            raise ValueError(
                f"offloaded table {table!r}: the store {self.name!r} holds {self.rows} x {self.dim} "
                f"rows with {self.state_width} optimizer float(s) per row; expected {rows} x {dim} "
                f"with {state_width} (the table's cardinality, width and sparse optimizer)"
            )


class RamStore(RowStore):
    """The table in host memory (pinned when CUDA is available)."""

    def __init__(self, weights: torch.Tensor, state: torch.Tensor | None = None, name: str = "ram") -> None:
        if weights.ndim != 2 or weights.dtype != torch.float32:
            raise ValueError(f"store {name!r}: weights must be a float32 matrix, got {weights.dtype} {tuple(weights.shape)}")
        state = torch.zeros(weights.shape[0], 0) if state is None else state.reshape(weights.shape[0], -1)
        data = torch.cat([weights, state.to(torch.float32)], 1)
        self.data = data.pin_memory() if torch.cuda.is_available() else data
        self.name = name
        self.rows, self.dim = (int(s) for s in weights.shape)
        self.state_width = int(state.shape[1])

    @classmethod
    def create(cls, rows: int, dim: int, state_width: int, seed: int = 0, name: str = "ram") -> "RamStore":
        """A fresh table with torchrec's default init (seeded) and zero optimizer state."""
        weights = torch.cat([initial_rows(first, rows, dim, seed) for first in range(0, rows, INIT_CHUNK_ROWS)])
        return cls(weights, torch.zeros(rows, state_width), name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the weights and state (call the cache's `flush` first)."""
        return {"weights": self.weights.clone(), "state": self.state.clone()}

    def load_state_dict(self, saved: dict[str, torch.Tensor]) -> None:
        """Restore a `state_dict` of a store of the same shape."""
        self.check_table(self.name, *saved["weights"].shape, saved["state"].shape[1])
        self.weights.copy_(saved["weights"])
        self.state.copy_(saved["state"])


class MmapStore(RowStore):
    """The table in a memory-mapped file; use `create` or `open`, then `close` (or ``with``).

    Layout: a 4 KiB header (magic, JSON shape), then ``rows x (dim + state_width)`` float32.
    """

    def __init__(self, path: Path, meta: dict, resident_bytes: int, readers: int = 8) -> None:
        self.path, self.name = path, str(path)
        self.readers = readers
        self._pool = ThreadPoolExecutor(readers, thread_name_prefix="embtab-store")
        self.rows, self.dim, self.state_width = meta["rows"], meta["dim"], meta["state_width"]
        self.resident_bytes = resident_bytes
        self._touched = 0
        self._file = open(path, "r+b")
        self._identity = _file_identity(os.fstat(self._file.fileno()))
        _drop_page_cache(self._file.fileno())
        self._map = mmap.mmap(self._file.fileno(), 0)
        self._map.madvise(mmap.MADV_RANDOM)
        width = self.dim + self.state_width
        self.data = torch.frombuffer(self._map, dtype=torch.float32, count=self.rows * width, offset=HEADER_BYTES)
        self.data = self.data.view(self.rows, width)

    @staticmethod
    def file_bytes(rows: int, dim: int, state_width: int) -> int:
        return HEADER_BYTES + 4 * rows * (dim + state_width)

    @classmethod
    def create(
        cls,
        path: str | Path,
        rows: int,
        dim: int,
        state_width: int,
        seed: int = 0,
        resident_bytes: int = 256 << 20,
        overwrite: bool = False,
    ) -> "MmapStore":
        """Write a new store file (torchrec's default init, zero state) chunk by chunk and open it.

        An existing file (which may hold trained rows) is replaced only with ``overwrite=True``.
        The chunks go through ordinary file writes into a temporary file renamed into place when
        complete, never through the mapping, so creating a table larger than RAM needs only one
        chunk (`INIT_CHUNK_ROWS` rows) of memory, and a failed creation leaves no partial store.
        """
        path = Path(path)
        for name, value in (("rows", rows), ("dim", dim), ("state_width", state_width)):
            if not is_integer(value) or value < (0 if name == "state_width" else 1):
                raise ValueError(f"store file {str(path)!r}: {name} = {value!r}, expected a positive integer")
        if path.exists() and not overwrite:
            raise FileExistsError(
                f"store file {str(path)!r} already exists (it may hold trained rows); open it with "
                "MmapStore.open, or pass overwrite=True to replace it with a fresh table"
            )
        meta = {"version": FORMAT_VERSION, "rows": rows, "dim": dim, "state_width": state_width, "dtype": "float32"}

        def write(f) -> None:
            f.write(_header(meta))
            for first in range(0, rows, INIT_CHUNK_ROWS):
                weights = initial_rows(first, rows, dim, seed)
                f.write(torch.cat([weights, torch.zeros(len(weights), state_width)], 1).numpy())

        atomic_write(path, write)
        return cls(path, meta, resident_bytes)

    @classmethod
    def open(
        cls,
        path: str | Path,
        rows: int,
        dim: int,
        state_width: int,
        resident_bytes: int = 256 << 20,
    ) -> "MmapStore":
        """Open an existing store file, checking that it holds `rows` x `dim` with `state_width`."""
        path = Path(path)
        meta = _read_header(path)
        expected = {"version": FORMAT_VERSION, "rows": rows, "dim": dim, "state_width": state_width, "dtype": "float32"}
        if meta != expected:
            raise ValueError(
                f"store file {str(path)!r} holds {_describe(meta)}; expected {_describe(expected)} "
                "(create a store for this table with MmapStore.create)"
            )
        size = path.stat().st_size
        if size != cls.file_bytes(rows, dim, state_width):
            raise ValueError(
                f"store file {str(path)!r} is {size} bytes; expected {cls.file_bytes(rows, dim, state_width)} "
                f"for {_describe(meta)} (the file is truncated or was written by something else)"
            )
        return cls(path, meta, resident_bytes)

    @torch.no_grad()
    def read(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather `rows`, in `readers` slices at once: each missing page is a synchronous fault,
        so parallel slices keep several disk reads in flight."""
        self.check_file()
        out = torch.empty(rows.numel(), self.dim + self.state_width)
        slices = list(zip(rows.tensor_split(self.readers), out.tensor_split(self.readers)))
        list(self._pool.map(lambda part: torch.index_select(self.data, 0, part[0], out=part[1]), slices))
        self._count(rows.numel())
        return out[:, : self.dim], out[:, self.dim :]

    @torch.no_grad()
    def write(self, rows: torch.Tensor, weights: torch.Tensor, state: torch.Tensor) -> None:
        """Scatter `rows`, in `readers` slices at once (writing a row first faults its page in)."""
        self.check_file()
        both = torch.cat([weights, state], 1) if self.state_width else weights
        slices = list(zip(rows.tensor_split(self.readers), both.tensor_split(self.readers)))
        list(self._pool.map(lambda part: self.data.index_copy_(0, part[0], part[1]), slices))
        self._count(rows.numel())

    def _count(self, rows: int) -> None:
        """Drop the mapping's resident pages after `resident_bytes` of traffic (dirty pages stay
        in the page cache and reach the file; MADV_DONTNEED only unmaps them from this process)."""
        self._touched += rows * mmap.PAGESIZE
        if self._touched >= self.resident_bytes:
            self._map.madvise(mmap.MADV_DONTNEED)
            self._touched = 0

    def flush(self) -> None:
        """Write dirty pages to the file (msync)."""
        self.check_file()
        self._map.flush()

    def check_file(self) -> None:
        """Raise `StoreChangedError` if the file was deleted, replaced or truncated since it was
        opened: writes to it would be lost (or reads of a truncated part kill the process)."""
        expected = self.file_bytes(self.rows, self.dim, self.state_width)
        mapped = os.fstat(self._file.fileno())
        try:
            named = _file_identity(os.stat(self.path))
        except FileNotFoundError:
            named = None
        if named is not None and named != self._identity:
            problem = "was replaced by another file"
        elif mapped.st_nlink == 0 or named is None:
            problem = "was deleted"
        elif mapped.st_size < expected:
            problem = f"was truncated to {mapped.st_size} of {expected} bytes"
        else:
            return
        raise StoreChangedError(
            f"store file {str(self.path)!r} {problem} while the store was open; its rows can no "
            "longer be read or saved. Stop the run, restore the store file (or recreate it with "
            "MmapStore.create and resume from a checkpoint)"
        )

    def close(self) -> None:
        """Flush and unmap; the tensors of this store are invalid afterwards. Raises
        `StoreChangedError` (after unmapping) if the file changed under the store."""
        if self._map.closed:
            return
        try:
            self.flush()
        finally:
            self._pool.shutdown()
            del self.data
            self._map.close()
            self._file.close()

    def __enter__(self) -> "MmapStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ConcatStore(RowStore):
    """Several tables' stores as one row space (table i's rows start at ``offsets[i]``), for a
    cache that several offloaded tables share, as FBGEMM's cache offsets each table's rows."""

    def __init__(self, stores: Sequence[RowStore], names: Sequence[str]) -> None:
        shapes = {(s.dim, s.state_width) for s in stores}
        if len(shapes) != 1:
            raise ValueError(f"tables {list(names)} share a cache but their stores differ in width or state: {shapes}")
        self.stores, self.names = list(stores), list(names)
        self.dim, self.state_width = shapes.pop()
        sizes = torch.tensor([s.rows for s in stores])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
        self.rows = int(self.offsets[-1])
        self.name = "+".join(s.name for s in stores)

    def _parts(self, rows: torch.Tensor) -> list[tuple[RowStore, torch.Tensor, torch.Tensor]]:
        """(store, positions in `rows`, local rows) for every store that `rows` touch."""
        if len(self.stores) == 1:
            return [(self.stores[0], torch.arange(rows.numel()), rows)]
        which = torch.searchsorted(self.offsets, rows, right=True) - 1
        parts = []
        for i, store in enumerate(self.stores):
            positions = torch.nonzero(which == i).squeeze(1)
            if positions.numel():
                parts.append((store, positions, rows.index_select(0, positions) - self.offsets[i]))
        return parts

    def read(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.stores) == 1:
            return self.stores[0].read(rows)
        out = torch.empty(rows.numel(), self.dim + self.state_width)
        for store, positions, local in self._parts(rows):
            weights, state = store.read(local)
            out.index_copy_(0, positions, torch.cat([weights, state], 1))
        return out[:, : self.dim], out[:, self.dim :]

    def write(self, rows: torch.Tensor, weights: torch.Tensor, state: torch.Tensor) -> None:
        if len(self.stores) == 1:
            self.stores[0].write(rows, weights, state)
            return
        for store, positions, local in self._parts(rows):
            store.write(local, weights.index_select(0, positions), state.index_select(0, positions))

    def locate(self, row: int) -> tuple[str, int]:
        """(table, id) of combined row `row`."""
        i = int(torch.searchsorted(self.offsets, torch.tensor(row), right=True)) - 1
        return self.names[i], row - int(self.offsets[i])

    def flush(self) -> None:
        for store in self.stores:
            store.flush()


def _file_identity(status: os.stat_result) -> tuple[int, int]:
    return status.st_dev, status.st_ino


def _drop_page_cache(fd: int) -> None:
    """Write the file's dirty pages and drop its page cache. A file just written sequentially sits
    in the page cache as large folios, and a fault maps a whole folio (hundreds of KiB for one
    256-byte row); re-read with MADV_RANDOM, each fault maps only the page it needs."""
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def initial_rows(first: int, rows: int, dim: int, seed: int) -> torch.Tensor:
    """Rows ``first .. first + INIT_CHUNK_ROWS`` (or to the end) of a fresh ``rows x dim`` table:
    U(-sqrt(1/rows), sqrt(1/rows)), seeded per chunk so RAM and file stores start identical."""
    bound = default_init_bound(rows)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + first)
    return torch.empty(min(INIT_CHUNK_ROWS, rows - first), dim).uniform_(-bound, bound, generator=generator)


def _header(meta: dict) -> bytes:
    body = MAGIC + b"\n" + json.dumps(meta, sort_keys=True).encode()
    return body.ljust(HEADER_BYTES, b"\0")


def _read_header(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"store file {str(path)!r} does not exist; create it with MmapStore.create")
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
    magic, _, body = head.partition(b"\n")
    if magic != MAGIC:
        raise ValueError(f"{str(path)!r} is not an embtab row store (no {MAGIC.decode()} header)")
    return json.loads(body.rstrip(b"\0"))


def _describe(meta: dict) -> str:
    return (
        f"{meta.get('rows')} x {meta.get('dim')} {meta.get('dtype')} rows with "
        f"{meta.get('state_width')} optimizer float(s) per row (format {meta.get('version')})"
    )
