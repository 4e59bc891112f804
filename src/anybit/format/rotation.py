"""Incoherence processing: a random orthogonal transform of a linear layer's input dimension.

R = (Q ⊗ H_b) diag(s) on an input of width n = m · b: s random signs, H_b the orthonormal Walsh-Hadamard
matrix of b, the largest power of two dividing n, and Q a random orthogonal m × m matrix (a Kronecker
product, so that widths that are not powers of two still get a fast transform; QuIP# uses such products).
A layer y = W x is quantized as W' = W Rᵀ on the inputs R x, so that W' R x = W x: the transform spreads
each weight row's large entries over its whole width before the codebooks are fitted. It is applied to the
input at run time in O(n log b + n m) operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from anybit.format.packing import pack_codes, packed_nbytes, unpack_codes


@dataclass(frozen=True)
class InputRotation:
    """R = (Q ⊗ H_b) diag(s) for an input of width n = m · b (see the module doc), as stored: the signs as
    one bit each (a set bit is −1), Q in float32 (m, m)."""

    signs: torch.Tensor  # uint8, packed_nbytes(n, 1): bit j of the stream is set where s_j = −1
    mix: torch.Tensor  # float32 (m, m), orthogonal

    @staticmethod
    def random(n: int, generator: torch.Generator) -> InputRotation:
        """A random rotation of an input of width n."""
        b = n & -n
        m = n // b
        mix = torch.linalg.qr(torch.randn(m, m, generator=generator, dtype=torch.float64))[0].float().contiguous()
        negative = torch.randint(0, 2, (n,), generator=generator, dtype=torch.uint8)
        return InputRotation(pack_codes(negative, 1), mix)

    def sign_vector(self, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """s as ±1 of `dtype`, (n,)."""
        negative = unpack_codes(self.signs, 1, n, torch.int64)
        return (1 - 2 * negative).to(dtype)

    def matrix(self, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """R as a dense (n, n) matrix (for checks: the transforms below never build it)."""
        m = self.mix.shape[0]
        return torch.kron(self.mix.to(dtype), hadamard(n // m, dtype)) * self.sign_vector(n, dtype)[None, :]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """R x for every row x of `x` (..., n), in x's dtype (computed in float32 at least)."""
        n = x.shape[-1]
        m = self.mix.shape[0]
        dtype = torch.promote_types(x.dtype, torch.float32)
        v = x.to(dtype) * self.sign_vector(n, dtype).to(x.device)
        v = walsh_hadamard(v.reshape(*x.shape[:-1], m, n // m))
        if m > 1:
            v = torch.matmul(self.mix.to(device=x.device, dtype=dtype), v)
        return v.reshape(x.shape).to(x.dtype)

    def unapply(self, x: torch.Tensor) -> torch.Tensor:
        """x R for every row x of `x` (..., n), i.e. Rᵀ applied: the inverse of `apply`."""
        n = x.shape[-1]
        m = self.mix.shape[0]
        dtype = torch.promote_types(x.dtype, torch.float32)
        v = x.to(dtype).reshape(*x.shape[:-1], m, n // m)
        if m > 1:
            v = torch.matmul(self.mix.t().to(device=x.device, dtype=dtype), v)
        v = walsh_hadamard(v).reshape(x.shape) * self.sign_vector(n, dtype).to(x.device)
        return v.to(x.dtype)

    def stored_bits(self) -> int:
        return 8 * (self.signs.numel() * self.signs.element_size() + self.mix.numel() * self.mix.element_size())


def rotation_bits(n: int) -> int:
    """Stored bits of the rotation of an input of width n (its signs and its float32 mixing matrix)."""
    m = n // (n & -n)
    return 8 * packed_nbytes(n, 1) + 32 * m * m


def fits(m: int, n: int) -> bool:
    """Whether an m × m mixing matrix fits an input of width n: n / m a whole power of two."""
    return m >= 1 and n % m == 0 and (n // m) & (n // m - 1) == 0


def hadamard(b: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix of order b (a power of two)."""
    H = torch.ones(1, 1, dtype=dtype)
    while H.shape[0] < b:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H / math.sqrt(b)


def walsh_hadamard(v: torch.Tensor) -> torch.Tensor:
    """H_b v along the last dimension (b, a power of two), by log2(b) butterfly steps."""
    b = v.shape[-1]
    shape = v.shape
    h = 1
    while h < b:
        pairs = v.reshape(-1, b // (2 * h), 2, h)
        v = torch.stack((pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]), dim=2)
        h *= 2
    return v.reshape(shape) / math.sqrt(b)
