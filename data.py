"""Datasets for diffcl: decode once into a uint8 (N, H, W, C) cache, then batch straight from memory.

    images = load_images("celeba32")      # np.memmap (162770, 32, 32, 3) uint8, built on first use
    for x0 in epoch_batches(images, 128, rank, world, seed, epoch, "cuda"):
        ...                               # float32 (128 // world, 3, 32, 32) in [-1, 1]

Datasets: celeba32, celeba64 (alias celeba), cifar10, fashion32, shapes (built in), folder:PATH.
Decoded images are cached as one .npy per (dataset, root, split, resolution) in ~/.cache/diffcl/ ($DIFFCL_CACHE
when set) with a JSON sidecar describing the source files; the cache is rebuilt when the sidecar no longer matches.

Preprocessing, as tqch/ddpm-torch: CelebA crops rows 40-188 and columns 15-163 of the aligned 178x218 image (a
centred 148x148 square) and resizes with PIL BILINEAR (antialiased when shrinking, as torchvision's Resize on PIL
images); Fashion-MNIST is zero-padded 28x28 -> 32x32 (the background is 0, so no pixel is resampled) and stays
single-channel; folder images are converted to RGB (alpha dropped), centre-cropped to the largest square and resized.
The cache is named <dataset>_<split>_<res>px_<hash of root>.npy; its sidecar records dataset, absolute root, split,
resolution, CACHE_VERSION and the number, total size and newest mtime of the source files. Both files are written
atomically (each process its own temporary name), so concurrent builds are correct, only wasteful. Measured
2026-11-26 on a 2-core x86-64 CPU: one core decodes ~1,900 CelebA images/s at 32x32; Fashion-MNIST caches in ~0.8 s.
Batches (`epoch_batches`): a permutation and flip coins keyed by (seed, epoch); rank r takes the r-th slice of each
global batch, so the union of the ranks' batches is the one-GPU batch; uint8 gathered with numpy, pinned for CUDA,
converted on the device (4x fewer bytes to copy than float32).
"""
import contextlib, errno, fcntl, gzip, hashlib, json, os, pickle, re, shutil, stat, tarfile, time, urllib.request, zlib
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from PIL import Image

DATASETS = ("celeba32", "celeba64", "celeba", "cifar10", "fashion32", "shapes")  # plus "folder:PATH"
INFO = {  # resolution, channels, default split, valid splits
    "celeba32": (32, 3, "train", ("train", "valid", "test", "all")),
    "celeba64": (64, 3, "all", ("train", "valid", "test", "all")),  # tqch trains CelebA-64 on all 202,599
    "cifar10": (32, 3, "train", ("train", "test", "all")),
    "fashion32": (32, 1, "train", ("train", "test", "all")),
    "shapes": (32, 3, "train", ("train", "test")),
    "folder": (32, 3, "all", ("all",)),
}
ROOT_HINT = "or pass --data_root=PATH"
CELEBA_BOX = (15, 40, 163, 188)  # PIL (left, top, right, bottom): rows 40-188, cols 15-163 of 178x218 (tqch)
CELEBA_PARTS = {"train": "0", "valid": "1", "test": "2"}
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"],
                 "all": [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]}
# Every global a CIFAR-10 batch pickle names: numpy's array rebuild (Python 2 and numpy 2 module paths), and the
# _codecs.encode that Python 3 uses for bytes at protocol 2. Anything else would run code: refused.
CIFAR_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                 ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
FASHION_FIX = "delete it and reinstall (apt-get install --reinstall dataset-fashion-mnist) or download it again"
FASHION_FILES = {"train": ["train-images-idx3-ubyte.gz"], "test": ["t10k-images-idx3-ubyte.gz"],
                 "all": ["train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"]}
FASHION_ROOTS = ("~/datasets/fashion-mnist", "/usr/share/datasets/fashion-mnist")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp")
SHAPES = {"train": (0, 10_000), "test": (1, 2_000)}  # split -> (seed, default number of images)
SHAPES_MAX_BYTES = 8 << 30  # shapes are generated in memory: refuse sizes that could only exhaust it
CACHE_VERSION = 1  # bump when preprocessing changes so old caches are rebuilt
POOL_MIN = 512  # decode fewer files than this in-process: a pool costs more than it saves
MAX_JSON_BYTES = 64 << 20  # configs, manifests, sidecars, compare.json: far smaller; more is a device or a mistake
TEMP_NAME = re.compile(r".+\.(\d{1,7})\.tmp")  # atomic_write's temporary names: <file>.<pid>.tmp
CACHE_ENV = "DIFFCL_CACHE"  # the image cache's folder when set (tests point it into their temporary folder)


