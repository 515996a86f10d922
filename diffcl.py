"""diffcl: DDPM with a timestep curriculum (C), bottleneck channel sparsity (CS) and Group-L1 (CR).

    python diffcl.py train  --config-path configs/celeba32_cs.json [--train.lr=1e-4 ...]
    python diffcl.py sample --ckpt out/celeba32_cs/ckpt.pt --num 64 --out samples/ [--ddim --steps 50]
    python diffcl.py eval   --ckpt out/celeba32_cs/ckpt.pt --ref stats.npz --num 10000
    python diffcl.py bench  --config-path configs/celeba32.json [--precision bf16]
    torchrun --standalone --nproc_per_node 4 diffcl.py train --config-path configs/celeba32_cs.json

Sections, in order: config -> diffusion maths -> curriculum -> sparsity / regularisation ->
distributed helpers -> train -> sample / eval / bench -> main. Everything above `train` is a pure
function of its arguments (randomness only through a passed-in generator) and is tested directly.
Semantics follow ../shared/spec/decisions.md; the numbers in comments refer to its decisions.
"""
import copy
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# Config: the description's nested JSON. Every key has a default here; unknown keys are errors.

DEFAULTS = {
    "dataset": "shapes",            # celeba32 | celeba64 (= celeba) | cifar10 | fashion32 | shapes | folder:PATH
    "data_root": "",                # "" = the dataset's default location (see data.py)
    "data_split": "",               # "" = the dataset's default split
    "resolution": 0,                # 0 = the dataset's default (32, or 64 for celeba64)
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
        "epochs": 100,              # ignored when the curriculum is on: its stage epochs sum instead
        "warmup": 5000,             # linear LR warm-up, optimizer steps
        "use_ema": True,
        "ema_decay": 0.9999,
        "num_samples": 12,          # images in each sample grid
        "image_intv": 1,            # epochs between sample grids (0 = never)
        "sample_steps": 0,          # grid sampler: 0 = full DDPM ancestral, N > 0 = DDIM with N steps
        "chkpt_intv": 1,            # epochs between checkpoints (one is always written at the end)
        "save_every": 0,            # also checkpoint every N optimizer steps (0 = off)
        "log_intv": 100,            # optimizer steps between progress lines / metrics records
        "precision": "auto",        # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
        "channels_last": "auto",    # auto (on for CUDA) | on | off
        "compile": False,           # torch.compile the UNet
    },
    "curriculum": {
        "enabled": False,
        "mode": "hard",             # hard: t ~ U[window) ; soft: t = floor(u T), u ~ Beta(alpha, beta) per stage
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
    "precision": ("auto", "fp32", "bf16"),
    "channels_last": ("auto", "on", "off"),
    "mode": ("hard", "soft"),
    "regrowth_method": ("gradient", "taylor", "random"),
}
STAGE_KEYS = {"t_min": float, "t_max": float, "epochs": int, "name": str,
              "sparsity": float, "lambda": float, "alpha": float, "beta": float}


class ConfigError(Exception):
    """A bad config file or override; main() prints it as one line and exits 2."""


def _check_value(where, value, default):
    """Type-check one value against its default; ints are accepted where floats are expected."""
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    elif isinstance(default, list):
        ok = isinstance(value, list) or (where.endswith("apply_attn") and isinstance(value, bool))
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{where}: expected {type(default).__name__}, got {value!r}")
    key = where.rsplit(".", 1)[-1]
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(CHOICES[key])}")
    return value


