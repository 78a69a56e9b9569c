"""Behaviour Sequence Transformer (Chen et al. 2019) on ``Snapshot.ctr`` with the behaviour history,
task ``ctr``.

The history's item embeddings and the target item's (one shared table, as in DIN) each get a
positional embedding, go through transformer encoder blocks with a padding mask, and an MLP
reads ``[target token output, field embeddings, dense]``.

Positions. The paper's position of item ``v_i`` is ``t(v_target) - t(v_i)``; the history carries
no timestamps, so the position is the *recency rank* instead: the target is 0, the most recent
history item 1, the one before it 2, ... A learned embedding per rank up to ``max_history``;
anything older shares the last rank's embedding. The rank is computed in the graph from the
padding mask (``length - slot``), so it is the same whatever right padding follows the history,
and any history length works, including one longer than training saw (the parity gate feeds
3L+5 slots) without truncating or re-indexing the input.

Head. The paper flattens all transformer outputs into the MLP, which ties the graph to one
sequence length. Here the MLP reads the target token's output (the row that attended over the
history with the target as query): fixed width, any length, padding ignored. Since only that row
is read, the last block computes it alone (the same numbers as the full block's last row):
a 1024-row training step took 0.03 s instead of 0.15 s (with all rows and dropout on the
attention weights) on the default synthetic data.

Attention is written from plain ops instead of ``nn.TransformerEncoder``: in eval mode that
module takes PyTorch's fused "fast path" (``_transformer_encoder_layer_fwd``, nested tensors
for padding), which the ONNX exporters translate poorly or not at all, and it would make eval
and training run different kernels. Plain matmul/softmax/LayerNorm export at opset 18 and
score the same in torch and onnxruntime.

Training, loss, unknown-id masking and the export spec are shared with DIN (``models/din.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from models import ctr, din
from models.base import ExportSpec, Task, TrainedModel
from models.ctr import CtrConfig
from models.data import Snapshot
from models.layers import MLP, FeaturesEmbedding


@dataclass(frozen=True)
class Config(CtrConfig):
    # 16-dim embeddings as the other CTR families here; also the transformer's model width.
    embed_dim: int = 16
    # 2 heads of 8 dims: heads narrower than ~8 dims lose expressiveness, the paper's 8 heads
    # assume a wider model.
    num_heads: int = 2
    # The paper found one block best (b = 1 beat 2 and 3 on Taobao).
    num_layers: int = 1
    # Feed-forward width 4x the model width (Vaswani et al.).
    ffn_dim: int = 64
    # Dropout on the blocks' residual branches: 0.1, the transformer default (the head has `dropout`).
    block_dropout: float = 0.1
    # The paper's head is 1024-512-256 for Taobao's billions of rows; narrower for MovieLens sizes.
    hidden: tuple[int, ...] = (256, 128, 64)
    dropout: float = 0.2
    # Most recent history items kept in training (paper: 20; 50 is the common sequence cap and
    # this repo's dbt `history_len`); also the number of learned position ranks.
    max_history: int = 50
    # Adam 1e-3 with early stopping on valid AUC (see DeepFM), but batch 256 as transformer
    # sequence recommenders use (BERT4Rec): at 1024 a 100k-row set gives ~80 steps an epoch.
    batch_size: int = 256

    def __post_init__(self):
        din.check_sequence_config(self)
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")


# --- parts -------------------------------------------------------------------------------
class RecencyEncoding(nn.Module):
    """Learned embedding of the recency rank (0 = target, 1 = most recent history item, ...),
    ranks beyond ``max_rank`` share the last one; see the module docstring."""

    def __init__(self, max_rank: int, dim: int):
        super().__init__()
        self.max_rank = max_rank
        self.embedding = nn.Embedding(max_rank + 1, dim)
        nn.init.normal_(self.embedding.weight, std=1e-2)

    def forward(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(history [B, L, d], target [d])`` position embeddings (padding slots get rank 0's,
        which the attention mask then ignores)."""
        return self.embedding(din.recency_ranks(mask, self.max_rank)), self.embedding.weight[0]


