"""Multi-head self-attention over a 2-D grid of tokens, with the paper's positional scores.

Every head h attends over all H*W keys of the grid with attention logits
a_h(q, k) from one of the score modules below, and mixes the *full* hidden
vector of the keys (head dim = hidden, as in the official model):

    MHSA(X) = concat_h [ softmax_k a_h(q, k) X_k ] W_value + b_value,   W_value: (heads * hidden) -> hidden

Positions are integer grid cells; delta = key - query = (dy, dx). The score
modules compute their position terms on the fly from the grid size, so no
position table is ever a buffer and checkpoints hold only parameters.

- `GaussianScores` (quadratic encoding, no content): per head a centre
  Delta_h = (dy, dx) and a precision P_h,
      a_h(delta) = -1/2 (delta - Delta_h)^T P_h (delta - Delta_h),
  isotropic P_h = s_h^2 I (the paper's alpha_h = s_h^2 / 2), anisotropic
  P_h = S_h S_h^T (the paper's Sigma^-1; positive semi-definite by
  construction). The maximum over integer keys is at query + round(Delta_h)
  in the isotropic case: the centre is exactly where the parameters say.
- `LearnedPositionScores` (w.r, positional only): a_h(delta) = w_row_h . row(dy) + w_col_h . col(dx).
- `ContentScores` (q.r, or q.k + q.r): a_h(q, k) = (q_h . k_h + q_h . [row(dy), col(dx)]) / sqrt(hidden).

Cost, in multiply-accumulates per image of Q = H*W tokens (the convention of common/inspect/flops.py, which
torch.utils.flop_counter follows here): the weighted sums heads * Q^2 * hidden and W_value Q * heads * hidden^2,
plus the scores. None for the Gaussian ones (the quadratic form of an offset is element-wise; the anisotropic
ones add the 2x2 product S_h S_h^T of each head); the tables times w for the learned ones (heads * (2G_h - 1 +
2G_w - 1) * embedding_size, once per batch); for q.r the query projection Q * hidden * heads * hidden and
`relative_logits` (heads * Q * (H + W) * hidden / 2: the H row and W column logits of every query, counted as
such rather than as the matrix product over every table row that computes them); q.k adds the key projection
and heads * Q^2 * hidden. The softmax is not counted.
"""

from __future__ import annotations

import torch
from torch import nn

from common.inspect.capture import AttentionLayer
from common.inspect.flops import counted_op
from common.models.weight_decay import mark_no_weight_decay

ATTENTIONS = ("quadratic", "quadratic_aniso", "learned", "learned_query", "learned_content")
INIT_STD = 0.02  # BERT's initializer range, for every learned weight and table under init="bert"
# "torch_default": what the official BertImage gets, since it never applies BERT's init_bert_weights: PyTorch's
# Linear init, LayerNorm 1 and 0, nn.Embedding tables N(0, 1). "bert": Linear and tables N(0, 0.02), zero biases.
INITS = ("torch_default", "bert")
# How the attention-probability dropout mask is drawn for positional-only scores (Gaussian, learned w.r), which
# are the same for every image: one mask per image, or one mask shared by the whole batch, as the official code
# does by dropping out the batch-free (H, W, heads, H, W) probabilities. Content scores always draw per image.
DROPOUT_MASKS = ("per_image", "shared")


def relative_offsets(size: int, device=None) -> torch.Tensor:
    """(size, size) integer offsets key - query along one axis: out[q, k] = k - q."""
    pos = torch.arange(size, device=device)
    return pos[None, :] - pos[:, None]


