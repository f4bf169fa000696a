"""Small model zoo for the correctness tests. Every model is tiny, deterministic given the torch seed, and
uses no dropout. Layers under test sit inside nested nn.Sequential containers on purpose (fastDP left layers
inside nn.Sequential unclipped)."""

from __future__ import annotations

import torch
from torch import nn


def seeded(seed: int = 0) -> None:
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------
# single-layer-kind models
# ----------------------------------------------------------------------------------------------------
class LinearNet(nn.Module):
    """Linear -> tanh -> Sequential(Sequential(Linear)). Works for any number of leading dims."""

    def __init__(self, d_in: int = 6, hidden: int = 5, d_out: int = 4, bias: bool = True):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, hidden, bias=bias), nn.Tanh())
        self.head = nn.Sequential(nn.Sequential(nn.Linear(hidden, d_out, bias=bias)))

    def forward(self, x):
        return self.head(self.body(x))


class ConvNet(nn.Module):
    """Sequential(Sequential(conv)) -> tanh -> 1x1 conv of the same dimensionality."""

    def __init__(self, dim: int, in_ch: int, out_ch: int, **conv_kw):
        super().__init__()
        cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
        self.features = nn.Sequential(nn.Sequential(cls(in_ch, out_ch, **conv_kw)), nn.Tanh())
        self.mix = cls(out_ch, 3, kernel_size=1)

    def forward(self, x):
        return self.mix(self.features(x))


class EmbedNet(nn.Module):
    """Embedding(padding_idx) nested in Sequential -> Linear."""

    def __init__(self, vocab: int = 11, dim: int = 6, padding_idx: int | None = 0):
        super().__init__()
        self.embed = nn.Sequential(nn.Embedding(vocab, dim, padding_idx=padding_idx))
        self.proj = nn.Linear(dim, 3)

    def forward(self, ids):
        return self.proj(torch.tanh(self.embed(ids)))


class ChannelNormNet(nn.Module):
    """For channel-first norms (GroupNorm, InstanceNorm1d/2d): conv1x1 -> norm -> tanh -> conv1x1."""

    def __init__(self, dim: int, norm: nn.Module, ch: int = 6):
        super().__init__()
        cls = {1: nn.Conv1d, 2: nn.Conv2d}[dim]
        self.pre = cls(3, ch, kernel_size=1)
        self.block = nn.Sequential(nn.Sequential(norm), nn.Tanh())
        self.post = cls(ch, 2, kernel_size=1)

    def forward(self, x):
        return self.post(self.block(self.pre(x)))


class LastDimNormNet(nn.Module):
    """For norms over the last dim (LayerNorm, RMSNorm): Linear -> norm -> tanh -> Linear; input (B, T, d)."""

    def __init__(self, norm: nn.Module, d_in: int = 5, d: int = 6):
        super().__init__()
        self.pre = nn.Linear(d_in, d)
        self.block = nn.Sequential(nn.Sequential(norm), nn.Tanh())
        self.post = nn.Linear(d, 3)

    def forward(self, x):
        return self.post(self.block(self.pre(x)))


class HFConv1DNet(nn.Module):
    """transformers' Conv1D (GPT-2 style, transposed weight)."""

    def __init__(self, d_in: int = 6, hidden: int = 8, d_out: int = 4):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.blocks = nn.Sequential(nn.Sequential(Conv1D(hidden, d_in)), nn.Tanh())
        self.out = Conv1D(d_out, hidden)
        with torch.no_grad():  # Conv1D inits its weight with std 0.02 and bias 0: make both non-trivial
            for p in self.parameters():
                p.normal_(0, 0.5)

    def forward(self, x):
        return self.out(self.blocks(x))


class RNNNet(nn.Module):
    """nn.LSTM / nn.GRU (batch_first=True) -> Linear over all time steps."""

    def __init__(
        self, kind: str, d_in: int = 4, hidden: int = 5, num_layers: int = 1, bidirectional: bool = False
    ):
        super().__init__()
        cls = {"lstm": nn.LSTM, "gru": nn.GRU}[kind]
        self.rnn = nn.Sequential(
            cls(d_in, hidden, num_layers=num_layers, batch_first=True, bidirectional=bidirectional)
        )
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), 3)

    def forward(self, x):
        rnn = self.rnn[0]
        out, _ = rnn(x)
        return self.head(out)


class MHANet(nn.Module):
    """nn.MultiheadAttention (batch_first=True): self-attention, or cross-attention with kdim/vdim !=
    embed_dim (separate q/k/v projection weights)."""

    def __init__(self, embed: int = 8, heads: int = 2, cross: bool = False, bias: bool = True):
        super().__init__()
        self.cross = cross
        kv = 5 if cross else None
        self.attn = nn.MultiheadAttention(embed, heads, batch_first=True, bias=bias, kdim=kv, vdim=kv)
        self.head = nn.Linear(embed, 3)

    def forward(self, x, mem=None):
        if self.cross:
            out, _ = self.attn(x, mem, mem, need_weights=False)
        else:
            out, _ = self.attn(x, x, x, need_weights=False)
        return self.head(out)


