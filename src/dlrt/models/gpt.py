"""A small decoder-only transformer (GPT) for low-rank pre-training of language models.

The architecture is GPT-2's (Radford et al. 2019) in its pre-norm form: a token
and a learned position embedding, ``n_layers`` blocks of causal self-attention
and a GELU MLP, each behind a LayerNorm and added back to the residual stream,
a final LayerNorm and a head that shares the token embedding's weight.

Every projection is its own ``nn.Linear`` (``attn.q``, ``attn.k``, ``attn.v``,
``attn.out``, ``mlp.fc``, ``mlp.proj``), so :func:`dlrt.convert` makes each of
them low-rank, while the embeddings, the norms and the tied head stay dense::

    from dlrt.models import get_model
    model = get_model("gpt-tiny")          # 3.3 M parameters, byte vocabulary
    dlrt.convert(model, rank=32)           # 24 projections low-rank; head tied, left dense
    logits = model(tokens)                 # (batch, time) int64 -> (batch, time, vocab)

Attention goes through :func:`torch.nn.functional.scaled_dot_product_attention`
with ``is_causal=True``: the fused kernels on a GPU, the math one on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["GPT", "GPT_SIZES", "GPTConfig", "gpt"]


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a :class:`GPT`.

    Attributes:
        vocab_size: tokens in the vocabulary (256: the bytes of :class:`dlrt.data.ByteTokenizer`).
        context: the longest sequence the model reads (the position embedding's length).
        d_model: width of the residual stream.
        n_layers: transformer blocks.
        n_heads: attention heads (``d_model`` must be a multiple).
        mlp_ratio: hidden width of the MLP over ``d_model``.
        dropout: dropout on the embeddings, the attention weights and each residual branch.
        bias: biases in the projections and the norms.
    """

    vocab_size: int = 256
    context: int = 128
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    bias: bool = True

    def __post_init__(self) -> None:
        for key in ("vocab_size", "context", "d_model", "n_layers", "n_heads", "mlp_ratio"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"GPT {key} must be a positive int, got {key}={value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"GPT d_model={self.d_model} is not a multiple of n_heads={self.n_heads}: pick n_heads dividing d_model"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPT dropout must lie in [0, 1), got {self.dropout}")


GPT_SIZES: dict[str, GPTConfig] = {
    # 3.3 M: a few minutes of training on 2 CPU cores
    "tiny": GPTConfig(context=128, d_model=256, n_layers=4, n_heads=4),
    # 25 M, 101 M and 304 M: for a GPU
    "small": GPTConfig(context=256, d_model=512, n_layers=8, n_heads=8),
    "medium": GPTConfig(context=512, d_model=768, n_layers=14, n_heads=12),
    "large": GPTConfig(context=1024, d_model=1024, n_layers=24, n_heads=16),
}
"""The registered sizes, ``get_model("gpt-<size>")``. With the byte vocabulary: ``tiny`` 3.3 M parameters
(d 256, 4 layers, 4 heads, context 128; trains on 2 CPU cores in minutes), ``small`` 25 M (512, 8, 8, 256),
``medium`` 100 M (768, 14, 12, 512) and ``large`` 304 M (1024, 24, 16, 1024), for a GPU."""


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position ``t`` sees positions ``≤ t`` only."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.dropout = cfg.dropout
        self.q = nn.Linear(d, d, bias=cfg.bias)
        self.k = nn.Linear(d, d, bias=cfg.bias)
        self.v = nn.Linear(d, d, bias=cfg.bias)
        self.out = nn.Linear(d, d, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.n_heads

        def heads(y: Tensor) -> Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        y = F.scaled_dot_product_attention(
            heads(self.q(x)),
            heads(self.k(x)),
            heads(self.v(x)),
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=True,
        )
        return self.resid_drop(self.out(y.transpose(1, 2).reshape(b, t, d)))


class MLP(nn.Module):
    """``proj(GELU(fc(x)))``, widening by ``mlp_ratio``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """A decoder-only transformer language model: ``(batch, time)`` token ids to next-token logits.

    Modules: ``tok`` (token embedding), ``pos`` (position embedding),
    ``blocks.<i>`` (each with ``ln1``, ``attn.{q,k,v,out}``, ``ln2``,
    ``mlp.{fc,proj}``), ``ln_f`` and ``head``, whose weight *is* ``tok.weight``
    (weight tying, Press & Wolf 2017), so the model stores it once.
    :func:`dlrt.convert` leaves a layer that shares its weight dense.

    Weights start as GPT-2's: normal with std 0.02, the projections that
    write into the residual stream (``attn.out``, ``mlp.proj``) with std
    ``0.02 / √(2 · n_layers)``, biases zero.

    Args:
        config: the shape (:class:`GPTConfig`); keyword arguments override its fields,
            e.g. ``GPT(n_layers=2)``.

    Attributes:
        config: the resolved :class:`GPTConfig`.
        input_shape: ``(context,)``, the shape of one example (int64 token ids).
    """

    def __init__(self, config: GPTConfig | None = None, **overrides: int | float | bool) -> None:
        super().__init__()
        fields = GPTConfig.__dataclass_fields__
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise ValueError(f"GPT has no setting {', '.join(unknown)}; valid: {', '.join(fields)}")
        cfg = replace(config or GPTConfig(), **overrides)
        self.config = cfg
        self.input_shape: tuple[int, ...] = (cfg.context,)
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok.weight
        self._init_weights()

    def _init_weights(self) -> None:
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and module is not self.head:
                std = residual_std if name.endswith(("attn.out", "mlp.proj")) else 0.02
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)

    @property
    def context(self) -> int:
        """The longest sequence the model reads."""
        return self.config.context

    def forward(self, idx: Tensor) -> Tensor:
        """Next-token logits ``(batch, time, vocab)`` of token ids ``idx`` ``(batch, time)``, ``time ≤ context``.

        Raises:
            ValueError: ``idx`` is not a 2-D integer tensor, or longer than the context.
        """
        if idx.dim() != 2 or idx.is_floating_point() or idx.is_complex():
            raise ValueError(
                f"GPT takes (batch, time) integer token ids, got a {idx.dtype} tensor of shape {tuple(idx.shape)}"
            )
        t = idx.shape[1]
        if t > self.config.context:
            raise ValueError(
                f"GPT got {t} tokens per sequence, more than its context of {self.config.context}: "
                "pass shorter windows (e.g. the dataset's context=)"
            )
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok(idx) + self.pos(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        *,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue ``idx`` ``(batch, time)`` by ``max_new_tokens`` sampled tokens; returns ``(batch, time + new)``.

        Each token is drawn from the softmax of the last logits over
        ``temperature`` (0: the most likely token), restricted to the ``top_k``
        most likely when given. The model reads the last ``context`` tokens.
        ``generator`` seeds the draws (it must live on the model's device).
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None), got {top_k}")
        was_training = self.training
        self.eval()
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.context :])[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and top_k < logits.shape[-1]:
                    kth = torch.topk(logits, top_k).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            idx = torch.cat([idx, nxt.to(idx.dtype)], 1)
        self.train(was_training)
        return idx


def gpt(size: str, **overrides: int | float | bool) -> GPT:
    """The :class:`GPT` of a registered size (:data:`GPT_SIZES`), with field overrides.

    Raises:
        ValueError: an unknown size (listing the valid ones) or a bad override.
    """
    if size not in GPT_SIZES:
        raise ValueError(f"unknown GPT size {size!r}; choose one of {', '.join(GPT_SIZES)}")
    return GPT(GPT_SIZES[size], **overrides)