class DataError(Exception):
    """A user-facing data problem; the message is one line naming the problem and the fix."""


def dataset_info(name):
    """{"resolution", "channels", "default_split"} of a dataset name (folder:PATH included)."""
    res, ch, split, _ = INFO[canonical(name)]
    return {"resolution": res, "channels": ch, "default_split": split}


def canonical(name):
    """Key of INFO for a user-facing dataset name; DataError for unknown names."""
    if name.startswith("folder:") and len(name) > 7:
        return "folder"
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)} or folder:PATH")
    return "celeba64" if name == "celeba" else name


def one_line(e):
    """An exception as one line of at most 200 characters (some messages are empty or span lines)."""
    return " ".join(str(e).split())[:200] or type(e).__name__


def shown(text):
    """`text` safe to print on any stream, strict UTF-8 included: the bytes of a file name that is not UTF-8 (held
    as surrogates by Python) become \\xNN escapes."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:                              # a lone surrogate that no file name produced
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


# ---------------------------------------------------------------------------- files
# The primitives every writer in diffcl uses: a file is created exclusively (never through a planted link), written
# whole or not at all, appended one record at a time; a folder is proven writable and locked by one process.

def regular_file(path, max_bytes=None):
    """Raise OSError unless `path` is a regular file (links followed) of at most max_bytes; call it before reading.
    Opening a FIFO blocks until a writer comes and a device such as /dev/zero reads until memory runs out; stat
    does neither."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a pipe" if stat.S_ISFIFO(st.st_mode) else "a device"
        raise OSError(errno.EINVAL, f"{kind}, not a regular file", path)
    if max_bytes is not None and st.st_size > max_bytes:
        raise OSError(errno.EFBIG, f"{st.st_size:,} bytes, more than such a file can hold ({max_bytes:,})", path)


def check_not_folder(*paths):
    """DataError naming the first of `paths` that is a folder (not a link to one), where a file is to be written:
    checked before the work, so the rename at the end cannot fail on it."""
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            raise DataError(f"{shown(str(path))} is a folder where a file goes; move it away (or write elsewhere), "
                            "then rerun")


def remove_stale_temps(folder, log=print):
    """Delete the temporary files (<file>.<pid>.tmp, see atomic_write) in `folder` whose process is gone: a SIGKILL
    during a write leaves one (a checkpoint's is as big as the checkpoint). Only regular files of that pattern; a
    live process's (any other pid that exists) and this process's own are kept. Returns the names removed."""
    removed, size = [], 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(folder):
            m = TEMP_NAME.fullmatch(entry.name)
            if not m or int(m[1]) == os.getpid() or not entry.is_file(follow_symlinks=False) or pid_alive(int(m[1])):
                continue
            with contextlib.suppress(OSError):
                size += entry.stat(follow_symlinks=False).st_size
                os.remove(entry.path)
                removed.append(entry.name)
    if removed:
        log(shown(f"{folder}: removed {len(removed)} temporary file(s) left by killed processes ({size / 2 ** 20:.1f} "
                  f"MiB), e.g. {removed[0]}"))
    return removed


def pid_alive(pid):
    """Whether a process with this pid exists (signal 0 checks without sending; EPERM: it exists, not ours)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exclusive_file(path):
    """Create `path` as a new empty file of ours, never through a link someone planted there (a shared folder)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)                     # a leftover of ours, or a planted link: the link goes, not its target
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644))


def atomic_write(path, content):
    """Write a file that is either whole or absent: `content` (str, bytes, or a function that writes a given file
    name) goes to a temporary name beside `path`, which then replaces `path`. On any failure, Ctrl-C included,
    the temporary file is removed and `path` is untouched. Readers never see the temporary names (*.tmp)."""
    check_not_folder(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        exclusive_file(tmp)
        if callable(content):
            content(tmp)
        else:
            with open(tmp, "w" if isinstance(content, str) else "wb") as f:
                f.write(content)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def append_jsonl(path, record):
    """One JSON object per line, written with a single call and flushed (never half a record)."""
    check_not_folder(path)
    try:                                                    # O_NOFOLLOW: never append through a planted link
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644), "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:                                    # disk full, a link, or the path became a folder
        raise DataError(f"cannot append to {path} ({e.strerror}); free disk space or fix that file, then rerun "
                        "to resume from the last checkpoint")


