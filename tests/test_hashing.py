"""Tests for embtab.hashing: bit-exactness, stability, independence of salts, uniformity, errors."""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from embtab.hashing import hash64, hash_to_range, hash_to_ranges, salt_of

M64 = (1 << 64) - 1
REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- independent pure-Python reference


def ref_mix64(z: int) -> int:
    """SplitMix64 finalizer (Stafford Mix13) on Python ints mod 2**64."""
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return (z ^ (z >> 31)) & M64


def ref_hash64(i: int, salt: int) -> int:
    """The documented hash as an unsigned 64-bit Python int."""
    gamma = 0x9E3779B97F4A7C15
    s = salt & M64
    k1 = ref_mix64(s + gamma)
    k2 = ref_mix64(s + 2 * gamma)
    return ref_mix64(ref_mix64((i & M64) ^ k1) + k2)


def to_unsigned(t: torch.Tensor) -> list[int]:
    return [v & M64 for v in t.tolist()]


def edge_ids() -> list[int]:
    vals = {0, 1, 2, 3, 255, 256, 1023, 1024, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1}
    vals |= {2**40, 2**53, 2**53 + 1, 2**62 - 1, 2**62, 2**63 - 2, 2**63 - 1}
    vals |= {-1, -2, -(2**31), -(2**32), -(2**63) + 1, -(2**63)}
    vals |= {2**k for k in range(63)} | {2**k - 1 for k in range(1, 64)}
    return sorted(vals)


