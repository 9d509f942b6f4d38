"""The relation functions delta of the paper, from phi (query side) and psi (key side) features.

Pairwise, delta(x_i, x_j) for each footprint pixel j (Eq. 2 and the list after it):

    summation      phi(x_i) + psi(x_j)            rel channels
    subtraction    phi(x_i) - psi(x_j)            rel channels   (the official pairwise model)
    concatenation  [phi(x_i), psi(x_j)]           2 rel channels
    hadamard       phi(x_i) (.) psi(x_j)          rel channels
    dot            phi(x_i)^T psi(x_j)            1 channel

Patchwise, delta(x_R(i)) for the whole footprint at once (Eq. 4 and the list after it):

    star           [phi(x_i)^T psi(x_j)]_j               k^2 channels
    clique         [phi(x_j)^T psi(x_k)]_{j,k}           k^4 channels (j-major)
    concatenation  [phi(x_i), [psi(x_j)]_j]              rel (k^2 + 1) channels (the official patchwise model)

Layouts: pairwise tensors are (B, C, k*k, H*W); patchwise relations return (B, C, H*W).
"""

from __future__ import annotations

import torch

PAIRWISE = ("summation", "subtraction", "concatenation", "hadamard", "dot")
PATCHWISE = ("star", "clique", "concatenation")


def pairwise_width(relation: str, rel_planes: int) -> int:
    """Channels of delta(x_i, x_j)."""
    return {"concatenation": 2 * rel_planes, "dot": 1}.get(relation, rel_planes)


def pairwise_relation(relation: str, query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """query (B, C, 1, L): phi(x_i); keys (B, C, k*k, L): psi(x_j) over the footprint -> (B, C', k*k, L)."""
    if relation == "summation":
        return query + keys
    if relation == "subtraction":
        return query - keys
    if relation == "concatenation":
        return torch.cat([query.expand_as(keys), keys], dim=1)
    if relation == "hadamard":
        return query * keys
    if relation == "dot":
        return torch.einsum("bcol,bcol->bol", query.expand_as(keys), keys).unsqueeze(1)
    raise ValueError(f"unknown pairwise relation {relation!r}; one of {', '.join(PAIRWISE)}")


def patchwise_width(relation: str, rel_planes: int, kernel_size: int) -> int:
    """Channels of delta(x_R(i))."""
    kk = kernel_size * kernel_size
    return {"star": kk, "clique": kk * kk, "concatenation": rel_planes * (kk + 1)}[relation]


def patchwise_relation(relation: str, query: torch.Tensor, query_windows, key_windows: torch.Tensor) -> torch.Tensor:
    """query (B, C, L): phi(x_i); query_windows() -> (B, C, k*k, L): phi over the footprint (only the clique
    needs it, so it is a callable); key_windows (B, C, k*k, L): psi over the footprint. Returns (B, C', L)."""
    b, c, kk, length = key_windows.shape
    if relation == "star":
        return torch.einsum("bcl,bcol->bol", query, key_windows)
    if relation == "clique":
        return torch.einsum("bcjl,bckl->bjkl", query_windows(), key_windows).reshape(b, kk * kk, length)
    if relation == "concatenation":
        return torch.cat([query, key_windows.reshape(b, c * kk, length)], dim=1)
    raise ValueError(f"unknown patchwise relation {relation!r}; one of {', '.join(PATCHWISE)}")
