"""diffcl: DDPM with a timestep curriculum (C), bottleneck channel sparsity (CS) and Group-L1 (CR).

    python diffcl.py train   --config-path configs/celeba32_cs.json [--train.lr=1e-4 ...]
    torchrun --standalone --nproc_per_node 4 diffcl.py train --config-path configs/celeba32_cs.json
    python diffcl.py sample  --ckpt out/celeba32_cs/ckpt.pt --num-images 64 --out samples/ [--ddim --steps 50]
    python diffcl.py eval    --ckpt out/celeba32_cs/ckpt.pt --ref stats.npz --num-images 10000
    python diffcl.py bench   --config-path configs/celeba32.json [--precision bf16]
    python diffcl.py compare --dataset fashion32 --seeds 3 --jobs 4      (demo: the same, one seed, no FID)

Read top-down. The method comes first, as pure functions tested directly: the config's keys, diffusion maths,
random streams, the curriculum (every rule of the method, in one place), sparsity / regularisation, the sampler.
Then the training loop (`train_step`, `train`) and the pieces it calls. The plumbing follows: checking a config,
distributed helpers, files, the held-out bits/dim, then sample / eval / bench, compare / demo and the CLI.
Plain DDPM is a one-stage curriculum on [0, 1), so one loop serves every mode.
"""
import signal
import sys

if __name__ == "__main__":                                  # Ctrl-C while torch is imported: exit quietly
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import argparse
import contextlib
import copy
import dataclasses
import datetime
import functools
import gc
import hashlib
import io
import json
import logging
import math
import os
import re
import resource
import shlex
import subprocess
import threading
import time
import warnings
from fractions import Fraction

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from scipy.special import betainc, stdtrit

import data
import fid
from unet import UNet


# ----------------------------------------------------------------------------------------------
# Config: the description's nested JSON. Every key has a default here; unknown keys are errors. The rules that
# check a config (types, ranges, cross-key rules) come after the training loop, under "Checking a config".

DEFAULTS = {
    "dataset": "shapes",            # celeba32 | celeba64 (= celeba) | cifar10 | fashion32 | shapes | folder:PATH
    "data_root": "",                # "" = the dataset's default location (see data.py)
    "data_split": "",               # "" = the dataset's default split
    "resolution": 0,                # 0 = the dataset's default (data.py: 32, or 64 for celeba64)
    "data_limit": 0,                # use only the first N images (0 = all); for quick experiments
    "out_dir": "",                  # "" = out/<config file stem>
    "seed": 0,
    "diffusion": {
        "timesteps": 1000,          # T
        "beta_start": 1e-4,
        "beta_end": 0.02,
        "beta_schedule": "linear",  # linear | quad | const | jsd | warmup10 | warmup50 | cosine
        "model_mean_type": "eps",   # eps | x0 | mean: what the network predicts
        "model_var_type": "fixed-small",  # fixed-small (beta tilde) | fixed-large (beta)
        "loss_type": "mse",         # mse (the simple loss of Ho et al., eq. 14)
        "loss_weight": "uniform",   # uniform (Ho et al.) | min_snr (Hang et al. 2023: min(SNR, gamma)-based)
        "min_snr_gamma": 5.0,       # gamma of min_snr
    },
    "model": {
        "in_channels": 3,
        "hid_channels": 64,
        "ch_multipliers": [1, 2, 2],
        "num_res_blocks": 2,
        "apply_attn": [False, False, False],
        "drop_rate": 0.0,
        "resample_with_conv": True,
    },
    "train": {
        "lr": 2e-4,
        "beta1": 0.9,
        "beta2": 0.999,
        "batch_size": 128,          # GLOBAL batch per optimizer step (all ranks, all micro-steps)
        "num_accum": 1,             # micro-steps per optimizer step (gradient accumulation)
        "grad_norm": 1.0,           # global-norm clipping
        "epochs": 100,              # plain DDPM's length; with the curriculum on, the stage epochs sum instead
        "length_scale": 1.0,        # multiplies the run's length and every stage's (0.2 = a fifth of the schedule)
        "warmup": 5000,             # linear LR warm-up, optimizer steps
        "use_ema": True,
        "ema_decay": 0.9999,
        "num_samples": 12,          # images in each sample grid
        "image_intv": 1,            # epochs between sample grids (0 = never)
        "sample_steps": 0,          # grid sampler: 0 = full DDPM ancestral, N > 0 = DDIM with N steps
        "chkpt_intv": 1,            # epochs between checkpoints (one is always written at the end)
        "save_every": 0,            # also checkpoint every N optimizer steps (0 = off)
        "log_intv": 100,            # optimizer steps between progress lines / metrics records
        "precision": "auto",        # auto (fp32, TF32 on CUDA: the fastest eager path on an H100) | fp32 | bf16
        "channels_last": "auto",    # auto (off: its layout conversions cost more than it saved on an H100) | on | off
        "compile": False,           # torch.compile the step's loss (forward, loss, backward) and the sampler's UNet
        "cuda_graphs": False,       # with compile, on CUDA: replay them as CUDA graphs (mode "reduce-overhead")
        "snapshots": False,         # also keep ckpt_epochNNNN.pt at every checkpoint epoch
        "eval_intv": 0,             # optimizer steps between held-out evaluations (0 = off; when on, also at the end)
        "eval_num": 50,             # held-out (test) images per evaluation, for bits/dim and the per-bucket mse
        "eval_timesteps": 8,        # K of the bits/dim estimate: t = 0 plus K - 1 stratified draws (0 or >= T: all)
        "eval_fid": 0,              # also FID of this many DDIM samples against as many held-out images (0 = off)
    },
    "curriculum": {
        "enabled": False,
        "mode": "hard",             # hard: t ~ U[window) ; soft: t = floor(u T), u ~ Beta(alpha, beta) per stage
        "window": "t",              # t: t_min/t_max are fractions of T ; logsnr: fractions of the log-SNR range ;
                                    # full: every window is [0, T) (the stage schedule, capacity alone, no curriculum)
        "order": "forward",         # forward (high noise first) | reverse (mirrored windows) | mixture (no order)
        "stages": [],               # [{"t_min", "t_max", "epochs", "name", ["sparsity", "lambda", "alpha", "beta"]}]
    },
    "sparsity": {
        "enabled": False,
        "initial_sparsity": 0.8,
        "regrowth_method": "gradient",  # gradient | taylor | random
    },
    "regularization": {
        "enabled": False,
        "lambda_max": 3e-5,
    },
}

CHOICES = {
    "beta_schedule": ("linear", "quad", "const", "jsd", "warmup10", "warmup50", "cosine"),
    "model_mean_type": ("eps", "x0", "mean"),
    "model_var_type": ("fixed-small", "fixed-large"),
    "loss_type": ("mse",),
    "loss_weight": ("uniform", "min_snr"),
    "window": ("t", "logsnr", "full"),
    "order": ("forward", "reverse", "mixture"),
    "precision": ("auto", "fp32", "bf16"),
    "channels_last": ("auto", "on", "off"),
    "mode": ("hard", "soft"),
    "regrowth_method": ("gradient", "taylor", "random"),
}


def load_config(path=None, overrides=(), base=None):
    """Defaults < JSON file (or `base`, e.g. a checkpoint's stored config) < --key=value overrides."""
    user = read_json_file(path) if path else copy.deepcopy(base) if base is not None else {}
    over = parse_overrides(overrides)
    for section, value in over.items():                     # an override's own mistake is named as typed
        for key, v in value.items() if isinstance(value, dict) else [(None, value)]:
            name = f"{section}.{key}" if key else section
            merge_keys(copy.deepcopy(DEFAULTS), DEFAULTS, {section: {key: v}} if key else {section: v},
                       f"command-line override --{name}")
            for _, lo, hi in (r for r in RANGES if r[0] == name and not r[1] <= v <= r[2]):
                raise ConfigError(f"command-line override --{name}: must be in [{lo}, {hi}], got {v!r}")
    for section, value in over.items():
        if isinstance(value, dict) and isinstance(user.get(section), dict):
            user[section] = {**user[section], **value}
        else:
            user[section] = value
    stages = over.get("curriculum", {}).get("stages") if isinstance(over.get("curriculum"), dict) else None
    for i, st in enumerate(stages if isinstance(stages, list) else []):   # a stage typed here is named as such
        validate_stage(st, f"command-line override --curriculum.stages[{i}]", user["curriculum"].get("mode") == "soft")
    cfg = merge_config(user, path or "config")
    if cfg["curriculum"]["enabled"] and "epochs" in over.get("train", {}):
        raise ConfigError("--train.epochs has no effect with the curriculum on (the stage epochs set the length); "
                          "use --train.length_scale=F to scale every stage, e.g. 0.2 for a fifth of the schedule")
    return cfg


def run_mode(cfg):
    """'base' | 'c' | 'cs' | 'cr', from the three `enabled` flags (the description's mode selection)."""
    if not cfg["curriculum"]["enabled"]:
        return "base"
    return "cs" if cfg["sparsity"]["enabled"] else "cr" if cfg["regularization"]["enabled"] else "c"


def image_resolution(cfg):
    """The side of the training images: `resolution`, else the dataset's default from data.py."""
    return cfg["resolution"] or data.dataset_info(cfg["dataset"])["resolution"]


# ----------------------------------------------------------------------------------------------
# Diffusion maths (Ho et al. 2020; Song et al. 2021 for DDIM). Tables are float64; t in {0..T-1},
# t = 0 the least noisy. Lookups index the float64 table and cast once.

def beta_schedule(name, T, beta_start=1e-4, beta_end=0.02):
    """(T,) float64 betas. Schedules as tqch/ddpm-torch, plus cosine (Nichol & Dhariwal, clipped 0.999)."""
    f64 = torch.float64
    if name == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=f64)
    if name == "quad":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=f64) ** 2
    if name == "const":
        return torch.full((T,), beta_end, dtype=f64)
    if name == "jsd":                                        # 1/T, 1/(T-1), ..., 1
        return 1.0 / torch.linspace(T, 1, T, dtype=f64)
    if name in ("warmup10", "warmup50"):
        betas = torch.full((T,), beta_end, dtype=f64)
        n = int(T * (0.1 if name == "warmup10" else 0.5))
        betas[:n] = torch.linspace(beta_start, beta_end, n, dtype=f64)
        return betas
    if name == "cosine":                                     # alpha_bar(s) = cos^2((s/T + 0.008)/1.008 * pi/2)
        s = torch.arange(T + 1, dtype=f64) / T
        ab = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - ab[1:] / ab[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {name!r}")


def diffusion_tables(betas):
    """Dict of (T,) float64 tables; square roots are taken in float64 before any cast."""
    alphas = 1 - betas
    ab = torch.cumprod(alphas, 0)
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    post_var = betas * (1 - ab_prev) / (1 - ab)             # beta tilde, eq. 7
    return {
        "betas": betas, "alpha_bar": ab, "alpha_bar_prev": ab_prev,
        "sqrt_ab": ab.sqrt(), "sqrt_1m_ab": (1 - ab).sqrt(),
        "sqrt_recip_ab": (1 / ab).sqrt(), "sqrt_recipm1_ab": (1 / ab - 1).sqrt(),
        "post_var": post_var,
        "large_var": torch.cat([post_var[1:2], betas[1:]]),                  # fixed-large, as Ho et al.
        "post_coef1": betas * ab_prev.sqrt() / (1 - ab),                     # multiplies x0, eq. 7
        "post_coef2": alphas.sqrt() * (1 - ab_prev) / (1 - ab),             # multiplies xt, eq. 7
    }


def tables_on(cfg, device):
    """The diffusion tables of a config on `device` (still float64), with the per-timestep loss weight."""
    d = cfg["diffusion"]
    tab = diffusion_tables(beta_schedule(d["beta_schedule"], d["timesteps"], d["beta_start"], d["beta_end"]))
    tab["loss_weight"] = (min_snr_weight(tab["alpha_bar"], d["min_snr_gamma"], d["model_mean_type"])
                          if d["loss_weight"] == "min_snr" else torch.ones_like(tab["alpha_bar"]))
    return {k: v.to(device) for k, v in tab.items()}


def extract(table, t, x):
    """table[t] cast to x's dtype/device, shaped (B, 1, 1, 1) to broadcast against x."""
    return table.to(x.device)[t].to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


def q_sample(x0, t, eps, tab):
    """Forward process q(x_t | x_0) = N(sqrt(ab_t) x0, (1 - ab_t) I), eq. 4."""
    return extract(tab["sqrt_ab"], t, x0) * x0 + extract(tab["sqrt_1m_ab"], t, x0) * eps


def q_posterior(x0, xt, t, tab):
    """Mean and variance of q(x_{t-1} | x_t, x_0), eq. 6-7."""
    mean = extract(tab["post_coef1"], t, xt) * x0 + extract(tab["post_coef2"], t, xt) * xt
    return mean, extract(tab["post_var"], t, xt)


def predict_x0(out, xt, t, tab, mean_type):
    """x0 implied by the network output for each parameterisation."""
    if mean_type == "eps":                                   # x0 = (x_t - sqrt(1-ab) eps) / sqrt(ab)
        return extract(tab["sqrt_recip_ab"], t, xt) * xt - extract(tab["sqrt_recipm1_ab"], t, xt) * out
    if mean_type == "x0":
        return out
    return (out - extract(tab["post_coef2"], t, xt) * xt) / extract(tab["post_coef1"], t, xt)


def training_target(x0, xt, t, eps, tab, mean_type):
    """What the network regresses onto: eps, x0 or the posterior mean."""
    if mean_type == "eps":
        return eps
    if mean_type == "x0":
        return x0
    return q_posterior(x0, xt, t, tab)[0]


def mse_per_sample(out, target):
    """(B,) mean squared error over C, H, W (the 'simple' loss, eq. 14); computed in float32."""
    return (out.float() - target.float()).pow(2).flatten(1).mean(1)


def p_mean_var(out, xt, t, tab, mean_type, var_type, clip=True):
    """Reverse-process mean, variance and x0 estimate; x0 clipped to [-1, 1] when sampling."""
    x0 = predict_x0(out, xt, t, tab, mean_type)
    if clip:
        x0 = x0.clamp(-1, 1)
    mean, _ = q_posterior(x0, xt, t, tab)
    var = extract(tab["post_var" if var_type == "fixed-small" else "large_var"], t, xt)
    return mean, var, x0


def ddpm_step(out, xt, t, tab, noise, mean_type="eps", var_type="fixed-small"):
    """One ancestral step x_t -> x_{t-1} = mean + sigma_t z (no noise at t = 0), Algorithm 2."""
    mean, var, _ = p_mean_var(out, xt, t, tab, mean_type, var_type)
    nonzero = (t > 0).to(xt.dtype).reshape(-1, *([1] * (xt.dim() - 1)))
    return mean + nonzero * var.sqrt() * noise


def ddim_timesteps(T, steps, rule="uniform"):
    """`steps` distinct timesteps in sampling order (descending), ending at 0.

    uniform: floor(i T / steps); quadratic: round((i sqrt(0.8 T) / (steps-1))^2) made strictly increasing
    (the official rule repeats small timesteps, which would waste network evaluations on identity steps)."""
    if not 1 <= steps <= T:
        raise ValueError(f"DDIM needs 1 <= steps <= T = {T}, got {steps}")
    if rule == "uniform":
        ts = [i * T // steps for i in range(steps)]
    elif rule == "quadratic":
        grid = np.linspace(0, math.sqrt(0.8 * T), steps) ** 2
        ts = []
        for g in np.round(grid).astype(int):
            ts.append(int(g) if not ts else max(int(g), ts[-1] + 1))
    else:
        raise ValueError(f"unknown DDIM skip rule {rule!r} (uniform | quadratic)")
    return ts[::-1]


def ddim_step(out, xt, t, t_prev, tab, eta, noise, mean_type="eps"):
    """One DDIM step x_t -> x_{t_prev} (Song et al. eq. 12); t_prev = -1 means the final step to x_0."""
    x0 = predict_x0(out, xt, t, tab, mean_type).clamp(-1, 1)
    eps = (xt - extract(tab["sqrt_ab"], t, xt) * x0) / extract(tab["sqrt_1m_ab"], t, xt)
    ab = extract(tab["alpha_bar"], t, xt)
    ab_prev = extract(torch.cat([tab["alpha_bar"], tab["alpha_bar"].new_ones(1)]), t_prev, xt)  # [-1] -> 1
    sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).sqrt()
    return ab_prev.sqrt() * x0 + (1 - ab_prev - sigma ** 2).clamp(min=0).sqrt() * eps + sigma * noise


# ----------------------------------------------------------------------------------------------
# Random streams. Every draw comes from a generator keyed by integers -- (purpose, seed, step, rank) in
# training, (purpose, seed, image) in sampling -- so a resumed run draws exactly what the uninterrupted
# run drew, and ranks, seeds and steps get unrelated streams.

# purposes
TIMESTEPS, NOISE, DROPOUT, X_T, SAMPLER_NOISE, FIRST_MASK, RANDOM_REGROWTH, NLL_TIMESTEPS, NLL_NOISE = range(9)


def key_seed(*key):
    """A 64-bit seed hashed from non-negative integers by numpy's SeedSequence. Parts are mixed, never
    shifted into high bits: torch's CPU generator (mt19937) keeps only the low 32 bits of a seed."""
    low, high = np.random.SeedSequence(key).generate_state(2, np.uint32)
    return int(low) | int(high) << 32


def step_generators(seed, step, rank, device):
    """(timestep generator, noise generator) for one optimizer step of one rank, both on `device`: drawing t where it
    is used saves a host->device copy and a sync per step."""
    t_gen = torch.Generator(device=device).manual_seed(key_seed(TIMESTEPS, seed, step, rank))
    return t_gen, torch.Generator(device=device).manual_seed(key_seed(NOISE, seed, step, rank))


# ----------------------------------------------------------------------------------------------
# Curriculum: every rule of the method. Stage functions take (stages, i, ...) with i the stage index.
# Stage lengths are given in epochs, times train.length_scale, and turned into optimizer steps here only.

def stages_of(cfg):
    """The run's stages. Plain DDPM is one stage on [0, 1) lasting train.epochs, so every mode runs one loop.
    curriculum.order "reverse" (the anti-curriculum) mirrors every window: low noise first, widening upward.
    curriculum.window "full" keeps every stage (its length, sparsity, lambda) but widens its window to [0, 1)."""
    if not cfg["curriculum"]["enabled"]:
        return [{"t_min": 0.0, "t_max": 1.0, "epochs": cfg["train"]["epochs"], "name": "plain"}]
    if cfg["curriculum"]["window"] == "full":
        return [{**s, "t_min": 0.0, "t_max": 1.0} for s in cfg["curriculum"]["stages"]]
    if cfg["curriculum"]["order"] == "reverse":
        return [mirrored(s) for s in cfg["curriculum"]["stages"]]
    return cfg["curriculum"]["stages"]


def mirrored(stage):
    """A stage seen from the other end of the noise axis: [t_min, t_max) -> [1 - t_max, 1 - t_min), and
    Beta(alpha, beta) -> Beta(beta, alpha)."""
    out = dict(stage)
    if "t_min" in stage:
        out["t_min"], out["t_max"] = round(1 - stage["t_max"], 12), round(1 - stage["t_min"], 12)
    if "alpha" in stage:
        out["alpha"], out["beta"] = stage["beta"], stage["alpha"]
    return out


def stage_start(stages, i, steps_per_epoch, scale=1.0):
    """First optimizer step of stage i (i = len(stages): the run's length): epochs before it x steps per epoch
    x scale, rounded half up to a whole step in exact arithmetic (as `active_count`), epochs and scale read as the
    decimals a config writes (2.53 = 253/100: 2 epochs x 25 steps x 2.53 = 126.5 -> 127). With scale 1 and whole
    epochs, stages start on epoch boundaries."""
    decimal = lambda x: Fraction(repr(float(x)))           # 2.53 -> 253/100, not the binary float just below it
    steps = sum(decimal(s["epochs"]) for s in stages[:i]) * steps_per_epoch * decimal(scale)
    return math.floor(steps + Fraction(1, 2))


def stage_at(stages, step, steps_per_epoch, scale=1.0):
    """Index of the stage that contains optimizer `step`; steps past the schedule stay in the last stage."""
    i = 0
    while i + 1 < len(stages) and step >= stage_start(stages, i + 1, steps_per_epoch, scale):
        i += 1
    return i


def stage_name(stages, i):
    """A stage's display name (and file-name part): its 'name', else 'stage<i+1>'."""
    return stages[i].get("name", f"stage{i + 1}")


def total_epochs(cfg):
    """The schedule's length in epochs before train.length_scale: the stage epochs' sum (train.epochs if plain)."""
    return sum(s["epochs"] for s in stages_of(cfg))


def time_window(stages, i, T, positions=None):
    """Half-open integer window [lo, hi) of stage i, at least one step wide: the timesteps whose position lies in
    [t_min, t_max), t_max = 1 taking the last step too. The position of t is t/T (curriculum.window "t":
    [floor(t_min T), floor(t_max T)), the 1e-9 guarding 0.57 * 100 = 56.999...) or `positions[t]`, increasing
    in t (window "logsnr": `logsnr_positions`)."""
    t_min, t_max = stages[i]["t_min"], stages[i]["t_max"]
    if positions is None:
        lo, hi = (math.floor(f * T + 1e-9) for f in (t_min, t_max))
    else:
        lo, hi = (T if f >= 1 else int(np.searchsorted(positions, f, side="left")) for f in (t_min, t_max))
    lo = min(lo, T - 1)
    return lo, max(min(hi, T), lo + 1)


def logsnr_positions(alpha_bar):
    """(T,) float64 position of each timestep in the schedule's log-SNR range, 0 at t = 0 (least noisy) and 1 at
    t = T-1. log-SNR = log(alpha_bar / (1 - alpha_bar)); a last alpha_bar of 0 (the jsd schedule: log-SNR -inf)
    sits at 1, the finite ones spread over [0, 1] by their log-SNR (jsd at T = 2: positions 0 and 1)."""
    ab = np.asarray(alpha_bar, dtype=np.float64)
    with np.errstate(divide="ignore"):
        lam = np.log(ab) - np.log1p(-ab)
    finite = np.isfinite(lam)
    span = lam[0] - lam[finite].min()
    return np.where(finite, (lam[0] - np.where(finite, lam, lam[0])) / (span if span > 0 else 1.0), 1.0)


def sample_t(n, lo, hi, generator):
    """(n,) int64 timesteps uniform on [lo, hi) from an explicit generator (hard curriculum), on its device."""
    return torch.randint(lo, hi, (n,), generator=generator, device=generator.device)


@functools.lru_cache(maxsize=64)
def beta_cdf_grid(alpha, beta, T, device):
    """(T-1,) float64 Beta(alpha, beta) CDF at 1/T, ..., (T-1)/T on `device`, made once per stage and device."""
    return torch.tensor(betainc(alpha, beta, np.arange(1, T) / T), dtype=torch.float64, device=device)


def sample_t_soft(n, alpha, beta, T, generator):
    """(n,) int64 timesteps t = floor(x T), x ~ Beta(alpha, beta), on the generator's device. x = F^-1(u) for a uniform
    u, and floor(x T) >= k iff u >= F(k/T), so t counts the grid CDF values <= u: exact, with no trip to the host."""
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device)
    return torch.searchsorted(beta_cdf_grid(alpha, beta, T, generator.device), u, right=True)


