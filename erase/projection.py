"""Projection of a gradient onto the cone of memory gradients, as a `grad_transform` of the training loop.

GEM's rule (Lopez-Paz & Ranzato, 2017), which Scissorhands uses: given memory gradients m_1..m_t (rows of M) and a
gradient g with some ⟨g, m_i⟩ < 0, step along g̃ = g + Mᵀv instead, v = argmin_{v ≥ margin} ½‖g + Mᵀv‖² (the dual
of min ‖z − g‖² subject to Mz ≥ 0, with GEM's margin biasing v upwards). Its optimality conditions give
⟨g̃, m_i⟩ ≥ 0 for every memory, so a descent step on g̃ does not, to first order, increase any memory's loss. The
dual lives in t dimensions (t memories), so it is solved exactly on the t×t Gram matrix in float64; the weights are
only touched to form the Gram matrix, the products ⟨g, m_i⟩ and the final sum.
"""

from __future__ import annotations

import torch
from torch import nn

Grads = dict[str, torch.Tensor]


def dot(a: Grads, b: Grads) -> float:
    """⟨a, b⟩ over all tensors, summed in float64."""
    total = torch.zeros((), dtype=torch.float64, device=next(iter(a.values())).device)
    for name, x in a.items():
        total += torch.dot(x.reshape(-1).double(), b[name].reshape(-1).to(x.device).double())
    return float(total)


def gram(memories: list[Grads]) -> torch.Tensor:
    """(t, t) float64 matrix of the memories' inner products."""
    t = len(memories)
    out = torch.zeros(t, t, dtype=torch.float64)
    for i in range(t):
        for j in range(i, t):
            out[i, j] = out[j, i] = dot(memories[i], memories[j])
    return out


def nonnegative_qp(p: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """argmin_{u ≥ 0} ½·uᵀPu + cᵀu for a positive semi-definite P: Lawson and Hanson's active-set NNLS written on
    the Gram matrix (P = AᵀA, c = −Aᵀb), exact in a few iterations for the handful of memories."""
    t = c.numel()
    scale = max(float(p.abs().max()), float(c.abs().max()), 1e-300)
    tol = 1e-12 * scale * t
    u = torch.zeros(t, dtype=torch.float64)
    free = torch.zeros(t, dtype=torch.bool)
    for _ in range(3 * t + 10):
        w = -(p @ u + c)  # minus the objective's gradient: positive where raising u_i helps
        w[free] = -torch.inf
        if bool(free.all()) or float(w.max()) <= tol:
            break
        free[int(w.argmax())] = True
        for _ in range(3 * t + 10):
            idx = free.nonzero().reshape(-1)
            z = torch.zeros_like(u)
            z[idx] = torch.linalg.lstsq(p[idx][:, idx], -c[idx].unsqueeze(1)).solution.reshape(-1)
            if bool((z[idx] > 0).all()):
                break
            blocking = free & (z <= 0)  # step from u towards z until the first free variable reaches 0
            alpha = torch.min(u[blocking] / (u[blocking] - z[blocking]))
            u = u + alpha * (z - u)
            free &= u > tol * 1e-3
            u[~free] = 0
        u = z.clamp(min=0)
    return u


def project_to_cone(
    grad: Grads, memories: list[Grads], margin: float = 0.0, memory_gram: torch.Tensor | None = None
) -> Grads | None:
    """g̃ = g + Σ v_i m_i with ⟨g̃, m_i⟩ ≥ 0 for every memory (module docstring); None when g already has no
    negative inner product with any of them (it is then used unchanged, as GEM and Scissorhands do)."""
    products = torch.tensor([dot(grad, m) for m in memories], dtype=torch.float64)
    if bool((products >= 0).all()):
        return None
    p = gram(memories) if memory_gram is None else memory_gram
    v = nonnegative_qp(p, products + margin * p.sum(dim=1)) + margin  # v = u + margin, u ≥ 0
    out = {}
    for name, g in grad.items():
        total = g.double()
        for weight, m in zip(v.tolist(), memories):
            total = total + weight * m[name].to(g.device).double()
        out[name] = total.to(g.dtype)
    return out


class ConeProjection:
    """`grad_transform` for erase.train: every `every` optimizer steps (step % every == 0), project the trained
    parameters' gradient onto the cone of `memories` (name -> tensor, the trained parameters' names)."""

    def __init__(self, memories: list[Grads], margin: float = 0.0, every: int = 1):
        self.memories, self.margin, self.every = memories, margin, every
        self.memory_gram = gram(memories)
        self.projected_steps: list[int] = []  # the steps whose gradient was changed

    def __call__(self, params: dict[str, nn.Parameter], step: int) -> None:
        if step % self.every:
            return
        grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}
        projected = project_to_cone(grads, self.memories, self.margin, self.memory_gram)
        if projected is None:
            return
        for name, p in params.items():
            p.grad = projected[name]
        self.projected_steps.append(step)