class EncoderLayerNet(nn.Module):
    """nn.TransformerEncoderLayer(batch_first=True, dropout=0) inside nn.Sequential, then a Linear head."""

    def __init__(self, d_model: int = 8, nhead: int = 2, norm_first: bool = False):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.TransformerEncoderLayer(
                d_model, nhead, dim_feedforward=16, dropout=0.0, batch_first=True, norm_first=norm_first
            )
        )
        self.head = nn.Linear(d_model, 3)

    def forward(self, x):
        return self.head(self.encoder(x))


class TinyViT(nn.Module):
    """ViT-style raw parameters used directly in forward: a cls token concatenated via expand, a position
    embedding added by broadcasting, and a layer-scale vector multiplied; plus Linear/LayerNorm/GELU MLP."""

    def __init__(self, patch_dim: int = 6, d: int = 8, n_patches: int = 4, n_out: int = 3):
        super().__init__()
        self.patch = nn.Linear(patch_dim, d)
        self.cls_token = nn.Parameter(torch.randn(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, n_patches + 1, d) * 0.5)
        self.norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.layer_scale = nn.Parameter(torch.full((d,), 0.5) + 0.1 * torch.randn(d))
        self.head = nn.Linear(d, n_out)

    def forward(self, x):  # x: (B, n_patches, patch_dim)
        t = self.patch(x)
        t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], dim=1)
        t = t + self.pos_embed
        t = t + self.layer_scale * self.mlp(self.norm(t))
        return self.head(t[:, 0] + t[:, 1:].mean(1))


class TwiceLinear(nn.Module):
    """The same Linear applied twice in one forward."""

    def __init__(self, d: int = 5):
        super().__init__()
        self.shared = nn.Linear(d, d)
        self.head = nn.Linear(d, 2)

    def forward(self, x):
        h = torch.tanh(self.shared(x))
        h = torch.tanh(self.shared(h))
        return self.head(h)


class TiedEmbedLinear(nn.Module):
    """A Linear decoder whose weight is the Embedding's weight (tied). `decoder_first` declares the decoder
    before the embedding, so the tied parameter is owned (and named) by the decoder."""

    def __init__(self, vocab: int = 13, d: int = 6, decoder_first: bool = False):
        super().__init__()
        if decoder_first:
            self.decoder = nn.Linear(d, vocab, bias=True)
            self.embed = nn.Embedding(vocab, d)
        else:
            self.embed = nn.Embedding(vocab, d)
            self.decoder = nn.Linear(d, vocab, bias=True)
        self.decoder.weight = self.embed.weight
        self.mid = nn.Sequential(nn.Linear(d, d), nn.Tanh())

    def forward(self, ids):
        return self.decoder(self.mid(self.embed(ids)))


class FrozenNet(nn.Module):
    """An MLP with LayerNorm, some parameters frozen (a whole Linear, and LayerNorm's weight only)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.blocks = nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.Tanh()), nn.Linear(8, 3))
        for p in self.stem.parameters():
            p.requires_grad_(False)
        self.norm.weight.requires_grad_(False)

    def forward(self, x):
        return self.blocks(self.norm(self.stem(x)))


class BiasOnlyNet(nn.Module):
    """Conv2d -> GroupNorm -> tanh -> Linear with every weight frozen and every bias trainable (DP-BiTFiT)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh())
        self.fc = nn.Sequential(nn.Linear(4 * 5 * 5, 6), nn.Tanh(), nn.Linear(6, 3))
        for n, p in self.named_parameters():
            p.requires_grad_(n.endswith("bias"))

    def forward(self, x):
        return self.fc(self.conv(x).flatten(1))


class ConvGNNet(nn.Module):
    """A small CNN: Conv2d -> GroupNorm -> tanh -> Conv2d(stride 2) -> flatten -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.head = nn.Sequential(nn.Linear(4 * 3 * 3, 3))

    def forward(self, x):  # (B, 3, 6, 6)
        h = torch.tanh(self.gn(self.conv1(x)))
        h = torch.tanh(self.conv2(h))
        return self.head(h.flatten(1))


# ----------------------------------------------------------------------------------------------------
# models the engine must refuse
# ----------------------------------------------------------------------------------------------------
class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class TrackedInstanceNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.inorm = nn.InstanceNorm2d(4, affine=True, track_running_stats=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.inorm(self.conv(x)).mean((2, 3)))


class ParentUsesChildWeight(nn.Module):
    """The parent uses `child_proj.weight` directly in its own forward, outside the module that owns it. With
    `also_call_child`, the child module is also called normally (the weight then has two uses, one of which
    happens outside its owner)."""

    def __init__(self, also_call_child: bool = False):
        super().__init__()
        self.also_call_child = also_call_child
        self.child_proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = x @ self.child_proj.weight.T
        if self.also_call_child:
            h = h + self.child_proj(x)
        return self.head(torch.tanh(h))