def merge_config(user, source="config"):
    """Defaults < user dict. Keys starting with '_' are comments. Returns a validated nested dict."""
    cfg = copy.deepcopy(DEFAULTS)
    for key, value in user.items():
        if key.startswith("_"):
            continue
        if key not in DEFAULTS:
            raise ConfigError(f"{source}: unknown key '{key}' (allowed: {', '.join(DEFAULTS)})")
        if isinstance(DEFAULTS[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{key}' must be an object")
            for sub, v in value.items():
                if sub.startswith("_"):
                    continue
                if sub not in DEFAULTS[key]:
                    raise ConfigError(f"{source}: unknown key '{key}.{sub}' "
                                      f"(allowed: {', '.join(DEFAULTS[key])})")
                cfg[key][sub] = _check_value(f"{source}: {key}.{sub}", v, DEFAULTS[key][sub])
        else:
            cfg[key] = _check_value(f"{source}: {key}", value, DEFAULTS[key])
    validate_config(cfg, source)
    return cfg


def validate_config(cfg, source="config"):
    """Cross-key rules (decisions 1, 7, 12, 16). Raises ConfigError naming the key and what is allowed."""
    cur, tr = cfg["curriculum"], cfg["train"]
    for i, st in enumerate(cur["stages"]):
        where = f"{source}: curriculum.stages[{i}]"
        if not isinstance(st, dict):
            raise ConfigError(f"{where}: must be an object with t_min, t_max, epochs")
        for k in ("t_min", "t_max", "epochs"):
            if k not in st:
                raise ConfigError(f"{where}: missing '{k}'")
        for k, v in st.items():
            if k not in STAGE_KEYS:
                raise ConfigError(f"{where}: unknown key '{k}' (allowed: {', '.join(STAGE_KEYS)})")
            ok = isinstance(v, STAGE_KEYS[k]) or (STAGE_KEYS[k] is float and isinstance(v, int))
            if isinstance(v, bool) or not ok:
                raise ConfigError(f"{where}.{k}: expected {STAGE_KEYS[k].__name__}, got {v!r}")
        if not 0 <= st["t_min"] < st["t_max"] <= 1:
            raise ConfigError(f"{where}: need 0 <= t_min < t_max <= 1, got {st['t_min']}, {st['t_max']}")
        if st["epochs"] < 1:
            raise ConfigError(f"{where}.epochs: must be >= 1")
        if not 0 <= st.get("sparsity", 0) < 1:
            raise ConfigError(f"{where}.sparsity: must be in [0, 1)")
        if st.get("lambda", 0) < 0 or st.get("alpha", 1) <= 0 or st.get("beta", 1) <= 0:
            raise ConfigError(f"{where}: lambda must be >= 0 and alpha, beta > 0")
    if cur["enabled"] and not cur["stages"]:
        raise ConfigError(f"{source}: curriculum.enabled needs a non-empty curriculum.stages list")
    if cfg["sparsity"]["enabled"] and cfg["regularization"]["enabled"]:
        raise ConfigError(f"{source}: sparsity.enabled and regularization.enabled are both true; "
                          "choose one mode (CS or CR)")
    if (cfg["sparsity"]["enabled"] or cfg["regularization"]["enabled"]) and not cur["enabled"]:
        raise ConfigError(f"{source}: sparsity/regularization schedules are per curriculum stage; "
                          "set curriculum.enabled to true")
    if not 0 <= cfg["sparsity"]["initial_sparsity"] < 1:
        raise ConfigError(f"{source}: sparsity.initial_sparsity must be in [0, 1)")
    if cfg["regularization"]["lambda_max"] < 0:
        raise ConfigError(f"{source}: regularization.lambda_max must be >= 0")
    if tr["batch_size"] < 1 or tr["num_accum"] < 1 or tr["batch_size"] % tr["num_accum"]:
        raise ConfigError(f"{source}: train.batch_size ({tr['batch_size']}) must be a positive "
                          f"multiple of train.num_accum ({tr['num_accum']})")
    if cfg["diffusion"]["timesteps"] < 2 or tr["lr"] <= 0 or tr["log_intv"] < 1:
        raise ConfigError(f"{source}: need diffusion.timesteps >= 2, train.lr > 0, train.log_intv >= 1")
    if cur["mode"] == "soft" and any("alpha" not in s or "beta" not in s for s in cur["stages"]):
        raise ConfigError(f"{source}: curriculum.mode 'soft' needs 'alpha' and 'beta' in every stage")


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


def load_config(path=None, overrides=(), base=None):
    """Defaults < JSON file (or `base`, e.g. a checkpoint's stored config) < --key=value overrides."""
    user = copy.deepcopy(base) if base is not None else {}
    if path:
        try:
            with open(path) as f:
                user = json.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path} (see configs/ for the shipped ones)")
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e}); JSON has no comments: use a '_comment' key")
    for section, value in parse_overrides(overrides).items():
        if isinstance(value, dict) and isinstance(user.get(section), dict):
            user[section] = {**user[section], **value}
        elif isinstance(value, dict):
            user[section] = value
        else:
            user[section] = value
    return merge_config(user, path or "config")


def run_mode(cfg):
    """'base' | 'c' | 'cs' | 'cr', from the three `enabled` flags (the description's mode selection)."""
    if not cfg["curriculum"]["enabled"]:
        return "base"
    return "cs" if cfg["sparsity"]["enabled"] else "cr" if cfg["regularization"]["enabled"] else "c"


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
        "post_logvar": torch.log(torch.cat([post_var[1:2], post_var[1:]])),   # t=0 has var 0: clip the log
        "large_var": torch.cat([post_var[1:2], betas[1:]]),                  # fixed-large, as Ho et al.
        "post_coef1": betas * ab_prev.sqrt() / (1 - ab),                     # multiplies x0, eq. 7
        "post_coef2": alphas.sqrt() * (1 - ab_prev) / (1 - ab),             # multiplies xt, eq. 7
    }


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
# Curriculum (decisions 1-5): everything is a pure function of the epoch and the config.

