"""The DDPM UNet (Ho et al. 2020, Appendix B), with an optional bottleneck channel mask.

Architecture, initialisation and parameter names follow tqch/ddpm-torch (`ddpm_torch/models/unet.py`),
itself a port of the official TensorFlow DDPM model, so its checkpoints load with `strict=True`
(strip a DDP `module.` prefix first) and give the same outputs:

    model = UNet(in_channels=3, hid_channels=128, ch_multipliers=[1, 2, 2, 2], num_res_blocks=2,
                 apply_attn=[False, True, False, False], drop_rate=0.1)   # CIFAR-10: 35.7M params
    eps_hat = model(xt, t)                    # xt (B, C, H, W), t (B,) integer timesteps
    eps_hat = model(xt, t, mask=mask)         # mask (model.bottleneck_channels,) of 0/1

Parameter names: `embed.{0,2}` (timestep MLP), `in_conv`, `downsamples.level_{i}.{j}`,
`middle.{0,1,2}` (ResBlock, attention, ResBlock), `upsamples.level_{i}.{j}`, `out_conv.{0,2}`.
A ResBlock has `norm1 conv1 fc norm2 conv2 [skip]`, attention has `norm project_in project_out`,
a ResBlock followed by attention is a pair `{j}.0` / `{j}.1`, and a resampling conv is `{j}.1`
(after the padding or the upsampling at `{j}.0`).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def init_(layer, init_scale=1.0):
    """TF's variance_scaling(scale, "fan_avg", "uniform") = Xavier with gain sqrt(scale); zero bias.

    scale 0 means 1e-10 (a near-zero start, not exact zeros), as in the TF and tqch code.
    """
    nn.init.xavier_uniform_(layer.weight, gain=math.sqrt(init_scale or 1e-10))
    nn.init.zeros_(layer.bias)
    return layer


def conv(cin, cout, kernel_size, stride=1, padding=0, init_scale=1.0):
    # skip_init: build without PyTorch's default init, so the RNG draws only what tqch draws. The default
    # device is passed on so that `with torch.device("meta")` sizes a model without allocating it.
    return init_(nn.utils.skip_init(nn.Conv2d, cin, cout, kernel_size, stride, padding,
                                    device=torch.get_default_device()), init_scale)


def linear(cin, cout):
    return init_(nn.utils.skip_init(nn.Linear, cin, cout, device=torch.get_default_device()))


def norm(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)  # TF's eps; PyTorch's default is 1e-5


def timestep_embedding(t, dim):
    """Sinusoidal embedding of raw timesteps, fairseq convention: [sin | cos], freq_i = 10000^(-i/(half-1))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) / (half - 1) * torch.arange(half, dtype=torch.float32, device=t.device))
    args = t.reshape(-1).float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, dim % 2))  # odd dim: one zero column, as tqch


