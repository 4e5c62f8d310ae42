"""FreqFusion (Chen et al., TPAMI 2024) as OffSeg uses it, with a pure-PyTorch CARAFE.

FreqFusion upsamples a low-resolution map to the size of a high-resolution one guided by both:
content-adaptive low-pass kernels (5x5, CARAFE) upsample the low-res features without aliasing,
content-adaptive high-pass kernels (3x3) sharpen the high-res features, and a sampler shifts each
upsampled pixel by a learned sub-pixel offset driven by local feature similarity. Only OffSeg's
configuration is implemented (scale 2, one kernel group, semi-conv, compressed-feature kernels,
high-pass with residual, 4-group feature resampling with GroupNorm, no Hamming window).
Keys are the published ones, minus the constant `hamming_lowpass` / `hamming_highpass` buffers.
"""

import torch
import torch.nn.functional as F
from torch import nn

CARAFE_BLOCK_BYTES = 1 << 22
"""Outside autograd, CARAFE accumulates blocks of channels of about this many bytes, each interleaved
into the output while it is still in cache (an L3-sized share here)."""


def carafe(
    features: torch.Tensor, masks: torch.Tensor, kernel_size: int, group_size: int, scale_factor: int
) -> torch.Tensor:
    """Content-aware reassembly, the arithmetic of mmcv's `carafe` kernel, without compiled ops.

        out[n, c, y, x] = Σ_{i,j} masks[n, g·k² + i·k + j, y, x]
                                  · features[n, c, ⌊y/s⌋ + i − k//2, ⌊x/s⌋ + j − k//2]
    with zero outside the map and g the group of channel c. features (N, C, H, W), masks (N, G·k², sH, sW),
    used as given (no normalisation) -> (N, C, sH, sW).

    It accumulates tap by tap (k² multiply-adds of the shifted low-res map), so no k²·C·sH·sW tensor
    is ever built. The output is accumulated with its s×s sub-pixel positions as separate planes,
    (N, G, C/G, s, s, H, W), so that every multiply-add runs along contiguous rows, and is
    interleaved into (sH, sW) once at the end: faster than accumulating into the interleaved layout,
    for one extra output-sized buffer (both timed by benchmarks/carafe.py). Outside autograd and
    tracing, the channels go in blocks of CARAFE_BLOCK_BYTES, so that the k² passes over each block
    stay in cache (timed on OffSeg-T's last FreqFusion by benchmarks/offseg_speed.py).
    """
    n, c, h, w = features.shape
    k, s, g = kernel_size, scale_factor, group_size
    if masks.shape != (n, g * k * k, h * s, w * s):
        raise ValueError(
            f'carafe: masks of shape {tuple(masks.shape)} do not fit features {tuple(features.shape)} '
            f'with kernel {k}, {g} group(s), scale {s}: expected {(n, g * k * k, h * s, w * s)}'
        )
    pad = k // 2
    padded = F.pad(features, (pad, pad, pad, pad)).reshape(n, g, c // g, 1, 1, h + 2 * pad, w + 2 * pad)
    # output pixel (y, x) = (s·Y + a, s·X + b): masks to (N, G, k², 1, a, b, Y, X)
    masks = masks.reshape(n, g, k * k, 1, h, s, w, s).permute(0, 1, 2, 3, 5, 7, 4, 6).contiguous()
    step = max(1, CARAFE_BLOCK_BYTES // (n * g * s * s * h * w * features.element_size()))
    if step >= c // g or torch.is_grad_enabled() or torch.jit.is_tracing():
        return reassemble_planes(padded, masks, k).reshape(n, c, h * s, w * s)
    out = features.new_empty(n, g, c // g, h, s, w, s)
    for start in range(0, c // g, step):
        out[:, :, start : start + step] = reassemble_planes(padded[:, :, start : start + step], masks, k)
    return out.view(n, c, h * s, w * s)


def reassemble_planes(padded: torch.Tensor, masks: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """CARAFE's k² multiply-adds, tap by tap: padded features (N, G, C', 1, 1, H + 2p, W + 2p), masks
    (N, G, k², 1, s, s, H, W) -> sub-pixel planes (N, G, C', s, s, H, W), returned as the view
    (N, G, C', H, s, W, s) in output pixel order, for the caller to interleave in one copy."""
    h, w = masks.shape[-2:]
    out = padded[..., :h, :w] * masks[:, :, 0]  # tap (0, 0)
    for tap in range(1, kernel_size * kernel_size):
        i, j = divmod(tap, kernel_size)
        out.addcmul_(padded[..., i : i + h, j : j + w], masks[:, :, tap])
    return out.permute(0, 1, 2, 5, 3, 6, 4)


def kernel_softmax(mask: torch.Tensor) -> torch.Tensor:
    """Normalise one group of k² kernel channels per pixel with a softmax, as the published
    `kernel_normalizer` does; its Hamming window is 1 here, so its extra renormalisation is a no-op."""
    return mask.softmax(dim=1)


def channel_norm(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W) Euclidean norms over the channels, as a product and a sum: on NCHW
    maps faster than torch.linalg.vector_norm(x, dim=1) on CPU (2.14; timed by benchmarks/offseg_speed.py),
    equal up to rounding."""
    return (x * x).sum(dim=1, keepdim=True).sqrt()


def local_cosine_similarity(x: torch.Tensor, dilation: int = 2) -> torch.Tensor:
    """(B, C, H, W) -> (B, 8, H, W): cosine similarity of each pixel with its 8 neighbours in a 3x3
    window of the given dilation (zero padded), neighbours in row-major order, the centre left out.

    The same numbers as `F.cosine_similarity` per neighbour (each vector divided by its norm clamped
    at 1e-8, then summed products), with each pixel normalised once, and only the first 4 neighbours
    computed: the similarity of p with p − d is the one of p − d with p, a shifted map (0 off the border).
    """
    h, w = x.shape[-2:]
    d = dilation
    unit = x / channel_norm(x).clamp_min(1e-8)
    padded = F.pad(unit, (d, d, d, d))
    first = ((-d, -d), (-d, 0), (-d, d), (0, -d))
    sims = torch.stack(
        [(unit * padded[..., d + dy : d + dy + h, d + dx : d + dx + w]).sum(dim=1) for dy, dx in first], dim=1
    )
    padded = F.pad(sims, (d, d, d, d))
    mirrored = [padded[:, n, d - dy : d - dy + h, d - dx : d - dx + w] for n, (dy, dx) in enumerate(first)]
    return torch.cat((sims, torch.stack(mirrored[::-1], dim=1)), dim=1)


class LocalSimGuidedSampler(nn.Module):
    """Upsampling by x2 as learned sub-pixel resampling, steered by local similarity (published names).

    Offsets for the 2x2 output pixels of each low-res pixel and each of `groups` channel groups come
    from the similarity maps of the high-res and low-res guides (`offset`, `hr_offset`), gated by a
    sigmoid of their GroupNorm'ed features (`direct_scale`, `hr_direct_scale`), and added to the
    regular ±1/4 sub-pixel positions `init_pos`. The feature is then bilinearly sampled (border
    padding) per contiguous channel group.
    """

    def __init__(self, in_channels: int, groups: int = 4, kernel_size: int = 3, local_window: int = 3):
        super().__init__()
        if in_channels % groups or in_channels % 8:
            raise ValueError(f'LocalSimGuidedSampler: {in_channels} channels must divide into {groups} groups and 8')
        self.groups = groups
        sims, pad = local_window**2 - 1, kernel_size // 2
        self.offset = nn.Conv2d(sims, 2 * groups * 4, kernel_size, padding=pad)
        self.direct_scale = nn.Conv2d(in_channels, 2 * groups * 4, kernel_size, padding=pad)
        self.hr_offset = nn.Conv2d(sims, 2 * groups, kernel_size, padding=pad)
        self.hr_direct_scale = nn.Conv2d(in_channels, 2 * groups, kernel_size, padding=pad)
        self.norm_hr = nn.GroupNorm(in_channels // 8, in_channels)
        self.norm_lr = nn.GroupNorm(in_channels // 8, in_channels)
        self.register_buffer('init_pos', self.sub_pixel_positions(groups))

    @staticmethod
    def sub_pixel_positions(groups: int) -> torch.Tensor:
        """(1, 2·groups·4, 1, 1): channel xy·4G + g·4 + a·2 + b holds the x (xy=0) or y (xy=1)
        centre of output sub-pixel (a, b) relative to its low-res pixel: ±1/4."""
        pos = torch.tensor([-0.25, 0.25])
        x = pos.view(1, 2).expand(2, 2)  # varies with the column b
        return torch.stack((x, x.t())).reshape(2, 1, 4).expand(2, groups, 4).reshape(1, -1, 1, 1).clone()

    def forward(self, hr_guide: torch.Tensor, lr_guide: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        """Guides (B, C, 2H, 2W) and (B, C, H, W), feature (B, C', h, w) of any size -> (B, C', 2H, 2W)."""
        hr_guide, lr_guide = self.norm_hr(hr_guide), self.norm_lr(lr_guide)
        hr_sim, lr_sim = local_cosine_similarity(hr_guide), local_cosine_similarity(lr_guide)
        offset = self.offset(lr_sim) + F.pixel_unshuffle(self.hr_offset(hr_sim), 2)
        gate = self.direct_scale(lr_guide) + F.pixel_unshuffle(self.hr_direct_scale(hr_guide), 2)
        return self.sample(feature, offset * gate.sigmoid() + self.init_pos)

    def sample(self, feature: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        """Offsets (B, 2·G·4, H, W) in low-res pixels -> grid_sample of each channel group at (2H, 2W)."""
        b, _, h, w = offset.shape
        ys, xs = torch.meshgrid(
            torch.arange(h, dtype=offset.dtype, device=offset.device) + 0.5,
            torch.arange(w, dtype=offset.dtype, device=offset.device) + 0.5,
            indexing='ij',
        )
        grid = torch.stack((xs, ys)).view(1, 2, 1, h, w) + offset.reshape(b, 2, -1, h, w)  # (x, y) in pixels
        # normalised to [-1, 1]; dividing by the sizes as numbers keeps them dynamic in an ONNX trace
        grid = torch.stack((2 * grid[:, 0] / w - 1, 2 * grid[:, 1] / h - 1), dim=1)
        grid = F.pixel_shuffle(grid.reshape(b, -1, h, w), 2).reshape(b, 2, self.groups, 2 * h, 2 * w)
        grid = grid.permute(0, 2, 3, 4, 1).flatten(0, 1)  # (B·G, 2H, 2W, 2)
        out = F.grid_sample(
            feature.reshape(b * self.groups, -1, *feature.shape[-2:]),
            grid,
            mode='bilinear',
            padding_mode='border',
            align_corners=False,
        )
        return out.reshape(b, -1, 2 * h, 2 * w)


class FreqFusion(nn.Module):
    """Fuse hr (B, h, 2H, 2W) and lr (B, l, H, W) features -> (sharpened hr, upsampled lr), both at 2H x 2W.

    Both inputs are compressed to `compressed_channels` by 1x1 convs. Kernels are predicted from the
    compressed maps by `content_encoder` (25 = 5x5 low-pass) and `content_encoder2` (9 = 3x3
    high-pass), each from hr and from CARAFE-upsampled lr predictions:
    1. hr' = 2·hr_c − CARAFE₃(hr_c, high-pass kernels of hr_c)   (sharpened compressed hr)
    2. low-pass kernels  = enc(hr') + CARAFE₅↑(enc(lr_c), softmax(enc(hr')))
    3. high-pass kernels = enc2(hr_c) + CARAFE₅↑(enc2(lr_c), softmax(low-pass kernels))
    4. lr_up = CARAFE₅↑(lr, softmax(low-pass)); hr_out = hr + (hr − CARAFE₃(hr, softmax(high-pass)))
    5. lr_up is resampled by the LocalSimGuidedSampler guided by hr' and lr_c.
    The published module also returns the normalised low-pass kernels; OffSeg discards them.
    Init as published: xavier-uniform convs (zero bias), content encoders normal(0, 0.001).
    """

    def __init__(
        self,
        hr_channels: int,
        lr_channels: int,
        compressed_channels: int,
        lowpass_kernel: int = 5,
        highpass_kernel: int = 3,
        resample_groups: int = 4,
    ):
        super().__init__()
        self.lowpass_kernel, self.highpass_kernel = lowpass_kernel, highpass_kernel
        c = compressed_channels
        self.hr_channel_compressor = nn.Conv2d(hr_channels, c, 1)
        self.lr_channel_compressor = nn.Conv2d(lr_channels, c, 1)
        self.content_encoder = nn.Conv2d(c, lowpass_kernel**2, 3, padding=1)
        self.content_encoder2 = nn.Conv2d(c, highpass_kernel**2, 3, padding=1)
        self.dysampler = LocalSimGuidedSampler(c, resample_groups)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for encoder in (self.content_encoder, self.content_encoder2):
            nn.init.normal_(encoder.weight, std=0.001)

    def forward(self, hr_feat: torch.Tensor, lr_feat: torch.Tensor) -> tuple:
        if hr_feat.shape[-2:] != tuple(2 * s for s in lr_feat.shape[-2:]):
            raise ValueError(
                f'FreqFusion: the high-res map ({tuple(hr_feat.shape[-2:])}) must be exactly twice '
                f'the low-res one ({tuple(lr_feat.shape[-2:])}); OffSeg needs ceil(H/4) and '
                f'ceil(W/4) divisible by 8 (sides that are multiples of 32 always work)'
            )
        low, high = self.lowpass_kernel, self.highpass_kernel
        hr_c = self.hr_channel_compressor(hr_feat)
        lr_c = self.lr_channel_compressor(lr_feat)
        highpass_hr = self.content_encoder2(hr_c)
        hr_c = 2 * hr_c - carafe(hr_c, kernel_softmax(highpass_hr), high, 1, 1)
        lowpass = self.content_encoder(hr_c)
        lowpass = lowpass + carafe(self.content_encoder(lr_c), kernel_softmax(lowpass), low, 1, 2)
        lowpass = kernel_softmax(lowpass)
        highpass = highpass_hr + carafe(self.content_encoder2(lr_c), lowpass, low, 1, 2)
        lr_up = carafe(lr_feat, lowpass, low, 1, 2)
        hr_out = hr_feat + (hr_feat - carafe(hr_feat, kernel_softmax(highpass), high, 1, 1))
        return hr_out, self.dysampler(hr_c, lr_c, lr_up)