def _combine_axes(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """(..., Hq, Hk) + (..., Wq, Wk) -> (..., Hq*Wq, Hk*Wk): the score of a 2-D offset as a sum over its axes."""
    *lead, h, _ = row.shape
    w = col.shape[-2]
    out = row[..., :, None, :, None] + col[..., None, :, None, :]
    return out.reshape(*lead, h * w, h * w)


def relative_logits_macs(q: torch.Tensor, row: torch.Tensor, col: torch.Tensor, iy: torch.Tensor,
                         ix: torch.Tensor) -> int:
    """Multiply-accumulates of `relative_logits`: B * heads * H * W * (H + W) * embedding_size."""
    b, heads, height, width, _ = q.shape
    return b * heads * height * width * (height + width) * row.shape[1]


@counted_op("sa_conv_relative_logits", macs=relative_logits_macs)
def relative_logits(q: torch.Tensor, row: torch.Tensor, col: torch.Tensor, iy: torch.Tensor,
                    ix: torch.Tensor) -> torch.Tensor:
    """q . [row(dy), col(dx)] for every (query, key) pair of an H x W grid: (B, heads, H*W, H*W).

    q: (B, heads, H, W, 2e), its first half against the row table (2G_h - 1, e), its second against the
    column table (2G_w - 1, e); iy (H, H) and ix (W, W): the table rows of the (query, key) offsets.
    """
    b, heads, height, width, _ = q.shape
    e = row.shape[1]
    # q . row(dy) for every table row, then pick the row of each (query row, key row) pair.
    qr_row = q[..., :e] @ row.to(q.dtype).t()  # (B, heads, H, W, 2Gh - 1)
    qr_col = q[..., e:] @ col.to(q.dtype).t()
    by_row = torch.gather(qr_row, -1, iy[:, None, :].expand(b, heads, height, width, height))
    by_col = torch.gather(qr_col, -1, ix[None, :, :].expand(b, heads, height, width, width))
    logits = by_row[..., :, None] + by_col[..., None, :]  # (B, heads, H, W, Hk, Wk)
    return logits.reshape(b, heads, height * width, height * width)


class GaussianScores(nn.Module):
    """Quadratic (Gaussian) positional scores, one centre and spread per head; no content term.

    Init as the paper: centres ~ N(0, centre_std^2) grid cells, spreads ~ 1 + N(0, spread_std^2)
    (anisotropic: S = I + N(0, spread_std^2) per entry). Neither is weight-decayed.
    """

    content = False

    def __init__(self, heads: int, anisotropic: bool = False, centre_std: float = 2.0, spread_std: float = 0.01,
                 grid: tuple[int, int] = (16, 16)):
        super().__init__()
        self.heads, self.anisotropic = heads, anisotropic
        self.grid = tuple(grid)  # the grid the model is built for: what gauss_viz draws
        self.centres = nn.Parameter(torch.randn(heads, 2) * centre_std)  # (dy, dx) in grid cells
        if anisotropic:
            self.spreads = nn.Parameter(torch.eye(2).repeat(heads, 1, 1) + spread_std * torch.randn(heads, 2, 2))
        else:
            self.spreads = nn.Parameter(1.0 + spread_std * torch.randn(heads))
        mark_no_weight_decay(self.centres, self.spreads)

    def precision(self) -> torch.Tensor:
        """(heads, 2, 2) P_h over (dy, dx): s_h^2 I or S_h S_h^T."""
        if self.anisotropic:
            return self.spreads @ self.spreads.transpose(-1, -2)
        eye = torch.eye(2, dtype=self.spreads.dtype, device=self.spreads.device)
        return self.spreads[:, None, None] ** 2 * eye

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (heads, H*W, H*W) for a (B, H, W, C) input: the same for every image."""
        height, width = x.shape[1:3]
        c = self.centres
        ey = relative_offsets(height, c.device).to(c.dtype) - c[:, 0, None, None]  # (heads, Hq, Hk)
        ex = relative_offsets(width, c.device).to(c.dtype) - c[:, 1, None, None]  # (heads, Wq, Wk)
        if not self.anisotropic:
            half_s2 = (0.5 * self.spreads ** 2)[:, None, None]
            return -_combine_axes(half_s2 * ey ** 2, half_s2 * ex ** 2)
        p = self.precision()
        quad = _combine_axes(p[:, 0, 0, None, None] * ey ** 2, p[:, 1, 1, None, None] * ex ** 2)
        cross = (ey[:, :, None, :, None] * ex[:, None, :, None, :]).reshape_as(quad)
        return -0.5 * (quad + 2 * p[:, 0, 1, None, None] * cross)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, anisotropic={self.anisotropic}"


class _RelativeTables(nn.Module):
    """Row and column embeddings of the offsets -(G-1) .. G-1 of a declared G_h x G_w grid."""

    def __init__(self, grid: tuple[int, int], embedding_size: int):
        super().__init__()
        self.grid = tuple(grid)
        self.row = nn.Parameter(torch.randn(2 * grid[0] - 1, embedding_size) * INIT_STD)
        self.col = nn.Parameter(torch.randn(2 * grid[1] - 1, embedding_size) * INIT_STD)

    def init_tables(self, init: str) -> None:
        """N(0, 0.02) under "bert"; N(0, 1), nn.Embedding's init, under "torch_default"."""
        std = INIT_STD if init == "bert" else 1.0
        nn.init.normal_(self.row, std=std)
        nn.init.normal_(self.col, std=std)

    def offset_index(self, height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Table rows of the (query, key) offsets along each axis: (H, H) and (W, W)."""
        if height > self.grid[0] or width > self.grid[1]:
            raise ValueError(f"input grid {height}x{width} is larger than the {self.grid[0]}x{self.grid[1]} grid "
                             f"the relative embeddings were built for; build the model with a larger image_size")
        return (relative_offsets(height, device) + self.grid[0] - 1,
                relative_offsets(width, device) + self.grid[1] - 1)


class LearnedPositionScores(_RelativeTables):
    """Positional only: a_h(delta) = w_row_h . row(dy) + w_col_h . col(dx) (the paper's w^T r)."""

    content = False

    def __init__(self, heads: int, grid: tuple[int, int], embedding_size: int):
        super().__init__(grid, embedding_size)
        self.heads = heads
        self.w_row = nn.Parameter(torch.randn(heads, embedding_size) * INIT_STD)
        self.w_col = nn.Parameter(torch.randn(heads, embedding_size) * INIT_STD)

    def init_tables(self, init: str) -> None:
        """Also w_row, w_col: the official head_keys_row/col are bias-free Linear(embedding, heads) layers, so
        PyTorch draws them U(-1/sqrt(embedding), 1/sqrt(embedding))."""
        super().init_tables(init)
        for w in (self.w_row, self.w_col):
            if init == "bert":
                nn.init.normal_(w, std=INIT_STD)
            else:
                bound = w.shape[1] ** -0.5
                nn.init.uniform_(w, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (heads, H*W, H*W), the same for every image."""
        iy, ix = self.offset_index(*x.shape[1:3], x.device)
        row = (self.row @ self.w_row.t()).t()[:, iy]  # (heads, Hq, Hk)
        col = (self.col @ self.w_col.t()).t()[:, ix]
        return _combine_axes(row, col)


class ContentScores(_RelativeTables):
    """q_h . r(delta) with r = [row(dy), col(dx)], plus q_h . k_h when `content`; scaled by hidden^-1/2.

    q and k are Linear(hidden -> heads * hidden) (head dim = hidden), so r is 2 * embedding_size = hidden wide.
    """

    def __init__(self, hidden: int, heads: int, grid: tuple[int, int], embedding_size: int, content: bool):
        if 2 * embedding_size != hidden:
            raise ValueError(f"q.r needs [row, col] embeddings as wide as a head (hidden = {hidden}): "
                             f"embedding_size must be {hidden / 2:g}, got {embedding_size}")
        super().__init__(grid, embedding_size)
        self.hidden, self.heads, self.content = hidden, heads, content
        self.scale = hidden ** -0.5
        self.query = nn.Linear(hidden, heads * hidden)
        self.key = nn.Linear(hidden, heads * hidden) if content else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, heads, H*W, H*W)."""
        b, height, width, _ = x.shape
        q = self.query(x).reshape(b, height, width, self.heads, self.hidden).permute(0, 3, 1, 2, 4) * self.scale
        logits = relative_logits(q, self.row, self.col, *self.offset_index(height, width, x.device))
        if self.key is not None:
            k = self.key(x).reshape(b, height * width, self.heads, self.hidden).transpose(1, 2)
            logits = logits + q.reshape(b, self.heads, height * width, self.hidden) @ k.transpose(-1, -2)
        return logits


class ImageSelfAttention(AttentionLayer, nn.Module):
    """Multi-head self-attention on a (B, H, W, hidden) grid; each head mixes the full hidden vector.

    attention: "quadratic" (isotropic Gaussian), "quadratic_aniso", "learned" (w.r), "learned_query" (q.r)
    or "learned_content" (q.k + q.r). `grid` is the grid the model is built for: it sizes the learned
    relative tables (a larger input is an error) and is what gauss_viz draws; Gaussian heads work on any grid.
    Dropout on the attention probabilities as in BERT, drawn per image, or for positional-only scores once for
    the whole batch (attention_dropout_mask="shared", the official code). `out_features` (default hidden) is the
    width the value projection maps the concatenated heads to: another width lets the layer fill a backbone's
    mixer slot that changes the channel count (sa_conv/mixer.py).
    """

    def __init__(self, hidden: int, heads: int, attention: str = "quadratic", grid: tuple[int, int] = (16, 16),
                 embedding_size: int | None = None, attention_dropout: float = 0.0,
                 attention_dropout_mask: str = "per_image", out_features: int | None = None):
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}")
        if attention_dropout_mask not in DROPOUT_MASKS:
            raise ValueError(f"attention_dropout_mask must be one of {', '.join(DROPOUT_MASKS)}, "
                             f"got {attention_dropout_mask!r}")
        self.attention_dropout_mask = attention_dropout_mask
        if heads < 1:
            raise ValueError(f"heads must be >= 1, got {heads}")
        self.hidden, self.heads, self.attention = hidden, heads, attention
        if attention.startswith("quadratic"):
            self.scores = GaussianScores(heads, anisotropic=attention == "quadratic_aniso", grid=grid)
        elif attention == "learned":
            self.scores = LearnedPositionScores(heads, grid, embedding_size or hidden)
        else:
            self.scores = ContentScores(hidden, heads, grid, embedding_size or hidden // 2,
                                        content=attention == "learned_content")
        self.dropout = nn.Dropout(attention_dropout)
        self.value = nn.Linear(heads * hidden, out_features or hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, height, width, c = x.shape
        logits = self.scores(x)  # (heads, Q, K) when positional only, else (B, heads, Q, K)
        probs = logits.softmax(-1, dtype=torch.float32) if logits.dtype in (torch.float16, torch.bfloat16) \
            else logits.softmax(-1)
        if self.recording:
            self.record(self._weights_fn(probs, b, (height, width)), (height, width), (height, width))
        if self.training and self.dropout.p > 0:
            shared = probs.dim() == 3 and self.attention_dropout_mask == "shared"
            probs = self.dropout(probs if shared else probs.expand(b, *probs.shape[-3:]))
        tokens = x.reshape(b, height * width, c)
        probs = probs.to(tokens.dtype) if not torch.is_autocast_enabled() else probs
        pattern = "hqk,bkc->bqhc" if probs.dim() == 3 else "bhqk,bkc->bqhc"
        mixed = torch.einsum(pattern, probs, tokens)  # (B, Q, heads, hidden)
        return self.value(mixed.reshape(b, height, width, self.heads * c))

    @staticmethod
    def _weights_fn(probs: torch.Tensor, batch: int, grid: tuple[int, int]):
        def weights(index: torch.Tensor | None) -> torch.Tensor:
            p = probs.detach()
            p = p.expand(batch, *p.shape[-3:])
            if index is not None:
                p = p[:, :, index.to(p.device)]
            return p.reshape(*p.shape[:3], *grid)

        return weights

    def extra_repr(self) -> str:
        return f"hidden={self.hidden}, heads={self.heads}, attention={self.attention!r}"


def init_bert_(module: nn.Module) -> None:
    """BERT's init: Linear weights N(0, 0.02) and zero biases; LayerNorm weight 1, bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=INIT_STD)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


__all__ = ["ATTENTIONS", "ContentScores", "DROPOUT_MASKS", "GaussianScores", "INITS", "ImageSelfAttention",
           "LearnedPositionScores", "init_bert_", "relative_logits", "relative_offsets"]
