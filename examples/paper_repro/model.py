"""A tiny multimodal transformer whose FFNs are AnyExperts MoE layers.

Tokens: [<cls>] + 6 question words + P image patches. Each block is pre-LN self-attention
followed by an :class:`anyexperts_ops.layer.AnyExpertsMoE` FFN (configured by a preset:
static top-K or AnyExperts). The answer is read from the <cls> token.
"""
from __future__ import annotations

import torch
from torch import nn

from anyexperts_ops.layer import AnyExpertsConfig, AnyExpertsMoE

from data import CLS, IMAGE, NUM_CLASSES, TEXT, TEXT_LEN, VOCAB, WORD_ID


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, moe_config: AnyExpertsConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(hidden)
        self.moe = AnyExpertsMoE(moe_config)

    def forward(self, x, modality):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        y, aux = self.moe(self.ln2(x), modality)
        return x + y, aux


class TinyVQA(nn.Module):
    def __init__(self, moe_config: AnyExpertsConfig, num_patches: int, patch_dim: int,
                 hidden: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.patch_embed = nn.Linear(patch_dim, hidden)
        self.word_embed = nn.Embedding(len(VOCAB), hidden)
        self.pos = nn.Parameter(torch.randn(1 + TEXT_LEN + num_patches, hidden) * 0.02)
        self.type_embed = nn.Embedding(3, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads, moe_config) for _ in range(layers))
        self.ln = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, NUM_CLASSES)
        mod = torch.tensor([CLS] + [TEXT] * TEXT_LEN + [IMAGE] * num_patches)
        self.register_buffer("modality", mod, persistent=False)
        self.num_patches = num_patches

    @property
    def moes(self):
        return [b.moe for b in self.blocks]

    def forward(self, patches, text):
        """patches [B,P,D], text [B,TEXT_LEN] -> (logits [B,classes], aux losses, [MoEAux])."""
        B = patches.shape[0]
        cls = self.word_embed(torch.full((B, 1), WORD_ID["<cls>"], device=text.device))
        x = torch.cat([cls, self.word_embed(text), self.patch_embed(patches)], dim=1)
        mod = self.modality.expand(B, -1)
        x = x + self.pos + self.type_embed(mod)
        auxes = []
        for blk in self.blocks:
            x, aux = blk(x, mod)
            auxes.append(aux)
        logits = self.head(self.ln(x[:, 0]))
        return logits, sum(a.loss for a in auxes), auxes

    # token layout helpers
    @staticmethod
    def text_slice():
        return slice(1, 1 + TEXT_LEN)

    @staticmethod
    def image_slice():
        return slice(1 + TEXT_LEN, None)
