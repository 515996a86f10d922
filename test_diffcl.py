"""Tests for diffcl. Run: pytest test_diffcl.py  (CPU only, no network, no datasets needed)."""
import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

import diffcl as D
from unet import AttentionBlock, SamePad2d, UNet, timestep_embedding

HERE = Path(__file__).resolve().parent
F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# Config

def test_every_shipped_config_loads_with_the_mode_its_name_says():
    files = sorted(glob.glob(str(HERE / "configs" / "*.json")))
    assert len(files) >= 16
    for f in files:
        cfg = D.load_config(f)
        stem = Path(f).stem
        suffix = stem.rsplit("_", 1)[-1] if "_" in stem else "base"
        assert D.run_mode(cfg) == suffix, f


def test_description_cs_config_is_the_full_example():
    cfg = D.load_config(str(HERE / "configs" / "celeba32_cs.json"))
    assert cfg["model"] == {"in_channels": 3, "hid_channels": 64, "ch_multipliers": [1, 2, 2],
                            "num_res_blocks": 2, "apply_attn": [False] * 3, "drop_rate": 0.0,
                            "resample_with_conv": True}
    assert [s["t_min"] for s in cfg["curriculum"]["stages"]] == [0.8, 0.6, 0.4, 0.2, 0.0]
    assert [s["epochs"] for s in cfg["curriculum"]["stages"]] == [1, 1, 1, 2, 5]
    assert cfg["train"]["batch_size"] == 256 and cfg["sparsity"]["initial_sparsity"] == 0.8
    assert D.total_epochs(cfg) == 10            # stage epochs override train.epochs (decision 3)


def test_overrides_beat_file_beat_defaults(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"train": {"lr": 1e-3, "batch_size": 8}}))
    cfg = D.load_config(str(p), ["--train.lr=5e-4", "--epochs=3", "--dataset=fashion32"])
    assert cfg["train"]["lr"] == 5e-4 and cfg["train"]["epochs"] == 3
    assert cfg["train"]["batch_size"] == 8 and cfg["train"]["warmup"] == D.DEFAULTS["train"]["warmup"]
    assert cfg["dataset"] == "fashion32"
    assert isinstance(D.load_config(None, ["--train.lr=1"])["train"]["lr"], float)


STAGE = {"t_min": 0.5, "t_max": 1.0, "epochs": 1}
BAD_CONFIGS = [
    ({"trian": {}}, "unknown key 'trian'"),
    ({"train": {"lrr": 1}}, "unknown key 'train.lrr'"),
    ({"train": {"lr": "fast"}}, "train.lr: expected float"),
    ({"train": {"use_ema": 1}}, "train.use_ema: expected bool"),
    ({"diffusion": {"beta_schedule": "cosin"}}, "not one of"),
    ({"curriculum": {"enabled": True, "stages": [{"t_min": 0.9, "t_max": 0.5, "epochs": 1}]}}, "t_min < t_max"),
    ({"curriculum": {"enabled": True, "stages": [{"t_min": -0.1, "t_max": 0.5, "epochs": 1}]}}, "t_min < t_max"),
    ({"curriculum": {"enabled": True, "stages": [{"t_min": 0.1, "t_max": 1.5, "epochs": 1}]}}, "t_max <= 1"),
    ({"curriculum": {"enabled": True, "stages": [{"t_min": 0.1, "epochs": 1}]}}, "missing 't_max'"),
    ({"curriculum": {"enabled": True, "stages": [dict(STAGE, tmin=0)]}}, "unknown key 'tmin'"),
    ({"curriculum": {"enabled": True, "stages": []}}, "non-empty curriculum.stages"),
    ({"curriculum": {"enabled": True, "stages": [STAGE]}, "sparsity": {"enabled": True, "initial_sparsity": 1.0}},
     "initial_sparsity must be in [0, 1)"),
    ({"curriculum": {"enabled": True, "stages": [dict(STAGE, sparsity=1.2)]}}, "sparsity: must be in [0, 1)"),
    ({"curriculum": {"enabled": True, "stages": [STAGE]}, "regularization": {"enabled": True, "lambda_max": -1}},
     "lambda_max must be >= 0"),
    ({"curriculum": {"enabled": True, "stages": [STAGE]}, "sparsity": {"enabled": True},
      "regularization": {"enabled": True}}, "both true"),
    ({"sparsity": {"enabled": True}}, "set curriculum.enabled"),
    ({"train": {"batch_size": 10, "num_accum": 3}}, "multiple of train.num_accum"),
    ({"curriculum": {"enabled": True, "mode": "soft", "stages": [STAGE]}}, "needs 'alpha' and 'beta'"),
]


