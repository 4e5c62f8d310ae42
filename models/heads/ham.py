"""SegNeXt's decode head, LightHamHead (Guo et al., NeurIPS 2022): a Hamburger with NMF.

The stride-8/16/32 maps are resized to stride 8 and concatenated, squeezed by a 1x1 conv + GN,
passed through a Hamburger (1x1 conv -> ReLU -> NMF -> 1x1 conv + GN, added back), aligned by a
1x1 conv + GN and classified: logits at stride 8. Keys are mmseg's (`squeeze`, `hamburger.ham_in`,
`hamburger.ham_out`, `align`); the classifier is `classifier` (mmseg `conv_seg` or `offset_learning`).

NMF randomness. The matrix decomposition starts from random bases, redrawn on every forward, in
training and in evaluation, as in the published code: `torch.rand((B, C, R))` on torch's global
default CPU generator, moved to the input's device, L2-normalised over C. So by default evaluation
is stochastic, and `torch.manual_seed(s)` right before the forward reproduces a published run
(the backbone and the rest of the head draw no random numbers in eval). With `nmf_seed` set,
evaluation instead draws from a private generator seeded with `nmf_seed` on every eval forward:
every eval forward of the same input gives the same logits, and the global RNG is left untouched.
Training always draws from the global generator.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .classifier import build_classifier, convert_classifier_keys
from .layers import ConvModule, resize


class NMF2D(nn.Module):
    """Non-negative matrix factorisation x ≈ bases · coefᵀ of each image's (C, H·W) map, rank R.

    Multiplicative updates from random bases (see the module docstring): `train_steps` or
    `eval_steps` rounds of (coef, bases) updates, one more coef update, then the reconstruction.
    No parameters. As published: one group (MD_S = 1), inverse temperature 1 for the initial
    softmax (the configs' inv_t = 100 is overridden by NMF2D), gradients flow through every step.
    """

    def __init__(self, rank: int = 16, train_steps: int = 6, eval_steps: int = 7, seed: int | None = None):
        super().__init__()
        self.rank = rank
        self.train_steps = train_steps
        self.eval_steps = eval_steps
        self.seed = seed

    def initial_bases(self, batch: int, channels: int, device: torch.device) -> torch.Tensor:
        """(B, C, R) uniform bases with unit columns, drawn on the CPU as the published code does."""
        generator = torch.Generator().manual_seed(self.seed) if self.seed is not None and not self.training else None
        bases = torch.rand((batch, channels, self.rank), generator=generator).to(device)
        return F.normalize(bases, dim=1)

    @staticmethod
    def update_coef(x: torch.Tensor, bases: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        return coef * (x.transpose(1, 2) @ bases) / (coef @ (bases.transpose(1, 2) @ bases) + 1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        x = x.reshape(b, c, h * w)  # (B, C, N), non-negative
        bases = self.initial_bases(b, c, x.device)  # (B, C, R)
        coef = torch.softmax(x.transpose(1, 2) @ bases, dim=-1)  # (B, N, R)
        for _ in range(self.train_steps if self.training else self.eval_steps):
            coef = self.update_coef(x, bases, coef)
            bases = bases * (x @ coef) / (bases @ (coef.transpose(1, 2) @ coef) + 1e-6)
        coef = self.update_coef(x, bases, coef)
        return (bases @ coef.transpose(1, 2)).reshape(b, c, h, w)


class Hamburger(nn.Module):
    """relu(x + ham_out(NMF(ham_in(x)))): `ham_in` is a 1x1 conv with bias whose ReLU makes the NMF
    input non-negative; `ham_out` is a bias-free 1x1 conv + GN without activation."""

    def __init__(
        self, channels: int, md_r: int = 16, train_steps: int = 6, eval_steps: int = 7, nmf_seed: int | None = None
    ):
        super().__init__()
        self.ham_in = ConvModule(channels, channels, 1, norm=None)
        self.ham = NMF2D(md_r, train_steps, eval_steps, nmf_seed)
        self.ham_out = ConvModule(channels, channels, 1, norm='gn', act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.ham_out(self.ham(self.ham_in(x))))


class LightHamHead(nn.Module):
    """SegNeXt's LightHam: stride-8/16/32 maps fused at stride 8 through a Hamburger (NMF matrix decomposition).

    List of 4 backbone maps -> logits at the stride of `features[in_index[0]]` (8 for SegNeXt).

    `in_channels` lists all 4 backbone widths; the head uses the levels in `in_index`.
    """

    def __init__(
        self,
        in_channels: list,
        num_classes: int,
        in_index: list = (1, 2, 3),
        ham_channels: int = 256,
        channels: int = 256,
        md_r: int = 16,
        train_steps: int = 6,
        eval_steps: int = 7,
        dropout: float = 0.1,
        offset_learning: bool = False,
        nmf_seed: int | None = None,
    ):
        super().__init__()
        self.in_index = list(in_index)
        self.squeeze = ConvModule(sum(in_channels[i] for i in self.in_index), ham_channels, 1, norm='gn')
        self.hamburger = Hamburger(ham_channels, md_r, train_steps, eval_steps, nmf_seed)
        self.align = ConvModule(ham_channels, channels, 1, norm='gn')
        self.classifier = build_classifier(channels, num_classes, dropout, offset_learning)

    def forward(self, features: list) -> torch.Tensor:
        inputs = [features[i] for i in self.in_index]
        x = torch.cat([resize(f, inputs[0].shape[2:]) for f in inputs], dim=1)
        return self.classifier(self.align(self.hamburger(self.squeeze(x))))

    @staticmethod
    def convert_checkpoint(state: dict) -> dict:
        """mmseg `decode_head.*` keys (prefix stripped) -> ours: only the classifier is renamed."""
        return convert_classifier_keys(state)
