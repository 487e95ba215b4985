"""Maps onto the orthogonal group: QR with a positive diagonal, the Cayley retraction, skew parts."""

from __future__ import annotations

import torch


def orthogonal_from(free: torch.Tensor) -> torch.Tensor:
    """Q of the QR decomposition with R's diagonal made positive, so Q(I) = I and Q is continuous."""
    q, r = torch.linalg.qr(free)
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return q * signs.unsqueeze(-2)


def cayley_retract(rotation: torch.Tensor, skew: torch.Tensor) -> torch.Tensor:
    """Q·cay(Ω), the body-frame Cayley step, as one linear solve: with X(I − Ω/2) = Q,
    Q·cay(Ω) = 2X − Q (no explicit inverse, no extra matmul; batched over leading dims)."""
    eye = torch.eye(skew.shape[-1], dtype=skew.dtype, device=skew.device).expand_as(skew)
    return 2.0 * torch.linalg.solve(eye - skew / 2, rotation, left=False) - rotation


def block_diagonal_mask(size: int, blocks: int, device: torch.device | None = None) -> torch.Tensor:
    """(size, size) float mask, 1 on `blocks` equal diagonal blocks (block-diagonal R1).
    Raises ValueError when `size` does not split into them."""
    if blocks < 1 or size % blocks:
        raise ValueError(f"rotation.r1_blocks {blocks} does not divide the hidden size {size}")
    eye = torch.eye(blocks, device=device)
    return eye.repeat_interleave(size // blocks, 0).repeat_interleave(size // blocks, 1)


def with_masked_gradient(matrix: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`matrix` itself, whose gradient is `mask` ⊙ the gradient: a block-diagonal R1 stays
    block-diagonal under every optimizer (Cayley and QR steps keep the zero pattern exactly)."""
    return matrix * mask + (matrix * (1 - mask)).detach()


def _skew(matrix: torch.Tensor) -> torch.Tensor:
    return (matrix - matrix.transpose(-1, -2)) / 2


def _orthonormalised(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest-by-QR orthogonal matrix (float64 QR, signs fixed), to undo float32 drift."""
    return orthogonal_from(matrix.to(torch.float64)).to(matrix.dtype)