@pytest.mark.parametrize("user,message", BAD_CONFIGS)
def test_bad_config_gives_one_line_error_naming_the_key(user, message):
    with pytest.raises(D.ConfigError) as e:
        D.merge_config(user, "my.json")
    assert message in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("my.json")


def test_bad_override_and_missing_file_are_config_errors():
    with pytest.raises(D.ConfigError, match="--section.key=value"):
        D.load_config(None, ["--lr"])
    with pytest.raises(D.ConfigError, match="unknown override"):
        D.load_config(None, ["--nonsense=1"])
    with pytest.raises(D.ConfigError, match="not found"):
        D.load_config("/nonexistent/x.json")


# ---------------------------------------------------------------------------------------------
# Diffusion maths

def tables(T=1000, name="linear"):
    return D.diffusion_tables(D.beta_schedule(name, T))


@pytest.mark.parametrize("name", ["linear", "quad", "const", "jsd", "warmup10", "warmup50", "cosine"])
def test_beta_schedules_are_valid(name):
    b = D.beta_schedule(name, 1000)
    assert b.dtype == F64 and b.shape == (1000,) and (b > 0).all() and (b <= 1).all()
    ab = D.diffusion_tables(b)["alpha_bar"]
    assert (ab[1:] <= ab[:-1]).all() and ab[0] == 1 - b[0]


def test_beta_schedule_spot_values():
    lin = D.beta_schedule("linear", 1000)
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.02)
    assert lin[499].item() == pytest.approx(1e-4 + 499 * (0.02 - 1e-4) / 999)
    assert D.beta_schedule("quad", 1000)[-1].item() == pytest.approx(0.02)
    assert D.beta_schedule("jsd", 10)[0].item() == pytest.approx(0.1) and D.beta_schedule("jsd", 10)[-1] == 1
    w = D.beta_schedule("warmup10", 1000)
    assert w[99].item() == pytest.approx(0.02) and w[0].item() == pytest.approx(1e-4) and w[100] == 0.02
    cos = D.beta_schedule("cosine", 1000)
    assert cos.max().item() == pytest.approx(0.999)
    assert D.diffusion_tables(lin)["alpha_bar"][-1].item() == pytest.approx(4.04e-5, rel=0.01)


def test_q_sample_closed_forms_float64():
    tab = tables()
    t = torch.arange(0, 1000, 37)
    x0 = torch.randn(len(t), 3, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(x0.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    ab = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=F64), 0)[t].view(-1, 1, 1, 1)
    assert torch.allclose(D.q_sample(x0, t, torch.zeros_like(eps), tab), ab.sqrt() * x0, atol=1e-6)
    assert torch.allclose(D.q_sample(torch.zeros_like(x0), t, eps, tab), (1 - ab).sqrt() * eps, atol=1e-6)
    xt = D.q_sample(x0, t, eps, tab)
    assert torch.allclose(D.predict_x0(eps, xt, t, tab, "eps"), x0, atol=1e-6)


def test_sqrt_tables_are_accurate_after_casting_to_float32():
    tab = tables()
    t = torch.arange(1000)
    x = torch.zeros(1000, 1, dtype=torch.float32)
    exact = (1 - torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=F64), 0)).sqrt()
    got = D.extract(tab["sqrt_1m_ab"], t, x).flatten().double()
    assert ((got - exact).abs() / exact).max() < 1e-6