@functools.lru_cache(maxsize=16)
def mixture_tables(windows, weights, device):
    """(lo, hi, weights) as tensors on `device`, made once per run rather than copied from the host every step."""
    lo, hi = (torch.tensor(v, device=device) for v in zip(*windows))
    return lo, hi, torch.tensor(weights, dtype=torch.float64, device=device)


def sample_t_mixture(n, windows, weights, generator):
    """(n,) timesteps from the mixture of uniform windows [lo_k, hi_k) with probabilities weights_k / sum: a
    window index per sample, then a uniform position inside it; on the generator's device."""
    lo, hi, w = mixture_tables(tuple(windows), tuple(weights), generator.device)
    k = torch.multinomial(w, n, replacement=True, generator=generator)
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device)
    return lo[k] + (u * (hi - lo)[k]).long()                # u < 1, so t < hi_k


def draw_timesteps(stages, i, n, T, soft, generator, positions=None, weights=None):
    """(n,) timesteps for stage i on the generator's device: U[window) (hard; plain DDPM's window is [0, T)),
    floor(T Beta(alpha, beta)) (soft), or with per-stage `weights` (curriculum.order "mixture") the weighted mixture
    of every stage's window, whatever i is."""
    if soft:
        return sample_t_soft(n, stages[i]["alpha"], stages[i]["beta"], T, generator)
    if weights is not None:
        return sample_t_mixture(n, [time_window(stages, k, T, positions) for k in range(len(stages))], weights,
                                generator)
    return sample_t(n, *time_window(stages, i, T, positions), generator)


def linear_decay(peak, i, num_stages):
    """peak * (S-1-i)/(S-1): the description's linear per-stage decay; 0 when S = 1."""
    return 0.0 if num_stages <= 1 else peak * (num_stages - 1 - i) / (num_stages - 1)


def stage_sparsity(stages, i, initial_sparsity):
    """CS: target fraction of masked bottleneck channels in stage i (a stage's 'sparsity' overrides)."""
    return stages[i].get("sparsity", linear_decay(initial_sparsity, i, len(stages)))


def stage_lambda(stages, i, lambda_max):
    """CR: Group-L1 weight lambda in stage i (a stage's 'lambda' overrides)."""
    return stages[i].get("lambda", linear_decay(lambda_max, i, len(stages)))


def min_snr_weight(alpha_bar, gamma, mean_type):
    """Min-SNR-gamma loss weight per timestep (Hang et al. 2023), SNR = alpha_bar / (1 - alpha_bar):
    min(SNR, gamma) / SNR for eps-prediction (its loss is the x0 loss divided by SNR), min(SNR, gamma) for x0.
    gamma = inf gives 1 (eps) and SNR (x0): Ho et al.'s simple loss. SNR = 0 (alpha_bar = 0) weighs 1 for eps."""
    snr = alpha_bar / (1 - alpha_bar)
    w = snr.clamp(max=gamma)
    return torch.where(snr > 0, w / snr, torch.ones_like(snr)) if mean_type == "eps" else w


def lr_at(step, lr, warmup):
    """Linear warm-up over `warmup` optimizer steps to the constant base LR (tqch: min((s+1)/warmup, 1))."""
    return lr * min((step + 1) / warmup, 1.0) if warmup > 0 else lr


def ema_decay_at(num_updates, decay):
    """EMA decay with TF's warm-up: min(decay, (1+n)/(10+n))."""
    return min(decay, (1 + num_updates) / (10 + num_updates))


# ----------------------------------------------------------------------------------------------
# Sparsity (CS) and Group-L1 regularisation (CR).

def active_count(C, sparsity):
    """Channels kept on: max(1, round(C (1 - s))) with halves rounded up, in exact fractions (10 x 0.45 and
    10 x 0.95 both round up). limit_denominator recovers the decimal a config wrote (0.6000000000000001 -> 3/5)."""
    keep = C * (1 - Fraction(sparsity).limit_denominator(10 ** 6))
    return max(1, math.floor(keep + Fraction(1, 2)))


def initial_mask(C, active, seed):
    """(C,) float 0/1 mask with `active` ones at seeded random positions: identical on every rank."""
    g = torch.Generator().manual_seed(key_seed(FIRST_MASK, seed))
    mask = torch.zeros(C)
    mask[torch.randperm(C, generator=g)[:active]] = 1.0
    return mask


def gradient_score(weight_grad, mask):
    """(C,) per-output-channel sum |dL/dW| of the UNet's regrowth_weight (the middle block's first ResBlock
    conv2), masked channels only."""
    return weight_grad.abs().sum(dim=(1, 2, 3)) * (1 - mask)


def taylor_score(mask_grad, mask):
    """(C,) |dL/dm_c|: first-order estimate of the loss change from switching channel c on."""
    return mask_grad.abs() * (1 - mask)


def random_score(C, seed, stage_index):
    """(C,) uniform scores from a generator keyed by (seed, stage): the same on every rank."""
    return torch.rand(C, generator=torch.Generator().manual_seed(key_seed(RANDOM_REGROWTH, seed, stage_index)))


def regrow(mask, birth, score, target_active, stage_index):
    """Switch on the highest-scoring masked channels until `target_active` are on.

    Ties go to the lower channel index; a channel is never switched off. Returns (mask, birth, ids)."""
    mask, birth = mask.clone(), birth.clone()
    need = target_active - int(mask.sum().item())
    if need <= 0:
        return mask, birth, []
    candidates = torch.nonzero(mask == 0).flatten()
    order = torch.sort(-score[candidates].double(), stable=True).indices
    ids = candidates[order[:need]]
    mask[ids], birth[ids] = 1.0, stage_index
    return mask, birth, sorted(ids.tolist())


def conv_layers(model):
    """[(name, nn.Conv2d)] of every convolution in the model, in module order (CR penalises every convolution)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]


def group_l1(model):
    """P = sum over convs, sum over output channels c of ||W_c||_2 (biases not penalised)."""
    return sum(m.weight.flatten(1).norm(dim=1).sum() for _, m in conv_layers(model))


def objective(mse, penalty, lam, global_batch):
    """loss = mean(mse) + lam P / B with B the GLOBAL batch, so it does not depend on the world size
    (a choice: the description divides by the per-GPU batch). Returns (loss, reg) where reg is the term actually added."""
    reg = lam * penalty / global_batch
    return mse.mean() + reg, reg


def small_norm_channels(model, threshold=1e-3):
    """{layer group: number of conv output channels with ||W_c||_2 < threshold} (what CR achieved)."""
    counts = {}
    for name, m in conv_layers(model):
        group = name.split(".")[0]
        counts[group] = counts.get(group, 0) + int((m.weight.flatten(1).norm(dim=1) < threshold).sum())
    return counts


# ----------------------------------------------------------------------------------------------
# Generation (shared by training grids, `sample`, `eval` and `compare`).

@torch.no_grad()
def generate(net, cfg, shape, first, count, seed, mask, tab, ddim_steps=0, eta=0.0, skip="uniform", amp=None,
             on_step=None):
    """Images first .. first+count-1 as float (count, C, H, W) in [-1, 1]; on_step(k, steps) after each step.

    x_T of image i is drawn from a generator keyed by (seed, i), so with deterministic DDIM (eta = 0) image i
    never depends on the batch or the number of GPUs; per-step noise is keyed by (seed, first)."""
    device, dif = tab["betas"].device, cfg["diffusion"]
    graphs = cuda_graphs(cfg, device)                       # the net was compiled for this config and device
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(key_seed(X_T, seed, i)))
                     for i in range(first, first + count)]).to(device)
    g = torch.Generator(device=device).manual_seed(key_seed(SAMPLER_NOISE, seed, first))
    T = dif["timesteps"]
    ts = ddim_timesteps(T, ddim_steps, skip) if ddim_steps else list(range(T - 1, -1, -1))
    for k, t_ in enumerate(ts):
        if graphs:                                          # a graphed net's last output is consumed: reuse it
            torch.compiler.cudagraph_mark_step_begin()
        t = torch.full((count,), t_, device=device, dtype=torch.long)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = net(x, t, mask).float()
        stochastic = not ddim_steps or eta > 0
        z = torch.randn(x.shape, generator=g, device=device) if stochastic else torch.zeros((), device=device)
        if ddim_steps:
            t_prev = torch.full_like(t, ts[k + 1] if k + 1 < len(ts) else -1)
            x = ddim_step(out, x, t, t_prev, tab, eta, z, dif["model_mean_type"])
        else:
            x = ddpm_step(out, x, t, tab, z, dif["model_mean_type"], dif["model_var_type"])
        if on_step:
            on_step(k, len(ts))
    return x


# ----------------------------------------------------------------------------------------------
# Training: one plain loop for plain DDPM, C, CS and CR, on CPU, one GPU or torchrun DDP. The loop first
# (`Run`, `train_step`, `train`), then the pieces it calls.

@dataclasses.dataclass
class Run:
    """What stays fixed for a training run, decided once from the config. `fwd` computes the forward (the DDP
    wrapper on several ranks); `model` is the module whose parameters it updates; `loss` is step_loss, compiled with
    train.compile; `net` is the sampler's network (the EMA copy, compiled with train.compile)."""
    cfg: dict
    stages: list                    # the curriculum; plain DDPM is one stage on [0, 1)
    mode: str                       # base | c | cs | cr
    lambdas: list                   # CR's lambda per stage (zeros in the other modes)
    lam: torch.Tensor               # the same on the device, so a new stage changes a value, not a compiled constant
    regrowth: str                   # CS's regrowth method, "" in the other modes
    soft: bool                      # soft curriculum: t = floor(T x), x ~ Beta(alpha, beta)
    positions: object               # curriculum.window "logsnr": each t's log-SNR position; None for "t"
    mix_weights: object             # curriculum.order "mixture": steps per stage; None otherwise
    model: torch.nn.Module
    fwd: object
    ema: object                     # the EMA copy, or None
    opt: torch.optim.Optimizer
    tab: dict                       # diffusion tables on the device
    amp: object                     # bf16 autocast dtype, or None for fp32
    stats: "StepStats"
    rank: int = 0
    world: int = 1
    graphed: bool = False           # the compiled loss replays as CUDA graphs (cuda_graphs)
    loss: object = None
    net: object = None


def new_state(cfg, device):
    """(model, ema, opt, mask, birth, score): identical on every rank (same seed). The mask starts with stage
    0's share of channels for CS and all ones otherwise; birth[c] is the stage channel c came on (-1: off)."""
    tr = cfg["train"]
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg, device)
    ema = copy.deepcopy(model).requires_grad_(False).eval() if tr["use_ema"] else None
    opt = torch.optim.Adam(model.parameters(), lr=tr["lr"], betas=(tr["beta1"], tr["beta2"]),
                           fused=device.type == "cuda")
    C = model.bottleneck_channels
    mask = torch.ones(C)
    if run_mode(cfg) == "cs":
        s0 = stage_sparsity(stages_of(cfg), 0, cfg["sparsity"]["initial_sparsity"])
        mask = initial_mask(C, active_count(C, s0), cfg["seed"])
    return model, ema, opt, mask, torch.where(mask > 0, 0, -1), torch.zeros(C)


def make_run(cfg, model, ema, opt, device, rank=0, world=1, steps_per_epoch=1):
    """The Run of a config: its decisions (mode, stages, lambdas, regrowth, windows), forward (DDP), loss, sampler."""
    mode, stages, cur = run_mode(cfg), stages_of(cfg), cfg["curriculum"]
    tab = tables_on(cfg, device)
    starts = [stage_start(stages, i, steps_per_epoch, cfg["train"]["length_scale"]) for i in range(len(stages) + 1)]
    fwd = model
    if world > 1:
        fwd = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    lambdas = [stage_lambda(stages, i, cfg["regularization"]["lambda_max"]) if mode == "cr" else 0.0
               for i in range(len(stages))]
    run = Run(cfg=cfg, stages=stages, mode=mode, lambdas=lambdas, lam=torch.tensor(lambdas, device=device),
              regrowth=cfg["sparsity"]["regrowth_method"] if mode == "cs" else "",
              soft=cur["enabled"] and cur["mode"] == "soft", model=model, fwd=fwd,
              positions=logsnr_positions(tab["alpha_bar"].cpu()) if cur["window"] == "logsnr" else None,
              mix_weights=[b - a for a, b in zip(starts, starts[1:])] if cur["order"] == "mixture" else None,
              ema=ema, opt=opt, tab=tab, amp=precision_dtype(cfg),
              stats=StepStats(device), rank=rank, world=world)
    run.loss, run.net = functools.partial(step_loss, run), ema if ema is not None else model
    run.graphed = cuda_graphs(cfg, device)
    if cfg["train"]["compile"]:
        run.loss, run.net = compiled(run.loss, cfg, device), compiled(run.net, cfg, device)
    return run


def step_loss(run, xb, t, eps, mask, lam):
    """(objective, unweighted per-sample mse, reg) of one micro-batch: q_sample, the forward, the simple loss weighted
    per timestep (all ones unless Min-SNR) and CR's lam P / B. Every stage-dependent input (t, mask, lam) is a
    tensor, so a compiled step sees new values at a stage change, never new constants or shapes."""
    xt = q_sample(xb, t, eps, run.tab)
    with torch.autocast(xb.device.type, dtype=run.amp or torch.float32, enabled=run.amp is not None):
        out = run.fwd(xt, t, mask)
    mse = mse_per_sample(out, training_target(xb, xt, t, eps, run.tab, run.cfg["diffusion"]["model_mean_type"]))
    penalty = group_l1(run.model) if run.mode == "cr" else mse.new_zeros(())   # also at lam = 0: no branch on lam
    loss, reg = objective(mse * run.tab["loss_weight"][t].float(), penalty, lam, run.cfg["train"]["batch_size"])
    return loss, mse, reg


def train_step(x0, step, i, mask, score, run):
    """One optimizer step on this rank's batch x0 in stage i: micro-steps (DDP's no_sync on all but the last),
    clipping, Adam, EMA, and the CS regrowth evidence added into `score` in place. Statistics stay on the
    device (no host sync). Clipping, Adam (fused on CUDA) and the EMA are a few multi-tensor kernels; they stay
    outside the compiled region because the LR and the EMA decay change every step."""
    cfg, tr = run.cfg, run.cfg["train"]
    T = cfg["diffusion"]["timesteps"]
    if run.graphed:                                         # CUDA graphs: last step's outputs may be overwritten
        torch.compiler.cudagraph_mark_step_begin()          # (asked only then: its first call imports for ~2 s)
    t_gen, noise_gen = step_generators(cfg["seed"], step, run.rank, x0.device)
    if cfg["model"]["drop_rate"] > 0:
        torch.manual_seed(key_seed(DROPOUT, cfg["seed"], step, run.rank))
    micro = x0.chunk(tr["num_accum"])
    for k, xb in enumerate(micro):
        t = draw_timesteps(run.stages, i, len(xb), T, run.soft, t_gen, run.positions, run.mix_weights)
        eps = torch.randn(xb.shape, generator=noise_gen, device=xb.device)
        sync = run.fwd.no_sync() if run.world > 1 and k < len(micro) - 1 else contextlib.nullcontext()
        with sync:
            loss, mse, reg = run.loss(xb, t, eps, mask, run.lam[i])
            (loss / len(micro)).backward()
        run.stats.add(t, mse.detach(), loss.detach(), reg.detach(), T)
    if run.regrowth:
        score += regrowth_evidence(run.regrowth, run.model, mask)
    for group in run.opt.param_groups:
        group["lr"] = lr_at(step, tr["lr"], tr["warmup"])
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), tr["grad_norm"])
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    if run.ema is not None:
        ema_update(run.ema, run.model, ema_decay_at(step, tr["ema_decay"]))