def read_jsonl(path):
    """[(line, record)] of a metrics file's JSON objects; torn or foreign lines (a hard kill, a bad edit) are left out."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(r, dict) and isinstance(r.get("step", 0), int):
                out.append((line if line.endswith("\n") else line + "\n", r))
    return out


def prepare_out_dir(out_dir, *subdirs):
    """Create a folder (and subfolders) and prove it is writable before any work starts."""
    try:
        for sub in subdirs or ("",):
            os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
        probe = os.path.join(out_dir, f".write-test.{os.getpid()}")
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW))
        os.remove(probe)
    except OSError as e:
        raise DataError(f"folder {out_dir} is not writable ({e.strerror}); choose another output path")


def lock_run_folder(out_dir, holder_kind="trainer"):
    """Take an exclusive lock on a run or image folder, or refuse with the holder's pid. The kernel drops the lock
    when its process dies, so a SIGKILLed run never leaves a stale lock. Keep the returned file open."""
    try:
        f = os.fdopen(os.open(os.path.join(out_dir, ".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW), "r+")
    except OSError as e:
        raise DataError(f"cannot open the lock file {out_dir}/.lock ({e.strerror}); it must be a plain file "
                        "this run made: delete it, or pass --out_dir=OTHER")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = f.read().strip() or "?"
        f.close()
        raise DataError(f"folder {out_dir} is in use by another {holder_kind} (pid {holder}); wait for it to "
                        f"finish, or choose another {'--out_dir' if holder_kind == 'trainer' else '--out'}")
    try:
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
    except OSError as e:                                    # a full disk
        f.close()
        raise DataError(f"cannot write {out_dir}/.lock ({e.strerror}); free disk space or choose another folder")
    return f


@contextlib.contextmanager
def locked_folder(out_dir, holder_kind, *subdirs):
    """prepare_out_dir and lock_run_folder for one block; after it (success or error) the lock is released and what
    this made is removed while empty, so a start that fails leaves nothing new behind."""
    made = not_yet_made(out_dir, *subdirs)
    try:
        prepare_out_dir(out_dir, *subdirs)
        with lock_run_folder(out_dir, holder_kind) as lock:
            yield lock
    finally:
        remove_made(made)


def not_yet_made(out_dir, *subdirs):
    """What prepare_out_dir(out_dir, *subdirs) and lock_run_folder would make that does not exist yet, deepest first
    (out_dir's missing parents too): remove_made undoes a failed start with this list."""
    made = [p for p in (os.path.join(out_dir, n) for n in (".lock", *subdirs)) if not os.path.lexists(p)]
    path = os.path.abspath(out_dir)
    while not os.path.lexists(path):
        made.append(path)
        path = os.path.dirname(path)
    return made


def remove_made(paths):
    """Remove, deepest first, what a failed start made (not_yet_made's list): the lock file, then each folder while it
    is empty. Anything else (files another process put there meanwhile) stays, and so do the folders holding it."""
    for p in paths:
        with contextlib.suppress(OSError):                   # a folder that is not empty is kept, on purpose
            os.remove(p) if os.path.basename(p) == ".lock" else os.rmdir(p)


# ---------------------------------------------------------------------------- load_images
def load_images(name, root=None, split=None, resolution=None, cache_dir=None, download=False, strict=False,
                log=print, num_images=None):
    """uint8 (N, H, W, C) images of a dataset split, decoded once and memory-mapped from the cache after that.
    num_images: for shapes, how many to generate; for the others, keep only the first num_images."""
    dataset = canonical(name)
    res, _, default_split, splits = INFO[dataset]
    split = split or default_split
    res = resolution or res
    if split not in splits:
        raise DataError(f"unknown split {split!r} for {name}: choose one of {', '.join(splits)}")
    for arg, value, low in (("resolution", res, 2), ("num_images", num_images, 1)):
        if value is not None and not (isinstance(value, (int, np.integer)) and value >= low):
            raise DataError(f"{arg} must be an integer >= {low}, got {value!r}")
    if dataset == "shapes":
        seed, n = SHAPES[split]
        n, need = num_images or n, (num_images or n) * res * res * 3
        if need > SHAPES_MAX_BYTES:
            raise DataError(f"shapes: {n:,} images of {res}x{res} would take {need / 2 ** 30:.0f} GiB; generate at most "
                            f"{SHAPES_MAX_BYTES // (res * res * 3):,} (lower data_limit)")
        return make_shapes(n, res, seed)
    root = checked_root(dataset, name, root, res)
    files = source_files(dataset, root, split, download, log)
    images = cached_decode(dataset, files, root, split, res, cache_dir, strict, log)
    return images[:num_images] if num_images else images


def checked_root(dataset, name, root, res):
    """The dataset's folder, absolute, after the checks that need no file: 32x32-only datasets, a file for a folder."""
    if dataset in ("cifar10", "fashion32") and res != 32:
        raise DataError(f"{name} is 32x32 only; resolution={res} is not supported, drop the resolution setting")
    root = os.path.abspath(os.path.expanduser(find_root(dataset, name, root)))
    if os.path.exists(root) and not os.path.isdir(root):
        raise DataError(f"{root} is a file, not a directory: point --data_root (or folder:PATH) at a folder")
    return root


def check_source(name, root=None, split=None, resolution=None, download=False):
    """Raise the DataError load_images would for a missing or misplaced dataset, reading no image and fetching
    nothing (with download, a missing CIFAR-10 is left for load_images to fetch). run.sh's check before torchrun."""
    dataset = canonical(name)
    res, _, default_split, splits = INFO[dataset]
    split = split or default_split
    if split not in splits:
        raise DataError(f"unknown split {split!r} for {name}: choose one of {', '.join(splits)}")
    if dataset == "shapes" or (download and dataset == "cifar10"):
        return
    source_files(dataset, checked_root(dataset, name, root, resolution or res), split, False, lambda *a: None)


def find_root(dataset, name, root):
    """The dataset's directory: the given root, else the per-dataset default (fashion32 searches two)."""
    if root is not None:
        return root
    if dataset == "folder":
        return name[len("folder:"):]
    if dataset == "fashion32":
        found = [r for r in FASHION_ROOTS if os.path.isfile(os.path.expanduser(r + "/train-images-idx3-ubyte.gz"))]
        return found[0] if found else FASHION_ROOTS[0]
    return "~/datasets/" + ("celeba" if dataset.startswith("celeba") else dataset)


def source_files(dataset, root, split, download, log):
    """Paths the split is read from (in order); DataError with the expected layout when they are missing."""
    if dataset.startswith("celeba"):
        listing = os.path.join(root, "list_eval_partition.txt")
        if not (os.path.isfile(listing) and os.path.isdir(os.path.join(root, "img_align_celeba"))):
            raise DataError(f"CelebA not found at {root}: expected img_align_celeba/*.jpg and list_eval_partition.txt"
                            f" (download 'Align&Cropped Images' and the partition file from the CelebA site), "
                            f"{ROOT_HINT}")
        try:
            with open(listing) as f:
                keep = [file for file, part in (line.split() for line in f if line.strip())
                        if split == "all" or part == CELEBA_PARTS[split]]
        except (OSError, ValueError) as e:  # unreadable, not text, or a line that is not "name part"
            raise DataError(f"cannot read {listing} ({one_line(e)}): use the official partition file") from None
        if not keep:
            raise DataError(f"{listing} lists no images for split {split!r}: use the official partition file")
        return [listing] + [os.path.join(root, "img_align_celeba", file) for file in keep]
    if dataset == "cifar10":
        tar = os.path.join(root, "cifar-10-python.tar.gz")
        if os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
            return [os.path.join(root, "cifar-10-batches-py", b) for b in CIFAR_BATCHES[split]]
        if not os.path.isfile(tar):
            if not download:
                raise DataError(f"CIFAR-10 not found at {root}: expected cifar-10-batches-py/ or "
                                f"cifar-10-python.tar.gz (from {CIFAR_URL}), {ROOT_HINT}, or add --download to "
                                "fetch it")
            fetch(CIFAR_URL, tar, CIFAR_MD5, log)
        return [tar]  # the split's batches are read straight from the tarball, no extraction
    if dataset == "fashion32":
        files = [os.path.join(root, n) for n in FASHION_FILES[split]]
        if not all(map(os.path.isfile, files)):
            raise DataError(f"Fashion-MNIST not found at {root} (default search: {', '.join(FASHION_ROOTS)}): "
                            f"expected {' and '.join(FASHION_FILES[split])}; run 'apt-get install "
                            f"dataset-fashion-mnist', {ROOT_HINT}")
        return files
    if not os.path.isdir(root):
        raise DataError(f"image folder {root} does not exist: point folder:PATH at a directory of images")
    # Regular files only (os.walk follows no directory links, so a link loop cannot recur): a FIFO or device named
    # x.png would block the decoder, a dangling link has nothing to read.
    named = sorted(os.path.join(d, f) for d, _, fs in os.walk(root, onerror=unlistable) for f in fs
                   if f.lower().endswith(IMAGE_EXTS))
    files = [f for f in named if os.path.isfile(f)]
    if len(files) < len(named):
        log(shown(f"{root}: skipped {len(named) - len(files)} entries that are not regular files (links to nothing, "
                  f"pipes, devices), e.g. {next(f for f in named if not os.path.isfile(f))}"))
    if not files:
        raise DataError(f"no {'/'.join(IMAGE_EXTS)} images under {root}: point folder:PATH at a directory of images")
    return files


def unlistable(e):
    """os.walk's onerror: a folder we cannot list would silently shrink the dataset, so stop instead."""
    raise DataError(f"cannot list {e.filename} ({e.strerror}): fix its permissions or move it out of the image folder")


def signature(files):
    """Count, total bytes, newest mtime and a digest of every file's (name, size, mtime, ctime): the cache is rebuilt
    when any file is added, removed, renamed, swapped or rewritten (ctime catches copies that keep an old mtime)."""
    stats, digest = [], hashlib.sha256()
    for f in files:  # one stat per file: CelebA has 202,599 of them
        try:
            st = os.stat(f)
        except FileNotFoundError:  # a missing CelebA jpg is reported by the decoder instead
            continue
        stats.append(st)
        digest.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode(errors="replace"))
    return {"files": len(stats), "bytes": sum(s.st_size for s in stats),
            "mtime_ns": max((s.st_mtime_ns for s in stats), default=0), "digest": digest.hexdigest()[:16]}