def test_posterior_matches_bayes_rule_closed_form():
    """q(x_{t-1}|x_t,x_0) from the product of Gaussians, computed independently in float64."""
    tab = tables()
    betas = D.beta_schedule("linear", 1000)
    ab = torch.cumprod(1 - betas, 0)
    g = torch.Generator().manual_seed(2)
    for t_ in [1, 2, 10, 500, 999]:
        t = torch.tensor([t_])
        x0, xt = torch.randn(1, 2, generator=g, dtype=F64), torch.randn(1, 2, generator=g, dtype=F64)
        # prior of x_{t-1} given x0: N(sqrt(ab_{t-1}) x0, 1 - ab_{t-1}); likelihood x_t | x_{t-1}: N(sqrt(a_t) x, b_t)
        prec = 1 / (1 - ab[t_ - 1]) + (1 - betas[t_]) / betas[t_]
        mean = (ab[t_ - 1].sqrt() * x0 / (1 - ab[t_ - 1]) + (1 - betas[t_]).sqrt() * xt / betas[t_]) / prec
        m, v = D.q_posterior(x0, xt, t, tab)
        assert torch.allclose(m, mean, atol=1e-6) and abs(v.item() - 1 / prec.item()) < 1e-9
    m, v = D.q_posterior(x0, xt, torch.tensor([0]), tab)
    assert v.item() == 0 and torch.allclose(m, x0)          # t = 0: the posterior collapses onto x0


@pytest.mark.parametrize("mean_type", ["eps", "x0", "mean"])
def test_parameterisations_are_consistent(mean_type):
    tab = tables()
    t = torch.tensor([3, 400, 999])
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(3, 1, 2, 2, dtype=F64, generator=g) * 2 - 1
    eps = torch.randn(x0.shape, dtype=F64, generator=g)
    xt = D.q_sample(x0, t, eps, tab)
    target = D.training_target(x0, xt, t, eps, tab, mean_type)
    assert torch.allclose(D.predict_x0(target, xt, t, tab, mean_type), x0, atol=1e-6)
    assert D.mse_per_sample(target, target).shape == (3,)


def test_ddpm_step_uses_posterior_mean_and_chosen_variance():
    tab = tables()
    g = torch.Generator().manual_seed(4)
    x0 = torch.rand(2, 1, 2, 2, dtype=F64, generator=g) * 2 - 1
    eps, z = torch.randn(x0.shape, dtype=F64, generator=g), torch.randn(x0.shape, dtype=F64, generator=g)
    t = torch.tensor([500, 0])
    xt = D.q_sample(x0, t, eps, tab)
    mean, var = D.q_posterior(x0, xt, t, tab)
    out = D.ddpm_step(eps, xt, t, tab, z)
    assert torch.allclose(out[0], mean[0] + var[0].sqrt() * z[0], atol=1e-6)
    assert torch.allclose(out[1], x0[1], atol=1e-6)         # last step returns the clipped x0, no noise
    large = D.ddpm_step(eps, xt, t, tab, z, var_type="fixed-large")
    assert torch.allclose(large[0], mean[0] + tab["betas"][500].sqrt() * z[0], atol=1e-6)


def test_ddim_with_eta_one_on_the_full_sequence_is_the_ancestral_step():
    tab = tables()
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand(4, 1, 3, 3, dtype=F64, generator=g) * 2 - 1
    eps, z = torch.randn(x0.shape, dtype=F64, generator=g), torch.randn(x0.shape, dtype=F64, generator=g)
    t = torch.tensor([1, 10, 500, 999])
    xt = D.q_sample(x0, t, eps, tab)
    out = eps + 0.1                                          # an imperfect network output
    ddim = D.ddim_step(out, xt, t, t - 1, tab, 1.0, z)
    ddpm = D.ddpm_step(out, xt, t, tab, z)
    assert torch.allclose(ddim, ddpm, atol=1e-6)
    mean0 = D.ddim_step(out, xt, t, t - 1, tab, 1.0, torch.zeros_like(z))
    assert torch.allclose(mean0, D.p_mean_var(out, xt, t, tab, "eps", "fixed-small")[0], atol=1e-6)


def test_ddim_eta_zero_is_deterministic_and_inverts_forward_process_with_true_eps():
    tab = tables()
    x0 = torch.rand(1, 1, 2, 2, dtype=F64) * 2 - 1
    eps = torch.randn(x0.shape, dtype=F64)
    t, t_prev = torch.tensor([700]), torch.tensor([300])
    x_prev = D.ddim_step(eps, D.q_sample(x0, t, eps, tab), t, t_prev, tab, 0.0, torch.randn(x0.shape, dtype=F64))
    assert torch.allclose(x_prev, D.q_sample(x0, t_prev, eps, tab), atol=1e-6)


