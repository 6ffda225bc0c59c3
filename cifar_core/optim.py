"""Muon for conv filters, SGD (Nesterov) for everything else, in one torch optimizer.

Muon (public: Keller Jordan et al., 2024; the optimizer of the current CIFAR-10 speed record)
replaces each filter's momentum update by the nearest semi-orthogonal matrix (an approximate
polar factor from a few Newton-Schulz iterations), so every direction of the filter bank moves at
the same rate instead of the few dominant ones SGD follows. Our CNN's conv weights feed
fixed-scale BatchNorm and are therefore scale-invariant: we keep each filter bank at a fixed norm,
which makes weight decay unnecessary for them.

    opt = MuonSGD(groups)   # groups with "muon": True get Muon; the rest plain Nesterov SGD
"""
from __future__ import annotations

import torch

# Quintic Newton-Schulz coefficients that push all singular values towards 1 in few steps
# (they do not converge exactly; about 0.7-1.2 is what the update needs).
_NS_COEFFS = (3.4445, -4.7750, 2.0315)


@torch.no_grad()
def orthogonalize(matrix: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U V^T of matrix = U S V^T (rows x cols), by Newton-Schulz iteration."""
    a, b, c = _NS_COEFFS
    tall = matrix.shape[0] > matrix.shape[1]
    x = matrix.T if tall else matrix  # iterate on the wide side: the Gram matrix is the small one
    x = x / (x.norm() + eps)          # singular values <= 1: inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


class MuonSGD(torch.optim.Optimizer):
    """Param groups flagged {"muon": True} (conv filters, >= 2-D) take Muon steps; the others
    SGD with Nesterov momentum and weight decay. Every group honours its own "lr" and "momentum"."""

    def __init__(self, groups, lr: float, momentum: float = 0.85, ns_steps: int = 5):
        super().__init__(groups, dict(lr=lr, momentum=momentum, weight_decay=0.0, muon=False, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # the torch.optim contract: re-evaluate the loss, with gradients
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mom = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"] and not group["muon"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                buf = self.state[p].get("momentum")
                if buf is None:
                    buf = self.state[p]["momentum"] = torch.zeros_like(grad)
                buf.mul_(mom).add_(grad)
                update = grad.add(buf, alpha=mom)  # Nesterov
                if group["muon"]:
                    # fixed filter-bank norm (sqrt(out channels)): the step size is then relative
                    p.mul_(len(p) ** 0.5 / (p.norm() + 1e-12))
                    update = orthogonalize(update.reshape(len(p), -1), group["ns_steps"]).view_as(p)
                p.add_(update, alpha=-lr)
        return loss
