"""Byte-level language-modelling data from the Python standard library's own source files (no download).

Files: every `*.py` under `sysconfig.get_paths()['stdlib']`, sorted by their path relative to that directory,
skipping `site-packages`/`dist-packages` (installed third-party code, not the standard library) and, unless
`include_tests=True`, the standard library's test suites (directories named `test`, `tests`, `idle_test`).
About 730 files / 12 MB on CPython 3.11 without tests.

Split: a file is held out for validation when `int(first 8 bytes of sha1(relative path), big-endian) mod 10_000 <
val_fraction * 10_000`. The split depends only on the relative paths, so it is deterministic and the same on any
machine with the same stdlib.

Tokens: vocab of 258. Ids 0..255 are the raw bytes; `BOS = 256` starts every file and `EOS = 257` ends it. The
files of a split are concatenated (`BOS bytes EOS BOS bytes EOS ...`) into one stream.

Batches: training draws `batch_size` windows of `seq_len + 1` tokens at uniformly random offsets of the training
stream (a seeded `torch.Generator`); validation uses fixed windows at evenly spaced offsets of the validation stream
(the same windows every call). The scripts train on windows of `seq_len` tokens passed as both `input_ids` and
`labels` (the models shift the labels themselves: `seq_len - 1` targets; `seq_len` a multiple of the chunk size
keeps the kernels' chunks full), and evaluate windows of `seq_len + 1` as `input_ids = window[:, :-1]` with targets
`window[:, 1:]`.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass, field

import torch

BYTE_VOCAB = 256
BOS = 256
EOS = 257
VOCAB_SIZE = 258
SKIP_DIRS = frozenset({'site-packages', 'dist-packages', '__pycache__'})
TEST_DIRS = frozenset({'test', 'tests', 'idle_test'})


def stdlib_dir() -> str:
    return sysconfig.get_paths()['stdlib']


def list_files(root: str | None = None, include_tests: bool = False) -> list[str]:
    """Relative paths (POSIX separators) of the stdlib's `*.py` files, sorted."""
    root = root or stdlib_dir()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        parts = [] if rel_dir == '.' else rel_dir.split(os.sep)
        if any(p in SKIP_DIRS for p in parts) or (not include_tests and any(p in TEST_DIRS for p in parts)):
            dirnames[:] = []
            continue
        for name in filenames:
            if name.endswith('.py'):
                out.append('/'.join(parts + [name]))
    return sorted(out)


def is_validation(rel_path: str, val_fraction: float) -> bool:
    """Deterministic hash split of a relative path."""
    h = int.from_bytes(hashlib.sha1(rel_path.encode('utf-8')).digest()[:8], 'big')
    return h % 10_000 < round(val_fraction * 10_000)


def split_files(files: list[str], val_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    """(train, validation) file lists, both sorted; every file lands in exactly one."""
    train = [f for f in files if not is_validation(f, val_fraction)]
    val = [f for f in files if is_validation(f, val_fraction)]
    return train, val


def encode_files(files: list[str], root: str, max_bytes: int | None = None) -> torch.Tensor:
    """`BOS bytes EOS` per file, concatenated, as an int16 tensor (ids < 258). Stops adding files once the stream
    holds `max_bytes` tokens (the last file is kept whole)."""
    chunks, total = [], 0
    for rel in files:
        with open(os.path.join(root, *rel.split('/')), 'rb') as f:
            data = f.read()
        t = torch.empty(len(data) + 2, dtype=torch.int16)
        t[0], t[-1] = BOS, EOS
        if data:
            t[1:-1] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int16)
        chunks.append(t)
        total += t.numel()
        if max_bytes is not None and total >= max_bytes:
            break
    return torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.int16)