@pytest.mark.parametrize("rule", ["uniform", "quadratic"])
@pytest.mark.parametrize("T", [10, 100, 999, 1000, 1001])
def test_ddim_timesteps_are_distinct_ordered_and_exact_length(rule, T):
    for steps in sorted({1, 2, 7, 10, 50, 100, 300, T - 1, T} & set(range(1, T + 1))):
        ts = D.ddim_timesteps(T, steps, rule)
        assert len(ts) == steps == len(set(ts)) and ts[-1] == 0 and max(ts) <= T - 1
        assert all(a > b for a, b in zip(ts, ts[1:]))
    with pytest.raises(ValueError, match="steps <= T"):
        D.ddim_timesteps(T, T + 1, rule)


def test_ddim_uniform_matches_reference_when_divisible():
    assert D.ddim_timesteps(1000, 50)[::-1] == list(range(0, 1000, 20))


# ---------------------------------------------------------------------------------------------
# Curriculum

DESC_STAGES = D.load_config(str(HERE / "configs" / "celeba32_c.json"))["curriculum"]["stages"]


@pytest.mark.parametrize("epoch,stage", [(0, 0), (1, 1), (2, 2), (3, 3), (4, 3), (5, 4), (9, 4), (10, 4), (99, 4)])
def test_stage_of_epoch_at_every_boundary_and_past_the_end(epoch, stage):
    assert D.stage_of_epoch(epoch, DESC_STAGES) == stage


def test_stage_start_epochs():
    assert [D.stage_start_epoch(i, DESC_STAGES) for i in range(5)] == [0, 1, 2, 3, 5]


def test_description_windows():
    windows = [D.time_window(s, 1000) for s in DESC_STAGES]
    assert windows == [(800, 1000), (600, 1000), (400, 1000), (200, 1000), (0, 1000)]


def test_window_edge_cases():
    assert D.time_window({"t_min": 0.57, "t_max": 1.0}, 100) == (57, 100)   # no float floor surprise
    assert D.time_window({"t_min": 0.5, "t_max": 0.5001}, 1000) == (500, 501)  # empty -> one step wide
    assert D.time_window({"t_min": 0.999, "t_max": 1.0}, 10) == (9, 10)
    assert D.time_window({"t_min": 0.0, "t_max": 0.25}, 1000) == (0, 250)


def test_sample_t_stays_in_window_hits_both_ends_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    t = D.sample_t(10000, 800, 1000, g)
    assert t.min() == 800 and t.max() == 999 and t.dtype == torch.int64
    assert torch.equal(D.sample_t(50, 0, 10, torch.Generator().manual_seed(1)),
                       D.sample_t(50, 0, 10, torch.Generator().manual_seed(1)))


def test_soft_curriculum_draws_follow_the_beta_distribution():
    from scipy import stats
    t = D.sample_t_soft(20000, 5.0, 1.0, 1000, torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() == 999                  # t = T-1 is reachable
    u = (t.double() + 0.5) / 1000
    assert stats.kstest(u.numpy(), stats.beta(5.0, 1.0).cdf).pvalue > 1e-3
    a = D.sample_t_soft(100, 2.0, 2.0, 1000, torch.Generator().manual_seed(7))
    assert torch.equal(a, D.sample_t_soft(100, 2.0, 2.0, 1000, torch.Generator().manual_seed(7)))


# ---------------------------------------------------------------------------------------------
# Sparsity and regularisation schedules

def test_description_sparsity_table():
    s = [D.stage_sparsity(DESC_STAGES, i, 0.8) for i in range(5)]
    assert s == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0])
    assert [D.active_count(128, x) for x in s] == [26, 51, 77, 102, 128]


def test_description_lambda_table():
    lam = [D.stage_lambda(DESC_STAGES, i, 3e-5) for i in range(5)]
    assert lam == pytest.approx([3.0e-5, 2.25e-5, 1.5e-5, 7.5e-6, 0.0], abs=1e-15)


def test_per_stage_overrides_win_and_single_stage_gives_zero():
    stages = [dict(STAGE, sparsity=0.5, **{"lambda": 1e-3}), dict(STAGE)]
    assert D.stage_sparsity(stages, 0, 0.8) == 0.5 and D.stage_sparsity(stages, 1, 0.8) == 0.0
    assert D.stage_lambda(stages, 0, 3e-5) == 1e-3 and D.stage_lambda(stages, 1, 3e-5) == 0.0
    assert D.stage_sparsity([STAGE], 0, 0.8) == 0.0


