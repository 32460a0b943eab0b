"""float16 <-> float32 conversions, bit for bit as numpy casts, at one speed whatever the values.

numpy converts value by value through a general path, and its speed depends on the values: values
below float16's normal range (2^-14) cost 17.7 ns a value to widen and 104 to narrow, against 2.4
and 5 at unit scale (16384 x 512 on this machine). A map between priors that share little puts
most re-aligned targets there.
"""

from __future__ import annotations

import functools

import numpy as np


def to_float16(values: np.ndarray) -> np.ndarray:
    """values.astype(float16), bit for bit, at one speed whatever the values: integer steps on the
    float32 bits, in place, a cache-sized block at a time. Measured on 16384 x 512: ~4 ns a value,
    where numpy's cast took 5 at unit scale and 104 below float16's normal range, raising the
    floating-point underflow flag value by value (a map between unrelated priors makes most
    re-aligned values that small)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    halves = np.empty(values.shape, np.float16)
    block = max(1, min(values.size, _HALF_BLOCK_VALUES))
    _HalfBits(block).convert(values.reshape(-1), halves.reshape(-1).view(np.uint16))
    return halves


# 256 KiB of float32 input: the passes of _HalfBits stay in the core's cache (4x smaller blocks took 2x longer).
_HALF_BLOCK_VALUES = 1 << 16
_U32 = np.uint32


class _HalfBits:
    """IEEE half-precision bits of float32 values, rounded to nearest, ties to even, as numpy casts,
    through scratch buffers of one block reused for every block."""

    def __init__(self, block: int):
        self.magnitude, self.half = np.empty(block, np.uint32), np.empty(block, np.uint32)
        self.scaled, self.mask = np.empty(block, np.float32), np.empty(block, bool)

    def convert(self, source: np.ndarray, bits: np.ndarray) -> None:
        for start in range(0, source.size, self.half.size):
            block = source[start : start + self.half.size]
            bits[start : start + block.size] = self._block(block)

    def _block(self, block: np.ndarray) -> np.ndarray:
        size, raw = block.size, block.view(np.uint32)
        magnitude, half, mask = self.magnitude[:size], self.half[:size], self.mask[:size]
        np.bitwise_and(raw, _U32(0x7FFFFFFF), out=magnitude)
        # Normal range: round the significand to 10 bits (ties to even), rebase the exponent 127 -> 15.
        np.right_shift(magnitude, _U32(13), out=half)
        half &= _U32(1)
        half += _U32(0x0FFF)
        half += magnitude
        half >>= _U32(13)
        half -= _U32((127 - 15) << 10)  # wraps below the normal range: replaced next
        # Below 2^-14 the results are subnormals, whole multiples of 2^-24 (at most 1024, the smallest normal).
        if np.less(magnitude, _U32(113 << 23), out=mask).any():
            scaled = self.scaled[:size]
            np.abs(block, out=scaled)
            with np.errstate(over="ignore", invalid="ignore"):  # the large values, not taken from here
                scaled *= np.float32(2.0**24)
                np.copyto(half, np.rint(scaled, out=scaled), where=mask, casting="unsafe")
        # From 65520 (rounds past 65504, the largest half) up, and infinity: infinity.
        if np.greater_equal(magnitude, _U32(0x477FF000), out=mask).any():
            np.copyto(half, _U32(0x7C00), where=mask)
            if np.greater(magnitude, _U32(0x7F800000), out=mask).any():
                # NaN keeps the top of its payload and stays NaN, as in numpy's cast.
                payload = _U32(0x7C00) + ((magnitude & _U32(0x007FFFFF)) >> _U32(13))
                np.copyto(half, np.maximum(payload, _U32(0x7C01)), where=mask)
        np.right_shift(raw, _U32(16), out=magnitude)
        magnitude &= _U32(0x8000)
        half |= magnitude
        return half


def to_float32(halves: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """halves.astype(float32), bit for bit (NaN payloads too): each value looked up by its 16 bits in
    the table of all 65536 widened by numpy once, a cache-sized block at a time (np.take into the
    output). ~2 ns a value whatever the values, where numpy's cast took 2.4 at unit scale and 17.7
    below float16's normal range. `out`: a contiguous float32 array of halves' shape to fill."""
    halves = np.ascontiguousarray(halves, dtype=np.float16)
    if out is None:
        out = np.empty(halves.shape, np.float32)
    elif out.dtype != np.float32 or out.shape != halves.shape or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous float32 array of shape {halves.shape}.")
    bits, flat, table = halves.reshape(-1).view(np.uint16), out.reshape(-1), _widened()
    for start in range(0, bits.size, _HALF_BLOCK_VALUES):
        stop = start + _HALF_BLOCK_VALUES
        np.take(table, bits[start:stop], out=flat[start:stop])
    return out


@functools.cache
def _widened() -> np.ndarray:
    """Every float16 bit pattern, widened by numpy (256 KiB: it stays in the core's cache); read-only."""
    with np.errstate(all="ignore"):
        table = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    table.flags.writeable = False
    return table