class SamePad2d(nn.Module):
    """Pad like TF's "SAME" for a 3x3 stride-2 conv: any odd extra row/column goes at the bottom/right."""

    def forward(self, x):
        h, w = x.shape[-2:]
        ph, pw = max(2 * (math.ceil(h / 2) - 1) + 3 - h, 0), max(2 * (math.ceil(w / 2) - 1) + 3 - w, 0)
        return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class ResidualBlock(nn.Module):
    def __init__(self, in_channels, out_channels, embed_dim, drop_rate):
        super().__init__()
        self.norm1 = norm(in_channels)
        self.conv1 = conv(in_channels, out_channels, 3, padding=1)
        self.fc = linear(embed_dim, out_channels)
        self.norm2 = norm(out_channels)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1, init_scale=0.0)  # block starts as identity
        self.skip = nn.Identity() if in_channels == out_channels else conv(in_channels, out_channels, 1)
        self.dropout = nn.Dropout(drop_rate)

    def forward(self, x, t_emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.fc(F.silu(t_emb))[:, :, None, None]  # timestep enters as a per-channel bias
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return h + self.skip(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all H*W positions, softmax(q.k / sqrt(C)) v, plus a residual."""

    def __init__(self, channels):
        super().__init__()
        self.norm = norm(channels)
        self.project_in = conv(channels, 3 * channels, 1)  # fused q, k, v
        self.project_out = conv(channels, channels, 1, init_scale=0.0)

    def forward(self, x, t_emb=None):
        B, C, H, W = x.shape
        # (B, 3C, H, W) -> three (B, HW, C); SDPA's default scale is 1/sqrt(C), as in the paper.
        q, k, v = self.project_in(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, C, H, W)   # strided as NHWC
        # In x's layout: a 1x1 conv's weight gradient takes its input's layout, and DDP wants every gradient strided
        # like its parameter ("Grad strides do not match bucket view strides" otherwise, at every step).
        layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return x + self.project_out(h.contiguous(memory_format=layout))


class EmbedSequential(nn.Sequential):
    """A Sequential whose children all take (x, t_emb): a ResBlock followed by attention, or the middle."""

    def forward(self, x, t_emb):
        for layer in self:
            x = layer(x, t_emb)
        return x


class UNet(nn.Module):
    def __init__(self, in_channels, hid_channels, out_channels=None, *, ch_multipliers, num_res_blocks,
                 apply_attn, drop_rate=0.0, resample_with_conv=True):
        super().__init__()
        levels = len(ch_multipliers)
        apply_attn = [apply_attn] * levels if isinstance(apply_attn, bool) else list(apply_attn)
        assert len(apply_attn) == levels, "apply_attn needs one entry per level"
        chs = [m * hid_channels for m in ch_multipliers]
        embed_dim = 4 * hid_channels
        self.hid_channels = hid_channels
        self.num_res_blocks = num_res_blocks
        self.bottleneck_channels = chs[-1]  # the size of the CS mask

        def block(cin, cout, level):
            res = ResidualBlock(cin, cout, embed_dim, drop_rate)
            return EmbedSequential(res, AttentionBlock(cout)) if apply_attn[level] else res

        # Construction order matches tqch's, so the same seed draws the same initial weights.
        self.embed = nn.Sequential(linear(hid_channels, embed_dim), nn.SiLU(), linear(embed_dim, embed_dim))
        self.in_conv = conv(in_channels, hid_channels, 3, padding=1)

        # Down: num_res_blocks blocks per level, then a stride-2 downsample except on the last level.
        self.downsamples = nn.ModuleDict()
        for i in range(levels):
            prev = chs[i - 1] if i > 0 else hid_channels
            level = nn.ModuleList([block(prev if j == 0 else chs[i], chs[i], i) for j in range(num_res_blocks)])
            if i < levels - 1:
                level.append(nn.Sequential(SamePad2d(), conv(chs[i], chs[i], 3, stride=2))
                             if resample_with_conv else nn.AvgPool2d(2))
            self.downsamples[f"level_{i}"] = level

        self.middle = EmbedSequential(
            ResidualBlock(chs[-1], chs[-1], embed_dim, drop_rate),
            AttentionBlock(chs[-1]),  # always on, whatever apply_attn says
            ResidualBlock(chs[-1], chs[-1], embed_dim, drop_rate))

        # Up: num_res_blocks + 1 blocks per level, each eating one skip from the down path, then an
        # upsample except on level 0. Input widths: first (deeper level + this level), last (this
        # level + the shallower level's skip), others 2x this level.
        self.upsamples = nn.ModuleDict()
        for i in range(levels):
            deeper = chs[i + 1] if i < levels - 1 else chs[-1]
            shallower = chs[i - 1] if i > 0 else hid_channels
            cins = [deeper + chs[i]] + [2 * chs[i]] * (num_res_blocks - 1) + [shallower + chs[i]]
            level = nn.ModuleList([block(cin, chs[i], i) for cin in cins])
            if i > 0:
                # TF used align_corners=True nearest resizing, which PyTorch lacks; plain nearest as tqch.
                up = [nn.Upsample(scale_factor=2, mode="nearest")]
                level.append(nn.Sequential(*up, conv(chs[i], chs[i], 3, padding=1)) if resample_with_conv
                             else nn.Sequential(*up))
            self.upsamples[f"level_{i}"] = level

        self.out_conv = nn.Sequential(norm(hid_channels), nn.SiLU(),
                                      conv(hid_channels, out_channels or in_channels, 3, padding=1, init_scale=0.0))

    def regrowth_weight(self):
        """The weight whose gradient scores masked channels for CS regrowth: the middle's first ResBlock conv2."""
        return self.middle[0].conv2.weight

    def forward(self, x, t, mask=None):
        """x (B, C, H, W), t (B,) timesteps; mask (bottleneck_channels,) of 0/1 multiplies the middle's output."""
        n = self.num_res_blocks
        t_emb = self.embed(timestep_embedding(t, self.hid_channels))

        hs = [self.in_conv(x)]  # every output on the way down is a skip for the way up
        for level in self.downsamples.values():
            for layer in level[:n]:
                hs.append(layer(hs[-1], t_emb))
            for resample in level[n:]:  # none on the last level
                hs.append(resample(hs[-1]))

        h = self.middle(hs[-1], t_emb)
        if mask is not None:
            # CS: switched-off channels carry nothing into the up path.
            assert mask.shape == (self.bottleneck_channels,), mask.shape
            h = h * mask.to(h.dtype)[None, :, None, None]

        for level in reversed(self.upsamples.values()):
            for layer in level[:n + 1]:
                h = layer(torch.cat([h, hs.pop()], dim=1), t_emb)
            for resample in level[n + 1:]:  # none on level 0
                h = resample(h)
        assert not hs
        return self.out_conv(h)