def test_active_count_rounding_and_floor_of_one():
    assert D.active_count(10, 0.25) == 8                      # 7.5 rounds half up
    assert D.active_count(4, 0.99) == 1 and D.active_count(256, 0.0) == 256


def test_initial_mask_is_seeded_and_has_the_right_count():
    m = D.initial_mask(128, 26, seed=3)
    assert m.sum() == 26 and set(m.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(m, D.initial_mask(128, 26, seed=3)) and not torch.equal(m, D.initial_mask(128, 26, 4))


def test_regrow_picks_top_scores_never_switches_off_and_records_birth():
    mask = torch.tensor([1., 0, 0, 1, 0, 0])
    birth = torch.tensor([0, -1, -1, 0, -1, -1])
    score = torch.tensor([9., 1, 5, 9, 5, 3])                 # channels 2 and 4 tie
    m, b, ids = D.regrow(mask, birth, score, 4, stage_index=2)
    assert ids == [2, 4] and m.tolist() == [1, 0, 1, 1, 1, 0] and b.tolist() == [0, -1, 2, 0, 2, -1]
    m2, b2, ids2 = D.regrow(mask, birth, score, 3, stage_index=2)
    assert ids2 == [2]                                       # tie broken towards the lower index
    m3, _, ids3 = D.regrow(m, b, torch.zeros(6), 2, stage_index=3)
    assert ids3 == [] and torch.equal(m3, m)                 # target already met: no-op, nothing switched off
    m4, _, _ = D.regrow(mask, birth, torch.zeros(6), 6, 1)
    assert m4.sum() == 6


def test_regrow_random_property():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        C = int(torch.randint(2, 40, (1,), generator=g))
        mask = (torch.rand(C, generator=g) < 0.3).float()
        target = int(torch.randint(1, C + 1, (1,), generator=g))
        m, b, ids = D.regrow(mask, torch.full((C,), -1), torch.rand(C, generator=g), target, 1)
        assert (m >= mask).all() and m.sum() == max(target, mask.sum())
        assert all(mask[i] == 0 for i in ids)


def test_scores_only_count_masked_channels():
    mask = torch.tensor([1., 0, 1, 0])
    grad = torch.ones(4, 2, 3, 3)
    assert D.gradient_score(grad, mask).tolist() == [0, 18, 0, 18]
    assert D.taylor_score(torch.tensor([-1., -2, 3, -4]), mask).tolist() == [0, 2, 0, 4]
    assert torch.equal(D.random_score(8, 0, 1), D.random_score(8, 0, 1))


def test_group_l1_equals_a_direct_loop_and_objective_composition():
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.ReLU(), torch.nn.Conv2d(3, 4, 1),
                              torch.nn.Linear(4, 4))
    direct = 0.0
    for m in net:
        if isinstance(m, torch.nn.Conv2d):
            for c in range(m.out_channels):
                direct += math.sqrt(sum(float(w) ** 2 for w in m.weight.detach()[c].flatten()))
    assert D.group_l1(net).item() == pytest.approx(direct, rel=1e-6)
    mse = torch.tensor([1.0, 3.0])
    loss, reg = D.objective(mse, torch.tensor(10.0), 0.5, 4)
    assert reg.item() == pytest.approx(1.25) and loss.item() == pytest.approx(2 + 1.25)


# ---------------------------------------------------------------------------------------------
# UNet (unet.py)

CELEBA32 = dict(in_channels=3, hid_channels=64, ch_multipliers=[1, 2, 2], num_res_blocks=2,
                apply_attn=[False, False, False], drop_rate=0.0)
CIFAR10 = dict(in_channels=3, hid_channels=128, ch_multipliers=[1, 2, 2, 2], num_res_blocks=2,
               apply_attn=[False, True, False, False], drop_rate=0.1)
TINY = dict(in_channels=3, hid_channels=32, ch_multipliers=[1, 2], num_res_blocks=1, apply_attn=[False, True])