def train(cfg, config_path=None, resume=None, force=False, download=False):
    """Train plain DDPM / C / CS / CR as the config says; resumes from <out_dir>/ckpt.pt. Returns out_dir."""
    rank, world, device = setup_dist()
    is_main, tr, seed = rank == 0, cfg["train"], cfg["seed"]
    log = (lambda *a: print(*a, flush=True)) if is_main else (lambda *a: None)
    check_batch_split(tr, world)
    check_memory(cfg, device, world)
    evaluator = held_out_evaluator(cfg, device, rank, world) if tr["eval_intv"] else None   # refuses before any work
    if resume and not os.path.isfile(resume):               # before any folder is made
        raise RunError(f"checkpoint not found: {resume}" if not os.path.exists(resume) else
                       f"--resume {resume} is not a checkpoint file (a folder, pipe or device); pass the .pt file")
    out_dir = cfg["out_dir"] or os.path.join("out", os.path.splitext(os.path.basename(config_path or "run"))[0])
    ckpt_path, metrics_path = os.path.join(out_dir, "ckpt.pt"), os.path.join(out_dir, "metrics.jsonl")
    lock, made = open_run_folder(out_dir) if is_main else (None, [])   # made: what a failed start removes again
    stop, previous_handler = threading.Event(), signal.getsignal(signal.SIGINT)
    try:
        if is_main:
            check_run_folder(out_dir)                       # under the lock: no folder where a file goes, no temps
        images = data.load_images_on_ranks(cfg["dataset"], rank, world, root=cfg["data_root"] or None,
                                           split=cfg["data_split"] or None, resolution=cfg["resolution"] or None,
                                           num_images=cfg["data_limit"] or None, download=download, log=log)
        if images.shape[3] != cfg["model"]["in_channels"]:
            raise ConfigError(f"model.in_channels is {cfg['model']['in_channels']} but {cfg['dataset']} "
                              f"images have {images.shape[3]} channels")
        shape = (images.shape[3], images.shape[1], images.shape[2])
        steps_per_epoch = data.steps_per_epoch(len(images), tr["batch_size"])
        stages, scale = stages_of(cfg), tr["length_scale"]
        starts, total_steps = schedule_in_steps(cfg, stages, steps_per_epoch)
        grid_every, ckpt_every = tr["image_intv"] * steps_per_epoch, tr["chkpt_intv"] * steps_per_epoch
        model, ema, opt, mask, birth, score = new_state(cfg, device)
        source = resume or (ckpt_path if os.path.exists(ckpt_path) else None)
        step, wall, t_start = 0, 0.0, time.perf_counter()
        # ckpt.pt may become ckpt_prev.pt only once it is known good: a torn file never replaces the good one
        rotate = source is not None and os.path.samefile(source, ckpt_path) if os.path.exists(ckpt_path) else True
        if source:
            mask, birth, score, step, wall = resume_state(source, cfg, force, model, ema, opt, len(images))
            log(f"resumed from {source} at step {step} (epoch {step / steps_per_epoch:.2f})")
        if is_main:
            truncate_jsonl(metrics_path, step)              # records a killed run wrote after its checkpoint
            data.atomic_write(os.path.join(out_dir, "config.json"), json.dumps(cfg, indent=2))
        made = []                                           # started: the run folder stays from here on
        run = make_run(cfg, model, ema, opt, device, rank, world, steps_per_epoch)
        mask, score = place_mask_and_score(run, mask, score, device)
        epochs = total_epochs(cfg) * scale
        log(start_banner(run, cfg, len(images), shape, steps_per_epoch, total_steps, device, out_dir))
        def checkpoint(snapshot):
            nonlocal rotate
            snapshot = snapshot and tr["snapshots"] and os.path.join(out_dir,
                                                                     f"ckpt_epoch{step // steps_per_epoch:04d}.pt")
            last = max(step - 1, 0)                         # the last step taken: where a NaN would come from
            where = (f"epoch {step / steps_per_epoch:.2f}, "
                     f"stage {stage_name(stages, stage_at(stages, last, steps_per_epoch, scale))}")
            checkpoint_run(run, ckpt_path, snapshot, rotate, where, mask=mask, birth=birth, score=score, step=step,
                           epoch=step / steps_per_epoch, config=cfg, image_shape=list(shape), num_images=len(images),
                           wall_seconds=wall + time.perf_counter() - t_start)
            rotate = True

        def ask_stop(*_):
            stop.set()
            signal.signal(signal.SIGINT, signal.default_int_handler)   # a second Ctrl-C stops at once
        signal.signal(signal.SIGINT, ask_stop)
        batches = data.batches_from(images, tr["batch_size"], rank, world, seed, step, steps_per_epoch, device)
        first_step, t_log, step_log = step, time.perf_counter(), step
        while step < total_steps:
            # Curriculum: the stage, and with it the window, lambda and the CS mask, is a function of the step.
            i = stage_at(stages, step, steps_per_epoch, scale)
            if step == starts[i] or step == first_step:
                regrown = []
                if run.regrowth and step == starts[i] and i > 0:
                    mask, birth, regrown = regrow_at_stage(run, i, mask, birth, score)
                    score.zero_()
                log(stage_banner(run, i, mask.detach(), regrown))
                if is_main and step == starts[i]:
                    data.append_jsonl(metrics_path, stage_record(run, i, step, steps_per_epoch, mask, regrown, birth))

            # One optimizer step.
            model.train()
            train_step(next(batches), step, i, mask, score, run)
            step += 1

            # Held-out evaluation (train.eval_intv): before the checkpoint, so a resumed run writes each record once.
            if evaluator and (step % tr["eval_intv"] == 0 or step == total_steps):
                evaluator(run, mask.detach(), step, metrics_path)

            # Log: one all-reduce of the running sums, every log_intv steps.
            if step % tr["log_intv"] == 0 or step == total_steps:
                run.stats.v[24] = float(stop.is_set())
                s = run.stats.reduce(world)
                epoch, name = (step - 1) // steps_per_epoch, stage_name(stages, i)
                if not all(math.isfinite(s[k]) for k in ("loss", "mse", "reg")):
                    raise RunError(f"loss is {s['loss']} at step {step} (epoch {step / steps_per_epoch:.2f}, stage "
                                   f"{name}); stopped. {good_checkpoints(ckpt_path)}. Lower train.lr or raise "
                                   "train.warmup, then rerun to resume")
                now = time.perf_counter()
                img_s = (step - step_log) * tr["batch_size"] / max(now - t_log, 1e-9)
                t_log, step_log = now, step
                log(f"epoch {step / steps_per_epoch:.2f}/{epochs:g} [{name}] step {step}/{total_steps} | "
                    f"loss={s['loss']:.4f} "
                    f"mse={s['mse']:.4f} reg={s['reg']:.4f} | {img_s:.0f} img/s | "
                    f"ETA {fmt_time((total_steps - step) * tr['batch_size'] / max(img_s, 1e-9))}")
                if is_main:
                    data.append_jsonl(metrics_path, {
                        "kind": "train", "step": step, "epoch": epoch, "stage": i, "name": name,
                        "lr": lr_at(step - 1, tr["lr"], tr["warmup"]), "loss": s["loss"], "mse": s["mse"],
                        "reg": s["reg"], "lambda": run.lambdas[i], "active": int(mask.sum()),
                        "img_s": round(img_s, 1), "bucket_mse": s["bucket_mse"]})
                if s["stop"]:
                    raise StopRequested
            if world == 1 and stop.is_set():                # after this step's record, if it has one
                raise StopRequested

            # Checkpoint: every chkpt_intv epochs, every save_every steps, and at the end.
            epoch_end = step % ckpt_every == 0 or step == total_steps
            if epoch_end or (tr["save_every"] and step % tr["save_every"] == 0):
                checkpoint(epoch_end)

            # Sample grid (rank 0 alone): after the checkpoint, so drawing it can never cost the epoch.
            if grid_every and step % grid_every == 0 and is_main and tr["num_samples"]:
                model.eval()                                # sampled by run.net: the EMA, else the model itself
                x = torch.cat([generate(run.net, cfg, shape, a, n, seed, mask.detach(), run.tab,
                                        ddim_steps=tr["sample_steps"], amp=run.amp)
                               for a, n in rank_chunks(tr["num_samples"], 64, 0, 1)])
                save_grid(to_uint8(x), os.path.join(out_dir, "samples", f"epoch{step // steps_per_epoch:04d}_"
                                                                        f"{stage_name(stages, i)}.png"))
    except StopRequested:                                   # Ctrl-C, acted on at a step boundary
        checkpoint(False)
        log(f"interrupted at step {step}; saved {ckpt_path}. Run the same command to resume.")
        raise SystemExit(130)
    except KeyboardInterrupt:                               # a second Ctrl-C: stop now, save nothing
        log(f"stopped at once; nothing saved after the last checkpoint ({ckpt_path}).")
        raise SystemExit(130)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
        if lock is not None:
            lock.close()
        data.remove_made(made)
    log(f"done: {step} steps, checkpoint {ckpt_path}")
    return out_dir


def open_run_folder(out_dir):
    """Rank 0: make the run folder and samples/, then lock it. Returns (lock, made), made being what did not exist
    before (data.remove_made undoes a failed start with it). A folder another trainer holds is left untouched."""
    made = data.not_yet_made(out_dir, "samples")
    try:
        data.prepare_out_dir(out_dir, "samples")
    except data.DataError:
        data.remove_made(made)
        raise
    return data.lock_run_folder(out_dir), made


def start_banner(run, cfg, num_images, shape, steps_per_epoch, total_steps, device, out_dir):
    """The run's first line (mode, data, split over ranks, length, size, path), and a warm-up longer than the run."""
    tr = cfg["train"]
    note = " (stage epochs override train.epochs)" if cfg["curriculum"]["enabled"] else ""
    line = (f"diffcl train | mode {run.mode} | {num_images} images {shape} | "
            f"world {run.world} x {tr['batch_size'] // run.world} per rank | {steps_per_epoch} steps/epoch | "
            f"{total_epochs(cfg) * tr['length_scale']:g} epochs{note}, {total_steps} steps | "
            f"{sum(p.numel() for p in run.model.parameters()):,} params | {device} "
            f"{'bf16' if run.amp else 'fp32'} {compile_label(cfg, device)} | out {out_dir}")
    if tr["warmup"] > total_steps:
        line += (f"\nwarning: train.warmup ({tr['warmup']} steps) is longer than the run ({total_steps} steps): the "
                 "learning rate never reaches train.lr; lower train.warmup for a short run")
    return line


def schedule_in_steps(cfg, stages, steps_per_epoch):
    """(stage start steps, total steps) after train.length_scale; a stage scaled to no step is an error."""
    scale = cfg["train"]["length_scale"]
    starts = [stage_start(stages, i, steps_per_epoch, scale) for i in range(len(stages) + 1)]
    empty = [stage_name(stages, i) for i in range(len(stages)) if starts[i + 1] == starts[i]]
    if empty:
        raise ConfigError(f"train.length_scale={scale:g} leaves stage {empty[0]} with no optimizer step "
                          f"({steps_per_epoch} steps per epoch); raise train.length_scale or add images")
    return starts[:-1], starts[-1]


def resume_state(source, cfg, force, model, ema, opt, num_images):
    """Load a checkpoint into model, EMA and optimizer; returns (mask, birth, score, step, wall seconds so far).
    The data must be the checkpoint's too: its size sets steps per epoch, and with them every stage boundary."""
    state = load_checkpoint(source)
    diff = config_diff(state["config"], cfg)
    if diff and not force:
        raise RunError(f"{source} was written with a different config ({', '.join(diff)}); "
                       "use another --out_dir, or --force to resume anyway")
    if state.get("num_images", num_images) != num_images:
        raise RunError(f"{source} was trained on {state['num_images']} images, the dataset now has {num_images}: "
                       "the stage boundaries would move. Restore the data, or train into another --out_dir")
    load_weights(model, state["model"], source)
    if ema is not None and state["ema"] is not None:
        load_weights(ema, state["ema"], source)
    load_weights(opt, state["opt"], source)
    check_optimizer_state(opt, source)
    if state["mask"].shape != (model.bottleneck_channels,):
        raise RunError(f"{source} has a mask for {state['mask'].numel()} channels, the model has "
                       f"{model.bottleneck_channels}")
    return state["mask"], state["birth"], state["score"], state["step"], state.get("wall_seconds", 0.0)


def place_mask_and_score(run, mask, score, device):
    """The mask and CS scores on the training device; the mask tracks gradients only for Taylor regrowth."""
    return mask.to(device).requires_grad_(run.regrowth == "taylor"), score.to(device)


def regrow_at_stage(run, i, mask, birth, score):
    """CS stage transition: switch channels on up to stage i's target by their scores summed over ranks (random
    regrowth: by keyed random scores). Returns (mask, birth, regrown ids); the caller resets `score`."""
    C, cfg = mask.numel(), run.cfg
    totals = (random_score(C, cfg["seed"], i) if run.regrowth == "random"     # the same on every rank already
              else all_reduce_sum(score.clone(), run.world).cpu())
    target = active_count(C, stage_sparsity(run.stages, i, cfg["sparsity"]["initial_sparsity"]))
    new, birth, regrown = regrow(mask.detach().cpu(), birth, totals, target, i)
    return new.to(mask.device).requires_grad_(mask.requires_grad), birth, regrown


def stage_banner(run, i, mask, regrown):
    """One line describing curriculum stage i: epochs, window, sparsity / active channels, lambda."""
    stages, cfg = run.stages, run.cfg
    T, scale = cfg["diffusion"]["timesteps"], cfg["train"]["length_scale"]
    first, last = (sum(s["epochs"] for s in stages[:k]) * scale for k in (i, i + 1))
    epochs = f"epochs {first:g}-{last:g}" + (f" (x{scale:g})" if scale != 1 else "")   # as the progress line: from 0
    where = (f"t ~ {T}*Beta({stages[i]['alpha']}, {stages[i]['beta']})" if run.soft
             else "t in [%d, %d)" % time_window(stages, i, T, run.positions))
    if run.mix_weights:                                     # every stage draws from all windows alike
        where = "t ~ mixture of " + ", ".join(f"[{lo}, {hi}) x {w}" for (lo, hi), w in mixture_of(run)) + \
                " (order 'mixture': weights = steps per stage, the same in every stage)"
    text = f"== stage {i + 1}/{len(stages)} [{stage_name(stages, i)}] {epochs} | {where}"
    if run.mode == "cs":
        s = stage_sparsity(stages, i, cfg["sparsity"]["initial_sparsity"])
        text += (f" | sparsity {s:.0%}: {int(mask.sum())}/{mask.numel()} active"
                 f" (+{len(regrown)} regrown by {run.regrowth})")
    if run.mode == "cr":
        text += f" | lambda {run.lambdas[i]:.3g}"
    return text


def mixture_of(run):
    """[((lo, hi), weight)] of curriculum.order "mixture": every stage's window with its steps, drawn in every stage."""
    T = run.cfg["diffusion"]["timesteps"]
    return [(time_window(run.stages, k, T, run.positions), w) for k, w in enumerate(run.mix_weights)]


def stage_record(run, i, step, steps_per_epoch, mask, regrown, birth):
    """The metrics.jsonl record written when stage i starts: its window [lo, hi), none for a soft stage (it has
    none), and for order "mixture" the windows and weights every stage draws from instead ("mixture")."""
    record = {"kind": "stage", "step": step, "epoch": step // steps_per_epoch, "stage": i,
              "name": stage_name(run.stages, i), "lambda": run.lambdas[i], "active": int(mask.sum()),
              "regrown": regrown, "birth_stage": birth.tolist()}
    if run.mix_weights:
        record["mixture"] = {"windows": [list(w) for w, _ in mixture_of(run)], "weights": list(run.mix_weights)}
    elif not run.soft:
        record["window"] = list(time_window(run.stages, i, run.cfg["diffusion"]["timesteps"], run.positions))
    if run.mode == "cr":
        record["small_norm_channels"] = small_norm_channels(run.model)
    return record


def held_out_evaluator(cfg, device, rank, world):
    """train.eval_*: load the held-out images (with eval_fid also the Inception weights, refused in one line when
    missing, and the images' statistics); return evaluate(run, mask, step, metrics_path), which scores the EMA weights
    (the model's without EMA) under the current mask and appends (rank 0) {"kind": "eval", "step", "images_seen",
    "bucket_mse", "bpd", "fid"} to metrics.jsonl. Images, timesteps, noise and the FID samples' starting noise are keyed
    by seed 0 in every run and at every evaluation, so points differ only by the weights. Training is untouched: keyed
    generators only, no gradients, the module's mode restored. bits/dim is split over the ranks (all call its
    all-reduce); the bucket mse and FID run on rank 0 while the others wait at their next collective."""
    tr = cfg["train"]
    n, n_fid = tr["eval_num"], tr["eval_fid"]
    k = tr["eval_timesteps"] if tr["eval_timesteps"] < cfg["diffusion"]["timesteps"] else 0
    try:
        weights = fid.find_weights() if n_fid else None
    except fid.FIDError as e:
        raise ConfigError(f"train.eval_fid needs the FID Inception weights: {e}; or set --train.eval_fid=0") from None
    if rank > 0:                                            # rank 0 decodes and caches first, as for the training data
        barrier(world)
    held = data.held_out_images(cfg["dataset"], max(n, n_fid), cfg["resolution"] or None, cfg["data_root"] or None,
                                cfg["data_split"] or None)
    if rank == 0:
        barrier(world)
    if len(held) < max(n, n_fid):
        raise ConfigError(f"train.eval_num / train.eval_fid ask for {max(n, n_fid)} held-out images but "
                          f"{cfg['dataset']} has {len(held)}: lower them")
    inception = fid.load_inception(weights, device=device) if n_fid and rank == 0 else None
    ref = fid.feature_stats(fid.features(inception, held[:n_fid], device=device, log=None)) if inception else None
    shape = (held.shape[3], held.shape[1], held.shape[2])

    def evaluate(run, mask, step, metrics_path):
        t0, net = time.perf_counter(), run.ema if run.ema is not None else run.model
        training = net.training
        net.eval()
        nll = nll_on_ranks(net, cfg, mask, held[:n], k, 0, rank, world)
        if rank == 0:
            record = {"kind": "eval", "step": step, "images_seen": step * tr["batch_size"],
                      "bucket_mse": bucket_loss(net, cfg, mask, held, n=n), "bpd": nll["bpd"], "fid": None}
            if inception is not None:                       # DDIM: train.sample_steps steps, else 50
                x = torch.cat([generate(net, cfg, shape, a, m, 0, mask, run.tab, ddim_steps=tr["sample_steps"] or 50,
                                        amp=run.amp) for a, m in rank_chunks(n_fid, 256, 0, 1)])
                feats = fid.features(inception, to_uint8(x), device=device, log=None)
                record["fid"] = fid.frechet_distance(*fid.feature_stats(feats), *ref)
            data.append_jsonl(metrics_path, record)
            print(f"eval at step {step}: {nll['bpd']:.4f} bits/dim ({nll['estimator']}, {n} held-out images) | "
                  f"held-out mse {np.mean(record['bucket_mse']):.4f}"
                  + (f" | FID-{n_fid} {record['fid']:.2f}" if inception is not None else "")
                  + f" | {fmt_time(time.perf_counter() - t0)}", flush=True)
        net.train(training)
    return evaluate


def regrowth_evidence(method, model, mask):
    """This step's CS score for masked channels (gradients are complete and all-reduced here)."""
    if method == "gradient":
        return gradient_score(model.regrowth_weight().grad, mask.detach())
    if method == "taylor":
        evidence = taylor_score(mask.grad, mask.detach())
        mask.grad = None
        return evidence
    return torch.zeros_like(mask.detach())                  # random regrowth needs no evidence


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay ema + (1 - decay) model, in place and outside autograd (no graph grows across steps)."""
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)


class StepStats:
    """Running sums on the device since the last log: loss, mse, reg, count, and mse per 10 t-buckets."""

    def __init__(self, device):
        self.v = torch.zeros(25, dtype=torch.float64, device=device)   # [24]: a rank asked to stop

    def add(self, t, mse, loss, reg, T):
        n = len(t)
        self.v[0] += loss.double() * n
        self.v[1] += mse.double().sum()
        self.v[2] += reg.double() * n
        self.v[3] += n
        bucket = (t * 10 // T).clamp(max=9)
        self.v[4:14].index_add_(0, bucket, mse.double())
        self.v[14:24].index_add_(0, bucket, torch.ones_like(mse, dtype=torch.float64))

    def reduce(self, world):
        """All-reduce once (a log step), return a dict of means, and reset."""
        v = all_reduce_sum(self.v.clone(), world).cpu()
        self.v.zero_()
        n = max(v[3].item(), 1.0)
        buckets = [round(s / c, 6) if c else None for s, c in zip(v[4:14].tolist(), v[14:24].tolist())]
        return {"loss": v[0].item() / n, "mse": v[1].item() / n, "reg": v[2].item() / n, "n": int(v[3]),
                "bucket_mse": buckets, "stop": v[24].item() > 0}


def good_checkpoints(ckpt_path):
    """'Last good checkpoint: ...' naming ckpt.pt and ckpt_prev.pt where they exist (intact: nothing was written)."""
    files = [p for p in (ckpt_path, ckpt_path.removesuffix(".pt") + "_prev.pt") if os.path.isfile(p)]
    if not files:
        return "No checkpoint was written yet"
    return f"Last good checkpoint: {files[0]} (intact)" + "".join(f", the one before it: {p}" for p in files[1:])


def checkpoint_run(run, ckpt_path, snapshot_path, rotate, where, **state):
    """Check that the run is finite and the ranks agree, then (rank 0) write ckpt.pt, keeping the one before as
    ckpt_prev.pt when `rotate` (ckpt.pt is known good: never rotate a torn file over the good one), and an optional
    snapshot. `where` ("epoch 3, stage mid") locates the last step for an error; `state` holds mask, birth, score,
    step ... as the checkpoint stores them."""
    # Finite: the losses since the last log and all parameters, on every rank (one all-reduce, so all ranks agree).
    bad = [~torch.isfinite(run.stats.v[:3]).all()] + [~torch.isfinite(p).all() for p in run.model.parameters()]
    if all_reduce_sum(torch.stack(bad).any().double().reshape(1), run.world).item():
        raise RunError(f"loss or parameters became non-finite before step {state['step']} ({where}); not saved. "
                       f"{good_checkpoints(ckpt_path)}. Lower train.lr or raise train.warmup, then rerun to resume")
    assert_ranks_agree(run.model, state["mask"].detach(), run.world)
    if run.rank == 0:
        state.update(model=run.model.state_dict(), ema=run.ema.state_dict() if run.ema is not None else None,
                     opt=run.opt.state_dict(), mask=state["mask"].detach().cpu(), score=state["score"].cpu(),
                     world=run.world, torch=str(torch.__version__))
        save_checkpoint(ckpt_path, state, keep_previous=rotate)
        if snapshot_path:
            save_checkpoint(snapshot_path, state)
    barrier(run.world)


def build_model(cfg, device):
    """The UNet of the config, on `device` (channels_last when train.channels_last is 'on')."""
    model = UNet(**cfg["model"]).to(device)
    return model.to(memory_format=torch.channels_last) if uses_channels_last(cfg) else model


def precision_dtype(cfg):
    """bf16 autocast dtype or None (fp32) on any device. 'auto' = fp32: on an H100, bf16 autocast's casts made
    it slower than fp32 with TF32 (set in setup_dist) for the celeba32 model; see README "Performance"."""
    return torch.bfloat16 if cfg["train"]["precision"] == "bf16" else None


def uses_channels_last(cfg):
    """channels_last only when asked: 'auto' = off, as it was slower on an H100 in fp32 and in bf16."""
    return cfg["train"]["channels_last"] == "on"


def cuda_graphs(cfg, device):
    """Whether compiled code is replayed as CUDA graphs: train.compile and train.cuda_graphs, on a CUDA device only."""
    return cfg["train"]["compile"] and cfg["train"]["cuda_graphs"] and device.type == "cuda"


def compile_label(cfg, device):
    """How the step runs, for the banner and bench: eager, compiled, or compiled as CUDA graphs (or why not)."""
    if not cfg["train"]["compile"]:
        return "eager"
    if not cfg["train"]["cuda_graphs"]:
        return "compiled"
    if cuda_graphs(cfg, device):
        return "compiled + CUDA graphs"
    return f"compiled (no CUDA graphs on {device.type}: plain compilation)"


def compiled(fn, cfg, device):
    """fn through torch.compile (inductor), replayed as CUDA graphs (mode "reduce-overhead") when cuda_graphs: the
    step's loss, and the sampler's network for grids, sample, eval and compare."""
    return torch.compile(fn, mode="reduce-overhead" if cuda_graphs(cfg, device) else None)


# ----------------------------------------------------------------------------------------------
# Checking a config: types and choices per key, ranges, cross-key rules, and the size check before training.

class ConfigError(Exception):
    """A bad config file or override; main() prints it as one line and exits 2."""


# Allowed ranges, checked at start-up so a bad value never costs an epoch (upper bounds stop sizes that
# could only exhaust memory; the seed fits the 32 bits torch.manual_seed keeps on the CPU, so two seeds never
# share initial weights). Inclusive; fractions that must stay below 1 use 1 - 1e-9.
RANGES = [("seed", 0, 2 ** 32 - 1), ("resolution", 0, 1024), ("data_limit", 0, 10 ** 9),
          ("diffusion.timesteps", 2, 100_000), ("diffusion.beta_start", 1e-9, 1 - 1e-9),
          ("diffusion.beta_end", 1e-9, 1 - 1e-9), ("diffusion.min_snr_gamma", 1e-6, 1e6),
          ("model.in_channels", 1, 64), ("model.hid_channels", 32, 4096), ("model.num_res_blocks", 1, 16),
          ("model.drop_rate", 0.0, 1 - 1e-9), ("train.lr", 1e-12, 10.0),
          ("train.beta1", 0.0, 1 - 1e-9), ("train.beta2", 0.0, 1 - 1e-9), ("train.batch_size", 1, 1 << 20),
          ("train.num_accum", 1, 1 << 20), ("train.grad_norm", 1e-12, 1e12), ("train.epochs", 1, 10 ** 7),
          ("train.length_scale", 1e-6, 1e6), ("train.warmup", 0, 10 ** 9), ("train.ema_decay", 0.0, 1.0),
          ("train.num_samples", 0, 10_000), ("train.image_intv", 0, 10 ** 7), ("train.chkpt_intv", 1, 10 ** 7),
          ("train.save_every", 0, 10 ** 9), ("train.log_intv", 1, 10 ** 9), ("train.eval_intv", 0, 10 ** 9),
          ("train.eval_num", 1, 10 ** 6), ("train.eval_timesteps", 0, 100_000), ("train.eval_fid", 0, 10 ** 6)]

STAGE_KEYS = {"t_min": float, "t_max": float, "epochs": float, "name": str,
              "sparsity": float, "lambda": float, "alpha": float, "beta": float}


def read_json_file(path):
    """A config file's JSON object, or a one-line ConfigError saying what is wrong with the file."""
    try:
        data.regular_file(path, data.MAX_JSON_BYTES)        # a FIFO would block the open, /dev/zero fill memory
        with open(path, encoding="utf-8") as f:
            user = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path} (see configs/ for the shipped ones)")
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); JSON has no comments: use a '_comment' key")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; a config is a JSON object (see configs/)")
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e} (pass a JSON file, see configs/)")
    if not isinstance(user, dict):
        raise ConfigError(f"{path}: a config is a JSON object {{...}}, not a {type(user).__name__}")
    return user