def wilson_hilferty_quantile(df: int, z: float) -> float:
    """Chi-square quantile for `df` degrees of freedom at standard-normal quantile `z`."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


Z_0999 = 3.090232306167813  # standard-normal 0.999 quantile


def chi_square(buckets: torch.Tensor, m: int) -> float:
    counts = torch.bincount(buckets, minlength=m).double()
    expected = buckets.numel() / m
    return float(((counts - expected) ** 2).sum() / expected)


# ---------------------------------------------------------------- bit-exactness and stability


@pytest.mark.parametrize("salt", [0, 1, 12345, -1, 2**63 - 1, 2**64 + 7, salt_of("item_id", 2)])
def test_hash64_bit_exact_vs_reference(salt: int) -> None:
    gen = torch.Generator().manual_seed(1234)
    # 3001 random ids over the whole int64 range (odd count: exercises vector tails) plus edges.
    rand = torch.randint(-(2**63), 2**63 - 1, (3001,), generator=gen, dtype=torch.int64)
    ids = torch.cat([torch.tensor(edge_ids(), dtype=torch.int64), rand])
    got = to_unsigned(hash64(ids, salt))
    want = [ref_hash64(i, salt) for i in ids.tolist()]
    assert got == want


def test_chunked_path_bit_exact() -> None:
    # More ids than one CPU chunk (2**18), with a ragged last chunk.
    n = (1 << 18) * 2 + 12345
    ids = torch.arange(n, dtype=torch.int64) * 0x9E3779B1 + 7
    h = hash64(ids, 99)
    idx = torch.tensor([0, 1, (1 << 18) - 1, 1 << 18, (1 << 18) + 1, 2 << 18, n - 2, n - 1])
    assert to_unsigned(h[idx]) == [ref_hash64(int(i), 99) for i in ids[idx].tolist()]
    # The whole result equals a chunk-by-chunk hash of slices (no state leaks between chunks).
    parts = torch.cat([hash64(ids[a : a + 100_000], 99) for a in range(0, n, 100_000)])
    assert torch.equal(h, parts)


@pytest.mark.parametrize("m", [1, 2, 7, 1000, 1024, 10**9 + 7, 2**40, 2**62 + 3, 2**63 - 1])
def test_hash_to_range_matches_reference(m: int) -> None:
    gen = torch.Generator().manual_seed(7)
    ids = torch.cat(
        [
            torch.tensor(edge_ids(), dtype=torch.int64),
            torch.randint(0, 2**63 - 1, (500,), generator=gen, dtype=torch.int64),
        ]
    )
    got = hash_to_range(ids, m, salt=5)
    assert got.dtype == torch.int64
    assert int(got.min()) >= 0 and int(got.max()) < m
    assert got.tolist() == [(ref_hash64(i, 5) >> 1) % m for i in ids.tolist()]


def test_golden_values() -> None:
    # Pinned outputs: a change here silently reshuffles every trained hashed table.
    ids = torch.tensor([0, 1, 2**32, 2**63 - 1, -1, -(2**63)])
    assert hash64(ids).tolist() == [
        2923684916897761976,
        -2781618992730859301,
        -8513889532229815221,
        -1208669323096131441,
        22211721870597969,
        -819009904710765526,
    ]
    assert hash64(ids, 1).tolist() == [
        -2681541628818344238,
        5396797888744205480,
        -1251229112265784708,
        6555938317281642129,
        -7647486568985773213,
        3928269915992856977,
    ]
    assert hash_to_range(torch.arange(10), 1000, salt_of("item_id", 0)).tolist() == [
        342, 272, 871, 848, 307, 258, 507, 565, 774, 5,
    ]  # fmt: skip
    assert salt_of() == -280116861339299243
    assert salt_of("item_id", 0) == 9182945406304085207
    assert salt_of(0, 1) == -3567073718793555294


# The child loads embtab/hashing.py by path (it imports only hashlib, operator and torch), so it
# does not pay for importing the whole package (torchrec) just to hash.
_CHECKSUM_SNIPPET = """
import hashlib, importlib.util, sys, torch
spec = importlib.util.spec_from_file_location("embtab_hashing_child", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
hash64, hash_to_range, salt_of = mod.hash64, mod.hash_to_range, mod.salt_of
torch.set_num_threads(1)
h = hash64(torch.arange(100_000), salt_of("f", 3))
r = hash_to_range(torch.arange(100_000) * 1024, 10**9, salt_of("f", 4))
d = hashlib.sha256(h.numpy().astype("<i8").tobytes() + r.numpy().astype("<i8").tobytes())
print(d.hexdigest())
"""


def _checksum_here() -> str:
    h = hash64(torch.arange(100_000), salt_of("f", 3))
    r = hash_to_range(torch.arange(100_000) * 1024, 10**9, salt_of("f", 4))
    d = hashlib.sha256(h.numpy().astype("<i8").tobytes() + r.numpy().astype("<i8").tobytes())
    return d.hexdigest()


def test_deterministic_across_processes() -> None:
    # A fresh interpreter with a different hash seed and thread count gives the same bits.
    env = dict(os.environ, PYTHONHASHSEED="12345")
    child = subprocess.run(
        [sys.executable, "-c", _CHECKSUM_SNIPPET, str(REPO_ROOT / "embtab" / "hashing.py")],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    here = _checksum_here()
    assert child.stdout.strip() == here
    assert here == "34ccfa203c3be9f0069225867202b76e0b9943c92fe13f967e444abce0a1b29b"


def test_thread_count_does_not_change_bits() -> None:
    ids = torch.arange(600_000, dtype=torch.int64) * 31 + 5
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = hash64(ids, 17)
        torch.set_num_threads(max(2, before))
        many = hash64(ids, 17)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


# ---------------------------------------------------------------- statistics


def test_salts_are_independent() -> None:
    n, m = 1_000_000, 1000
    ids = torch.arange(n)
    pairs = [(1, 2), (0, 1), (salt_of("item_id", 0), salt_of("item_id", 1))]
    for s1, s2 in pairs:
        same = int((hash_to_range(ids, m, s1) == hash_to_range(ids, m, s2)).sum())
        p = 1.0 / m
        sd = math.sqrt(n * p * (1 - p))
        assert abs(same - n * p) < 5 * sd, (s1, s2, same)
    # Full-width outputs: top-53-bit values of two salts are uncorrelated.
    a = (hash64(ids, 1) >> 11).double()
    b = (hash64(ids, 2) >> 11).double()
    corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
    assert abs(corr) < 5 / math.sqrt(n)


def test_avalanche() -> None:
    # Flipping any one input bit flips every output bit with probability ~1/2.
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(-(2**63), 2**63 - 1, (4000,), generator=gen, dtype=torch.int64)
    base = hash64(ids, 11)
    shifts = torch.arange(64, dtype=torch.int64)
    worst = 0.0
    for bit in range(64):
        flipped = ids ^ torch.tensor(1, dtype=torch.int64).bitwise_left_shift(bit)
        diff = base ^ hash64(flipped, 11)
        rates = ((diff.unsqueeze(1) >> shifts) & 1).double().mean(0)  # per output bit
        worst = max(worst, float((rates - 0.5).abs().max()))
    # sd of one rate is 0.5/sqrt(4000) ~ 0.0079; 4096 rates -> max ~ 4.5 sd.
    assert worst < 0.05


@pytest.mark.parametrize(
    "name",
    ["sequential", "multiples_of_1024", "near_2**62", "sequential_salted", "strided_2**32"],
)
def test_uniformity_chi_square(name: str) -> None:
    n, m = 1_000_000, 1000
    ar = torch.arange(n, dtype=torch.int64)
    ids, salt = {
        "sequential": (ar, 0),
        "multiples_of_1024": (ar * 1024, 0),
        "near_2**62": (ar + 2**62 - n // 2, 0),
        "sequential_salted": (ar, salt_of("user_id", 1)),
        "strided_2**32": (ar * 2**32, 3),
    }[name]
    stat = chi_square(hash_to_range(ids, m, salt), m)
    assert stat < wilson_hilferty_quantile(m - 1, Z_0999), stat


def test_uniformity_power_of_two_buckets() -> None:
    # Power-of-two bucket counts use a mask of the top 63 bits (the low bits of those).
    n, m = 1_000_000, 1024
    ids = torch.arange(n, dtype=torch.int64) * 4096
    stat = chi_square(hash_to_range(ids, m, 9), m)
    assert stat < wilson_hilferty_quantile(m - 1, Z_0999), stat


def _occupied_mean_sd(n: int, m: int) -> tuple[float, float]:
    """Mean and sd of the number of distinct buckets when n ids land uniformly in m buckets."""
    log_b = n * math.log1p(-1.0 / m)  # log (1 - 1/m)^n
    b = math.exp(log_b)
    mean = m * -math.expm1(log_b)
    # Var = m(m-1)(1-2/m)^n + m(1-1/m)^n - m^2(1-1/m)^2n, rearranged to avoid cancellation.
    a_minus_b2 = b * b * math.expm1(n * math.log1p(-1.0 / (m - 1) ** 2))
    b_minus_a = -b * math.expm1(n * (math.log1p(-2.0 / m) - math.log1p(-1.0 / m)))
    var = m * m * a_minus_b2 + m * b_minus_a
    return mean, math.sqrt(var)


@pytest.mark.parametrize(
    ("n", "m", "kind"),
    [
        (1_000_000, 1_000_000, "sequential"),
        (1_000_000, 250_000, "multiples_of_1024"),
        (500_000, 10**9, "random"),
        (300_000, 2**40, "sequential"),
    ],
)
def test_distinct_buckets_match_balls_in_bins(n: int, m: int, kind: str) -> None:
    ar = torch.arange(n, dtype=torch.int64)
    gen = torch.Generator().manual_seed(5)
    ids = {
        "sequential": ar,
        "multiples_of_1024": ar * 1024,
        "random": torch.randint(0, 2**63 - 1, (n,), generator=gen, dtype=torch.int64),
    }[kind]
    distinct = int(torch.unique(hash_to_range(ids, m, 21)).numel())
    mean, sd = _occupied_mean_sd(n, m)
    assert abs(distinct - mean) < 5 * max(sd, 1.0), (distinct, mean, sd)


def test_occupied_formula_sanity() -> None:
    # The stable rearrangement agrees with the direct formula where the latter is accurate.
    n, m = 50, 40
    mean, sd = _occupied_mean_sd(n, m)
    a, b = (1 - 2 / m) ** n, (1 - 1 / m) ** n
    assert mean == pytest.approx(m * (1 - b))
    assert sd**2 == pytest.approx(m * (m - 1) * a + m * b - m * m * b * b)


# ---------------------------------------------------------------- shapes, dtypes, devices, salts


@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 4), (2, 0, 3), (2, 3, 5)])
def test_shape_and_dtype_preserved(shape: tuple[int, ...]) -> None:
    ids = torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape)
    for out in (hash64(ids, 1), hash_to_range(ids, 97, 1)):
        assert out.shape == ids.shape
        assert out.dtype == torch.int64
        assert out.device == ids.device
    flat = hash64(ids.reshape(-1), 1)
    assert torch.equal(hash64(ids, 1).reshape(-1), flat)


def test_input_not_modified_and_non_contiguous() -> None:
    ids = torch.arange(24, dtype=torch.int64).reshape(4, 6)
    copy = ids.clone()
    _ = hash64(ids, 3), hash_to_range(ids, 10, 3)
    assert torch.equal(ids, copy)
    t = ids.t()  # non-contiguous view
    assert torch.equal(hash64(t, 3), hash64(t.contiguous(), 3))
    assert torch.equal(hash_to_range(ids[:, ::2], 13), hash_to_range(ids[:, ::2].clone(), 13))


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32])
def test_small_integer_dtypes_hash_by_value(dtype: torch.dtype) -> None:
    info = torch.iinfo(dtype)
    vals = torch.arange(max(info.min, -100), min(info.max, 100) + 1)
    ids = vals.to(dtype)
    assert torch.equal(hash64(ids, 4), hash64(vals.to(torch.int64), 4))
    assert torch.equal(hash_to_range(ids, 77, 4), hash_to_range(vals, 77, 4))


def test_uint64_keeps_bit_pattern() -> None:
    if not hasattr(torch, "uint64"):
        pytest.skip("torch has no uint64")
    signed = torch.tensor([0, 1, -1, -(2**63), 2**63 - 1], dtype=torch.int64)
    unsigned = signed.view(torch.uint64)
    assert torch.equal(hash64(unsigned, 8), hash64(signed, 8))


def test_salt_reduced_mod_2_64() -> None:
    ids = torch.arange(100)
    assert torch.equal(hash64(ids, -1), hash64(ids, 2**64 - 1))
    assert torch.equal(hash64(ids, 5), hash64(ids, 5 + 3 * 2**64))
    assert torch.equal(hash64(ids, np.int64(5)), hash64(ids, 5))
    assert not torch.equal(hash64(ids, 0), hash64(ids, 1))


def test_salt_of_is_stable_and_unambiguous() -> None:
    s = salt_of("item_id", 0)
    assert isinstance(s, int) and -(2**63) <= s < 2**63
    assert salt_of("item_id", 0) == s
    distinct = {
        salt_of("ab", "c"),
        salt_of("a", "bc"),
        salt_of("abc"),
        salt_of(1),
        salt_of("1"),
        salt_of(1, 0),
        salt_of(10),
        salt_of(),
        salt_of("item_id", 1),
        salt_of("item_id", 0),
        salt_of(2**100),
        salt_of(-1),
    }
    assert len(distinct) == 12
    assert salt_of(np.int64(3), "x") == salt_of(3, "x")
    assert salt_of("é") != salt_of("e")


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.bool])
def test_non_integer_dtype_raises(dtype: torch.dtype) -> None:
    ids = torch.zeros(3, dtype=dtype)
    with pytest.raises(TypeError, match=str(dtype)):
        hash64(ids)
    with pytest.raises(TypeError, match=str(dtype)):
        hash_to_range(ids, 10)


def test_non_tensor_raises() -> None:
    with pytest.raises(TypeError, match="list"):
        hash64([1, 2, 3])  # type: ignore[arg-type]


@pytest.mark.parametrize("m", [0, -1, -(10**12), 2**63])
def test_bad_num_buckets_raises(m: int) -> None:
    with pytest.raises(ValueError, match=str(m)):
        hash_to_range(torch.arange(3), m)


@pytest.mark.parametrize("m", [2.5, "10", True, None])
def test_non_integer_num_buckets_raises(m: object) -> None:
    with pytest.raises(TypeError):
        hash_to_range(torch.arange(3), m)  # type: ignore[arg-type]


@pytest.mark.parametrize("salt", [1.5, "a", True, None])
def test_bad_salt_raises(salt: object) -> None:
    with pytest.raises(TypeError):
        hash64(torch.arange(3), salt)  # type: ignore[arg-type]


@pytest.mark.parametrize("part", [1.0, b"x", None, True, (1,)])
def test_salt_of_bad_part_raises(part: object) -> None:
    with pytest.raises(TypeError):
        salt_of("f", part)  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu() -> None:
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(-(2**63), 2**63 - 1, (1_000_003,), generator=gen, dtype=torch.int64)
    for salt in (0, salt_of("item_id", 1)):
        on_gpu = hash64(ids.cuda(), salt)
        assert on_gpu.device.type == "cuda"
        assert torch.equal(on_gpu.cpu(), hash64(ids, salt))
        assert torch.equal(
            hash_to_range(ids.cuda(), 10**9 + 7, salt).cpu(), hash_to_range(ids, 10**9 + 7, salt)
        )


def test_hash_to_ranges_equals_hash_to_range_per_segment():
    """One pass over segments with their own buckets and salts gives each segment's own hash,
    bit for bit: powers of two and not, huge and negative ids, an empty segment."""
    generator = torch.Generator().manual_seed(5)
    segments = [
        (torch.randint(-(2**62), 2**62, (300,), generator=generator), 1000, 7),
        (torch.arange(0, dtype=torch.int64), 16, 3),
        (torch.randint(0, 50, (129,), generator=generator), 1024, -12345678901234),
        (torch.tensor([0, -1, 2**63 - 1, -(2**63)]), 2**40 + 3, salt_of("item", 1)),
    ]
    expected = torch.cat([hash_to_range(ids, m, salt) for ids, m, salt in segments])
    ids = torch.cat([ids for ids, _, _ in segments])
    counts = [s[0].numel() for s in segments]
    got = hash_to_ranges(ids, counts, [(m, salt) for _, m, salt in segments])
    assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="segments"):
        hash_to_ranges(ids, counts[:-1], [(m, salt) for _, m, salt in segments])
    with pytest.raises(TypeError, match="int64"):
        hash_to_ranges(ids.int(), counts, [(m, salt) for _, m, salt in segments])