def tiny(seed=0, **overrides):
    """A small UNet whose parameters are all redrawn at a useful scale (the zero-init layers would
    otherwise make every output ~1e-5 and every comparison trivial)."""
    torch.manual_seed(seed)
    model = UNet(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


def inputs(seed=1, channels=3, size=16, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=g), torch.tensor([3, 999])[:batch]


# Counts (decision 15 and the reference's table).

@pytest.mark.parametrize("cfg, params, convs, conv_out, bottleneck", [
    (CELEBA32, 6_140_675, 52, 5_827, 128),
    (CIFAR10, 35_746_307, 77, 20_611, 256),
])
def test_counts(cfg, params, convs, conv_out, bottleneck):
    model = UNet(**cfg)
    conv_layers = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(conv_layers) == convs
    assert sum(m.out_channels for m in conv_layers) == conv_out
    assert model.bottleneck_channels == bottleneck


# tqch/ddpm-torch parameter names.

def tqch_keys(hid_channels, ch_multipliers, num_res_blocks, apply_attn, **_):
    """State-dict keys of tqch's UNet, derived from its naming rules and the skip-connection data flow."""
    def params(prefix, names):
        return [f"{prefix}.{n}.{w}" for n in names for w in ("weight", "bias")]

    def block(prefix, cin, cout, attn):
        res = ("norm1", "conv1", "fc", "norm2", "conv2") + (("skip",) if cin != cout else ())
        if attn:
            return params(f"{prefix}.0", res) + params(f"{prefix}.1", ("norm", "project_in", "project_out"))
        return params(prefix, res)

    chs = [m * hid_channels for m in ch_multipliers]
    keys = params("embed", ("0", "2")) + ["in_conv.weight", "in_conv.bias"]
    skips, ch = [hid_channels], hid_channels  # channel count of every tensor pushed on the skip stack
    for i, c in enumerate(chs):
        for j in range(num_res_blocks):
            keys += block(f"downsamples.level_{i}.{j}", ch, c, apply_attn[i])
            skips.append(ch := c)
        if i < len(chs) - 1:
            keys += params(f"downsamples.level_{i}.{num_res_blocks}", ("1",))  # 0 is the SAME padding
            skips.append(c)
    keys += block("middle.0", ch, ch, False) + params("middle.1", ("norm", "project_in", "project_out"))
    keys += block("middle.2", ch, ch, False)
    for i in reversed(range(len(chs))):
        for j in range(num_res_blocks + 1):
            keys += block(f"upsamples.level_{i}.{j}", ch + skips.pop(), chs[i], apply_attn[i])
            ch = chs[i]
        if i > 0:
            keys += params(f"upsamples.level_{i}.{num_res_blocks + 1}", ("1",))  # 0 is the nearest upsample
    assert not skips
    return keys + params("out_conv", ("0", "2"))


@pytest.mark.parametrize("cfg", [CELEBA32, TINY])
def test_tqch_parameter_names(cfg):
    keys = list(UNet(**cfg).state_dict())
    assert sorted(keys) == sorted(tqch_keys(**cfg))
    assert len(keys) == len(set(keys))


def test_load_ddp_prefixed_state_dict():
    src, dst = tiny(seed=0), tiny(seed=1)
    x, t = inputs()
    ckpt = {f"module.{k}": v for k, v in src.state_dict().items()}  # as saved from a DDP wrapper
    dst.load_state_dict({k.removeprefix("module."): v for k, v in ckpt.items()}, strict=True)
    with torch.no_grad():
        assert torch.equal(dst(x, t), src(x, t))


def test_init_like_tf():
    model = UNet(**TINY)
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            assert torch.all(m.bias == 0), name
            fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(m.weight)
            zero_init = name.endswith(("conv2", "project_out")) or name == "out_conv.2"
            bound = math.sqrt((1e-10 if zero_init else 1.0) * 6 / (fan_in + fan_out))
            assert m.weight.abs().max() <= bound, name
            assert m.weight.abs().max() > 0.5 * bound, name  # uniform draws fill the range
        if isinstance(m, nn.GroupNorm):
            assert (m.num_groups, m.eps) == (32, 1e-6)


# Masked forward (decision 6).

def test_mask_of_ones_is_unmasked():
    model = tiny()
    x, t = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t, mask=torch.ones(model.bottleneck_channels)), model(x, t))