def fetch(url, path, md5, log):
    """Download url to path (via a .part file) and check its MD5; DataError saying what to do when offline."""
    log(f"downloading {url} to {path}")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with urllib.request.urlopen(url, timeout=60) as r, open(path + ".part", "wb") as f:
            shutil.copyfileobj(r, f)
    except (OSError, ValueError) as e:  # URLError is an OSError; ValueError for malformed URLs
        raise DataError(f"could not download {url} ({' '.join(str(e).split())}): "
                        f"download it by hand and put it at {path}") from None
    with open(path + ".part", "rb") as f:
        got = hashlib.file_digest(f, "md5").hexdigest()
    if got != md5:
        os.remove(path + ".part")
        raise DataError(f"{url} downloaded with MD5 {got}, expected {md5}: retry, or put the file at {path} by hand")
    os.replace(path + ".part", path)


# ---------------------------------------------------------------------------- decoding and cache
def cached_decode(dataset, files, root, split, res, cache_dir, strict, log):
    """The memory-mapped cache of the split, (re)built by decode() when its sidecar does not match the source."""
    source = {"dataset": dataset, "root": root, "split": split, "resolution": res, "version": CACHE_VERSION,
              **signature(files)}
    stem = f"{dataset}_{split}_{res}px_{hashlib.md5(root.encode()).hexdigest()[:8]}"
    path = os.path.join(cache_folder(cache_dir), stem + ".npy")
    remove_stale_temps(os.path.dirname(path), log)
    images, meta = read_cache(path, source)
    if meta is None:
        t0 = time.time()
        images, skipped = decode(dataset, files, split, res, root, log)
        meta = {"source": source, "shape": list(images.shape), "skipped": skipped}
        write_cache(path, images, meta)
        log(f"{dataset}: cached {len(images):,} images {images.shape[1:]} in {time.time() - t0:.1f} s at {path}")
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    if meta["skipped"]:
        report = shown(f"{len(meta['skipped'])} of {meta['shape'][0] + len(meta['skipped']):,} images in {root} "
                       f"could not be read (first: {'; '.join(meta['skipped'][:3])})")
        if strict:
            raise DataError(f"{report}: fix or remove them, or load without strict")
        log(f"warning: {report}; they are skipped")
    return images


