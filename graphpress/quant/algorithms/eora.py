"""EoRA (Liu et al., 2024): a rank-r branch that compensates a quantized linear's error in the
eigenspace of its calibration activations.

A linear quantized to ``Q`` errs by ``E = W - Q``; on inputs ``X`` the output error is
``X E^T``, so the best rank-``r`` compensation ``B A`` (``B: [N, r]``, ``A: [r, K]``) minimizes
``||X (E - B A)^T||_F``, not ``||E - B A||_F``. With ``H = X^T X / n = V diag(lambda) V^T``,

    ||X (E - BA)^T||_F^2 = n ||(E - BA) V diag(sqrt(lambda))||_F^2,

so project ``E' = E V diag(sqrt(lambda))``, truncate its SVD ``E' ~ U_r S_r Vt_r`` and map
back:

    B = U_r S_r,      A = Vt_r diag(1 / sqrt(lambda)) V^T

(eigenvalues below ``eps * max(lambda)`` count as 0: their directions carry no calibration
signal and get no compensation). The layer becomes ``y = x Q^T + (x A^T) B^T + b``: two small
float matmuls beside the quantized one, ``r (N + K)`` extra weights.
"""

from __future__ import annotations

import torch

__all__ = ["eora_factors"]


def eora_factors(error: torch.Tensor, gram: torch.Tensor, rank: int, *, eps: float = 1e-6
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [r, K], B [N, r])`` with ``B A`` the best rank-``rank`` approximation of ``error``
    ``[N, K]`` in the norm of ``gram`` ``[K, K]`` (any positive multiple of ``X^T X``)."""
    if error.dim() != 2 or gram.shape != (error.shape[1], error.shape[1]):
        raise ValueError(f"eora takes a [N, K] error and a [K, K] Gram matrix, got "
                         f"{tuple(error.shape)} and {tuple(gram.shape)}")
    if not 1 <= rank <= min(error.shape):
        raise ValueError(f"eora rank must be in [1, {min(error.shape)}], got {rank}")
    gram = gram.to(torch.float64)
    eigenvalues, vectors = torch.linalg.eigh((gram + gram.T) / 2)
    live = eigenvalues > eps * eigenvalues.max().clamp(min=1e-300)
    root = torch.where(live, eigenvalues.clamp(min=0).sqrt(), torch.zeros_like(eigenvalues))
    inverse_root = torch.where(live, 1 / root.clamp(min=1e-300), torch.zeros_like(root))
    projected = error.to(torch.float64) @ vectors * root
    u, s, vt = torch.linalg.svd(projected, full_matrices=False)
    b = u[:, :rank] * s[:rank]
    a = (vt[:rank] * inverse_root) @ vectors.T
    return a.to(error.dtype), b.to(error.dtype)