class MultiHeadSelfAttention(nn.Module):
    """Scaled dot-product attention of ``queries [B, Q, d]`` over ``tokens [B, S, d]`` with a key
    padding mask, from plain ops (self-attention when the queries are the tokens).

    Masked keys get a large finite negative score (not -inf), so their softmax weight is exactly
    0 and a row is never NaN; the target token is always a valid key, so no row is all-masked.
    No dropout on the weights themselves: on ``[B, H, S, S]`` it cost a quarter of a training
    step, and dropout on the block's outputs already regularises.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, d] -> [B, H, S, d/H]
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def attention_weights(self, queries: torch.Tensor, tokens: torch.Tensor, key_mask: torch.Tensor):
        """``[B, H, Q, S]`` softmax weights; 0 wherever the key is padding."""
        return self._weights_and_values(queries, tokens, key_mask)[0]

    def _weights_and_values(self, queries: torch.Tensor, tokens: torch.Tensor, key_mask: torch.Tensor):
        q = self._split(self.query(queries))
        k, v = (self._split(t) for t in self.key_value(tokens).chunk(2, dim=-1))
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        scores = scores.masked_fill(~key_mask[:, None, None, :], -1e9)
        return torch.softmax(scores, dim=-1), v

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return self._forward_by_head(queries, tokens, key_mask)
        weights, v = self._weights_and_values(queries, tokens, key_mask)
        return self.out((weights @ v).transpose(1, 2).flatten(2))

    def _forward_by_head(self, queries: torch.Tensor, tokens: torch.Tensor, key_mask: torch.Tensor):
        """``forward`` as the ONNX graph computes it: one head at a time, each head's keys and
        values one Gemm over the token rows with that head's rows of ``key_value``.

        The batched form makes onnxruntime copy the keys and values twice (the Split of
        ``key_value``'s output, then the ``[B, S, H, d/H] -> [B, H, S, d/H]`` Transposes), which
        took a quarter of BST's onnxruntime time at batch 1024; torch's strided bmm avoids most
        of those copies, so eager keeps the batched form. Every element is the same dot product
        as in ``forward`` (onnxruntime's scores were bit-identical on the default data); the
        parity gate compares the two.
        """
        dim = self.query.out_features
        width = dim // self.heads
        rows = tokens.flatten(0, -2)  # [B * S, d]: 2-D, so each projection is one Gemm
        weight, bias = self.key_value.weight, self.key_value.bias
        q = self.query(queries)
        padding = ~key_mask[:, None, :]
        outputs = []
        for h in range(self.heads):
            k_rows = slice(h * width, (h + 1) * width)
            v_rows = slice(dim + h * width, dim + (h + 1) * width)
            k = nn.functional.linear(rows, weight[k_rows], bias[k_rows]).view(*tokens.shape[:-1], width)
            v = nn.functional.linear(rows, weight[v_rows], bias[v_rows]).view(*tokens.shape[:-1], width)
            scores = q[..., k_rows] @ k.transpose(-2, -1) * width**-0.5
            outputs.append(torch.softmax(scores.masked_fill(padding, -1e9), dim=-1) @ v)
        return self.out(torch.cat(outputs, dim=-1))


class TransformerBlock(nn.Module):
    """Post-LayerNorm encoder block as in the paper: ``h = LN(x + MHA(x))``, ``LN(h + FFN(h))``,
    with LeakyReLU in the feed-forward layer (the paper's choice). ``target_only`` computes the
    last token's row alone: the same numbers as the full block's last row, for 1/S of the cost."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.attention = MultiHeadSelfAttention(dim, heads)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.LeakyReLU(), nn.Linear(ffn_dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor, target_only: bool = False) -> torch.Tensor:
        q = x[:, -1:] if target_only else x
        h = self.norm1(q + self.dropout(self.attention(q, x, key_mask)))
        return self.norm2(h + self.dropout(self.ffn(h)))


class BehaviourTransformer(nn.Module):
    """``history [B, L, d]`` (+ mask), ``target [B, d]`` -> the target token's output ``[B, d]``.

    The target token sits after the history; its position comes from the recency encoding, not
    from its slot. Only the target's output is read (it is the one that attended to the history
    with the target as query), so the last block computes that row alone; earlier blocks (when
    ``layers > 1``) compute every row, since the next block attends over them.
    """

    def __init__(self, dim: int, heads: int, layers: int, ffn_dim: int, dropout: float, max_rank: int):
        super().__init__()
        self.positions = RecencyEncoding(max_rank, dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, ffn_dim, dropout) for _ in range(layers))

    def tokens(self, hist: torch.Tensor, mask: torch.Tensor, target: torch.Tensor):
        """``([B, L + 1, d]`` tokens with positions, ``[B, L + 1]`` key mask)."""
        hist_pos, target_pos = self.positions(mask)
        x = torch.cat([hist + hist_pos, (target + target_pos).unsqueeze(1)], dim=1)
        return x, nn.functional.pad(mask, (0, 1), value=True)  # the target is always a key

    def _last_block_input(self, hist: torch.Tensor, mask: torch.Tensor, target: torch.Tensor):
        x, key_mask = self.tokens(hist, mask, target)
        for block in self.blocks[:-1]:
            x = block(x, key_mask)
        return x, key_mask

    def target_attention(self, hist: torch.Tensor, mask: torch.Tensor, target: torch.Tensor):
        """``[B, heads, L + 1]`` the last block's attention of the target over the tokens
        (history slots, then the target itself); 0 at padding."""
        x, key_mask = self._last_block_input(hist, mask, target)
        return self.blocks[-1].attention.attention_weights(x[:, -1:], x, key_mask)[:, :, 0]

    def forward(self, hist: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        x, key_mask = self._last_block_input(hist, mask, target)
        return self.blocks[-1](x, key_mask, target_only=True)[:, -1]


class BSTModule(nn.Module):
    def __init__(self, cardinalities: list[int], n_dense: int, item_column: int, config: Config):
        super().__init__()
        d = config.embed_dim
        self.item_column = item_column
        self.embedding = FeaturesEmbedding(cardinalities, d)
        self.history = din.HistoryLookup(self.embedding, item_column)
        self.transformer = BehaviourTransformer(
            d,
            config.num_heads,
            config.num_layers,
            config.ffn_dim,
            config.block_dropout,
            max_rank=config.max_history,
        )
        self.dnn = MLP(d + len(cardinalities) * d + n_dense, config.hidden, 1, config.dropout)

    def attention_weights(self, sparse: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """``[B, heads, L + 1]``: how the target attends over the history slots and itself."""
        hist, mask = self.history(history)
        return self.transformer.target_attention(hist, mask, self.embedding(sparse)[:, self.item_column])

    def forward(self, sparse: torch.Tensor, dense: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        emb = self.embedding(sparse)  # [B, F, d]
        hist, mask = self.history(history)  # [B, L, d], [B, L]
        x = torch.cat([self.transformer(hist, mask, emb[:, self.item_column]), emb.flatten(1), dense], dim=1)
        return self.dnn(x).squeeze(-1)


# --- the family ------------------------------------------------------------------------------
class BST(TrainedModel):
    family = "bst"
    task = Task.CTR
    config_cls = Config
    # BST trains exactly like DIN.
    loss = staticmethod(ctr.loss_fn)
    training_batch = staticmethod(din.sequence_batch)

    @classmethod
    def build_module(cls, config: Config, meta: dict) -> nn.Module:
        return BSTModule(meta["cardinalities"], len(meta["dense_fields"]), meta["item_column"], config)

    def export_spec(self) -> ExportSpec:
        return din.sequence_export_spec(self)


def fit(snapshot: Snapshot, config: Config, log: Callable[[str], None] = print) -> BST:
    module, meta, history = din.fit_sequence(
        snapshot, config, BST.family, lambda meta: BST.build_module(config, meta), log
    )
    return BST(config, module, meta, history)
