"""The context block: a small recurrent compressor from token embeddings to context vectors.

``context_t = LayerNorm(context_{t-1} + FFN([context_{t-1}, embed_norm(e_t)]))`` with a zero
context before the first token. Run token by token (`forward`, exact, used for inference) or as a
parallel fixed-point iteration (`iterate`, used by Phase 1 training and Lagged Cache Training):
iteration k feeds iteration k−1's contexts shifted by one position.
Weights are initialised normal(0, 0.1), biases normal(0, 0.01), as in the seeds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ContextLayer(nn.Module):
    """One recurrent step: FFN over [context, token embedding], residual, LayerNorm."""

    def __init__(self, context_dim: int, embed_dim: int, ffn_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.fc1 = nn.Linear(context_dim + embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, context_dim)
        self.norm = nn.LayerNorm(context_dim, eps=eps)
        for lin in (self.fc1, self.fc2):
            nn.init.normal_(lin.weight, std=0.1)
            nn.init.normal_(lin.bias, std=0.01)

    def forward(self, context: Tensor, emb: Tensor) -> Tensor:
        """context (..., Cc), emb (..., E) normalised -> next context (..., Cc)."""
        h = self.fc2(F.gelu(self.fc1(torch.cat((context, emb), dim=-1))))
        return self.norm(context + h)


class ContextBlock(nn.Module):
    def __init__(self, context_dim: int, embed_dim: int, ffn_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.context_dim = context_dim
        self.embed_norm = nn.LayerNorm(embed_dim, eps=eps)
        self.layer = ContextLayer(context_dim, embed_dim, ffn_dim, eps)

    def initial(self, batch_size: int, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.zeros(batch_size, self.context_dim, device=device, dtype=dtype)

    def forward(self, emb: Tensor, last: Tensor) -> tuple[Tensor, Tensor]:
        """Exact recurrence. emb (B, T, E), last (B, Cc) -> contexts (B, T, Cc), new last."""
        e = self.embed_norm(emb)
        out = []
        c = last
        for t in range(e.shape[1]):
            c = self.layer(c, e[:, t])
            out.append(c)
        if not out:
            return emb.new_zeros(emb.shape[0], 0, self.context_dim), last
        return torch.stack(out, dim=1), c

    def iterate(self, emb: Tensor, prev: Tensor, first: Tensor | None = None) -> Tensor:
        """One parallel fixed-point step (`shifted_prev_context`).

        emb (B, T, E) raw embeddings; prev (B, T, Cc) the previous iteration's contexts.
        Token t gets prev[t-1] as its context (``first``, default zeros, for t = 0). Repeating
        this T times reproduces `forward` exactly; in practice it converges much sooner.
        """
        if first is None:
            first = prev.new_zeros(prev.shape[0], prev.shape[-1])
        shifted = torch.cat((first.unsqueeze(1), prev[:, :-1]), dim=1)
        return self.layer(shifted, self.embed_norm(emb))