def parse_overrides(args):
    """['--train.lr=1e-4', '--epochs=3'] -> nested dict. A bare key must be unique across sections."""
    out = {}
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"bad override {arg!r}: use --section.key=value, e.g. --train.lr=1e-4")
        key, _, text = arg[2:].partition("=")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text                                     # bare strings: --dataset=fashion32
        if "." not in key and key not in DEFAULTS:
            owners = [s for s, d in DEFAULTS.items() if isinstance(d, dict) and key in d]
            if len(owners) != 1:
                raise ConfigError(f"unknown override --{key} (use --section.key=value)")
            key = f"{owners[0]}.{key}"
        section, _, sub = key.partition(".")
        if sub:
            out.setdefault(section, {})[sub] = value
        else:
            out[section] = value
    return out


def merge_config(user, source="config"):
    """Defaults < user dict. Keys starting with '_' are comments. Returns a validated nested dict."""
    cfg = copy.deepcopy(DEFAULTS)
    merge_keys(cfg, DEFAULTS, user, source)
    validate_config(cfg, source)
    return cfg


def merge_keys(into, defaults, given, source, prefix=""):
    """Copy `given` into `into`, the top level, then each section (one level deep): an unknown key or a wrong type
    is a ConfigError that starts with `source` (the config file, or the override as typed)."""
    for key, value in given.items():
        if key.startswith("_"):
            continue
        if key not in defaults:
            raise ConfigError(f"{source}: unknown key '{prefix}{key}' (allowed: {', '.join(defaults)})")
        if not isinstance(defaults[key], dict):
            into[key] = _check_value(f"{source}: {prefix}{key}", key, value, defaults[key])
        elif isinstance(value, dict):
            merge_keys(into[key], defaults[key], value, source, f"{key}.")
        else:
            raise ConfigError(f"{source}: '{key}' must be an object")


def _check_value(where, key, value, default):
    """Type-check one value against its default (ints are accepted where floats are expected), then its choices."""
    if isinstance(default, list):
        ok = isinstance(value, list) or (key == "apply_attn" and isinstance(value, bool))
    elif isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and math.isfinite(value)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{where}: expected {type(default).__name__}, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(CHOICES[key])}")
    return value


def validate_config(cfg, source="config"):
    """Stages, ranges, then cross-key rules. Raises ConfigError naming the key and what is allowed."""
    cur, tr, model, T = cfg["curriculum"], cfg["train"], cfg["model"], cfg["diffusion"]["timesteps"]
    soft = cur["mode"] == "soft"
    for i, st in enumerate(cur["stages"]):
        validate_stage(st, f"{source}: curriculum.stages[{i}]", soft)
    for key, lo, hi in RANGES:                              # first: the rules below divide by some of these
        section, _, sub = key.rpartition(".")
        value = cfg[section][sub] if section else cfg[sub]
        if not lo <= value <= hi:
            raise ConfigError(f"{source}: {key} must be in [{lo}, {hi}], got {value!r}")
    mults, attn = model["ch_multipliers"], model["apply_attn"]
    rules = [
        (soft and any("alpha" not in s or "beta" not in s for s in cur["stages"]),
         "curriculum.mode 'soft' needs 'alpha' and 'beta' in every stage"),
        (cur["enabled"] and not cur["stages"], "curriculum.enabled needs a non-empty curriculum.stages list"),
        (cfg["sparsity"]["enabled"] and cfg["regularization"]["enabled"],
         "sparsity.enabled and regularization.enabled are both true; choose one mode (CS or CR)"),
        ((cfg["sparsity"]["enabled"] or cfg["regularization"]["enabled"]) and not cur["enabled"],
         "sparsity/regularization schedules are per curriculum stage; set curriculum.enabled to true (with "
         "curriculum.window 'full' every stage draws t from [0, T): the capacity schedule without the curriculum)"),
        (not 0 <= cfg["sparsity"]["initial_sparsity"] < 1, "sparsity.initial_sparsity must be in [0, 1)"),
        (cfg["regularization"]["lambda_max"] < 0, "regularization.lambda_max must be >= 0"),
        (soft and (cur["window"] != "t" or cur["order"] == "mixture"),
         "curriculum.window 'logsnr' or 'full' and order 'mixture' need hard stages (curriculum.mode 'hard')"),
        (cfg["diffusion"]["loss_weight"] == "min_snr" and cfg["diffusion"]["model_mean_type"] == "mean",
         "diffusion.loss_weight 'min_snr' is defined for model_mean_type eps and x0"),
        (tr["batch_size"] % tr["num_accum"], f"train.batch_size ({tr['batch_size']}) must be a positive "
                                            f"multiple of train.num_accum ({tr['num_accum']})"),
        (model["hid_channels"] % 32, "model.hid_channels must be a multiple of 32 (GroupNorm uses 32 groups), "
                                     f"got {model['hid_channels']}"),
        (not mults or not all(type(m) is int and 1 <= m <= 16 for m in mults),
         "model.ch_multipliers must be a non-empty list of integers in [1, 16]"),
        (not isinstance(attn, bool) and (len(attn) != len(mults) or not all(isinstance(a, bool) for a in attn)),
         f"model.apply_attn must be true/false or one true/false per entry of model.ch_multipliers ({len(mults)})"),
        (not 0 <= tr["sample_steps"] <= T,
         f"train.sample_steps must be 0 (DDPM) or a DDIM step count in [1, diffusion.timesteps = {T}]"),
        (tr["eval_timesteps"] == 1, "train.eval_timesteps must be 0 (every timestep) or at least 2"),
        (tr["eval_fid"] == 1, "train.eval_fid must be 0 (off) or at least 2 images (FID needs a covariance)")]
    for bad, message in rules:
        if bad:
            raise ConfigError(f"{source}: {message}")


def validate_stage(st, where, soft):
    """One curriculum stage: known keys of the right types, a window inside [0, 1] (hard mode), epochs > 0 (a
    fraction of an epoch is fine: stage starts round to whole optimizer steps)."""
    if not isinstance(st, dict):
        raise ConfigError(f"{where}: must be an object with t_min, t_max, epochs")
    for k in ("epochs",) if soft else ("t_min", "t_max", "epochs"):
        if k not in st:
            raise ConfigError(f"{where}: missing '{k}'")
    for k, v in st.items():
        if k not in STAGE_KEYS:
            raise ConfigError(f"{where}: unknown key '{k}' (allowed: {', '.join(STAGE_KEYS)})")
        ok = isinstance(v, STAGE_KEYS[k]) or (STAGE_KEYS[k] is float and isinstance(v, int))
        if isinstance(v, bool) or not ok:
            raise ConfigError(f"{where}.{k}: expected {STAGE_KEYS[k].__name__}, got {v!r}")
    if not all(math.isfinite(v) for v in st.values() if isinstance(v, float)):
        raise ConfigError(f"{where}: values must be finite numbers")
    if not soft and not 0 <= st["t_min"] < st["t_max"] <= 1:
        raise ConfigError(f"{where}: need 0 <= t_min < t_max <= 1, got {st['t_min']}, {st['t_max']}")
    if not st["epochs"] > 0:
        raise ConfigError(f"{where}.epochs: must be > 0")
    if not 0 <= st.get("sparsity", 0) < 1:
        raise ConfigError(f"{where}.sparsity: must be in [0, 1)")
    if st.get("lambda", 0) < 0 or st.get("alpha", 1) <= 0 or st.get("beta", 1) <= 0:
        raise ConfigError(f"{where}: lambda must be >= 0 and alpha, beta > 0")
    if not re.fullmatch(r"[\w.+-]{1,64}", st.get("name", "x")):
        raise ConfigError(f"{where}.name: {st['name']!r} must be 1-64 letters, digits or . _ + - (it names files)")


def check_batch_split(tr, world):
    """The global batch must split evenly over the processes and their micro-steps (train; run.sh, before torchrun)."""
    if tr["batch_size"] % (world * tr["num_accum"]):
        raise ConfigError(f"train.batch_size {tr['batch_size']} must divide by {world} process(es) x train.num_accum "
                          f"{tr['num_accum']}: change the process count (run.sh's NGPUS) or --train.batch_size")


def check_memory(cfg, device, world):
    """Refuse a config whose model and batch cannot fit this device: params, grads, Adam and EMA copies, plus
    ~6 stored activations per ResBlock conv. A rough lower bound, so only hopeless sizes are refused."""
    m, tr = cfg["model"], cfg["train"]
    with torch.device("meta"):                              # sizes only: nothing is allocated
        params = sum(p.numel() for p in UNet(**m).parameters())
    res, down = image_resolution(cfg), 2 ** (len(m["ch_multipliers"]) - 1)
    if res % down:
        raise ConfigError(f"images of {res}x{res} cannot be halved {down.bit_length() - 1} times by the UNet's "
                          f"{len(m['ch_multipliers'])} levels: use a resolution divisible by {down}, or fewer "
                          "model.ch_multipliers")
    batch = tr["batch_size"] // world // tr["num_accum"]
    acts = sum(6 * (2 * m["num_res_blocks"] + 1) * m["hid_channels"] * k * (res / 2 ** level) ** 2
               for level, k in enumerate(m["ch_multipliers"]))
    need = 4 * (5 * params + 2 * batch * acts)
    have = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
            else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if need > have:
        raise ConfigError(f"this model ({params / 1e6:.1f}M params) at {batch} images of {res}x{res} per step "
                          f"needs at least ~{need / 2 ** 30:.0f} GiB, more than the {have / 2 ** 30:.0f} GiB of {device}; "
                          "reduce model.hid_channels, resolution or train.batch_size (or raise train.num_accum)")


# ----------------------------------------------------------------------------------------------
# Distributed helpers. DDP is on iff torchrun set RANK; every collective is called by every rank.

def device_kind():
    """'cuda' or 'cpu': CUDA when there is one, unless DIFFCL_DEVICE=cpu pins the CPU (=cuda insists on CUDA)."""
    want = os.environ.get("DIFFCL_DEVICE", "auto")
    if want not in ("auto", "cpu", "cuda") or (want == "cuda" and not torch.cuda.is_available()):
        raise ConfigError(f"DIFFCL_DEVICE={want}: use cpu, or cuda on a machine with a CUDA GPU")
    return "cuda" if want != "cpu" and torch.cuda.is_available() else "cpu"


def setup_dist():
    """(rank, world, device). Plain `python` = one process; torchrun sets RANK/LOCAL_RANK/WORLD_SIZE."""
    cuda = device_kind() == "cuda"
    if cuda:                                                # fp32 ('auto') runs its matmuls and convs in TF32:
        torch.backends.cuda.matmul.allow_tf32 = True        # fp32 NCHW was the fastest eager path measured on
        torch.backends.cudnn.allow_tf32 = True              # an H100 (fid.py turns TF32 off for its features)
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    missing = [k for k in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    numbers = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")
    if missing or not all(os.environ[k].isdigit() for k in numbers):
        raise ConfigError(f"RANK is set but {', '.join(missing) or '/'.join(numbers)} "
                          f"{'is' if len(missing) == 1 else 'are'} {'missing' if missing else 'not all whole numbers'}: "
                          "launch with torchrun (which sets them all), or unset RANK for one process")
    rank, local, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if not (0 <= local <= rank < world):
        raise ConfigError(f"RANK={rank}, LOCAL_RANK={local}, WORLD_SIZE={world} cannot be: need LOCAL_RANK <= RANK < "
                          "WORLD_SIZE; launch with torchrun, or unset RANK for one process")
    if cuda and local >= torch.cuda.device_count():
        raise ConfigError(f"{os.environ.get('LOCAL_WORLD_SIZE', local + 1)} processes on this node but only "
                          f"{torch.cuda.device_count()} GPU(s): launch one process per GPU, or DIFFCL_DEVICE=cpu")
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return rank, world, device


USER_ERROR_KEY = "diffcl/user_error"                      # in torchrun's store: ranks that stopped on a user error


def torchrun_store():
    """A client of the store that torchrun itself holds (so it outlives the ranks), or None when torchrun did not
    start this process or its store cannot be reached: every rank then reports its own failure."""
    if "RANK" not in os.environ or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    try:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=datetime.timedelta(seconds=10))
    except (KeyError, ValueError, RuntimeError):
        return None


def first_user_error():
    """Count this rank's user error in torchrun's store: True for the first rank to stop on one (it alone prints the
    line, so a mistake every rank meets is still one line); True outside torchrun."""
    store = torchrun_store()
    try:
        return store is None or store.add(USER_ERROR_KEY, 1) == 1
    except RuntimeError:
        return True


def after_user_error():
    """Whether a rank of this torchrun run stopped on a user error: a collective that then fails on another rank
    failed because of it, and that rank's one line says why."""
    store = torchrun_store()
    try:
        return store is not None and store.check([USER_ERROR_KEY])
    except RuntimeError:
        return False


def all_reduce_sum(x, world):
    """Sum a tensor over ranks (in place); a no-op on one process."""
    if world > 1:
        dist.all_reduce(x)
    return x


def barrier(world):
    if world > 1:
        dist.barrier()


def rank_chunks(n, batch, rank, world):
    """This rank's share of n items as [(first, count)]: chunks of `batch`, chunk k to rank k % world. The chunks
    do not depend on the world size, so neither do the images they make. The one way work is split over ranks."""
    return [(a, min(batch, n - a)) for a in range(0, n, batch)][rank::world]


def assert_ranks_agree(model, mask, world):
    """EDM-style consistency check: parameters and mask must be identical on every rank."""
    if world == 1:
        return
    vec = torch.cat([p.detach().flatten().double() for p in model.parameters()] + [mask.double()])
    weights = torch.arange(1, vec.numel() + 1, dtype=torch.float64, device=vec.device) % 9973
    summary = torch.stack([vec.sum(), (vec * vec).sum(), (vec * weights).sum()])
    parts = [torch.empty_like(summary) for _ in range(world)]
    dist.all_gather(parts, summary)
    if not all(torch.equal(p, parts[0]) for p in parts):
        raise RuntimeError(f"ranks disagree on parameters or mask: {[p.tolist() for p in parts]}")


# ----------------------------------------------------------------------------------------------
# Files: checkpoints, metrics.jsonl records, sample grids. data.py has the primitives: atomic and exclusive writes,
# append-only JSONL, the folder lock.

class RunError(Exception):
    """A problem with a run (checkpoint, output folder, NaN); printed as one line, exit 2."""


class StopRequested(Exception):
    """Ctrl-C was pressed; raised at the next step boundary so the checkpoint is consistent."""


# Keys that may differ between a checkpoint's config and the resuming command.
RESUMABLE_KEYS = {"out_dir", "train.log_intv", "train.image_intv", "train.chkpt_intv", "train.save_every",
                  "train.num_samples", "train.sample_steps", "train.precision", "train.channels_last",
                  "train.compile", "train.cuda_graphs", "train.snapshots", "train.epochs", "data_root",
                  "train.eval_intv", "train.eval_num", "train.eval_timesteps", "train.eval_fid"}

CHECKPOINT_KEYS = {"model": dict, "ema": (dict, type(None)), "opt": dict, "mask": torch.Tensor,
                   "birth": torch.Tensor, "score": torch.Tensor, "step": int, "config": dict, "image_shape": list}


def config_diff(old, new):
    """Dotted keys whose values differ, ignoring RESUMABLE_KEYS (train.epochs only matters for plain DDPM:
    with the curriculum on, the stage epochs set the length)."""
    keys = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += [f"{k}.{s}" for s in sorted(set(a) | set(b)) if a.get(s) != b.get(s)]
        elif a != b:
            keys.append(k)
    return [k for k in keys if k not in RESUMABLE_KEYS]


def save_checkpoint(path, state, keep_previous=False):
    """Write atomically so a crash never leaves a torn checkpoint. With keep_previous, the checkpoint being
    replaced stays as <name>_prev.pt (a hard link: no copy)."""
    def write(tmp):
        torch.save(state, tmp)
        if keep_previous and os.path.exists(path):
            # the previous file gets a second name: os.link never overwrites, so the fresh empty one goes first
            data.atomic_write(path.removesuffix(".pt") + "_prev.pt", lambda prev: os.remove(prev) or os.link(path, prev))
    try:
        data.atomic_write(path, write)
    except data.DataError:                                  # a folder where the file (or _prev.pt) goes: says so
        raise
    except Exception as e:                                  # disk full is a RuntimeError from torch.save
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0][:120]
        raise RunError(f"could not write checkpoint {path}: {reason}; the previous one is intact. "
                       "Free disk space or pass --out_dir=PATH")


def load_checkpoint(path):
    """torch.load(weights_only=True), then a structure check: one-line errors for missing, truncated,
    foreign or malformed files (a file is never modified). The file is read once: state["file_sha256"] is the
    SHA-256 of the bytes loaded, even if a running trainer replaces the file meanwhile."""
    if not os.path.isfile(path):
        raise RunError(f"checkpoint not found: {path}" if not os.path.exists(path) else
                       f"{path} is not a checkpoint file (a folder, pipe or device); move it away or pass the .pt file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise RunError(f"cannot read checkpoint {path} ({e.strerror}); check its permissions") from None
    try:
        with warnings.catch_warnings(action="ignore"):      # torch warns before refusing a foreign pickle
            state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as e:
        raise RunError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}); delete it, or resume "
                       "from the previous one with --resume <out_dir>/ckpt_prev.pt")
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise RunError(f"{path} is not a diffcl checkpoint (no 'config'/'model' entries)")
    bad = [k for k, kind in CHECKPOINT_KEYS.items() if not isinstance(state.get(k), kind)]
    if bad or len(state["image_shape"]) != 3:
        raise RunError(f"{path} is a malformed diffcl checkpoint (bad or missing: {', '.join(bad) or 'image_shape'})")
    check_checkpoint_values(state, path)
    state["file_sha256"] = hashlib.sha256(raw).hexdigest()
    return state