def cache_folder(cache_dir=None):
    """Where decoded images are cached: cache_dir, else $DIFFCL_CACHE, else ~/.cache/diffcl (read at each call)."""
    return os.path.expanduser(cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/diffcl")


def decode(dataset, files, split, res, root, log):
    """(uint8 (N, res, res, C) images, ["name: reason" of each unreadable file]) for the split's source files."""
    if dataset == "cifar10":
        return read_cifar(files, split), []
    if dataset == "fashion32":
        # 28x28 -> 32x32 by 2 px of zero padding: Fashion-MNIST's background is 0, so no pixel is resampled.
        return np.pad(np.concatenate([read_idx(f) for f in files]), ((0, 0), (2, 2), (2, 2)))[..., None], []
    box = CELEBA_BOX if dataset.startswith("celeba") else None
    files = files[1:] if box else files  # CelebA's files[0] is the partition list
    images = np.empty((len(files), res, res, 3), np.uint8)
    ok, skipped, every, t0 = np.ones(len(files), bool), [], max(1000, len(files) // 10), time.time()
    for i, (img, err) in enumerate(parallel_map(decode_file, files, [box] * len(files), [res] * len(files))):
        if err:
            ok[i] = False
            skipped.append(f"{os.path.relpath(files[i], root)}: {err}")
        else:
            images[i] = img
        if (i + 1) % every == 0:
            rate = (i + 1) / (time.time() - t0)
            log(f"{dataset}: decoded {i + 1:,}/{len(files):,} images | {rate:,.0f} img/s | "
                f"ETA {(len(files) - i - 1) / rate:.0f} s")
    if not ok.any():
        raise DataError(shown(f"none of the {len(files)} images in {root} could be read (first: {skipped[0]})"))
    return (images if ok.all() else images[ok]), skipped


def parallel_map(fn, *args):
    """map(fn, *args) in order over all usable cores; in-process for small jobs, where workers cost more than help."""
    if len(args[0]) < POOL_MIN:
        yield from map(fn, *args)
        return
    with ProcessPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        yield from pool.map(fn, *args, chunksize=64)


def decode_file(path, box, res):
    """(uint8 (res, res, 3) image, None), or (None, reason) when the file cannot be read.
    box=None: centre square crop. Resize is PIL BILINEAR, which antialiases when reducing (as tqch's Resize)."""
    try:
        with Image.open(path) as img:
            if img.mode.startswith("I"):  # 16-bit greyscale ('I;16', or 'I' holding 0..65535): scale, do not clip
                a = np.asarray(img, dtype=np.float64)
                if a.min() < 0 or a.max() > 65535:
                    raise ValueError(f"{img.mode} pixels outside 0..65535 cannot be mapped to 8 bits")
                img = Image.fromarray(np.round(a / 257).astype(np.uint8))
            elif img.mode == "F":
                raise ValueError("floating-point images cannot be mapped to 8 bits faithfully; convert them first")
            img = img.convert("RGB")  # L, LA, P, RGBA, CMYK -> RGB (alpha is dropped)
        w, h = img.size
        if box is not None and (w, h) != (178, 218):
            raise ValueError(f"expected an aligned 178x218 CelebA image, got {w}x{h}")
        s = min(w, h)
        box = box or ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
        return np.asarray(img.crop(box).resize((res, res), Image.BILINEAR)), None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        return None, " ".join(str(e).split())[:120] or type(e).__name__


def read_cifar(files, split):
    """uint8 (N, 32, 32, 3) from the official python batches: the files themselves, or [the .tar.gz]."""
    try:
        if files[0].endswith(".tar.gz"):
            with tarfile.open(files[0], "r:gz") as tar:
                batches = [read_cifar_batch(tar.extractfile(f"cifar-10-batches-py/{b}"), f"{files[0]}:{b}")
                           for b in CIFAR_BATCHES[split]]
        else:
            batches = []
            for file in files:
                regular_file(file)  # a pipe named like a batch would block the open
                with open(file, "rb") as f:
                    batches.append(read_cifar_batch(f, file))
    except (OSError, EOFError, KeyError, tarfile.TarError, zlib.error) as e:
        raise DataError(f"{os.path.dirname(files[0])} does not hold the official CIFAR-10 python batches "
                        f"({type(e).__name__}: {one_line(e)}): download it again") from None
    return np.concatenate([b.reshape(-1, 3, 32, 32) for b in batches]).transpose(0, 2, 3, 1)


class CifarUnpickler(pickle.Unpickler):
    """Resolves only CIFAR_GLOBALS, so a crafted batch file cannot run code (pickle.load would run it)."""

    def find_class(self, module, name):
        if (module, name) not in CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"refuses to unpickle global {module}.{name}: not a CIFAR-10 batch")
        return super().find_class(module, name)


def read_cifar_batch(f, name):
    """uint8 (N, 3072) data of one batch pickle, checked to be a dict with b'data' and as many b'labels'."""
    try:
        batch = CifarUnpickler(f, encoding="bytes").load()  # Python 2 str -> bytes, as the official batches need
    except Exception as e:  # a damaged pickle can raise almost anything; find_class already stopped any code
        raise DataError(f"{name}: {one_line(e)}; delete it and download CIFAR-10 again") from None
    data, labels = (batch.get(b"data"), batch.get(b"labels")) if isinstance(batch, dict) else (None, None)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
            and isinstance(labels, list) and len(labels) == len(data)):
        raise DataError(f"{name} is not a CIFAR-10 batch (a dict with b'data' uint8 (N, 3072) and N b'labels'): "
                        f"delete it and download CIFAR-10 again")
    return data


