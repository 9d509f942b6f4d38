"""Global multi-head self-attention over a token sequence, plain or with Locality Self-Attention.

    Attn(X) = concat_h softmax(s_h q_h k_h^T + M) v_h  W_out

Plain: s_h = d_head**-0.5 and M = 0. Locality Self-Attention (Lee et al. 2021) makes the softmax sharper
where it helps: s_h is a learned per-head temperature (initialised at d_head**-0.5), and M = -inf on the
diagonal, so no token attends to itself (the CLS token included) and the mass goes to the others.

The product runs through torch.nn.functional.scaled_dot_product_attention, which picks a fused kernel
where one fits (the learned scale is folded into q, the diagonal is a boolean mask). The probabilities
themselves are only built when a map is recorded (`common.inspect.capture`) or asked for (`probabilities`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.inspect.capture import AttentionLayer


class TokenSelfAttention(AttentionLayer, nn.Module):
    """Self-attention of `prefix_tokens` tokens (e.g. CLS) followed by the patch tokens of a `grid`.

    dim: token width; heads x head_dim: the attention width (head_dim defaults to dim // heads);
    qkv_bias: biases on the q, k, v projections (Lee et al.'s code has none); locality: LSA.
    The grid only tells recorded maps where each patch token sits in the image.
    """

    def __init__(self, dim: int, heads: int, grid: tuple[int, int], prefix_tokens: int = 1,
                 head_dim: int | None = None, qkv_bias: bool = False, locality: bool = False,
                 attn_dropout: float = 0.0, proj_dropout: float = 0.0):
        super().__init__()
        head_dim = head_dim or dim // heads
        if head_dim < 1:
            raise ValueError(f"{heads} heads do not fit in dim {dim}; give head_dim")
        self.heads, self.head_dim, self.grid = heads, head_dim, tuple(grid)
        self.prefix_tokens, self.locality, self.attn_dropout = prefix_tokens, locality, attn_dropout
        self.qkv = nn.Linear(dim, 3 * heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(heads * head_dim, dim)
        self.proj_drop = nn.Dropout(proj_dropout)
        if locality:
            self.scale = nn.Parameter(torch.full((heads,), head_dim ** -0.5))
        else:
            self.register_buffer("scale", torch.full((heads,), head_dim ** -0.5), persistent=False)
        # LSA's mask, True where a query may attend to a key: everywhere but the diagonal. Built once.
        tokens = prefix_tokens + self.grid[0] * self.grid[1]
        self.register_buffer("attend", ~torch.eye(tokens, dtype=torch.bool) if locality else None, persistent=False)

    def _scaled_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (times each head's scale), k, v, each (B, heads, N, head_dim)."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q * self.scale.to(q.dtype).view(1, -1, 1, 1), k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._scaled_qkv(x)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.attend,
                                             dropout_p=self.attn_dropout if self.training else 0.0, scale=1.0)
        if self.recording:
            self._record(q, k)
        return self.proj_drop(self.proj(out.transpose(1, 2).flatten(2)))

    def _probabilities(self, q: torch.Tensor, k: torch.Tensor, query_index: torch.Tensor | None) -> torch.Tensor:
        """Attention weights (B, heads, Q, N) of the token queries in `query_index` (all when None)."""
        n = k.shape[2]
        index = torch.arange(n, device=q.device) if query_index is None else query_index.to(q.device)
        logits = q[:, :, index].float() @ k.float().transpose(-1, -2)
        if self.locality:
            logits[:, :, torch.arange(len(index), device=q.device), index] = float("-inf")
        return logits.softmax(-1)

    @torch.no_grad()
    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """The full attention matrix (B, heads, N, N) of a layer input x (B, N, dim); rows sum to one."""
        q, k, _ = self._scaled_qkv(x)
        return self._probabilities(q, k, None)

    def _record(self, q: torch.Tensor, k: torch.Tensor) -> None:
        # Patch queries over patch keys: the weight each puts on a prefix (CLS) key is not drawn, so these
        # maps sum to one minus that weight. The CLS query over the patch keys is a map of its own.
        p, grid = self.prefix_tokens, self.grid

        def patch_queries(index):
            cells = torch.arange(grid[0] * grid[1]) if index is None else index
            return self._probabilities(q, k, cells + p)[..., p:].unflatten(-1, grid)

        self.record(patch_queries, query_grid=grid, key_grid=grid)
        if p:
            def cls_query(index):
                count = 1 if index is None else len(index)
                weights = self._probabilities(q, k, torch.zeros(1, dtype=torch.long))[..., p:].unflatten(-1, grid)
                return weights.expand(-1, -1, count, -1, -1)

            self.record(cls_query, query_grid=(1, 1), key_grid=grid, query_token="cls")

    def epoch_metrics(self) -> dict[str, float]:
        """LSA: the mean learned temperature 1/s_h over heads (d_head**0.5 at init), logged every epoch."""
        return {"lsa_temperature": (1 / self.scale.detach().float()).mean().item()} if self.locality else {}

    def extra_repr(self) -> str:
        return f"heads={self.heads}, head_dim={self.head_dim}, grid={self.grid}, locality={self.locality}"