def checkpoint_value_problem(state):
    """What is impossible about a structurally sound checkpoint's values, or None. A written checkpoint has: step >= 0;
    a float 0/1 mask with at least one 1; integer birth stages, >= 0 exactly where the mask is on and -1 where it is
    off; finite scores >= 0; one entry per bottleneck channel in all three; finite weights. Against its own config
    (skipped when this version cannot read that config; `sample` says so): image_shape (in_channels, res, res), an EMA
    exactly when train.use_ema, num_images at least one batch, step at most the schedule's last one and equal to
    epoch x steps per epoch; wall_seconds finite >= 0."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    mask, birth, score, step = state["mask"], state["birth"], state["score"], state["step"]
    try:
        cfg = merge_config(state["config"], "checkpoint")
    except ConfigError:
        cfg = None
    with torch.device("meta"):                              # sizes only: nothing is allocated
        channels = UNet(**cfg["model"]).bottleneck_channels if cfg else mask.numel()
    if isinstance(step, bool) or step < 0:
        return f"step is {step!r}, not a count >= 0"
    for name, t in (("mask", mask), ("birth", birth), ("score", score)):
        if t.shape != (channels,):
            return f"{name} has shape {tuple(t.shape)}; the model has {channels} bottleneck channels"
    if not mask.is_floating_point() or not ((mask == 0) | (mask == 1)).all() or not mask.any():
        return "mask must be a float tensor of 0s and 1s with at least one 1"
    if birth.is_floating_point() or birth.dtype == torch.bool or not torch.equal(birth >= 0, mask > 0) \
            or birth.min() < -1:
        return "birth must hold integer stages >= 0 where the mask is on and -1 where it is off"
    if not score.is_floating_point() or not (torch.isfinite(score) & (score >= 0)).all():
        return "score must hold finite values >= 0"
    for key in ("model", "ema"):
        if any(isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()
               for v in (state[key] or {}).values()):
            return f"its {key} weights are not finite"
    for key, ok in (("num_images", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
                    ("wall_seconds", lambda v: number(v) and v >= 0), ("epoch", lambda v: number(v) and v >= 0)):
        if key in state and not ok(state[key]):
            return f"{key} is {state[key]!r}"
    if cfg is None:
        return None
    tr, res = cfg["train"], image_resolution(cfg)
    if list(state["image_shape"]) != [cfg["model"]["in_channels"], res, res]:
        return (f"image_shape {state['image_shape']} is not (model.in_channels, resolution, resolution) = "
                f"({cfg['model']['in_channels']}, {res}, {res})")
    if (state["ema"] is None) == tr["use_ema"]:
        return f"it {'lacks' if tr['use_ema'] else 'has'} EMA weights but its train.use_ema is {tr['use_ema']}"
    if "num_images" in state:
        if state["num_images"] < tr["batch_size"]:
            return f"num_images {state['num_images']} is less than one batch ({tr['batch_size']})"
        steps_per_epoch = data.steps_per_epoch(state["num_images"], tr["batch_size"])
        try:
            last = schedule_in_steps(cfg, stages_of(cfg), steps_per_epoch)[1]
        except ConfigError as e:
            return f"its schedule is impossible ({e})"
        if step > last:
            return f"step {step} is past the schedule's last step {last}"
        if "epoch" in state and abs(state["epoch"] * steps_per_epoch - step) > 1e-6 * max(1, step):
            return f"epoch {state['epoch']} is not step {step} / {steps_per_epoch} steps per epoch"
    return None


def check_checkpoint_values(state, path):
    """RunError in one line when checkpoint_value_problem finds something: a damaged or hand-edited file."""
    problem = checkpoint_value_problem(state)
    if problem:
        raise RunError(f"{path} is a damaged diffcl checkpoint: {problem}; use another checkpoint (ckpt_prev.pt or "
                       "a snapshot), or train again")


def check_optimizer_state(opt, path):
    """After opt.load_state_dict (which checks only the parameter counts): every per-parameter tensor of the
    optimizer's state has its parameter's shape (or is a scalar), is finite, and Adam's moments and step are >= 0."""
    for p, st in opt.state.items():
        for key, v in st.items():
            if not isinstance(v, torch.Tensor) or (v.dim() and v.shape != p.shape):
                what = f"has shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else f"is a {type(v).__name__}"
                problem = f"its optimizer's {key} {what} for a parameter of shape {tuple(p.shape)}"
            elif not torch.isfinite(v).all() or key in ("step", "exp_avg_sq", "max_exp_avg_sq") and (v < 0).any():
                problem = f"its optimizer's {key} is not finite or below 0"
            else:
                continue
            raise RunError(f"{path} is a damaged diffcl checkpoint: {problem}; use another checkpoint (ckpt_prev.pt "
                           "or a snapshot), or train again")


def check_run_folder(out_dir):
    """Before training (under the folder lock): no folder sits where the run writes a file (checkpoints, snapshots,
    config.json, sample grids), and temporaries of killed writers are removed."""
    def names(folder, pattern):
        with contextlib.suppress(OSError):
            return [os.path.join(folder, f) for f in os.listdir(folder) if re.fullmatch(pattern, f)]
        return []
    data.check_not_folder(*names(out_dir, r"ckpt(_prev|_epoch\d{4})?\.pt|config\.json"),   # metrics: truncate_jsonl
                          *names(os.path.join(out_dir, "samples"), r"epoch\d{4}_.*\.png"))
    for folder in (out_dir, os.path.join(out_dir, "samples")):
        data.remove_stale_temps(folder)


def load_weights(module, weights, path):
    """module.load_state_dict with a one-line error when the checkpoint is of another architecture."""
    try:
        module.load_state_dict(weights)
    except (RuntimeError, KeyError, TypeError, ValueError) as e:
        first = str(e).strip().splitlines()[-1].strip()[:160]
        raise RunError(f"{path} does not fit this model ({first}); it was written for another model config")


def truncate_jsonl(path, step):
    """Drop records that a killed run wrote after its checkpoint at `step`: training records after it,
    and stage records at or after it (a stage record at step s is written after the checkpoint at s, so
    the resumed run writes it again)."""
    if os.path.islink(path) or os.path.lexists(path) and not os.path.isfile(path):
        raise RunError(f"{path} is not a plain file (a folder or a link); move it away, then rerun")
    if os.path.exists(path):
        keep = [line for line, r in data.read_jsonl(path)
                if r.get("step", 0) < step or r.get("step", 0) == step and r.get("kind") != "stage"]
        data.atomic_write(path, "".join(keep))


def to_uint8(x):
    """[-1, 1] float (B, C, H, W) -> uint8 (B, H, W, C) numpy, rounding as in PNG export."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_grid(images, path):
    """Write uint8 (N, H, W, C) images as one PNG grid with floor(sqrt(N)) columns, 2 px gaps."""
    n, h, w, c = images.shape
    cols = max(1, int(math.sqrt(n)))
    grid = np.full((math.ceil(n / cols) * (h + 2) + 2, cols * (w + 2) + 2, c), 255, np.uint8)
    for k, image in enumerate(images):
        top, left = 2 + k // cols * (h + 2), 2 + k % cols * (w + 2)
        grid[top:top + h, left:left + w] = image
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    scale = max(1, 64 // h)                                 # blow small images up (nearest) so they can be seen
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    data.atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def fmt_time(seconds):
    """Seconds as '1h02m', '3m05s' or '12s'."""
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s" if m else f"{s}s"


# ----------------------------------------------------------------------------------------------
# Held-out bits/dim: the variational bound on -log p(x_0), used by `eval --nll` and by the evaluations during
# training.

def gaussian_kl(mean1, logvar1, mean2, logvar2):
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats."""
    return 0.5 * (logvar2 - logvar1 - 1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretised_log_likelihood(x, mean, log_scale):
    """Elementwise log-probability in nats of pixels x on the 256 levels k/127.5 - 1 of [-1, 1] under
    N(mean, e^(2 log_scale)): the Gaussian's mass on the level's bin [x - 1/255, x + 1/255], the lowest bin open to
    -inf, the highest to +inf. Exact normal CDF in log space, so no floor is needed (improved-diffusion uses a tanh
    approximation clamped at 1e-12)."""
    inv = torch.exp(-log_scale)
    lo, hi = (x - mean - 1 / 255) * inv, (x - mean + 1 / 255) * inv
    flip = lo > 0                                           # Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi): keep both CDFs
    a, b = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)   # below 1/2 at the bigger one (no cancellation)
    la, lb = torch.special.log_ndtr(a), torch.special.log_ndtr(b)
    inner = lb + torch.log(-torch.expm1(la - lb))           # log(Phi(b) - Phi(a)), a < b
    edge = torch.where(x < -0.999, torch.special.log_ndtr(hi), torch.special.log_ndtr(-lo))   # open end bins
    return torch.where((x < -0.999) | (x > 0.999), edge, inner)