def stage_of_epoch(epoch, stages):
    """Index of the stage that contains `epoch` (0-based); epochs past the list stay in the last stage."""
    for i, stage in enumerate(stages):
        if epoch < stage["epochs"]:
            return i
        epoch -= stage["epochs"]
    return len(stages) - 1


def stage_start_epoch(i, stages):
    """First epoch of stage i."""
    return sum(s["epochs"] for s in stages[:i])


def total_epochs(cfg):
    """Training length: the sum of stage epochs with the curriculum on (decision 3), else train.epochs."""
    if cfg["curriculum"]["enabled"]:
        return sum(s["epochs"] for s in cfg["curriculum"]["stages"])
    return cfg["train"]["epochs"]


def time_window(stage, T):
    """Half-open integer window [floor(t_min T), floor(t_max T)) of a stage, at least one step wide.

    The 1e-9 guards against 0.57 * 100 = 56.999... flooring to 56."""
    lo = min(math.floor(stage["t_min"] * T + 1e-9), T - 1)
    hi = min(math.floor(stage["t_max"] * T + 1e-9), T)
    return lo, max(hi, lo + 1)


def sample_t(n, lo, hi, generator, device="cpu"):
    """(n,) int64 timesteps uniform on [lo, hi) from an explicit generator (hard curriculum)."""
    return torch.randint(lo, hi, (n,), generator=generator, device=device)


def sample_t_soft(n, alpha, beta, T, generator):
    """(n,) int64 timesteps t = floor(u T), u ~ Beta(alpha, beta), by inverting the Beta CDF of
    uniforms from `generator` (so every rank's own seeded stream is used; decision 4). CPU tensor."""
    from scipy.special import betaincinv
    u = torch.rand(n, generator=generator, dtype=torch.float64).numpy()
    x = betaincinv(alpha, beta, u)
    return torch.from_numpy(np.minimum(np.floor(x * T), T - 1).astype(np.int64))


# ----------------------------------------------------------------------------------------------
# Sparsity (CS, decisions 6-10) and Group-L1 regularisation (CR, decisions 11-14).

def linear_decay(peak, i, num_stages):
    """peak * (S-1-i)/(S-1): the description's linear per-stage decay; 0 when S = 1."""
    return 0.0 if num_stages <= 1 else peak * (num_stages - 1 - i) / (num_stages - 1)


def stage_sparsity(stages, i, initial_sparsity):
    """Target fraction of masked bottleneck channels in stage i (a stage's 'sparsity' overrides)."""
    return stages[i].get("sparsity", linear_decay(initial_sparsity, i, len(stages)))


def stage_lambda(stages, i, lambda_max):
    """Group-L1 weight lambda in stage i (a stage's 'lambda' overrides)."""
    return stages[i].get("lambda", linear_decay(lambda_max, i, len(stages)))


def active_count(C, sparsity):
    """Channels kept on: max(1, round(C (1 - s))), rounding halves up (128 -> 26/51/77/102/128)."""
    return max(1, math.floor(C * (1 - sparsity) + 0.5))


def initial_mask(C, active, seed):
    """(C,) float 0/1 mask with `active` ones at seeded random positions: identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(C)
    mask[torch.randperm(C, generator=g)[:active]] = 1.0
    return mask


def gradient_score(conv2_weight_grad, mask):
    """(C,) per-output-channel sum |dL/dW| of the middle block's first ResBlock conv2, masked channels only."""
    return conv2_weight_grad.abs().sum(dim=(1, 2, 3)) * (1 - mask)


def taylor_score(mask_grad, mask):
    """(C,) |dL/dm_c|: first-order estimate of the loss change from switching channel c on."""
    return mask_grad.abs() * (1 - mask)


def random_score(C, seed, stage_index):
    """(C,) uniform scores from a generator keyed by (seed, stage): the same on every rank."""
    return torch.rand(C, generator=torch.Generator().manual_seed(seed * 1000 + stage_index))


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
    """[(name, nn.Conv2d)] of every convolution in the model, in module order (decision 11)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]


def group_l1(model):
    """P = sum over convs, sum over output channels c of ||W_c||_2 (biases not penalised)."""
    return sum(m.weight.flatten(1).norm(dim=1).sum() for _, m in conv_layers(model))


def objective(mse, penalty, lam, global_batch):
    """loss = mean(mse) + lam P / B with B the GLOBAL batch, so it does not depend on the world size
    (decision 13). Returns (loss, reg) where reg is the term actually added."""
    reg = lam * penalty / global_batch
    return mse.mean() + reg, reg


def small_norm_channels(model, threshold=1e-3):
    """{layer group: number of conv output channels with ||W_c||_2 < threshold} (what CR achieved)."""
    counts = {}
    for name, m in conv_layers(model):
        group = name.split(".")[0]
        counts[group] = counts.get(group, 0) + int((m.weight.flatten(1).norm(dim=1) < threshold).sum())
    return counts
