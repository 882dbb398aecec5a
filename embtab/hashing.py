"""Deterministic, seeded, vectorized 64-bit hashing of int64 ids in torch.

Hashing-trick, double-hashing and feature-multiplexing methods map an id to a row with
``row = hash_to_range(ids, num_rows, salt)``, one salt per (feature, probe). The mapping decides
which trained row an id reads, so it must never change: it is a pure function of the id's 64-bit
pattern and the salt, identical across processes, runs, platforms, devices and thread counts (no
Python ``hash()``, no torch RNG, no floating point).

The hash
--------
Mixer: ``mix64`` is the SplitMix64 finalizer (Stafford's "Mix13", the output function of Java's
``SplittableRandom``): ``z ^= z >>> 30; z *= 0xbf58476d1ce4e5b9; z ^= z >>> 27;
z *= 0x94d049bb133111eb; z ^= z >>> 31``, a bijection on 64-bit words with full avalanche.

Salt: reduced mod 2**64, then mixed into two keys, the first two outputs of SplitMix64 seeded with
it: ``k1 = mix64(salt + G)``, ``k2 = mix64(salt + 2G)``, ``G = 0x9e3779b97f4a7c15``.

Id: ``hash64(id, salt) = mix64(mix64(id ^ k1) + k2)`` (all mod 2**64). The second round makes the
hashes of two salts unrelated: with one round, ``hash_s2(id) == hash_s1(id ^ k1(s1) ^ k1(s2))`` for
every id, a fixed XOR relation between the salts; with two, the permutation relating them is itself
pseudo-random.

torch has no full uint64 arithmetic, so everything runs on int64 tensors: addition and
multiplication wrap in two's complement (the same bits as uint64), and the logical right shift is
emulated as ``(x >> s) & (2**(64 - s) - 1)`` because int64 ``>>`` sign-extends. Elementwise
integer ops give the same bits on every device and thread count.
"""

from __future__ import annotations

import hashlib
import operator
from typing import Sequence

import torch

__all__ = ["hash64", "hash_to_range", "hash_to_ranges", "salt_of"]

_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MIX_M1 = 0xBF58476D1CE4E5B9
_MIX_M2 = 0x94D049BB133111EB

# Integer dtypes accepted as ids; all are widened to int64 (the unsigned 64-bit one reinterpreted
# bit for bit), so an id hashes the same whatever integer dtype carries it.
_ID_DTYPES: frozenset[torch.dtype] = frozenset(
    d
    for d in (
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        getattr(torch, "uint16", None),
        getattr(torch, "uint32", None),
        getattr(torch, "uint64", None),
    )
    if d is not None
)


