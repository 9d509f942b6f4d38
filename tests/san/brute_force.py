"""The paper's equations written out pixel by pixel, from a SelfAttention2d's own parameters.

Eval mode only: gamma's batch norms then act on each vector alone (running statistics), so one
pixel's output does not depend on the others. Batch item 0.
"""

from __future__ import annotations

import torch


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random parameters and running statistics, so that no term of the formula can hide."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "weight" in name else 0.2))
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn_like(m.running_mean) * 0.3)
                m.running_var.copy_(torch.rand_like(m.running_var) + 0.5)
    return module.eval()


def _bn(bn, v):
    return (v - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def _gamma(g, v):
    h = g.conv1.weight[:, :, 0, 0] @ torch.relu(_bn(g.bn1, v))
    return g.conv2.weight[:, :, 0, 0] @ torch.relu(_bn(g.bn2, h)) + g.conv2.bias


def _project(conv, x, y, xc):
    return conv.weight[:, :, 0, 0] @ x[0, :, y, xc] + conv.bias


def _coordinate(t, n):
    return -1.0 + 2.0 * t / (n - 1)


def _mirror(t, n):
    return -t if t < 0 else 2 * (n - 1) - t if t > n - 1 else t


def footprint(m, x, y, xc):
    """[(ny, nx, phi_j, psi_j, beta_j)] over the window of (y, xc), row-major, under m's padding rule."""
    h, w = x.shape[-2:]
    r = m.kernel_size // 2
    out = []
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            ny, nx = y + dy, xc + dx
            if m.padding == "reflection":
                ny, nx = _mirror(ny, h), _mirror(nx, w)
            if 0 <= ny < h and 0 <= nx < w:
                feats = [_project(conv, x, ny, nx) for conv in (m.query, m.key, m.value)]
            else:  # zero padding of the projected maps
                feats = [torch.zeros(conv.out_channels) for conv in (m.query, m.key, m.value)]
            out.append((ny, nx, *feats))
    return out


def _aggregate(alpha, values):
    """alpha (k*k, G) and values [beta_j] -> y: channel c uses weight group c mod G."""
    betas = torch.stack(values)  # (k*k, C)
    groups = alpha.shape[1]
    share = torch.arange(betas.shape[1]) % groups
    return (alpha[:, share] * betas).sum(0)


def pairwise_pixel(m, x, y, xc):
    h, w = x.shape[-2:]
    phi_i = _project(m.query, x, y, xc)
    pos = m.weights.position
    logits, values = [], []
    for ny, nx, _, psi_j, beta_j in footprint(m, x, y, xc):
        delta = {"summation": lambda: phi_i + psi_j,
                 "subtraction": lambda: phi_i - psi_j,
                 "concatenation": lambda: torch.cat([phi_i, psi_j]),
                 "hadamard": lambda: phi_i * psi_j,
                 "dot": lambda: (phi_i @ psi_j).reshape(1)}[m.relation]()
        if pos is not None:
            c_i = torch.tensor([_coordinate(y, h), _coordinate(xc, w)])
            c_j = torch.tensor([_coordinate(ny, h), _coordinate(nx, w)])
            p_i, p_j = (pos.proj.weight[:, :, 0, 0] @ c + pos.proj.bias for c in (c_i, c_j))
            delta = torch.cat([delta, p_i - p_j])
        logits.append(_gamma(m.weights.gamma, delta))
        values.append(beta_j)
    return _aggregate(torch.stack(logits).softmax(0), values)


def patchwise_pixel(m, x, y, xc):
    phi_i = _project(m.query, x, y, xc)
    window = footprint(m, x, y, xc)
    phis = [f[2] for f in window]
    psis = [f[3] for f in window]
    if m.relation == "star":
        delta = torch.stack([phi_i @ psi_j for psi_j in psis])
    elif m.relation == "clique":
        delta = torch.stack([phi_j @ psi_k for phi_j in phis for psi_k in psis])
    else:  # concatenation: [phi_i, psi_j for every j], channel-major
        delta = torch.cat([phi_i, torch.stack(psis, dim=1).flatten()])
    groups, kk = m.weights.groups, len(window)
    alpha = _gamma(m.weights.gamma, delta).view(groups, kk).t()  # (k*k, G), no softmax
    return _aggregate(alpha, [f[4] for f in window])