def decode(ids) -> str:
    """Token ids to text: bytes decoded as UTF-8 (invalid sequences replaced); BOS/EOS shown as `<bos>`/`<eos>`."""
    out, buf = [], bytearray()
    for i in (ids.tolist() if torch.is_tensor(ids) else ids):
        if i < BYTE_VOCAB:
            buf.append(i)
            continue
        out.append(buf.decode('utf-8', errors='replace'))
        buf = bytearray()
        out.append('<bos>' if i == BOS else '<eos>' if i == EOS else f'<{i}>')
    out.append(buf.decode('utf-8', errors='replace'))
    return ''.join(out)


def encode_text(text: str, bos: bool = True) -> torch.Tensor:
    ids = ([BOS] if bos else []) + list(text.encode('utf-8'))
    return torch.tensor(ids, dtype=torch.long)


@dataclass
class ByteCorpus:
    """Train/validation token streams of the stdlib corpus. `fingerprint` is a short hash of both streams, printed
    so that runs on different machines (different Python versions ship different stdlibs) can be told apart."""

    root: str
    train_files: list[str]
    val_files: list[str]
    train: torch.Tensor
    val: torch.Tensor
    fingerprint: str = field(default='')

    @classmethod
    def load(cls, val_fraction: float = 0.05, include_tests: bool = False, root: str | None = None,
             max_train_bytes: int | None = None, max_val_bytes: int | None = None) -> 'ByteCorpus':
        root = root or stdlib_dir()
        files = list_files(root, include_tests=include_tests)
        if not files:
            raise RuntimeError(f"no *.py files found under {root!r}")
        train_files, val_files = split_files(files, val_fraction)
        if not train_files or not val_files:
            raise RuntimeError(f"split of {len(files)} files at val_fraction={val_fraction} left a side empty")
        train = encode_files(train_files, root, max_train_bytes)
        val = encode_files(val_files, root, max_val_bytes)
        h = hashlib.sha1()
        for t in (train, val):
            h.update(t.numpy().tobytes())
        return cls(root, train_files, val_files, train, val, h.hexdigest()[:12])

    def describe(self) -> str:
        return (f"stdlib corpus {self.root}: {len(self.train_files)} train files ({self.train.numel():,} tokens), "
                f"{len(self.val_files)} validation files ({self.val.numel():,} tokens), vocab {VOCAB_SIZE} "
                f"(bytes 0-255, BOS={BOS}, EOS={EOS}), fingerprint {self.fingerprint}")


def random_windows(stream: torch.Tensor, batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """`[batch_size, length]` int64 windows at uniformly random offsets (drawn from `generator`)."""
    if stream.numel() < length:
        raise ValueError(f"stream of {stream.numel()} tokens is shorter than a window of {length}")
    starts = torch.randint(0, stream.numel() - length + 1, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(length)
    return stream[idx].long()


def fixed_windows(stream: torch.Tensor, num_windows: int, length: int) -> torch.Tensor:
    """`[n, length]` int64 windows at evenly spaced offsets covering the stream (non-overlapping while the stream
    is long enough; n = min(num_windows, stream length // length), at least 1)."""
    if stream.numel() < length:
        raise ValueError(f"stream of {stream.numel()} tokens is shorter than a window of {length}")
    n = max(1, min(num_windows, stream.numel() // length))
    starts = torch.linspace(0, stream.numel() - length, n).long()
    idx = starts[:, None] + torch.arange(length)
    return stream[idx].long()


class TrainBatches:
    """Infinite iterator of `[batch_size, seq_len]` training windows; seeded, so a run is reproducible. The
    same seed gives the same batches on any device (the generator lives on CPU)."""

    def __init__(self, stream: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0):
        self.stream, self.batch_size, self.seq_len = stream, batch_size, seq_len
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return random_windows(self.stream, self.batch_size, self.seq_len, self.generator)


def byte_mask(labels: torch.Tensor) -> torch.Tensor:
    """True where the target is a byte (not BOS/EOS): bits per byte count these targets only."""
    return labels < BYTE_VOCAB
