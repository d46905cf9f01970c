"""Low-rank factors of a weight change, in Paddle's layout: the arithmetic of `export --format lora`.

A Paddle Linear weight is [in, out] and our adapters compute W + A @ B with A [in, r] (lora_A, "down") and
B [r, out] (lora_B, "up", alpha / rank already folded in). For a change D = W_tuned - W_base the best rank-r
A @ B in the Frobenius norm is the truncated SVD (Eckart-Young): D = U S Vt, A = U[:, :r], B = S[:r] Vt[:r]
(the singular values go into B, the up-projection, as kohya's extraction puts them into lora_up). Its error is
exactly the discarded singular values: ||D - A @ B||_F = sqrt(sum_{i>r} s_i^2).

kohya's extraction (sd-scripts networks/extract_lora_from_models.py) then clamps both factors at one threshold,
the `clamp_quantile` quantile of their entries, against a few outliers dominating a low-precision file. kohya
takes the quantile of the signed entries; here it is the quantile of their absolute values, the symmetric form
of the same bound (with signed entries, a factor whose entries lean positive would be clamped harder below than
above). `clamp_quantile=1` clamps nothing and keeps the exact truncated SVD.

Written with NumPy rather than a library: ppdiffusers and paddlenlp have no LoRA extraction or resizing, and the
SVD (float64, LAPACK) is the whole computation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np


@dataclass(frozen=True)
class LowRank:
    """Factors A [in, r], B [r, out] (float32) of a change, with what they leave out.

    `energy`: ||D||_F^2; `kept`: the squared singular values kept (sum_{i<=r} s_i^2); `error`: ||D - A @ B||_F^2 of
    the factors as written (after any clamp)."""

    down: np.ndarray
    up: np.ndarray
    energy: float
    kept: float
    error: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[1])


def clamp_factors(down: np.ndarray, up: np.ndarray, quantile: float) -> Tuple[np.ndarray, np.ndarray]:
    """Both factors clipped to [-h, h], h the `quantile` quantile of the absolute values of all their entries
    (one threshold for both, as kohya does); `quantile >= 1` returns them unchanged."""
    if quantile >= 1:
        return down, up
    bound = float(np.quantile(np.abs(np.concatenate([down.ravel(), up.ravel()])), quantile))
    return np.clip(down, -bound, bound), np.clip(up, -bound, bound)


def low_rank_change(delta: np.ndarray, rank: int, clamp_quantile: float = 1.0) -> LowRank:
    """The rank-`rank` factors of `delta` ([in, out]) by truncated SVD, then `clamp_factors`. The rank is capped
    at min(in, out), as a LoRA cannot have more."""
    delta = np.asarray(delta, dtype=np.float64)
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    r = min(rank, len(s))
    down, up = clamp_factors(u[:, :r], s[:r, None] * vt[:r], clamp_quantile)
    error = float(np.sum((delta - down @ up) ** 2))
    return LowRank(down.astype(np.float32), up.astype(np.float32), float(np.sum(s ** 2)),
                   float(np.sum(s[:r] ** 2)), error)


def resize_factors(down: np.ndarray, up: np.ndarray, rank: int) -> LowRank:
    """Best rank-`rank` factors of the product down @ up ([in, k] @ [k, out]), as kohya's resize_lora.py does it
    (SVD of the product per module). The product is never formed at full size: with QR factors down = Qa Ra and
    up^T = Qb Rb, down @ up = Qa (Ra Rb^T) Qb^T, so the SVD of the small k x k core gives the same singular values
    and vectors (rotated by Qa, Qb)."""
    down = np.asarray(down, dtype=np.float64)
    up = np.asarray(up, dtype=np.float64)
    qa, ra = np.linalg.qr(down)
    qb, rb = np.linalg.qr(up.T)
    u, s, vt = np.linalg.svd(ra @ rb.T)
    r = min(rank, len(s))
    new_down, new_up = qa @ u[:, :r], (s[:r, None] * vt[:r]) @ qb.T
    energy = float(np.sum(s ** 2))
    return LowRank(new_down.astype(np.float32), new_up.astype(np.float32), energy, float(np.sum(s[:r] ** 2)),
                   float(np.sum(s[r:] ** 2)))


def relative_error(parts) -> float:
    """||D - A @ B||_F / ||D||_F over several modules together (0 when nothing changed)."""
    energy = sum(p.energy for p in parts)
    return float(np.sqrt(sum(p.error for p in parts) / energy)) if energy > 0 else 0.0


def kept_energy(parts) -> float:
    """The Frobenius norm the kept singular values carry, as a share of the change's (kohya's "fro retained")."""
    energy = sum(p.energy for p in parts)
    return float(np.sqrt(sum(p.kept for p in parts) / energy)) if energy > 0 else 1.0