def read_idx(path):
    """uint8 (N, 28, 28) from a gzipped IDX image file (big-endian header: magic 2051, N, rows, cols)."""
    try:
        with gzip.open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:  # not gzip / bad CRC: BadGzipFile (an OSError); cut short: EOFError
        raise DataError(f"cannot read {path} ({one_line(e)}): {FASHION_FIX}") from None
    if len(data) < 16:
        raise DataError(f"{path} is too short for an IDX header ({len(data)} bytes): {FASHION_FIX}")
    magic, n, rows, cols = map(int, np.frombuffer(data, ">i4", 4))  # Python ints: n * rows * cols must not wrap
    if magic != 2051:
        raise DataError(f"{path} is not an IDX image file (magic {magic}, expected 2051): {FASHION_FIX}")
    if (rows, cols) != (28, 28) or n < 0 or len(data) != 16 + n * rows * cols:
        raise DataError(f"{path} is truncated or corrupt: its header says {n} images of {rows}x{cols}, it holds "
                        f"{len(data) - 16} bytes of pixels: {FASHION_FIX}")
    return np.frombuffer(data, np.uint8, n * rows * cols, 16).reshape(n, rows, cols)


def read_cache(path, source):
    """(memmap, sidecar) if the cache was built from this source and is whole (a cut .npy fails), else (None, None)."""
    try:
        regular_file(path[:-4] + ".json", MAX_JSON_BYTES)
        regular_file(path)
        with open(path[:-4] + ".json") as f:
            meta = json.load(f)
        if not (isinstance(meta, dict) and meta.get("source") == source):
            return None, None
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None, None
    whole = images.dtype == np.uint8 and list(images.shape) == meta.get("shape")
    return (images, meta) if whole else (None, None)