def test_mask_removes_off_channels_exactly():
    model = tiny()
    x, t = inputs()
    mask = torch.ones(model.bottleneck_channels)
    off, on = 5, 6
    mask[off] = 0.0
    with torch.no_grad():
        ref = model(x, t, mask=mask)
        last = model.middle[2].conv2  # the conv that writes the middle block's output channels
        last.weight[off] += 1.0
        last.bias[off] += 1.0
        assert torch.equal(model(x, t, mask=mask), ref)
        last.weight[on] += 1.0
        last.bias[on] += 1.0
        assert not torch.allclose(model(x, t, mask=mask), ref)


def test_mask_blocks_gradient_of_off_channels():
    model = tiny()
    x, t = inputs()
    mask = (torch.arange(model.bottleneck_channels) % 3 != 0).float()
    middle_out = []

    def keep(module, args, out):  # returns None, so the output is left as it is
        out.retain_grad()
        middle_out.append(out)

    model.middle.register_forward_hook(keep)
    model(x, t, mask=mask).square().sum().backward()
    grad = middle_out[0].grad
    assert torch.all(grad[:, mask == 0] == 0)
    assert torch.all(grad[:, mask == 1].abs().amax(dim=(0, 2, 3)) > 0)


def test_mask_shape_is_checked():
    model = tiny()
    x, t = inputs()
    with pytest.raises(AssertionError):
        model(x, t, mask=torch.ones(model.bottleneck_channels + 1))


# Blocks.

def test_sdpa_attention_matches_einsum():
    torch.manual_seed(0)
    block = AttentionBlock(64)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        x = torch.randn(2, 64, 8, 8)
        B, C, H, W = x.shape
        q, k, v = block.project_in(block.norm(x)).chunk(3, dim=1)
        w = torch.einsum("bcij,bckl->bijkl", q, k).reshape(B, H, W, H * W) / math.sqrt(C)
        w = torch.softmax(w, dim=-1).reshape(B, H, W, H, W)
        expected = x + block.project_out(torch.einsum("bijkl,bckl->bcij", w, v))
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_same_pad_like_tf():
    pad = SamePad2d()
    even = pad(torch.ones(1, 1, 4, 4))  # TF SAME, k=3, s=2: pad 0 before, 1 after
    assert even.shape[-2:] == (5, 5) and even[..., :4, :4].eq(1).all() and even[..., 4, :].eq(0).all()
    assert even[..., :, 4].eq(0).all()
    odd = pad(torch.ones(1, 1, 5, 5))  # 1 on each side
    assert odd.shape[-2:] == (7, 7) and odd[..., 1:6, 1:6].eq(1).all() and odd.sum() == 25


def test_timestep_embedding_fairseq_convention():
    emb = timestep_embedding(torch.tensor([0, 10]), 8)
    assert torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))
    freqs = 10000.0 ** (-torch.arange(4) / 3)  # first frequency 1, last 1/10000
    torch.testing.assert_close(emb[1], torch.cat([torch.sin(10 * freqs), torch.cos(10 * freqs)]))
    assert timestep_embedding(torch.tensor([7]), 9)[0, -1] == 0  # odd dim: zero column


# Shapes, dtypes, memory formats.

@pytest.mark.parametrize("in_channels, out_channels, expected", [(3, None, 3), (3, 6, 6), (1, None, 1)])
def test_output_shape(in_channels, out_channels, expected):
    model = tiny(in_channels=in_channels, out_channels=out_channels)
    x, t = inputs(channels=in_channels)
    with torch.no_grad():
        assert model(x, t).shape == (2, expected, 16, 16)


def test_bf16_autocast_is_finite():
    model = tiny()
    x, t = inputs()
    mask = (torch.arange(model.bottleneck_channels) % 2).float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, mask=mask)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_channels_last_matches_contiguous():
    model = tiny()
    x, t = inputs()
    with torch.no_grad():
        ref = model(x, t)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_avgpool_resampling_and_float_t():
    model = tiny(resample_with_conv=False, apply_attn=True)
    x, t = inputs()
    with torch.no_grad():
        assert torch.equal(model(x, t.float()), model(x, t))
    assert sum(isinstance(m, nn.Conv2d) and m.stride == (2, 2) for m in model.modules()) == 0