@torch.no_grad()
def nll_bpd(net, cfg, mask, images, timesteps=0, seed=0, t_seed=None, batch=256, first=0, on_chunk=None):
    """Variational bound on -log p(x_0) of uint8 images (N, H, W, C) in bits/dim, as improved-diffusion's
    calc_bpd_loop (Nichol & Dhariwal 2021) with t 0-indexed as everywhere here:

        L = KL(q(x_{T-1}|x_0) || N(0, I)) + sum_{t>=1} KL(q(x_{t-1}|x_t, x_0) || p(x_{t-1}|x_t)) - log p(x_0|x_t=0)

    in nats summed over the D = C H W dimensions, divided by D ln 2, averaged over the images. p's mean is the
    posterior mean at the network's x0 estimate clipped to [-1, 1] (as the sampler); its variance is beta tilde
    (fixed-small) or beta (fixed-large), beta tilde_1 standing in at t = 0 in both (so is q's log-variance); the
    t = 0 term is the decoder, discretised_log_likelihood of x_0 under that Gaussian. x_t of (image i, t) uses
    noise keyed by (seed, i, t), i counted from `first`: reruns, every checkpoint and every split of the images over
    ranks see the same noise.

    timesteps = 0 or T: every t (exact up to the one noise draw). K in [2, T): an unbiased estimate from K
    network calls per image: t = 0 (the decoder: large, so never left to chance) plus one uniform draw in each of
    K - 1 equal strata of [1, T), keyed by (t_seed or seed, i), each term times its stratum's size; K = T is
    the full sum. Returns {"bpd", "n", "timesteps", "estimator", "bpd_terms": {"prior", "decoder", "kl": the KL
    terms summed per tenth of [0, T)}} (terms in bits/dim, summing to bpd). on_chunk(done, total) after each batch."""
    dif, device = cfg["diffusion"], mask.device
    T, mean_type, var_type = dif["timesteps"], dif["model_mean_type"], dif["model_var_type"]
    K = timesteps or T
    if not 2 <= K <= T:
        raise ValueError(f"timesteps must be 0 (all) or in [2, T = {T}], got {timesteps}")
    tab = tables_on(cfg, device)
    q_logvar = torch.cat([tab["post_var"][1:2], tab["post_var"][1:]]).log()
    p_logvar = q_logvar if var_type == "fixed-small" else tab["large_var"].log()
    x0 = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).double() / 127.5 - 1
    N, D = len(x0), x0[0].numel()
    edges = [1 + j * (T - 1) // (K - 1) for j in range(K)]             # strata [edges[j], edges[j+1]) of [1, T)
    lo, size = torch.tensor(edges[:-1]), torch.tensor(edges[1:]) - torch.tensor(edges[:-1])
    keyed, draw = lambda *key: torch.Generator().manual_seed(key_seed(*key)), seed if t_seed is None else t_seed
    ts, weight, noise_seeds = [], torch.cat([torch.ones(1), size.double()]), []
    for i in range(first, first + N):                       # t draws and noise seeds: functions of (seed, i) alone
        u = torch.rand(K - 1, dtype=torch.float64, generator=keyed(NLL_TIMESTEPS, draw, i))
        ts.append(torch.cat([torch.zeros(1, dtype=torch.long), lo + (u * size).long().clamp(max=size - 1)]))
        noise_seeds.append(torch.randint(0, 2 ** 62, (T,), generator=keyed(NLL_NOISE, seed, i)))
    ts, noise_seeds, g = torch.stack(ts), torch.stack(noise_seeds), torch.Generator()
    nats = torch.zeros(N, 12, dtype=torch.float64)           # per image: prior, decoder, KL per tenth of [0, T)
    ab = tab["alpha_bar"][-1].cpu()
    zero = torch.zeros((), dtype=torch.float64)
    nats[:, 0] = gaussian_kl(ab.sqrt() * x0, (1 - ab).log(), zero, zero).flatten(1).sum(1)
    for a in range(0, N * K, batch):                        # (image, t) pairs, image-major
        pair = torch.arange(a, min(a + batch, N * K))
        i, k = pair // K, pair % K
        t = ts[i, k]
        eps = torch.stack([torch.randn(x0.shape[1:], generator=g.manual_seed(s)) for s in noise_seeds[i, t].tolist()])
        xb, td = x0[i].to(device), t.to(device)
        xt = q_sample(xb.float(), td, eps.to(device), tab).double()   # the network's input, exactly
        mean, _, _ = p_mean_var(net(xt.float(), td, mask).double(), xt, td, tab, mean_type, var_type)
        lv = p_logvar[td].reshape(-1, 1, 1, 1)
        kl = gaussian_kl(q_posterior(xb, xt, td, tab)[0], q_logvar[td].reshape(-1, 1, 1, 1), mean, lv)
        decoder = -discretised_log_likelihood(xb, mean, 0.5 * lv)
        term = torch.where(td == 0, decoder.flatten(1).sum(1), kl.flatten(1).sum(1)).cpu() * weight[k]
        nats.index_put_((i, torch.where(t == 0, 1, 2 + t * 10 // T)), term, accumulate=True)
        if on_chunk:
            on_chunk(a + len(pair), N * K)
    return bpd_report((nats / (D * math.log(2))).mean(0).tolist(), N, K, T)


def bpd_report(bits, n, K, T):
    """nll_bpd's result from its 12 per-image mean terms in bits/dim: prior, decoder, KL per tenth of [0, T)."""
    return {"bpd": sum(bits), "n": n, "timesteps": K,
            "estimator": f"all {T} timesteps" if K == T else f"stratified {K} of {T}",
            "bpd_terms": {"prior": bits[0], "decoder": bits[1], "kl": bits[2:]}}


# ----------------------------------------------------------------------------------------------
# sample / eval / bench

def model_from_checkpoint(path, device, raw=False, state=None):
    """(net, cfg, mask, image_shape) from a checkpoint (or its `state`, already loaded): EMA weights unless raw, the
    CS mask to pass it, compiled when it was trained with train.compile."""
    state = state or load_checkpoint(path)
    try:
        cfg = merge_config(state["config"], path)
    except ConfigError as e:
        raise RunError(f"{path} holds a config this version cannot use ({e})")
    net = build_model(cfg, device)
    load_weights(net, state["model"] if raw or state["ema"] is None else state["ema"], path)
    net = net.eval().requires_grad_(False)
    if cfg["train"]["compile"]:
        net = compiled(net, cfg, device)
    return net, cfg, state["mask"].to(device), tuple(state["image_shape"])


def sample(ckpt, num, out, ddim=False, steps=50, eta=0.0, skip="uniform", batch_size=256, seed=0,
           raw=False, npz=False, replace_stale=False):
    """Generate `num` images to out/000000.png ...; rank_chunks shares the chunks of `batch_size` over ranks.
    Image i's starting noise is keyed by (seed, i), so reruns skip finished chunks and the result does not
    depend on the number of GPUs."""
    rank, world, device = setup_dist()
    state = load_checkpoint(ckpt)
    net, cfg, mask, shape = model_from_checkpoint(ckpt, device, raw, state)
    T = cfg["diffusion"]["timesteps"]
    if ddim and not 1 <= steps <= T:
        raise ConfigError(f"--steps {steps}: DDIM needs between 1 and T = {T} steps")
    tab, amp = tables_on(cfg, device), precision_dtype(cfg)
    # What made the images, for manifest.json. With DDPM or eta > 0 the batch matters: noise is keyed by chunk.
    made_by = {"ckpt_sha256": state["file_sha256"], "step": state["step"], "seed": seed,
               "weights": "raw" if raw else "ema", "sampler": f"ddim{steps} eta{eta:g} {skip}" if ddim else f"ddpm{T}",
               "batch_size": batch_size if not ddim or eta > 0 else None}
    with contextlib.ExitStack() as lock:
        if rank == 0:                                       # one writer per folder: two would lose images
            lock.enter_context(data.locked_folder(out, "sample or eval"))
            data.remove_stale_temps(out)
            data.check_not_folder(*(os.path.join(out, f) for f in os.listdir(out)
                                    if re.fullmatch(r"\d{6}\.png", f) or npz and f == "samples.npz"))
            fid.claim_image_folder(out, made_by, replace_stale)
        barrier(world)
        name = lambda i: os.path.join(out, f"{i:06d}.png")
        chunks = rank_chunks(num, batch_size, rank, world)
        todo = [(a, n) for a, n in chunks if not all(os.path.isfile(name(i)) for i in range(a, a + n))]
        if rank == 0:
            sampler = f"DDIM {steps} steps, eta {eta:g}, {skip}" if ddim else f"DDPM {T} steps"
            print(f"sample: {num} images from {ckpt} ({sampler}, {'raw' if raw else 'EMA'} weights) -> {out}; "
                  f"{len(chunks) - len(todo)} chunks already done", flush=True)
        total, done, t0, last_print = (steps if ddim else T) * len(todo), 0, time.perf_counter(), 0.0

        def report(*_):                                     # a line every 10 s: DDPM chunks can take minutes
            nonlocal done, last_print
            done += 1
            now = time.perf_counter()
            if rank == 0 and (now - last_print > 10 or done == total):
                last_print, rate = now, done / max(now - t0, 1e-9)
                print(f"sample (network evaluations, this rank): {done}/{total} | {rate:.1f}/s | "
                      f"ETA {fmt_time((total - done) / rate)}", flush=True)
        for a, n in todo:
            x = generate(net, cfg, shape, a, n, seed, mask, tab, ddim_steps=steps if ddim else 0, eta=eta, skip=skip,
                         amp=amp, on_step=report)
            try:
                for j, img in enumerate(to_uint8(x)):
                    fid.write_png(img, name(a + j))
            except OSError as e:                                # disk full: the finished images stay, a rerun resumes
                raise RunError(f"cannot write {out} ({e.strerror}); free disk space, then rerun to finish the rest")
        barrier(world)
        if npz and rank == 0:
            data.atomic_write(os.path.join(out, "samples.npz"),
                              lambda tmp: np.savez(open(tmp, "wb"), images=fid.load_image_folder(out)[:num]))
    return out


def evaluate(ckpt=None, images=None, ref=None, num=10000, real=None, inception=None, download=False, k=3,
             batch_size=256, **sample_kw):
    """FID (and precision/recall on Inception features when `real` images are given) of a checkpoint's
    samples or of saved images, through fid.score on rank 0. Prints one JSON line and appends it to
    eval.jsonl beside the images."""
    rank, world, device = setup_dist()
    fid.load_stats(ref)                                     # a bad --ref fails before any sampling
    if ckpt:                                                # our own folder (one per checkpoint): refresh it
        default = os.path.join(os.path.dirname(ckpt), "eval_samples_" + os.path.basename(ckpt).removesuffix(".pt"))
        data.check_not_folder(os.path.join(images or default, "eval.jsonl"))   # before the sampling
        images = sample(ckpt, num, images or default, batch_size=batch_size, replace_stale=not images, **sample_kw)
    if rank > 0:
        return None
    quiet = lambda *a: None
    progress = lambda msg: print(f"eval: {msg}", file=sys.stderr, flush=True)   # stdout: the result line alone
    # eval.jsonl goes into the image folder, or beside an .npz of images
    log = os.path.join(images if os.path.isdir(images) else os.path.dirname(os.path.abspath(images)), "eval.jsonl")
    data.check_not_folder(log)                              # before the features
    fake = fid.read_images(images, download=download, log=quiet)[:num]
    weights = fid.find_weights(inception, download)
    model = fid.load_inception(weights, device=device)
    t0 = time.perf_counter()
    real_feats = None
    if real:                                                # precision/recall compare at equal n
        real_images = fid.read_images(real, download=download, log=quiet)
        n = min(len(fake), len(real_images))
        progress(f"precision/recall at equal n = {n}: {n} of {len(fake)} generated and {n} of {len(real_images)} "
                 f"real images ({real})")
        real_feats = fid.features(model, real_images[:n], device=device, log=lambda m: progress(f"real {m}"))
    progress(f"FID of {len(fake)} generated images")
    result = fid.score(fake, ref, model, real_feats=real_feats, k=k, device=device,
                       log=lambda m: progress(f"generated {m}"))
    result.update({"images": images, "ckpt": ckpt, "ref": ref, "sampler": sample_kw if ckpt else None,
                   "inception_sha256": fid.weights_sha256(weights),
                   "feature_seconds": round(time.perf_counter() - t0, 1)})
    print(json.dumps(result), flush=True)
    try:
        data.append_jsonl(log, result)
    except data.DataError:
        raise RunError(f"could not append to {log} (not writable, or a full disk); the result is the line "
                       "above") from None
    return result


def nll_on_ranks(net, cfg, mask, images, timesteps, seed, rank, world, batch=256, on_chunk=None):
    """nll_bpd of `images` with the images split over ranks (one rank_chunks chunk each) and the sums all-reduced:
    every rank returns the same result, which does not depend on the number of ranks (up to rounding)."""
    n = len(images)
    sums = torch.zeros(13, dtype=torch.float64)             # images, then their prior, decoder, KL per tenth, summed
    for a, m in rank_chunks(n, -(-n // world), rank, world):
        r = nll_bpd(net, cfg, mask, images[a:a + m], timesteps, seed, batch=batch, first=a, on_chunk=on_chunk)
        terms = r["bpd_terms"]
        sums += m * torch.tensor([1.0, terms["prior"], terms["decoder"], *terms["kl"]], dtype=torch.float64)
    sums = all_reduce_sum(sums.to(mask.device), world).cpu() if world > 1 else sums
    T = cfg["diffusion"]["timesteps"]
    return bpd_report((sums[1:] / sums[0]).tolist(), n, timesteps or T, T)


def evaluate_nll(ckpt, num, timesteps=0, seed=0, batch_size=256, raw=False):
    """`eval --nll N`: the bound of nll_bpd on the first N held-out (test) images, EMA weights unless raw, the
    checkpoint's mask; ranks share the images under torchrun. Prints one JSON line (rank 0) and returns it."""
    rank, world, device = setup_dist()
    state = load_checkpoint(ckpt)
    net, cfg, mask, _ = model_from_checkpoint(ckpt, device, raw, state)
    T = cfg["diffusion"]["timesteps"]
    if timesteps and not 2 <= timesteps <= T:
        raise ConfigError(f"--nll-timesteps {timesteps}: use 0 (all T = {T}) or a number in [2, {T}]")
    images = data.held_out_images(cfg["dataset"], num, cfg["resolution"] or None, cfg["data_root"] or None,
                                  cfg["data_split"] or None)
    if len(images) < num:
        raise RunError(f"{cfg['dataset']} has only {len(images)} held-out images; use --nll {len(images)}")
    t0, last = time.perf_counter(), [0.0]

    def report(done, total):                                # a line every 10 s on stderr: all T can take hours
        now = time.perf_counter()
        if rank == 0 and (now - last[0] > 10 or done == total):
            last[0], rate = now, done / max(now - t0, 1e-9)
            print(f"nll (network evaluations, this rank): {done}/{total} | {rate:.1f}/s | "
                  f"ETA {fmt_time((total - done) / rate)}", file=sys.stderr, flush=True)
    result = nll_on_ranks(net, cfg, mask, images, timesteps, seed, rank, world, batch_size, report)
    result.update({"ckpt": ckpt, "step": state["step"], "weights": "raw" if raw else "ema", "seed": seed,
                   "dataset": cfg["dataset"], "seconds": round(time.perf_counter() - t0, 1)})
    if rank == 0:
        print(json.dumps(result), flush=True)
    return result


def timed(device, fn):
    """Wall seconds of fn(), from an idle device to an idle device (CUDA runs kernels asynchronously)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda device: None
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def matmul_rate(device, dtype, sizes=None, reps=5):
    """Peak dense matmul FLOP/s of this device in `dtype` (the utilisation denominator): the best of `reps` timed
    n x n products for each n in `sizes` (CUDA 2048-8192, CPU 512-2048), each size warmed up once. One size timed
    5 times on a busy CPU read low enough that utilisations above 1 came out."""
    best = 0.0
    for n in sizes or ((2048, 4096, 8192) if device.type == "cuda" else (512, 1024, 2048)):
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        timed(device, lambda: a @ b)                        # warm-up
        best = max(best, 2 * n ** 3 / min(timed(device, lambda: a @ b) for _ in range(reps)))
    return best


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 for a moment: the profiler's C++ side prints 'profiler_start/stop' lines there."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:                     # fd 2 keeps /dev/null open after `null` closes
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def kernels_per_step(x0, step, mask, score, run):
    """Device kernels (CUDA) or outermost aten ops (CPU) launched by one warm training step: the launch count
    that makes small-batch GPU training host-bound (an H100 profile found 1,743 kernels)."""
    from torch.autograd import DeviceType                   # bench only: the profiler is slow to import
    from torch.profiler import ProfilerActivity, profile
    cuda = x0.is_cuda
    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        train_step(x0, step, 0, mask, score, run)
        if cuda:
            torch.cuda.synchronize(x0.device)
    events = prof.events()
    if cuda:                                                # kernels only: copies and memsets are named so
        return sum(e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset")) for e in events)
    is_op = lambda e: e is not None and e.name.startswith("aten::")
    return sum(is_op(e) and not is_op(e.cpu_parent) for e in events)


def train_flops_per_image(cfg, model, device):
    """FLOPs of one training forward + backward per image (the masked CS channels are still computed)."""
    from torch.utils.flop_counter import FlopCounterMode    # bench and compare only
    res = image_resolution(cfg)
    x = torch.zeros(2, cfg["model"]["in_channels"], res, res, device=device)
    with FlopCounterMode(display=False) as counter:
        mse_per_sample(model(x, torch.zeros(2, dtype=torch.long, device=device)), x).mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / 2


def bench(cfg, batch_size=None, steps=20, windows=3, do_sample=False, sample_steps=20, data_check=False):
    """Throughput of the real training step (`train_step`) on synthetic images at the dataset's resolution,
    FLOPs, utilisation, memory."""
    rank, world, device = setup_dist()
    cuda, is_compiled = device.type == "cuda", cfg["train"]["compile"]
    dynamo = torch._dynamo.utils.counters                   # graphs dynamo compiles and its graph breaks, from here on
    dynamo.clear()
    B = batch_size or cfg["train"]["batch_size"]
    cfg = merge_config({**cfg, "train": {**cfg["train"], "batch_size": B, "num_accum": 1}}, "bench")
    res = image_resolution(cfg)
    model, ema, opt, mask, _, score = new_state(cfg, device)
    run = make_run(cfg, model, ema, opt, device)
    mask, score = place_mask_and_score(run, mask, score, device)
    x0 = torch.rand(B, cfg["model"]["in_channels"], res, res, device=device) * 2 - 1

    def train_steps(first, n):                              # one host sync at the end, as a log step would
        for s in range(first, first + n):
            train_step(x0, s, 0, mask, score, run)
        run.stats.v[0].item()
    warmup_s = timed(device, lambda: train_steps(0, 3))     # compilation happens here
    window_s = [timed(device, lambda: train_steps(3 + w * steps, steps)) / steps for w in range(windows)]
    step_s = sorted(window_s)[windows // 2]                 # the median window
    kernels = kernels_per_step(x0, 3 + windows * steps, mask, score, run)   # before the FLOP count sets grads to None
    gflop = train_flops_per_image(cfg, model, device) / 1e9
    peak = matmul_rate(device, run.amp or torch.float32)
    flop_s = B * gflop * 1e9 / step_s
    tf32 = cuda and torch.backends.cuda.matmul.allow_tf32
    path = " ".join(("bf16" if run.amp else "fp32/tf32" if tf32 else "fp32",
                     "channels_last" if uses_channels_last(cfg) else "NCHW", compile_label(cfg, device)))
    sig4 = lambda v: float(f"{v:.4g}")                      # four significant digits
    result = {"device": torch.cuda.get_device_name(device) if cuda else f"cpu x{torch.get_num_threads()}",
              "precision": "bf16" if run.amp else "fp32", "compile": is_compiled, "path": path, "batch": B,
              "resolution": res, "params": sum(p.numel() for p in model.parameters()),
              "img_per_s": round(B / step_s, 2), "step_ms": round(step_s * 1e3, 2), "gflop_per_img": sig4(gflop),
              "achieved_tflops": sig4(flop_s / 1e12), "matmul_tflops": sig4(peak / 1e12),
              "utilisation": sig4(flop_s / peak) if flop_s <= peak else None, "warmup_s": round(warmup_s, 2),
              "kernels_per_step": kernels, "compiled_graphs": dynamo["stats"]["unique_graphs"] if is_compiled else None,
              "graph_breaks": sum(dynamo["graph_break"].values()) if is_compiled else None,
              "peak_mem_gb": round((torch.cuda.max_memory_allocated(device) if cuda else
                                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30, 3)}
    if do_sample:
        net = run.net.eval()
        for ddim in (2, sample_steps):                      # the first call is a warm-up
            seconds = timed(device, lambda: generate(net, cfg, x0.shape[1:], 0, B, 0, mask, run.tab, ddim_steps=ddim,
                                                     amp=run.amp))
        result[f"ddim{sample_steps}_img_per_s"] = round(B / seconds, 2)
    if data_check:
        imgs = data.load_images("shapes", resolution=res, num_images=10000, log=lambda *a: None)
        result["data_img_per_s"] = round(data.data_throughput(imgs, 128, device), 0)
    if rank == 0:                                           # a table to read, then a line to parse
        if result["utilisation"] is None:                   # a utilisation above 1 would be a wrong number
            print(f"utilisation not reported: the training step ({result['achieved_tflops']} TFLOP/s) outran the "
                  f"measured matmul peak ({result['matmul_tflops']} TFLOP/s); the machine was busy while the peak was "
                  "timed: rerun on an idle one", file=sys.stderr)
        print("\n".join(f"{k:>20}  {v}" for k, v in result.items()))
        print(json.dumps(result), flush=True)
    return result


# ----------------------------------------------------------------------------------------------
# compare / demo: base, C, CS and CR at equal work, paired by seed, scored on held-out data.

MODES = ("base", "c", "cs", "cr")

# The controls: (the mode whose config file they start from, config overrides, what the difference isolates).
CONTROLS = {
    "anti": ("c", ["--curriculum.order=reverse"], "order: the curriculum's windows mirrored, low noise first"),
    "mixture": ("c", ["--curriculum.order=mixture"], "order alone: the curriculum's timestep distribution, no order"),
    "logsnr": ("c", ["--curriculum.window=logsnr"], "where stages are cut: windows in log-SNR instead of t"),
    "minsnr": ("base", ["--diffusion.loss_weight=min_snr"], "a loss weighting (Min-SNR-5) instead of an order"),
    "cs_flat": ("cs", ["--curriculum.window=full"],
                "the capacity schedule alone: cs's stages, mask and regrowth, t uniform on [0, T) in every stage"),
    "cr_flat": ("cr", ["--curriculum.window=full"],
                "the capacity schedule alone: cr's stages and lambda, t uniform on [0, T) in every stage"),
    "wide": ("c", [], "the first stage: accumulating windows that exclude only the least noisy t at first"),
    "wide_cs": ("cs", ["--sparsity.initial_sparsity=0.15"], "the first stage, with a gentle mask (15 % masked at "
                "first, down to 0)"),
}

# The wide curriculum: (t_min, percent of the run) per stage, t_max = 1 throughout; the modes that train it.
WIDE = ((0.3, 5), (0.2, 5), (0.1, 10), (0.07, 5), (0.05, 5), (0.03, 10), (0.01, 10), (0.0, 50))
WIDE_MODES = ("wide", "wide_cs")


def wide_stages(epochs):
    """The wide curriculum's stages for a run of `epochs` epochs (each lasting its exact share of them)."""
    return [{"t_min": t, "t_max": 1.0, "epochs": float(Fraction(epochs) * pct / 100), "name": f"wide{i + 1}_from{t:g}"}
            for i, (t, pct) in enumerate(WIDE)]


def stage_overlay(mode, epochs):
    """A wide mode's stages at the c schedule's length `epochs`, as an override given after compare's own (so
    every mode does equal work); nothing for the other modes."""
    return [f"--curriculum.stages={json.dumps(wide_stages(epochs))}"] if mode in WIDE_MODES else []


def mode_config(dataset, mode):
    """(config file, overrides) of a compare mode: configs/<dataset>[_<mode>].json, plus a control's overlay."""
    parent, overlay, _ = CONTROLS.get(mode, (mode, [], ""))
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                        f"{dataset}.json" if parent == "base" else f"{dataset}_{parent}.json"), overlay


def interval(values, level=0.95):
    """(mean, std, half-width of the t-distribution confidence interval) of a sample; half-width is nan for n=1."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()), float("nan"), float("nan")
    std = float(v.std(ddof=1))
    return float(v.mean()), std, float(stdtrit(len(v) - 1, (1 + level) / 2) * std / math.sqrt(len(v)))


def steps_to_reach(steps, values, target):
    """First step at which a curve (finite `values` measured at increasing `steps`; lower is better) is at or below
    `target`, linear between two evaluations; its first step when it starts there (nothing is known before it);
    None when it never gets there."""
    for k, (s, v) in enumerate(zip(steps, values)):
        if v <= target:
            if k == 0:
                return float(s)
            s0, v0 = steps[k - 1], values[k - 1]            # v0 > target >= v
            return s0 + (s - s0) * (v0 - target) / (v0 - v)
    return None


def reach_fractions(results, mode, seeds, metric):
    """{seed: the fraction of the run at which `mode`'s held-out `metric` curve first reaches base's final value of
    the same seed (None: never)}, for the seeds where both runs have that curve."""
    out = {}
    for s in range(seeds):
        run, base = results.get(f"{mode}/seed{s}"), results.get(f"base/seed{s}")
        if not (run and base and run.get("curve", {}).get(metric) and base.get("curve", {}).get(metric)):
            continue
        points = [(x, v) for x, v in zip(run["curve"]["step"], run["curve"][metric]) if v is not None]
        target = [v for v in base["curve"][metric] if v is not None]
        if points and target:
            step = steps_to_reach([x for x, _ in points], [v for _, v in points], target[-1])
            out[s] = None if step is None else step / run["steps"]
    return out


@torch.no_grad()
def bucket_loss(net, cfg, mask, images, seed=0, n=256, batch=128):
    """Held-out eps-MSE in 10 equal timestep buckets: the same images, timesteps and noise for every
    model, so modes trained on different windows are compared on the same task."""
    device, T = mask.device, cfg["diffusion"]["timesteps"]
    tab, g = tables_on(cfg, device), torch.Generator().manual_seed(seed)
    x0 = torch.from_numpy(np.array(images[:n])).permute(0, 3, 1, 2).float() / 127.5 - 1   # a copy: caches are read-only
    sums = [0.0] * 10
    for b in range(10):
        t = torch.randint(b * T // 10, (b + 1) * T // 10, (len(x0),), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        for a in range(0, len(x0), batch):
            xb, tb, eb = (v[a:a + batch].to(device) for v in (x0, t, eps))
            xt = q_sample(xb, tb, eb, tab)
            target = training_target(xb, xt, tb, eb, tab, cfg["diffusion"]["model_mean_type"])
            sums[b] += mse_per_sample(net(xt, tb, mask), target).sum().item()
    return [v / len(x0) for v in sums]


def run_length(cfg, num_images):
    """(epochs as run, optimizer steps) of a config on `num_images` training images: the schedule's epochs times
    train.length_scale (rounded to 1e-6), and the steps train takes for them."""
    steps = schedule_in_steps(cfg, stages_of(cfg), data.steps_per_epoch(num_images, cfg["train"]["batch_size"]))[1]
    return round(total_epochs(cfg) * cfg["train"]["length_scale"], 6), steps


def work_of(cfg, steps):
    """What equal work compares between runs of one dataset: optimizer steps, global batch, and which data
    (dataset, split, resolution, data_limit; data_root is left out: the same data may move)."""
    return {"optimizer steps": steps, "train.batch_size": cfg["train"]["batch_size"], "dataset": cfg["dataset"],
            "data_split": cfg["data_split"], "resolution": cfg["resolution"], "data_limit": cfg["data_limit"]}


def work_mismatch(key, path, state, cfg, finished):
    """None when checkpoint `state` (at `path`) of run `key` holds the work compare asks of it (`cfg`: the config
    compare trains it with): all of its optimizer steps when `finished`, at most that many before training, the
    same batch and data, and the same config but for the keys a resume may change. Else the one-line error naming
    the run, the difference and the fix."""
    if not isinstance(state.get("num_images"), int):
        return f"{key}: {path} does not record its number of training images; move it away, then rerun"
    have = work_of(state["config"], state["step"])
    want = work_of(cfg, run_length(cfg, state["num_images"])[1])
    for name in have:
        if have[name] != want[name] and (finished or name != "optimizer steps" or have[name] > want[name]):
            return (f"{key}: {path} holds {have[name]} {name} where this compare needs {want[name]} (not equal "
                    f"work; trained outside compare or with other settings?); move {os.path.dirname(path)} away "
                    "or use another --out, then rerun")
    diff = config_diff(state["config"], cfg)
    if diff:
        return (f"{key}: {path} was trained with another config ({', '.join(diff)}); move {os.path.dirname(path)} "
                "away or use another --out, then rerun")
    return None


def job_report(label, returncode, seconds, done, total, log_text):
    """The lines that report an ended job: its label (mode/seed), how many of the jobs have ended, its wall time
    and last log line, then every warning it logged (e.g. a warm-up longer than the run), so none goes unseen."""
    lines = log_text.strip().splitlines()
    return ([f"  {'finished' if returncode == 0 else 'FAILED'} {label} ({done}/{total}) in {fmt_time(seconds)}: "
             f"{(lines[-1:] or ['(no output)'])[0][:150]}"]
            + [f"    {line.strip()}" for line in lines if line.startswith("warning:")])


def run_jobs(jobs, parallel, log_name):
    """Run [(label, argv, run_dir)] as `python diffcl.py ...` subprocesses in `parallel` slots: slot k on GPU k mod
    the GPU count when there are several, else all sharing the device; CPU threads split between the slots. Returns
    {label: seconds}; a failed job is reported with the end of its log after the others finish. Each job has its own
    process group: Ctrl-C reaches this process alone, which passes it on once (each job saves at its next step) and
    waits for them; a second Ctrl-C passes that on too (they stop at once)."""
    gpus = torch.cuda.device_count() if device_kind() == "cuda" else 0
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // parallel)))
    pending, slots, seconds, failed = list(jobs), [None] * parallel, {}, []   # slot: (label, process, log, t0, offset)
    try:
        while pending or any(slots):
            for k, job in enumerate(slots):
                if job and job[1].poll() is not None:       # ended: report it and free its slot
                    label, proc, logf, t0, start = job
                    logf.close()
                    seconds[label] = time.perf_counter() - t0
                    with open(logf.name, "rb") as f:
                        f.seek(start)
                        text = f.read().decode(errors="replace")
                    print("\n".join(job_report(label, proc.returncode, seconds[label], len(seconds), len(jobs),
                                                text)), flush=True)
                    if proc.returncode:
                        failed.append(f"{label} (see {logf.name})")
                    slots[k] = job = None
                if job is None and pending:
                    label, argv, run_dir = pending.pop(0)
                    os.makedirs(run_dir, exist_ok=True)
                    logf = open(os.path.join(run_dir, log_name), "a")
                    start = os.path.getsize(logf.name)      # this job's part of a log that a resume appends to
                    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv], stdout=logf,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**env, "CUDA_VISIBLE_DEVICES": str(k % gpus)} if gpus > 1 else env)
                    slots[k] = (label, proc, logf, time.perf_counter(), start)
                    print(f"  started {label} ({argv[0]}, log {logf.name})", flush=True)
            time.sleep(0.2)
    except KeyboardInterrupt:
        running = [job[1] for job in slots if job and job[1].poll() is None]
        print(f"\n  Ctrl-C: {len(running)} running job(s) save at their next step and stop (Ctrl-C again: stop "
              "them at once)", flush=True)
        for _ in range(2):
            try:
                for proc in running:
                    proc.send_signal(signal.SIGINT)
                for proc in running:
                    proc.wait()
                break
            except KeyboardInterrupt:
                continue
        raise
    if failed:
        raise RunError(f"{len(failed)} run(s) failed: {', '.join(failed)}; fix the cause and rerun compare to resume")
    return seconds


def read_compare_json(path):
    """compare.json's results, or None when there is none yet; a damaged file is a one-line error, never rewritten."""
    try:
        data.regular_file(path, data.MAX_JSON_BYTES)        # a FIFO would block the open
        with open(path) as f:
            saved = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        saved = None
    if isinstance(saved, dict) and isinstance(saved.get("runs"), dict):
        return saved
    raise RunError(f"{path} is damaged (not compare's JSON); move it away to rescore the finished runs, then rerun")


def training_set_size(cfg):
    """How many images a run of cfg trains on (every compare mode the same: equal work)."""
    return len(data.load_images(cfg["dataset"], cfg["data_root"] or None, cfg["data_split"] or None,
                                cfg["resolution"] or None, log=lambda *a: None, num_images=cfg["data_limit"] or None))


@contextlib.contextmanager
def environ(name, value):
    """An environment variable set to `value` (None: left as it is) while the block runs, for the processes it starts."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def eval_curve(run_dir, steps):
    """A run's held-out curve from the evaluation records in its metrics.jsonl: {"step", "mse" (mean of the 10
    t buckets), "bpd", "fid" (None where not measured)}; a run evaluated at other steps than `steps` is refused."""
    path = os.path.join(run_dir, "metrics.jsonl")
    found = {r["step"]: r for r in by_step([r for _, r in data.read_jsonl(path)], "eval")} if os.path.isfile(path) else {}
    if list(found) != steps:
        raise RunError(f"{path} has held-out evaluations at steps {list(found) or 'none'}, not at {steps} like every "
                       "run of this compare; move that run folder away and rerun compare to retrain it")
    return {"step": steps, "mse": [float(np.mean(found[s]["bucket_mse"])) for s in steps],
            "bpd": [found[s]["bpd"] for s in steps], "fid": [found[s].get("fid") for s in steps]}


def compare(out, dataset, seeds, overrides=(), fid_num=2000, inception=None, held_out_n=256, jobs=1,
            sample_steps=50, modes=MODES, eval_points=8):
    """Train `modes` (base, C, CS, CR and the CONTROLS) for `seeds` paired seeds at equal work (same data, batch,
    optimizer steps; seed s shares initialisation, data order and noise streams across modes), `jobs` runs at a time;
    every run evaluates itself on held-out data at the same `eval_points` steps (eps-MSE, bpd, and FID-n when compare
    scores FID); score each final checkpoint on held-out data (eps-MSE per t bucket; FID-n with DDIM when Inception
    weights are found); write compare.md, compare.json and curves.png. A rerun resumes: finished runs are skipped,
    interrupted ones resume."""
    with data.locked_folder(out, "compare"):                # two compares would train into each other's runs
        if "base" not in modes or not set(modes) <= {*MODES, *CONTROLS}:
            raise ConfigError(f"--modes needs base and names from {', '.join(MODES + tuple(CONTROLS))}; got {','.join(modes)}")
        twice = sorted({m for m in modes if modes.count(m) > 1})
        if twice:
            raise ConfigError(f"--modes names {', '.join(twice)} more than once; list each mode once")
        for name in ("compare.json", "compare.md", "curves.png"):     # before any work, not after it
            if os.path.isdir(os.path.join(out, name)):
                raise RunError(f"{os.path.join(out, name)} is a folder where compare writes a file; move it away, "
                               "then rerun")
        c_cfg = load_config(mode_config(dataset, "c")[0], overrides)
        schedule = total_epochs(c_cfg)                      # base trains the curriculum's epochs
        epochs = round(schedule * c_cfg["train"]["length_scale"], 6)           # as run
        # Every run is scored on the same held-out (test) images; loading them first checks they were never trained on.
        base_cfg = load_config(mode_config(dataset, "base")[0], overrides)
        held = data.held_out_images(base_cfg["dataset"], max(held_out_n, 2 * fid_num), base_cfg["resolution"] or None,
                                    base_cfg["data_root"] or None, base_cfg["data_split"] or None)
        try:
            weights, note = (fid.find_weights(inception) if fid_num else None), ""
        except fid.FIDError as e:
            weights, note = None, f"FID skipped: {e}"
            print(note, flush=True)
        settings = {"dataset": dataset, "overrides": list(overrides), "held_out_n": held_out_n,
                    "fid_num": fid_num if weights else 0, "sample_steps": sample_steps, "eval_points": eval_points}
        # The curves: every run evaluates at the same steps, about eval_points of them ending at its last step
        # (equal work gives every mode the same number of steps); FID on the curve only when compare scores FID;
        # bpd from CURVE_TIMESTEPS stratified timesteps unless the overrides say otherwise, on CURVE_IMAGES of the
        # held-out images (the final scores use all held_out_n).
        num_images = training_set_size(base_cfg)
        total = run_length(load_config(mode_config(dataset, "base")[0], [*overrides, f"--train.epochs={schedule}"]),
                           num_images)[1]
        eval_intv = math.ceil(total / eval_points)
        eval_steps, curve_args = [*range(eval_intv, total, eval_intv), total], [
            f"--train.eval_intv={eval_intv}", f"--train.eval_num={min(held_out_n, CURVE_IMAGES)}",
            f"--train.eval_fid={settings['fid_num']}"]
        path = os.path.join(out, "compare.json")
        saved = read_compare_json(path) or {"fid_num": 0, "fid_floor": None, "settings": settings, "runs": {}}
        results = saved["runs"]
        runs = {f"{m}/seed{s}": (m, s, os.path.join(out, f"{m}_seed{s}")) for s in range(seeds) for m in modes}
        todo = {k: v for k, v in runs.items() if k not in results}
        # Scores made with other settings must never be mixed in; a request without FID that has nothing left to
        # score may show the FID scores already there.
        reusable = ("fid_num", "sample_steps") if not todo and not settings["fid_num"] else ()
        differ = [k for k in settings if k not in reusable and saved.get("settings", {}).get(k) != settings[k]]
        if results and differ:
            raise RunError(f"{path} holds results made with other settings ({', '.join(differ)}); "
                           "use another --out, or delete that folder to start over")

        # Train every unfinished run (train itself resumes an interrupted one); base gets the curriculum's epochs.
        # A checkpoint already there must hold no more than the run's work, on the same batch and data.
        cfgs, train_jobs, resuming = {}, [], 0
        for key, (mode, seed, run_dir) in todo.items():
            config, overlay = mode_config(dataset, mode)
            args = [*overlay, f"--train.eval_timesteps={CURVE_TIMESTEPS}", *overrides, *stage_overlay(mode, schedule),
                    *curve_args, f"--seed={seed}", f"--out_dir={run_dir}"]
            if not load_config(config, overlay)["curriculum"]["enabled"]:
                args.append(f"--train.epochs={schedule}")
            cfgs[key] = load_config(config, args)               # a bad override fails here, before any work,
            run_length(cfgs[key], num_images)                   # and so does a stage scaled to no optimizer step
            ckpt = os.path.join(run_dir, "ckpt.pt")
            state = load_checkpoint(ckpt) if os.path.exists(ckpt) else None
            problem = state is not None and work_mismatch(key, ckpt, state, cfgs[key], finished=False)
            if problem:
                raise RunError(problem)
            if state is None or work_mismatch(key, ckpt, state, cfgs[key], finished=True):
                train_jobs.append((key, ["train", config, *args], run_dir))
                resuming += state is not None
        print(f"compare {dataset}: {len(train_jobs)} of {len(runs)} runs to train ({resuming} resuming), "
              f"{len(todo)} to score; {epochs:g} epochs each, {jobs} at a time; held-out evaluations at steps "
              f"{', '.join(map(str, eval_steps))}", flush=True)
        with environ(fid.WEIGHTS_ENV, weights if settings["fid_num"] else None):   # FID on the curves: compare's weights
            train_seconds = run_jobs(train_jobs, jobs, "train.log")
        # Equal work, proven from the checkpoints about to be scored: every run's steps, batch and data.
        images = {k: r["training_images"] for k, r in results.items() if "training_images" in r}
        for key in todo:
            ckpt = os.path.join(runs[key][2], "ckpt.pt")
            state = load_checkpoint(ckpt)
            problem = work_mismatch(key, ckpt, state, cfgs[key], finished=True)
            if problem:
                raise RunError(problem)
            images[key] = state["num_images"]
        first = next(iter(images), None)
        odd = [k for k in images if images[k] != images[first]]
        if odd:
            raise RunError(f"{odd[0]} was trained on {images[odd[0]]} images, {first} on {images[first]} (not equal "
                           f"work: the data changed between runs); move {os.path.join(out, odd[0].replace('/', '_'))} away, "
                           "then rerun")
        if weights and todo:
            run_jobs([(key, ["sample", "--ckpt", os.path.join(d, "ckpt.pt"), "--num-images", str(fid_num), "--ddim", "--steps",
                             str(sample_steps), "--out", os.path.join(d, "fid_samples"), "--replace-stale"], d)
                      for key, (_, _, d) in todo.items()], jobs, "sample.log")

        # Score: held-out loss per bucket, FID-n against held-out statistics, wall time and training FLOPs.
        device, cpu, floor = torch.device(device_kind()), torch.device("cpu"), None
        if weights:             # the floor: FID of other real images (training ones if the test split is short)
            inception_model = fid.load_inception(weights, device=device)
            other = held[fid_num:] if len(held) >= 2 * fid_num else data.load_images(
                base_cfg["dataset"], resolution=base_cfg["resolution"] or None, root=base_cfg["data_root"] or None,
                log=lambda *a: None)
            name = base_cfg["dataset"].replace(":", "_").replace("/", "_")
            ref, floor_stats = (os.path.join(out, f"{p}_{name}_{fid_num}.npz") for p in ("ref", "floor"))
            floor = fid.reference_and_floor(held[:fid_num], other[:fid_num], ref, floor_stats, inception_model, device)
        for key, (mode, seed, run_dir) in todo.items():
            state = load_checkpoint(os.path.join(run_dir, "ckpt.pt"))
            net, cfg, mask, _ = model_from_checkpoint(run_dir, device, state=state)
            seen = state["step"] * cfg["train"]["batch_size"]
            curve = eval_curve(run_dir, eval_steps)
            entry = results[key] = {
                "bucket_mse": bucket_loss(net, cfg, mask, held, n=held_out_n), "bpd": curve["bpd"][-1], "curve": curve,
                "steps": state["step"], "images_seen": seen, "training_images": state["num_images"],
                "train_seconds": round(state.get("wall_seconds", train_seconds.get(key, 0.0)), 1),
                "train_tflops": round(seen * train_flops_per_image(cfg, build_model(cfg, cpu), cpu) / 1e12, 2)}
            if weights:
                images = fid.load_image_folder(os.path.join(run_dir, "fid_samples"))[:fid_num]
                entry["fid"] = fid.score(images, ref, inception_model, device=device, log=lambda *a: None)["fid"]
            saved = {"dataset": dataset, "epochs": epochs, "steps": state["step"], "seeds": seeds,
                     "fid_num": settings["fid_num"],
                     "fid_floor": floor, "settings": settings, "runs": results}
            data.atomic_write(path, json.dumps(saved, indent=1))    # after every run: an interrupted compare resumes
            print(f"  scored {key}: held-out mse {np.mean(entry['bucket_mse']):.4f}, bpd {entry['bpd']:.3f}"
                  + (f", FID-{fid_num} {entry['fid']:.2f}" if weights else ""), flush=True)
        saved["steps_to_reach"] = {m: {metric: reach_fractions(results, m, seeds, metric) for metric in CURVE_METRICS}
                                   for m in modes}
        data.atomic_write(path, json.dumps(saved, indent=1))
        return write_comparison(out, dataset, seeds, epochs, results, saved["fid_num"], saved.get("fid_floor"),
                                saved.get("settings", settings)["sample_steps"], note, modes)


def write_comparison(out, dataset, seeds, epochs, results, fid_num, floor, sample_steps, note="", modes=MODES):
    """compare.md and curves.png: per mode mean +- std and 95% t-interval over seeds; the paired difference to base
    (mode minus base, seed by seed) with its interval, the number the question is about; the held-out loss per t
    bucket; the steps each mode needs to reach base's final held-out value; seed 0's CS channel births and CR
    small-norm counts. The chart: each held-out metric over training, mean and min-max band over seeds."""
    metrics = [("held-out mse", lambda r: float(np.mean(r["bucket_mse"])), "%.4f"), ("bpd", lambda r: r["bpd"], "%.3f")]
    if fid_num:
        metrics.append((f"FID-{fid_num}", lambda r: r["fid"], "%.2f"))

    def cell(fmt, values, std=True):                    # one value has no spread: then only its mean
        m, sd, half = interval(values)
        return (fmt % m + (f" ± {fmt % sd}" if std and not math.isnan(sd) else "")
                + ("" if math.isnan(half) else f" [{fmt % (m - half)}, {fmt % (m + half)}]"))

    overlays = {m: CONTROLS[m][1] + ["the wide stages"] * (m in WIDE_MODES) for m in modes if m in CONTROLS}
    controls = [f"- {m}: {CONTROLS[m][0]} with {' and '.join(o)}; isolates {CONTROLS[m][2]}"
                for m, o in overlays.items()]
    header = " | ".join(f"{name} (mean ± std [95% CI]) | Δ{name} vs base (paired [95% CI])" for name, _, _ in metrics)
    steps = sorted({r["steps"] for k, r in results.items() if k.split("/")[0] in modes and "steps" in r})
    length = f"{epochs:g} epochs" + (f" ({'/'.join(map(str, steps))} optimizer steps)" if steps else "")
    lines = [f"# {dataset}: {' vs '.join(modes)}, {length} each, {seeds} paired seed(s)", "",
             "Held-out eps-MSE: mean over 10 t buckets of the test split; bpd: the variational bound in bits/dim on the "
             f"first {CURVE_IMAGES} of those test images (all, if fewer; {CURVE_TIMESTEPS} stratified timesteps unless "
             "overridden), from each run's evaluation at its last step"
             + (f"; FID-{fid_num}: {fid_num} DDIM-{sample_steps} samples against the first {fid_num} test images "
                f"(floor, real vs real at this n: {floor:.2f})" if fid_num else "") + "." + (f" {note}" if note else ""),
             *[""] * bool(controls), *controls,
             "", f"| mode | {header} | wall (train) | training TFLOP |", "|---" * (3 + 2 * len(metrics)) + "|"]
    means = {}
    for mode in modes:
        runs = {s: results[f"{mode}/seed{s}"] for s in range(seeds) if f"{mode}/seed{s}" in results}
        if not runs:
            continue
        cells = []
        for _, value, fmt in metrics:
            paired = paired_differences(results, mode, "base", seeds, value)
            cells += [cell(fmt, [value(r) for r in runs.values()]),
                      cell(fmt, paired, std=False) if mode != "base" and paired else "—"]
        cells += [fmt_time(np.mean([r.get("train_seconds", 0) for r in runs.values()])),
                  "%.1f" % np.mean([r.get("train_tflops", 0) for r in runs.values()])]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
        b = np.array([r["bucket_mse"] for r in runs.values()])
        means[mode] = b.mean(0).tolist()
    against = [(m, CONTROLS[m][0]) for m in means if CONTROLS.get(m, ("base",))[0] in set(means) - {"base"}]
    if against:                                         # e.g. cs_flat - cs: the windows under one capacity schedule
        lines += ["", "Each control against the mode it starts from (control minus that mode, paired by seed [95% CI]):",
                  "", "| control | " + " | ".join(f"Δ{name}" for name, _, _ in metrics) + " |",
                  "|---" * (1 + len(metrics)) + "|"]
        lines += [f"| {m} − {parent} | " + " | ".join(cell(fmt, paired_differences(results, m, parent, seeds, value),
                                                           std=False) for _, value, fmt in metrics) + " |"
                  for m, parent in against]
    lines += ["", "Held-out eps-MSE per t bucket (b0: t < T/10, least noisy), mean over seeds:", "",
              "| mode | " + " | ".join(f"b{k}" for k in range(10)) + " |", "|---" * 11 + "|"]
    lines += [f"| {m} | " + " | ".join(f"{v:.4f}" for v in b) + " |" for m, b in means.items()]
    shown = [m for m in CURVE_METRICS if m != "fid" or fid_num]
    eval_steps = next((r["curve"]["step"] for r in results.values() if "curve" in r), [])
    lines += ["", "Steps to reach base's final value, as a fraction of the run: per seed, the first step at which the "
              "mode's held-out curve is at or below base's value at the last step of the same seed (linear between the "
              f"evaluations at steps {', '.join(map(str, eval_steps))}; a curve already there at its first evaluation "
              "counts as that step); mean [95% CI] over seeds, or how many seeds never got there:", "",
              "| mode | " + " | ".join(curve_title(m, fid_num) for m in shown) + " |", "|---" * (1 + len(shown)) + "|"]
    lines += [f"| {mode} | " + " | ".join(reach_cell(reach_fractions(results, mode, seeds, m)) for m in shown) + " |"
              for mode in means]
    marks, notes = set(), []                                # seed 0's metrics.jsonl: stage starts, CS births, CR norms
    for mode in means:
        path = os.path.join(out, f"{mode}_seed0", "metrics.jsonl")
        records = [r for _, r in data.read_jsonl(path)] if os.path.isfile(path) else []
        stages = by_step(records, "stage")
        marks |= {r["step"] for r in stages if r["step"] > 0}
        family = CONTROLS.get(mode, (mode,))[0]              # cs_flat and wide_cs train cs's mask, cr_flat cr's lambda
        if family == "cs" and stages:
            birth = stages[-1]["birth_stage"]                # masks change only at stage starts
            born = ", ".join(f"{'never' if k < 0 else k + 1}: {birth.count(k)}" for k in sorted(set(birth)))
            notes.append(f"- {mode}, seed 0: active per stage {'/'.join(str(r['active']) for r in stages)}; "
                         f"channels born in stage {born}")
        if family == "cr" and stages:
            notes.append(f"- {mode}, seed 0: conv channels with norm<1e-3 at each stage start (the first counts the "
                         "initial weights, near-zero-initialised convs included) "
                         + "/".join(str(sum(r.get("small_norm_channels", {}).values())) for r in stages))
    warned = {}                                             # what the runs' train.log warned of, and which runs
    for key in (k for k in results if k.split("/")[0] in modes):
        for text in log_warnings(os.path.join(out, key.replace("/", "_"), "train.log")):
            warned.setdefault(text, []).append(key)
    notes += [f"- {', '.join(keys)}: {text}" for text, keys in warned.items()]
    table = "\n".join(lines + [""] * bool(notes) + notes)
    data.atomic_write(os.path.join(out, "compare.md"), table + "\n")
    if means:
        panels = [(curve_title(m, fid_num), mean_curves(results, list(means), seeds, m)) for m in shown]
        curves_chart(panels, os.path.join(out, "curves.png"), sorted(marks),
                     f"mean over {seeds} seed(s);\nband: min-max over seeds;\ngrey lines: stage starts")
    print("\n" + table, flush=True)
    return table


def paired_differences(results, mode, other, seeds, value):
    """value(mode's run) - value(other's run) for each seed both have: the paired differences compare.md reports."""
    keys = [(f"{mode}/seed{s}", f"{other}/seed{s}") for s in range(seeds)]
    return [value(results[a]) - value(results[b]) for a, b in keys if a in results and b in results]


def log_warnings(path):
    """The distinct `warning:` lines of a run's log, in order ([] without a log)."""
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        return list(dict.fromkeys(line.strip() for line in f if line.startswith("warning:")))


def by_step(records, kind):
    """metrics.jsonl records of one kind in step order, the last one written for each step (a resumed run may
    have written a step twice, or out of order)."""
    last = {r["step"]: r for r in records if r.get("kind") == kind and "step" in r}
    return [last[step] for step in sorted(last)]


CURVE_METRICS = ("mse", "bpd", "fid")                      # the held-out curves, all lower-is-better
CURVE_IMAGES = 64       # held-out images per curve point: 8 points cost ~11 % of a CPU fashion32 run (256: ~67 %)
CURVE_TIMESTEPS = 10    # K of the curves' bpd estimate: every run draws the same t and noise, so differences stay sharp


def curve_title(metric, fid_num):
    return {"mse": "held-out eps-MSE", "bpd": "bpd (bits/dim)", "fid": f"FID-{fid_num}"}[metric]


def reach_cell(fractions):
    """A steps-to-reach cell from {seed: fraction or None}: mean [95% CI] when every seed got there, else how many
    seeds never did (with the fractions of those that did): no number is made up for a seed that never got there."""
    if not fractions:
        return "—"
    missed = [s for s, f in fractions.items() if f is None]
    if not missed:
        m, _, half = interval(list(fractions.values()))
        return f"{m:.2f}" + ("" if math.isnan(half) else f" [{m - half:.2f}, {m + half:.2f}]")
    reached = ", ".join(f"seed {s}: {f:.2f}" for s, f in fractions.items() if f is not None)
    return f"not reached in {len(missed)} of {len(fractions)} seeds" + (f" (reached: {reached})" if reached else "")


def mean_curves(results, modes, seeds, metric):
    """{mode: (steps, mean, min, max over seeds)} of a held-out curve, at the steps every seed measured it."""
    out = {}
    for mode in modes:
        rows = [results[f"{mode}/seed{s}"]["curve"] for s in range(seeds)
                if "curve" in results.get(f"{mode}/seed{s}", {})]
        if not rows:
            continue
        v = np.array([[math.nan if x is None else x for x in c[metric]] for c in rows], dtype=np.float64)
        keep = np.isfinite(v).all(0)
        if keep.any():
            v = v[:, keep]
            out[mode] = ([x for x, k in zip(rows[0]["step"], keep) if k], v.mean(0).tolist(), v.min(0).tolist(),
                         v.max(0).tolist())
    return out


# The chart: a plain pillow drawing, one panel per metric side by side, the legend on the right. Each mode has its
# own colour, dash pattern and marker, so lines that lie on top of each other stay told apart.
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]            # matplotlib's tab10
DASHES = [(), (9, 5), (3, 4), (9, 4, 3, 4)]                 # on/off lengths in pixels; () = solid
MARKERS = ["circle", "square", "triangle", "diamond", "down", "cross"]
PANEL, LEGEND = (420, 380), 170                             # one panel's size, the legend's width (pixels)


def dashed_line(d, xy, fill, pattern, width=2):
    """A polyline through the points xy, drawn with an on/off dash pattern (pixel lengths; () = solid)."""
    if not pattern:
        d.line(xy, fill=fill, width=width)
        return
    k, left = 0, pattern[0]
    for (xa, ya), (xb, yb) in zip(xy, xy[1:]):
        length, pos = math.hypot(xb - xa, yb - ya), 0.0
        while pos < length:
            step = min(left, length - pos)
            if k % 2 == 0:                                  # an "on" stretch
                f0, f1 = pos / length, (pos + step) / length
                d.line([xa + (xb - xa) * f0, ya + (yb - ya) * f0, xa + (xb - xa) * f1, ya + (yb - ya) * f1],
                       fill=fill, width=width)
            pos, left = pos + step, left - step
            if left <= 0:
                k = (k + 1) % len(pattern)
                left = pattern[k]


def marker(d, x, y, shape, fill, r=4):
    """An outlined marker centred on (x, y)."""
    pts = {"triangle": [(x, y - r), (x + r, y + r), (x - r, y + r)], "down": [(x - r, y - r), (x + r, y - r), (x, y + r)],
           "diamond": [(x, y - r), (x + r, y), (x, y + r), (x - r, y)]}
    if shape == "circle":
        d.ellipse([x - r, y - r, x + r, y + r], outline=fill, width=2)
    elif shape == "square":
        d.rectangle([x - r, y - r, x + r, y + r], outline=fill, width=2)
    elif shape == "cross":
        d.line([x - r, y - r, x + r, y + r], fill=fill, width=2)
        d.line([x - r, y + r, x + r, y - r], fill=fill, width=2)
    else:
        d.polygon(pts[shape], outline=fill, width=2)


def curves_chart(panels, path, marks=(), note=""):
    """Panels [(title, {label: (steps, mean, low, high)})], side by side (y on a log scale when every value is
    positive): per label a line through the means, a translucent band from low to high, a marker per point; grey vertical lines at `marks` (stage starts, in steps);
    the legend and `note` on the right. Labels keep their colour, dash and marker in every panel."""
    labels = list(dict.fromkeys(label for _, curves in panels for label in curves))
    style = {label: (COLOURS[k % len(COLOURS)], DASHES[k % len(DASHES)], MARKERS[k % len(MARKERS)])
             for k, label in enumerate(labels)}
    w, h = PANEL
    img = Image.new("RGBA", (w * len(panels) + LEGEND, h), "white")
    for p, (title, curves) in enumerate(panels):
        x0, y0, x1, y1 = p * w + 64, 36, p * w + w - 16, h - 50
        xs = [x for c in curves.values() for x in c[0]] or [1]
        ys = [y for c in curves.values() for y in (*c[2], *c[3]) if math.isfinite(y)] or [1.0]
        # A log axis when every value is positive: the first points (untrained weights) are ~20x the last ones,
        # which would flatten the end of the run, where the modes differ.
        f = math.log10 if min(ys) > 0 else (lambda v: v)
        xmax, lo, hi = max(xs) or 1, f(min(ys)), f(max(ys))
        pad = max(hi - lo, abs(hi) * 1e-6, 1e-12) * 0.05
        lo, hi = lo - pad, hi + pad
        to_x, to_y = (lambda x: x0 + (x1 - x0) * x / xmax), (lambda v: y1 - (y1 - y0) * (f(v) - lo) / (hi - lo))
        for label, (steps, mean, low, high) in curves.items():     # bands first: every line stays on top
            band = [(to_x(s), to_y(v)) for s, v in zip(steps, high)] + \
                   [(to_x(s), to_y(v)) for s, v in zip(steps[::-1], low[::-1])]
            if len(band) > 2:
                layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
                ImageDraw.Draw(layer).polygon(band, fill=(*style[label][0], 48))
                img = Image.alpha_composite(img, layer)
        d = ImageDraw.Draw(img)
        d.text((x0, 10), title, fill="black")
        for m in marks:
            d.line([to_x(m), y0, to_x(m), y1], fill=(190, 190, 190))
        d.line([x0, y0, x0, y1, x1, y1], fill="black")
        fifths = [lo + (hi - lo) * k / 4 for k in range(5)]
        y_ticks = (f is math.log10 and log_ticks(lo, hi)) or [10 ** u if f is math.log10 else u for u in fifths]
        for v in y_ticks:                                   # y: round values on a log axis, else fifths
            y = to_y(v)
            d.line([x0 - 4, y, x0, y], fill="black")
            d.text((p * w + 4, y - 6), f"{v:.4g}", fill="black")
        for k in range(5):                                  # x ticks at quarters of the run
            tick = round(xmax * k / 4)
            d.line([to_x(tick), y1, to_x(tick), y1 + 4], fill="black")
            d.text((to_x(tick) - 8, y1 + 8), str(tick), fill="black")
        d.text((x1 - 90, y1 + 24), "optimizer step", fill="black")
        for label, (steps, mean, _, _) in curves.items():
            colour, dash, shape = style[label]
            xy = [(to_x(s), to_y(v)) for s, v in zip(steps, mean)]
            if len(xy) > 1:
                dashed_line(d, xy, colour, dash)
            for x, y in xy:
                marker(d, x, y, shape, colour)
    d, lx = ImageDraw.Draw(img), w * len(panels) + 10
    for k, label in enumerate(labels):
        colour, dash, shape = style[label]
        dashed_line(d, [(lx, 44 + 20 * k), (lx + 34, 44 + 20 * k)], colour, dash)
        marker(d, lx + 17, 44 + 20 * k, shape, colour)
        d.text((lx + 42, 38 + 20 * k), str(label), fill="black")
    for k, line in enumerate(note.splitlines()):
        d.text((lx, 60 + 20 * len(labels) + 14 * k), line, fill="black")
    data.atomic_write(path, lambda tmp: img.convert("RGB").save(tmp, format="PNG"))


def log_ticks(lo, hi):
    """Round values for a log axis from 10^lo to 10^hi: m x 10^k for m in 1..9, else in 1, 2, 5, else 1, the finest
    choice giving at most 8; None when fewer than 2 fit (the caller labels evenly spaced values instead)."""
    for mantissas in (range(1, 10), (1, 2, 5), (1,)):
        ticks = [m * 10.0 ** k for k in range(math.floor(lo) - 1, math.ceil(hi) + 1) for m in mantissas
                 if lo <= math.log10(m) + k <= hi]
        if len(ticks) <= 8:
            return ticks if len(ticks) >= 2 else None
    return None


def demo(out="runs/demo", dataset="shapes", overrides=(), held_out_n=256, jobs=2):
    """compare with one seed and no FID: every mode on a small dataset, for a first look."""
    t0 = time.time()
    compare(out, dataset, 1, overrides, fid_num=0, held_out_n=held_out_n, jobs=jobs)
    print(f"\ndemo done in {fmt_time(time.time() - t0)}: grids in {out}/<mode>_seed0/samples/, table {out}/compare.md, "
          f"chart {out}/curves.png", flush=True)
    return out


# ----------------------------------------------------------------------------------------------
# main: `python diffcl.py train|sample|eval|bench|demo|compare ...`; errors a user can fix print one line, exit 2.

COMMANDS = ("train", "sample", "eval", "bench", "demo", "compare")

USAGE = """usage: python diffcl.py COMMAND [options] [--section.key=value ...]
  train    CONFIG            train (resumes from <out_dir>/ckpt.pt)    e.g. train configs/celeba32_cs.json
  sample   --ckpt CKPT       write PNGs (DDPM, or --ddim --steps N)
  eval     --ckpt|--images   FID (+ precision/recall with --real) against --ref statistics
  eval     --ckpt --nll N    held-out NLL bound in bits/dim on N test images (--nll-timesteps K: estimate)
  bench    [CONFIG]          time the training step
  demo                       all four modes on a small dataset, one seed
  compare  --dataset D       base vs C vs CS vs CR, paired seeds, held-out loss and FID
python diffcl.py COMMAND --help lists a command's options."""

LAUNCHER = ("the description's mp.spawn launcher; use torchrun instead: torchrun --standalone --nproc_per_node N "
            "diffcl.py train CONFIG (or bash run.sh MODE N)")

REMOVED_FLAGS = {"--num-gpus": LAUNCHER, "--rigid-launch": LAUNCHER,   # each: what to use instead
                 "--soak": "removed from bench: the suite tests that memory does not grow; bench reports peak_mem_gb",
                 "--num": "now --num-images (torchrun takes --num for an abbreviation of its --numa-binding)"}


def number_in(lo, hi=math.inf, what="a whole number", cast=int):
    """argparse type: a number `cast` from the text (int: a whole number) in [lo, hi]; `what` names it in the error."""
    def parse(text):
        try:
            value = cast(text) if cast is float or text.isdigit() else math.nan    # no sign, space or _ in a count
        except ValueError:
            value = math.nan
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    return parse


def usage_error(message):
    raise ConfigError(f"{message} (see python diffcl.py {{{','.join(COMMANDS)}}} --help)")


def cli_parser(cmd):
    """The argparse parser of one command. No flag may be a prefix of one of torchrun's (test_diffcl checks): torchrun
    reads abbreviations of its own options anywhere on its command line, after the script name too."""
    count = number_in(1, what="a whole number >= 1")
    overrides = "config overrides: --section.key=value, e.g. --train.lr=1e-4 --train.length_scale=0.2"
    p = argparse.ArgumentParser(prog=f"diffcl.py {cmd}", allow_abbrev=False,
                                epilog=overrides if cmd not in ("sample", "eval") else None)
    p.error = usage_error                                   # one line, exit 2, like every other mistake
    add = p.add_argument
    if cmd in ("train", "bench"):
        add("config", nargs="?", help="config JSON (same as --config-path)")
        add("--config-path", dest="config_path")
    if cmd == "train":
        add("--resume", help="resume from this checkpoint instead of <out_dir>/ckpt.pt")
        add("--force", action="store_true", help="resume even if the checkpoint's config differs")
        add("--distributed", action="store_true",
            help="the description's flag: insist on a torchrun launch (torchrun alone decides the world)")
        add("--download", action="store_true", help="let data.py fetch CIFAR-10 if it is missing")
    if cmd in ("sample", "eval"):
        add("--ckpt", required=cmd == "sample", help="checkpoint to sample (EMA weights, its CS mask)")
        add("--num-images", dest="num", type=number_in(1, 10 ** 8, "a whole number in [1, 10^8]"),
            default=64 if cmd == "sample" else 10000, metavar="N", help="images to generate (default %(default)s)")
        add("--out", default=None, help="image folder to write (default: beside the checkpoint)")
        add("--ddim", action="store_true", help="DDIM sampling (default: the full DDPM chain)")
        add("--steps", type=count, default=50, help="DDIM steps, with --ddim (default %(default)s)")
        add("--eta", type=number_in(0, 1, "a number in [0, 1]", float), default=0.0,
            help="DDIM noise, with --ddim (default %(default)s: deterministic)")
        add("--skip", choices=("uniform", "quadratic"), default="uniform",
            help="DDIM step spacing, with --ddim (default %(default)s)")
        add("--batch-size", type=number_in(1, 1 << 20, "a whole number in [1, 2^20]"), default=256,
            help="images per batch (default %(default)s)")
        add("--seed", type=number_in(0, 2 ** 32 - 1, "a whole number in [0, 2^32)"), default=0,
            help="image i's noise is keyed by (seed, i) (default %(default)s)")
        add("--raw", action="store_true", help="use the raw weights instead of the EMA")
    if cmd == "sample":
        add("--npz", action="store_true", help="also write samples.npz (uint8 images)")
        add("--replace-stale", action="store_true",
            help="delete images in --out that another checkpoint or setting made (default: refuse)")
    if cmd == "eval":
        add("--images", help="score this folder / .npz / .npy instead of sampling a checkpoint")
        add("--ref", help="reference statistics .npz (python fid.py ref ...); not needed with --nll")
        add("--real", help="real images (dataset name, folder or .npy) for precision/recall")
        add("--inception", help="FID Inception weights (default: $DIFFCL_INCEPTION or the torch-hub cache)")
        add("--download", action="store_true", help="fetch missing weights (and a --real CIFAR-10)")
        add("--nll", type=number_in(1, 10 ** 8, "a whole number in [1, 10^8]"),
            help="instead of FID: the NLL bound in bits/dim on the first N held-out images")
        add("--nll-timesteps", type=number_in(0, 10 ** 6, "a whole number >= 0"), default=0,
            help="with --nll: K stratified timesteps per image (0 = every timestep)")
    if cmd == "bench":
        add("--batch-size", type=count, help="images per step (default: the config's train.batch_size)")
        add("--steps", type=count, default=10, help="steps per timed window (default %(default)s)")
        add("--precision", choices=("fp32", "bf16"), help="default: the config's train.precision")
        add("--compile", action="store_true", help="torch.compile the step")
        add("--cuda-graphs", action="store_true", help="with --compile on CUDA: as CUDA graphs")
        add("--sample", action="store_true", help="also time DDIM sampling of a batch")
        add("--sample-steps", type=count, default=20, help="DDIM steps for --sample (default %(default)s)")
        add("--data", action="store_true", help="also time the data path")
    if cmd in ("demo", "compare"):
        add("--out", default=f"runs/{cmd}", help="folder of the runs and the table (default %(default)s)")
        add("--dataset", default="shapes", help="uses configs/<dataset>.json and <dataset>_{c,cs,cr}.json "
                                                "(default %(default)s)")
        add("--jobs", type=count, default=2 if cmd == "demo" else 1,
            help="runs trained at once (one per GPU when there are enough; CPU threads are split; default "
                 "%(default)s)")
    if cmd == "compare":
        add("--seeds", type=count, default=3, help="paired seeds per mode (default %(default)s)")
        add("--fid-num", type=number_in(0, what="a whole number >= 0 (0 = no FID)"), default=2000,
            help="FID-n images per run; 0 = no FID (default %(default)s)")
        add("--sample-steps", type=count, default=50, help="DDIM steps for the FID samples (default %(default)s)")
        add("--modes", type=lambda text: tuple(text.split(",")), default=MODES,
            help=f"comma list from {','.join(MODES + tuple(CONTROLS))} (base is required; default {','.join(MODES)})")
        add("--inception", help="FID Inception weights (default: $DIFFCL_INCEPTION or the torch-hub cache)")
        add("--eval-points", type=count, default=8,
            help="held-out evaluations during each run, at the same steps for every mode (the curves; default "
                 "%(default)s)")
    return p


def parse_cli(argv):
    cmd = argv[0] if argv else ""
    if cmd not in COMMANDS:
        raise ConfigError("usage: python diffcl.py train|sample|eval|bench|demo|compare ... (python diffcl.py --help)")
    args, rest = cli_parser(cmd).parse_known_args(argv[1:])
    for flag, instead in REMOVED_FLAGS.items():
        if any(r.split("=")[0] == flag for r in rest):
            raise ConfigError(f"{flag} is {instead}")
    if cmd in ("sample", "eval") and rest:
        raise ConfigError(f"unrecognised arguments: {' '.join(rest)}")
    return cmd, args, rest


def run_command(cmd, args, rest):
    """Carry out one parsed command."""
    if cmd in ("train", "bench"):
        path = args.config_path or args.config or ("configs/celeba32.json" if cmd == "bench" else None)
        if path is None:
            raise ConfigError("train needs a config: python diffcl.py train --config-path configs/celeba32_cs.json")
        if cmd == "bench":
            rest = rest + [f"--train.precision={args.precision}"] * bool(args.precision) + \
                ["--train.compile=true"] * args.compile + ["--train.cuda_graphs=true"] * args.cuda_graphs
        cfg = load_config(path, rest)
        if cmd == "bench":
            return bench(cfg, batch_size=args.batch_size, steps=args.steps, do_sample=args.sample,
                         sample_steps=args.sample_steps,
                         data_check=args.data)
        if args.distributed and "RANK" not in os.environ:
            raise ConfigError("--distributed: launch with torchrun --standalone --nproc_per_node N diffcl.py "
                              "train ... (or bash run.sh MODE N); plain python runs one process")
        return train(cfg, path, resume=args.resume, force=args.force, download=args.download)
    if cmd in ("demo", "compare"):                          # Ctrl-C: the runs save, main names the rerun
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if cmd == "demo":
        return demo(args.out, args.dataset, rest, jobs=args.jobs)
    if cmd == "compare":
        return compare(args.out, args.dataset, args.seeds, rest, args.fid_num, args.inception, jobs=args.jobs,
                       sample_steps=args.sample_steps, modes=args.modes, eval_points=args.eval_points)
    kw = dict(ddim=args.ddim, steps=args.steps, eta=args.eta, skip=args.skip, seed=args.seed, raw=args.raw)
    if cmd == "sample":
        out = args.out or os.path.join(os.path.dirname(args.ckpt), "samples_" + (f"ddim{args.steps}" if args.ddim else "ddpm"))
        return sample(args.ckpt, args.num, out, batch_size=args.batch_size, npz=args.npz,
                      replace_stale=args.replace_stale, **kw)
    if args.nll:
        if not args.ckpt:
            raise ConfigError("eval --nll needs --ckpt CKPT")
        return evaluate_nll(args.ckpt, args.nll, args.nll_timesteps, args.seed, args.batch_size, args.raw)
    if not args.ckpt and not args.images:
        raise ConfigError("eval needs --ckpt CKPT (sample then score) or --images FOLDER|NPZ")
    if not args.ref:
        raise ConfigError("eval needs --ref STATS.npz (python fid.py ref ...), or --nll N for bits/dim")
    return evaluate(args.ckpt, args.out if args.ckpt else args.images, args.ref, args.num, args.real,
                    args.inception, args.download, batch_size=args.batch_size, **kw)


def preflight(argv, ngpus):
    """run.sh's check before torchrun starts: prints the number of processes (NGPUS, or on a machine without CUDA
    max(NGPUS, 1) gloo processes) after checking that the config loads and its batch splits evenly over them, so a
    mistake is one line and exit 2 rather than one error per rank and torchrun's traceback."""
    try:
        world = ngpus if ngpus > 0 and device_kind() == "cuda" else max(ngpus, 1)
        cmd, args, rest = parse_cli(["train", *argv])
        cfg = load_config(args.config_path or args.config, rest)
        check_batch_split(cfg["train"], world)
        data.check_source(cfg["dataset"], cfg["data_root"] or None, cfg["data_split"] or None,
                          cfg["resolution"] or None, download=args.download)
        print(world)
        return 0
    except (ConfigError, data.DataError) as e:
        print(f"error: {data.shown(str(e))}", file=sys.stderr, flush=True)
        return 2


def torchrun(argv):
    """run.sh's launcher: `torchrun ARGV` (torch.distributed.run), except that a run stopped by a user error (every
    failed rank exited 2 or was stopped by torchrun; the one-line message is printed) exits 2 without torchrun's
    failure report. Any other failure raises that report, as torchrun does."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run
    held, quiet = [], False                                 # torchrun's lines on its ranks' exits, for its report
    reports = logging.getLogger("torch.distributed.elastic.multiprocessing.api")

    def hold(record):
        if record.levelno >= logging.WARNING:
            held.append(record)
        return record.levelno < logging.WARNING
    reports.addFilter(hold)
    try:
        run(parse_args(argv))
        return 0
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        quiet = 2 in codes and all(c in (2, -signal.SIGTERM) for c in codes)
        if quiet:
            return 2
        raise
    finally:
        reports.removeFilter(hold)
        for record in held if not quiet else ():
            reports.handle(record)


def main(argv):
    if argv and argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    for stream in (sys.stdout, sys.stderr):                 # a file name that is not UTF-8: escaped, never a crash
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    try:
        run_command(*parse_cli(argv))
        return 0
    except (ConfigError, RunError, data.DataError, fid.FIDError) as e:
        if first_user_error():                              # under torchrun: one line, from the first rank to stop
            print(f"error: {data.shown(str(e))}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:                               # train: before training started, nothing to save
        again = (f"; finished runs and scores are kept: to resume, rerun python "
                 f"{shlex.quote(os.path.relpath(__file__))} {shlex.join(argv)}") if argv[:1] in (["compare"], ["demo"]) else ""
        print(f"interrupted{again}", file=sys.stderr, flush=True)
        return 130
    except Exception:
        if after_user_error():                              # another rank stopped on a user error and said why
            return 2
        raise
    finally:
        if dist.is_available() and dist.is_initialized():
            gc.collect()                                    # avoids an intermittent gloo abort at exit
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
