"""Small transformers for the token-merging tests, and a direct ToMe forward to compare with.

``TimmStyleViT`` is written the way timm writes ViTs (fused qkv, ``reshape`` + ``permute`` +
``unbind``, CLS and register tokens concatenated before the blocks, the head on token 0).
``TimmStyleViT.forward_tome`` runs the same weights with bipartite soft matching applied the
way ToMe's timm patch does, on genuinely shorter sequences: a third implementation (besides
the pass and ``graphpress.testing.token_merging``) that the tests compare the pass with.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, position_per_block: int = 0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        # a positional embedding added in every block (merging cannot keep it aligned)
        self.position = (nn.Parameter(torch.randn(1, position_per_block, dim) * 0.02)
                         if position_per_block else None)

    def attention(self, x: torch.Tensor, size: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        mask = None if size is None else size.log()[:, None, None, :, 0]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, c)), k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.position is not None:
            x = x + self.position
        x = x + self.attention(self.norm1(x))[0]
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class TimmStyleViT(nn.Module):
    """Patch embedding, CLS + register tokens, fused-qkv blocks, a classifier on token 0."""

    def __init__(self, dim: int = 32, depth: int = 3, heads: int = 4, registers: int = 0,
                 image: int = 16, patch: int = 2, classes: int = 10, dense: bool = False,
                 position_per_block: bool = False) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        tokens = (image // patch) ** 2 + 1 + registers
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.registers = nn.Parameter(torch.randn(1, registers, dim) * 0.02) if registers \
            else None
        self.position = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(
            _Block(dim, heads, tokens if position_per_block else 0) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)
        self.dense = dense
        self.prefix = 1 + registers

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2)
        special = [self.cls.expand(x.shape[0], -1, -1)]
        if self.registers is not None:
            special.append(self.registers.expand(x.shape[0], -1, -1))
        return torch.cat([*special, x], dim=1) + self.position

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(images)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if self.dense:  # a dense head: one output per patch
            return self.head(x[:, self.prefix:])
        return self.head(x[:, 0])

    def forward_tome(self, images: torch.Tensor, rates: list[int],
                     proportional: bool = True) -> torch.Tensor:
        """ToMe on shorter sequences (the timm patch's algorithm, protected prefix first)."""
        x = self.embed(images)
        size = torch.ones_like(x[..., :1])
        for block, r in zip(self.blocks, rates, strict=True):
            attended, k = block.attention(block.norm1(x), size if proportional else None)
            x = x + attended
            if r:
                merge = bipartite_soft_matching(k.mean(1), r, self.prefix)
                x, size = merge(x * size), merge(size)
                x = x / size
            x = x + block.fc2(F.gelu(block.fc1(block.norm2(x))))
        return self.head(self.norm(x)[:, 0])

    def forward_pruned(self, images: torch.Tensor, rates: list[int]) -> torch.Tensor:
        """Drop the r least attended unprotected tokens after each block's attention."""
        x = self.embed(images)
        for block, r in zip(self.blocks, rates, strict=True):
            h = block.norm1(x)
            b, n, c = h.shape
            qkv = block.qkv(h).reshape(b, n, 3, block.heads, c // block.heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            probs = (q @ k.transpose(-1, -2) * (c // block.heads) ** -0.5).softmax(-1)
            x = x + block.proj((probs @ v).transpose(1, 2).reshape(b, n, c))
            if r:
                received = probs.mean(dim=(1, 2))[:, self.prefix:]
                order = received.argsort(dim=-1, stable=True)
                kept = order[:, r:].sort(dim=-1).values + self.prefix
                x = torch.cat([x[:, :self.prefix],
                               x.gather(1, kept[..., None].expand(-1, -1, c))], dim=1)
            x = x + block.fc2(F.gelu(block.fc1(block.norm2(x))))
        return self.head(self.norm(x)[:, 0])


def bipartite_soft_matching(metric: torch.Tensor, r: int, protected: int
                            ) -> Callable[[torch.Tensor], torch.Tensor]:
    """ToMe's matching: alternate split after the protected prefix, top-r edges, sum merge."""
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, protected::2], metric[:, protected + 1::2]
    node_max, node_idx = (a @ b.transpose(-1, -2)).max(dim=-1)
    edges = node_max.argsort(dim=-1, descending=True, stable=True)[..., None]
    kept, src = edges[:, r:].sort(dim=1).values, edges[:, :r]
    dst = node_idx[..., None].gather(1, src)

    def merge(x: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        head, xa, xb = x[:, :protected], x[:, protected::2], x[:, protected + 1::2]
        moved = xa.gather(1, src.expand(-1, -1, c))
        xb = xb.scatter_add(1, dst.expand(-1, -1, c), moved)
        return torch.cat([head, xa.gather(1, kept.expand(-1, -1, c)), xb], dim=1)

    return merge


def images(batch: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def tiny_bert(attention: str = "sdpa", layers: int = 2) -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers,
                        num_attention_heads=4, intermediate_size=64,
                        attn_implementation=attention)
    return BertModel(config).eval()


def padded_tokens(batch: int = 2, length: int = 16, real: tuple[int, ...] = (16, 9),
                  seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and an attention mask whose row ``i`` has ``real[i]`` real tokens."""
    ids = torch.randint(1, 100, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(batch, length, dtype=torch.long)
    for row, count in enumerate(real):
        mask[row, :count] = 1
    return ids, mask


def tiny_deit() -> nn.Module:
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    torch.manual_seed(0)
    config = DeiTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, image_size=16, patch_size=2, num_labels=10,
                        attn_implementation="sdpa")
    return DeiTForImageClassificationWithTeacher(config).eval()


def tiny_vit_with_registers() -> nn.Module:
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    torch.manual_seed(0)
    config = Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, mlp_ratio=2, image_size=16,
                                       patch_size=2, num_register_tokens=4,
                                       attn_implementation="sdpa")
    return Dinov2WithRegistersModel(config).eval()