def write_cache(path, images, meta):
    """Write the .npy and then its sidecar, each atomically."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        def save(tmp):
            with open(tmp, "wb") as f:  # a file object: np.save would append .npy to a bare name
                np.save(f, np.ascontiguousarray(images))
        atomic_write(path, save)
        atomic_write(path[:-4] + ".json", json.dumps(meta, indent=1))
    except OSError as e:  # unwritable or full disk, or cache_dir is a file: only our temporary file is removed
        raise DataError(f"cannot write the image cache {path} ({one_line(e)}): free disk space or pass a writable "
                        f"cache_dir (or set {CACHE_ENV})") from None


# ---------------------------------------------------------------------------- shapes (built in)
def make_shapes(n, res, seed):
    """uint8 (n, res, res, 3) procedural images, a pure function of (n, res, seed). Coarse structure: a two-colour
    gradient background and one or two large discs/squares; fine structure: 2-4 px stripes or checkers inside the
    shapes and 2x2 px dots. Vectorised over images, in chunks of 1024 to bound memory."""
    rng = np.random.default_rng(seed)
    y, x = (np.mgrid[:res, :res].astype(np.float32) + 0.5) / res  # pixel centres in [0, 1]
    iy, ix = np.mgrid[:res, :res]
    checkers = np.stack([(iy // c + ix // c) % 2 == 1 for c in (2, 3)])  # cell sizes 2 and 3 px
    out = np.empty((n, res, res, 3), np.uint8)
    for lo in range(0, n, 1024):
        m = min(1024, n - lo)
        u = lambda lo_, hi_, *shape: rng.uniform(lo_, hi_, (m, 1, 1, *shape)).astype(np.float32)
        angle, c0, c1 = u(0, 2 * np.pi), u(0, 1, 3), u(0, 1, 3)
        t = ((x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle)) * 0.7071 + 0.5  # in [0, 1] along the direction
        img = c0 + (c1 - c0) * t[..., None]
        for k in range(2):  # the second shape is present in half of the images
            cy, cx, r, present, square, striped = u(.25, .75), u(.25, .75), u(.12, .3), u(0, 1), u(0, 1), u(0, 1)
            period, direction, colour = u(2, 4) / res, u(0, np.pi), u(0, 1, 3)
            dist = np.where(square < .5, np.maximum(abs(x - cx), abs(y - cy)), np.hypot(x - cx, y - cy))
            inside = (dist < r) & (present < (1 if k == 0 else .5))
            stripes = np.sin((x * np.cos(direction) + y * np.sin(direction)) * (2 * np.pi / period)) > 0
            texture = np.where(striped < .5, stripes, checkers[rng.integers(0, 2, m)])
            np.copyto(img, colour, where=inside[..., None])
            np.copyto(img, 0.4 * colour + 0.6 * (1 - colour), where=(inside & texture)[..., None])  # high contrast
        out[lo:lo + m] = img * 255 + 0.5
        for _ in range(4):  # small dots, 2x2 px, painted by index since they cover only 4 pixels each
            (py, px), colour = rng.integers(0, res - 1, (2, m)), rng.integers(0, 256, (m, 3), np.uint8)
            for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
                out[np.arange(lo, lo + m), py + dy, px + dx] = colour
    return out


# ---------------------------------------------------------------------------- batches
def steps_per_epoch(num_images, global_batch):
    """Full global batches in one epoch (the ragged tail is dropped)."""
    if global_batch < 1:
        raise DataError(f"batch size must be at least 1, got {global_batch}")
    if num_images // global_batch == 0:
        raise DataError(f"{num_images} images make no full batch of {global_batch}: lower batch_size or add images")
    return num_images // global_batch


def epoch_batches(images, global_batch, rank, world, seed, epoch, device, start=0, flip=True):
    """This rank's float32 (global_batch // world, C, H, W) batches in [-1, 1] on `device` for one epoch.
    The order and the flips are keyed by (seed, epoch) only, so the union of the ranks' batches is the world=1 batch
    and resuming at batch `start` reproduces the rest of the epoch exactly."""
    if world < 1 or global_batch % world or not 0 <= rank < world:
        raise DataError(f"global batch {global_batch} must divide by world size {world} (rank {rank})")
    b, steps = global_batch // world, steps_per_epoch(len(images), global_batch)
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0]))
    perm = torch.randperm(len(images), generator=g)[:steps * global_batch].numpy()
    flips = (torch.rand(steps * global_batch, generator=g) < 0.5).numpy() & flip  # one coin per image of the epoch
    _, h, w, c = images.shape
    device = torch.device(device)
    if isinstance(images, torch.Tensor):  # resident on the device: index, flip and convert there, no host copy per step
        perm, flips = torch.from_numpy(perm).to(images.device), torch.from_numpy(flips).to(images.device)
        for j in range(start, steps):
            lo = j * global_batch + rank * b
            x = images[perm[lo:lo + b]].permute(0, 3, 1, 2)
            x = torch.where(flips[lo:lo + b, None, None, None], x.flip(3), x)
            yield x.float().div_(127.5).sub_(1)
        return
    for j in range(start, steps):
        lo = j * global_batch + rank * b
        # Gather, flip and reorder NHWC -> NCHW in uint8 with numpy on the host (into pinned memory for CUDA): these
        # copies are cheap, torch's uint8 permute/flip on CPU are not, and uint8 moves 4x fewer bytes to the device.
        x = torch.empty((b, c, h, w), dtype=torch.uint8, pin_memory=device.type == "cuda")
        xs, f = x.numpy(), flips[lo:lo + b]
        xs[...] = images[perm[lo:lo + b]].transpose(0, 3, 1, 2)
        xs[f] = xs[f, :, :, ::-1]
        # In-place div_/sub_: fresh 1.5 MB float buffers per op cost more than the arithmetic on CPU.
        yield x.to(device, non_blocking=True).float().div_(127.5).sub_(1)


def load_images_on_ranks(name, rank, world, **kw):
    """load_images in every process of a run: rank 0 decodes and caches first, then the others read its cache."""
    wait = torch.distributed.barrier if world > 1 else lambda: None
    if rank > 0:
        wait()
    images = load_images(name, **kw)
    if rank == 0:
        wait()
    return images


def held_out_images(name, n, resolution=None, root=None, train_split=None):
    """The first n images of a dataset's held-out split (test), uint8 (n, H, W, C). Refused when the training split
    contains it (celeba64 trains on 'all' by default): held-out images must never have been trained on."""
    dataset = canonical(name)
    if "test" not in INFO[dataset][3]:
        raise DataError(f"{name} has no test split to hold out; compare needs a dataset with one")
    if (train_split or INFO[dataset][2]) == "all":
        raise DataError(f"{name} trains on split 'all', which contains the held-out test split: pass "
                        "--data_split=train so the scores come from images the models never saw")
    return load_images(name, split="test", resolution=resolution, root=root, log=lambda *a: None)[:n]


def on_device(images, device, fraction=0.25):
    """The uint8 images as a tensor on a CUDA device when they take at most `fraction` of its free memory (CelebA-32
    and CIFAR-10 take a few hundred MB), so batches never touch host memory; else the host array unchanged."""
    device = torch.device(device)
    if device.type != "cuda" or images.nbytes > fraction * torch.cuda.mem_get_info(device)[0]:
        return images
    return torch.from_numpy(np.ascontiguousarray(images)).to(device)


def batches_from(images, global_batch, rank, world, seed, step, steps_per_epoch, device):
    """This rank's batches from optimizer `step` on, across epochs (so a resume needs no special case); the images
    move to the GPU once when they fit there."""
    images = on_device(images, device)
    epoch, skip = divmod(step, steps_per_epoch)
    while True:
        yield from epoch_batches(images, global_batch, rank, world, seed, epoch, device, start=skip)
        epoch, skip = epoch + 1, 0


def data_throughput(images, global_batch, device, seconds=2.0):
    """Images per second that epoch_batches delivers on `device` (one rank), measured for about `seconds`."""
    device, n, epoch, t0 = torch.device(device), 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for x in epoch_batches(images, global_batch, 0, 1, 0, epoch, device):
            n += len(x)
            if time.perf_counter() - t0 >= seconds:
                break
        epoch += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - t0)