def _signed(x: int) -> int:
    """The int64 (two's complement) value of the 64-bit word `x` mod 2**64, for torch scalars."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


def _mix64_int(z: int) -> int:
    """`mix64` on a Python int mod 2**64 (used to derive the salt keys)."""
    z &= _MASK64
    z = ((z ^ (z >> 30)) * _MIX_M1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX_M2) & _MASK64
    return z ^ (z >> 31)


# Python-int constants in int64 range, so torch takes them as int64 scalars.
_M1 = _signed(_MIX_M1)
_M2 = _signed(_MIX_M2)
_LOW = {s: (1 << (64 - s)) - 1 for s in (1, 27, 30, 31)}  # masks for logical right shifts


# CPU work runs in chunks of this many ids (2 MiB of int64) so the dozen elementwise passes stay in
# cache and reuse one scratch buffer; on 1e7 ids this is several times faster than whole-tensor ops.
_CPU_CHUNK = 1 << 18


def _xorshift_right_(x: torch.Tensor, scratch: torch.Tensor, s: int) -> None:
    """In place ``x ^= x >>> s`` (logical shift) on an int64 tensor; `scratch` is same-size."""
    torch.bitwise_right_shift(x, s, out=scratch)
    scratch &= _LOW[s]
    x ^= scratch


def _mix64_(x: torch.Tensor, scratch: torch.Tensor) -> None:
    """In place SplitMix64 finalizer on an int64 tensor (wrapping multiplies)."""
    _xorshift_right_(x, scratch, 30)
    x *= _M1
    _xorshift_right_(x, scratch, 27)
    x *= _M2
    _xorshift_right_(x, scratch, 31)


def _rounds_(x: torch.Tensor, k2: int | torch.Tensor, scratch: torch.Tensor) -> None:
    """In place, on ``x = id ^ k1``: ``x = mix64(mix64(x) + k2)``, the full 64-bit hash."""
    _mix64_(x, scratch)
    x += k2
    _mix64_(x, scratch)


def _top63_(x: torch.Tensor) -> None:
    """In place logical right shift by 1: the top 63 bits of the hash, a non-negative int64."""
    x >>= 1
    x &= _LOW[1]


def _salt_keys(salt: int) -> tuple[int, int]:
    """The two 64-bit keys (as int64 Python ints) derived from `salt`: SplitMix64 outputs 1 and 2."""
    if isinstance(salt, bool):
        raise TypeError("salt must be an integer, got bool")
    try:
        s = operator.index(salt)
    except TypeError:
        raise TypeError(f"salt must be an integer, got {type(salt).__name__}") from None
    s &= _MASK64
    k1 = _mix64_int(s + _GOLDEN_GAMMA)
    k2 = _mix64_int(s + 2 * _GOLDEN_GAMMA)
    return _signed(k1), _signed(k2)


def _check_ids(ids: torch.Tensor) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in _ID_DTYPES:
        raise TypeError(f"ids must have an integer dtype, got {ids.dtype}")


def _check_buckets(num_buckets: int) -> int:
    if isinstance(num_buckets, bool):
        raise TypeError("num_buckets must be an integer, got bool")
    try:
        m = operator.index(num_buckets)
    except TypeError:
        raise TypeError(
            f"num_buckets must be an integer, got {type(num_buckets).__name__}"
        ) from None
    if not 1 <= m <= (1 << 63) - 1:
        raise ValueError(f"num_buckets must be in [1, 2**63 - 1], got {num_buckets}")
    return m


def _hash(ids: torch.Tensor, salt: int, num_buckets: int | None) -> torch.Tensor:
    """`hash64` of `ids` (already checked), reduced to ``[0, num_buckets)`` unless that is None."""
    k1, k2 = _salt_keys(salt)
    if ids.dtype == torch.int64:
        src = ids.reshape(-1)
        out = torch.empty(src.shape, dtype=torch.int64, device=ids.device)
    else:
        if ids.dtype == getattr(torch, "uint64", None):
            # Keep the bit pattern: values >= 2**63 become negative int64 (two's complement).
            src = ids.contiguous().view(torch.int64).reshape(-1)
        else:
            src = ids.reshape(-1).to(torch.int64)  # sign/zero-extends: same value as in int64
        out = src.clone() if src.data_ptr() == ids.data_ptr() else src
    n = src.numel()
    chunk = _CPU_CHUNK if ids.device.type == "cpu" else max(n, 1)
    scratch = torch.empty(min(chunk, n), dtype=torch.int64, device=ids.device)
    for start in range(0, n, chunk):  # one iteration off CPU; a loop over chunks, not ids
        x = out[start : start + chunk]
        t = scratch[: x.numel()]
        torch.bitwise_xor(src[start : start + chunk], k1, out=x)
        _rounds_(x, k2, t)
        if num_buckets is not None:
            _top63_(x)
            if num_buckets & (num_buckets - 1) == 0:  # power of two: a mask is exact and cheaper
                x &= num_buckets - 1
            else:
                x.remainder_(num_buckets)
    return out.view(ids.shape)


def hash64(ids: torch.Tensor, salt: int = 0) -> torch.Tensor:
    """The 64-bit hash of every id, as int64 holding the full 64-bit pattern (so it may be negative).

    `ids` may have any integer dtype, shape and device; ids are taken as their int64 value, so
    the whole int64 range (negative ids included) hashes. `salt` is any integer (reduced mod 2**64,
    e.g. from `salt_of`); different salts give independent hash functions. The result is a new
    contiguous tensor with the shape and device of `ids`. Vectorized and deterministic.
    """
    _check_ids(ids)
    return _hash(ids, salt, None)


def hash64_salted(ids: torch.Tensor, salts: Sequence[int], dim: int) -> torch.Tensor:
    """`hash64` of int64 `ids` with ``salts[i]`` along dimension `dim` (of size ``len(salts)``):
    bit for bit ``torch.stack([hash64(x, s) for x, s in zip(ids.unbind(dim), salts)], dim)``, in
    one vectorized pass (a run of tables hashes each table's ids with its own salt)."""
    if ids.dtype != torch.int64:
        raise TypeError(f"ids must be int64, got {ids.dtype}")
    if ids.shape[dim] != len(salts):
        raise ValueError(f"{len(salts)} salts for {ids.shape[dim]} entries along dimension {dim}")
    k1, k2 = torch.tensor([_salt_keys(s) for s in salts], dtype=torch.int64, device=ids.device).t()
    x = torch.bitwise_xor(ids, along(k1, ids.dim(), dim))
    _rounds_(x, along(k2, ids.dim(), dim), torch.empty_like(x))
    return x


def along(values: torch.Tensor, ndim: int, dim: int) -> torch.Tensor:
    """1-D `values` viewed to broadcast along dimension `dim` of an `ndim`-dimensional tensor
    (one value per table of a run)."""
    shape = [1] * ndim
    shape[dim] = values.numel()
    return values.view(shape)


def hash_to_range(ids: torch.Tensor, num_buckets: int, salt: int = 0) -> torch.Tensor:
    """The bucket of every id in ``[0, num_buckets)``, int64, same shape and device as `ids`.

    Takes the top 63 bits of `hash64` (a logical right shift by 1, so the value is a non-negative
    int64) modulo `num_buckets`. The modulo bias is at most ``num_buckets / 2**63`` relative
    (about 1e-7 for 2**40 buckets, 1e-10 for 1e9), negligible for table sizes.
    """
    _check_ids(ids)
    return _hash(ids, salt, _check_buckets(num_buckets))


def hash_to_ranges(ids: torch.Tensor, counts: list[int], requests: list[tuple[int, int]]) -> torch.Tensor:
    """`hash_to_range` of consecutive segments of the int64 `ids` in one vectorized pass: segment
    ``i`` holds ``counts[i]`` ids and hashes with ``requests[i] = (num_buckets, salt)``.

    Bit for bit ``torch.cat([hash_to_range(seg, m, s) for seg, (m, s) in ...])``, without a dozen
    small kernels per segment: the collection hashes every table's ids with it at once.
    """
    if ids.dtype != torch.int64:
        raise TypeError(f"ids must be int64, got {ids.dtype}")
    if len(counts) != len(requests) or sum(counts) != ids.numel():
        raise ValueError(
            f"{len(counts)} segments of {sum(counts)} ids for {len(requests)} requests and "
            f"{ids.numel()} ids; expected one segment per request covering every id"
        )
    keys = [_salt_keys(salt) for _, salt in requests]
    per_segment = torch.tensor(
        [[k1, k2, _check_buckets(m)] for (k1, k2), (m, _) in zip(keys, requests)], dtype=torch.int64
    ).to(ids.device)
    repeats = torch.tensor(counts, device=ids.device)
    k1, k2, buckets = per_segment.repeat_interleave(repeats, dim=0).unbind(1)
    x = torch.bitwise_xor(ids.reshape(-1), k1)
    _rounds_(x, k2, torch.empty_like(x))
    _top63_(x)
    return x.remainder_(buckets)


def salt_of(*parts: int | str) -> int:
    """A stable int64 salt from `parts`, e.g. ``salt_of("item_id", probe)`` or ``salt_of(feature_idx, 1)``.

    BLAKE2b-64 of an unambiguous encoding of the parts (type tag, length, bytes for each), so it
    is the same in every process and Python version (unlike ``hash()``), ``("ab", "c")`` differs
    from ``("a", "bc")`` and ``1`` differs from ``"1"``. Ints may be any size; bools are rejected.
    """
    h = hashlib.blake2b(digest_size=8, person=b"embtab.salt.v1")
    for part in parts:
        if isinstance(part, str):
            tag, data = b"s", part.encode("utf-8")
        elif isinstance(part, bool):
            raise TypeError("salt_of parts must be int or str, got bool")
        else:
            try:
                value = operator.index(part)
            except TypeError:
                raise TypeError(
                    f"salt_of parts must be int or str, got {type(part).__name__}"
                ) from None
            tag, data = b"i", str(value).encode("ascii")
        h.update(tag)
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return int.from_bytes(h.digest(), "little", signed=True)
