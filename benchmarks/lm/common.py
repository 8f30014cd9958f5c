"""Helpers shared by the LM demo, the model comparison, MQAR and the distributed script: device/precision choice,
Mesa config for the byte vocab, optimiser, schedule and training step, evaluation, CG-iteration telemetry, versions,
and the setup, JSON, plot and table reporting shared by the model comparison and MQAR.

The scripts put the repository root first on `sys.path` (`ensure_repo_on_path`), so they use this checkout's
`fla_mesa` even where an older (or namespace-only) editable install is on the path.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import time

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))


def ensure_repo_on_path() -> None:
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)


ensure_repo_on_path()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import zoo  # noqa: E402
from corpus import BOS, BYTE_VOCAB, EOS, VOCAB_SIZE  # noqa: E402


def pick_device(name: str = 'auto') -> torch.device:
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    dev = torch.device(name)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available here")
    return dev


def setup_device(name: str, threads: int | None) -> torch.device:
    """`pick_device(name)`, with `threads` torch CPU threads (default 1 on CPU)."""
    device = pick_device(name)
    if threads or device.type == 'cpu':
        torch.set_num_threads(threads or 1)
    return device


def with_overrides(cfg: dict, args) -> dict:
    """A copy of `cfg` where each key that `args` sets (not None) takes the value from `args`."""
    out = dict(cfg)
    for key in out:
        v = getattr(args, key, None)
        if v is not None:
            out[key] = v
    return out


def start_run(args, resolve) -> tuple[torch.device, dict, list[str], dict]:
    """Device and threads, `resolve(args)` config and `--models` of a model comparison (refusing fla's GPU-only
    models off CUDA); prints the versions and the setup. Returns (device, config, model names, versions)."""
    device = setup_device(args.device, args.threads)
    cfg = resolve(args)
    names = zoo.parse_models(args.models)
    if device.type != 'cuda':
        gpu_only = [n for n in names if n in zoo.GPU_ONLY]
        if gpu_only:
            raise SystemExit(f"{gpu_only} need CUDA (fla's Triton kernels); on CPU run --models mesa")
    vers = versions()
    print(f"versions: {vers}\nseed {args.seed}, device {device}, config {cfg}, models {names}")
    return device, cfg, names, vers


def write_json(path: str, obj) -> None:
    with open(path, 'w') as f:
        json.dump(obj, f, indent=2, default=str)


def show_plot(plot, results: list[dict], path: str) -> None:
    png = plot(results, path)
    print(f"plot: {png or 'not written (matplotlib is not installed)'}")


def merge_runs(paths: list[str], png: str, plot, table) -> dict:
    """Plot and print the table of the results of several `--out` files together (config of the first)."""
    runs = [json.load(open(p)) for p in paths]
    results = [r for run in runs for r in run['results']]
    cfg = runs[0]['config']
    show_plot(plot, results, png)
    print(table(results, cfg))
    return {'results': results, 'config': cfg}


def finish_run(args, out: dict, default_png: str, plot, table) -> dict:
    """Reports a finished comparison `out`: where `--out` went, the plot (`--png`, else next to `--out`, else
    `default_png`), versions and seed, then the table."""
    if args.out:
        print(f"results written to {args.out}")
    show_plot(plot, out['results'], args.png or (os.path.splitext(args.out)[0] + '.png' if args.out else default_png))
    print(f"versions: {out['versions']}; seed {args.seed}\n")
    print(table(out['results'], out['config']))
    return out


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA (fp32 weights, bf16 activations, as the paper), nothing elsewhere."""
    if device.type == 'cuda' and enabled:
        return torch.autocast('cuda', dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def now(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()


def versions() -> dict:
    out = {'python': platform.python_version(), 'torch': torch.__version__}
    for mod in ('fla', 'triton', 'transformers'):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            out[mod] = f'unavailable ({type(e).__name__})'
    try:
        import fla_mesa
        out['fla_mesa'] = getattr(fla_mesa, '__version__', '?')
    except Exception as e:  # noqa: BLE001
        out['fla_mesa'] = f'unavailable ({type(e).__name__})'
    if torch.cuda.is_available():
        out['gpu'] = torch.cuda.get_device_name()
    out['cpu_threads'] = torch.get_num_threads()
    try:
        import subprocess
        out['git'] = subprocess.run(['git', '-C', REPO_ROOT, 'describe', '--always', '--dirty'], capture_output=True,
                                    text=True, timeout=5).stdout.strip() or '?'
    except Exception:  # noqa: BLE001
        out['git'] = '?'
    return out


def mesa_config(hidden_size: int, num_layers: int, head_dim: int = 64, cg_steps: int = 30, device_type: str = 'cpu',
                vocab_size: int = VOCAB_SIZE, max_len: int = 2048, **overrides):
    """MesaConfig for the byte vocab: `hidden_size // head_dim` heads, SwiGLU MLP of ratio 4, tied embeddings. The
    fused Triton modules (norm, swiglu, cross entropy) are switched on only for CUDA."""
    from fla_mesa import MesaConfig
    if hidden_size % head_dim:
        raise ValueError(f"hidden_size={hidden_size} is not a multiple of head_dim={head_dim}")
    fused = device_type == 'cuda'
    kw = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_heads=hidden_size // head_dim, head_dim=head_dim,
              num_hidden_layers=num_layers, cg_steps=cg_steps, decode_cg_steps=cg_steps, bos_token_id=BOS,
              eos_token_id=EOS, pad_token_id=EOS, max_position_embeddings=max_len, tie_word_embeddings=True,
              fuse_norm=fused, fuse_swiglu=fused, fuse_cross_entropy=fused)
    kw.update(overrides)
    return MesaConfig(**kw)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are listed once


def no_weight_decay(name: str, p: torch.Tensor) -> bool:
    """Biases, norm weights, embeddings and parameters flagged `_no_weight_decay` (Mesa's lambda, Mamba-gate
    parameters) are not decayed."""
    return p.dim() < 2 or getattr(p, '_no_weight_decay', False) or 'embed' in name


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.98), eps: float = 1e-8,
                   fused: bool = False):
    """AdamW as the paper (wd 0.1, betas (0.9, 0.98)); no decay for the parameters of `no_weight_decay`."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if no_weight_decay(name, p):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}]
    kw = {'fused': True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kw)


def lr_at(step: int, total: int, peak: float, warmup: int, final_ratio: float = 0.1) -> float:
    """Linear warmup to `peak`, then cosine decay to `final_ratio * peak` at `total` (the paper's schedule shape)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g['lr'] = lr


def causal_lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss of a batch of windows (`ids` is `[B, T]`; the model shifts the labels itself)."""
    return model(input_ids=ids, labels=ids).loss


def optimizer_step(model: nn.Module, opt, loss: torch.Tensor) -> None:
    """Backward of `loss`, gradient norm clipped at 1, optimiser step, gradients cleared."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def lm_train_step(model: nn.Module, opt, ids: torch.Tensor, lr: float, device: torch.device,
                  use_autocast: bool = True) -> torch.Tensor:
    """One training step at learning rate `lr` on the next-token loss of `ids`; returns the loss."""
    set_lr(opt, lr)
    with autocast(device, use_autocast):
        loss = causal_lm_loss(model, ids)
    optimizer_step(model, opt, loss)
    return loss


@torch.no_grad()
def evaluate(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 16,
             use_autocast: bool = True, on_batch=None) -> dict:
    """Validation over fixed windows: `loss` (nats per token, all targets), `bpb` (bits per byte: byte targets only,
    BOS/EOS targets left out) and `tokens`. Computes the cross entropy itself from the logits (float32). Calls
    `on_batch()`, if given, after each batch."""
    was_training = model.training
    model.eval()
    tot_nats, tot_n, byte_nats, byte_n = 0.0, 0, 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i:i + batch_size].to(device)
        with autocast(device, use_autocast):
            logits = model(input_ids=ids[:, :-1]).logits
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction='none')
        is_byte = (ids[:, 1:] < BYTE_VOCAB).reshape(-1)
        tot_nats += nll.sum().item()
        tot_n += nll.numel()
        byte_nats += nll[is_byte].sum().item()
        byte_n += int(is_byte.sum())
        if on_batch is not None:
            on_batch()
    model.train(was_training)
    return {'loss': tot_nats / tot_n, 'bpb': byte_nats / max(1, byte_n) / math.log(2), 'tokens': tot_n}


def mesa_layers(model: nn.Module) -> list:
    from fla_mesa.layers import MesaAttention
    return [m for m in model.modules() if isinstance(m, MesaAttention)]


@contextlib.contextmanager
def cg_setting(model: nn.Module, cg_steps: int, cg_tol: float | None, record: bool = False,
               cg_init: str | None = None):
    """Temporarily sets every Mesa layer's `cg_steps`/`decode_cg_steps`/`cg_tol` (and `record_cg_iters`, and
    `cg_init` unless None)."""
    layers = mesa_layers(model)
    saved = [(m.cg_steps, m.decode_cg_steps, m.cg_tol, m.record_cg_iters, m.cg_init) for m in layers]
    try:
        for m in layers:
            m.cg_steps, m.decode_cg_steps, m.cg_tol, m.record_cg_iters = cg_steps, cg_steps, cg_tol, record
            m.cg_init = m.cg_init if cg_init is None else cg_init
            m.last_cg_iters = None
        yield layers
    finally:
        for m, (s, d, t, r, i) in zip(layers, saved):
            m.cg_steps, m.decode_cg_steps, m.cg_tol, m.record_cg_iters, m.cg_init = s, d, t, r, i


@torch.no_grad()
def cg_iteration_stats(model: nn.Module, windows: torch.Tensor, device: torch.device, cg_tol: float = 1e-4,
                       max_steps: int = 30, batch_size: int = 16, use_autocast: bool = True,
                       cg_init: str | None = None) -> dict:
    """Validation loss with CG stopped at relative residual `cg_tol` (at most `max_steps`; CG started as `cg_init`,
    default the layers' own), and the CG iterations
    the tokens needed, from the layers' `record_cg_iters`/`last_cg_iters` telemetry: per layer mean/median/max over
    all (token, head) pairs, plus the mean over heads per layer (`per_head_mean`)."""
    per_layer: dict[int, list] = {}
    with cg_setting(model, max_steps, cg_tol, record=True, cg_init=cg_init) as layers:
        def record():
            for j, m in enumerate(layers):
                if m.last_cg_iters is None:
                    raise RuntimeError(f"Mesa layer {j} recorded no CG iterations (record_cg_iters=True)")
                per_layer.setdefault(j, []).append(m.last_cg_iters.detach().cpu())

        ev = evaluate(model, windows, device, batch_size, use_autocast, on_batch=record)
    stats = {}
    for j, its in per_layer.items():
        it = torch.cat([t.reshape(-1, t.shape[-1]) for t in its]).float()  # [tokens, heads]
        stats[j] = {'mean': it.mean().item(), 'median': it.median().item(), 'max': int(it.max().item()),
                    'per_head_mean': [round(x, 2) for x in it.mean(0).tolist()]}
    all_mean = sum(s['mean'] for s in stats.values()) / max(1, len(stats))
    return {'loss': ev['loss'], 'bpb': ev['bpb'], 'cg_tol': cg_tol, 'max_steps': max_steps, 'mean_iters': all_mean,
            'layers': stats}


def format_cg_stats(st: dict) -> str:
    lines = [f"CG iterations at inference with tol {st['cg_tol']:g} (at most {st['max_steps']}), validation loss "
             f"{st['loss']:.4f}:",
             f"  {'layer':>5} {'mean':>7} {'median':>7} {'max':>5}  mean per head"]
    for j, s in st['layers'].items():
        lines.append(f"  {j:>5} {s['mean']:>7.2f} {s['median']:>7.1f} {s['max']:>5}  {s['per_head_mean']}")
    lines.append(f"  all layers: mean {st['mean_iters']:.2f}")
    return '\n'.join(lines)


TEST_TIME_SETTINGS = [(1, None), (2, None), (5, None), (10, None), (30, None), (30, 1e-2), (30, 1e-3), (30, 1e-4)]


@torch.no_grad()
def test_time_compute_table(model: nn.Module, windows: torch.Tensor, device: torch.device, prompt: torch.Tensor,
                            decode_tokens: int = 32, settings=TEST_TIME_SETTINGS, batch_size: int = 16) -> list[dict]:
    """The table the paper's reviewers asked for, one row per CG setting `(steps, tol)`: validation loss, mean CG
    iterations per token (all layers and heads), prefill ms per token (the validation pass), greedy decode ms per
    token (batch 1, cached, after `prompt`) and peak GPU memory of the two (None on CPU). `tol=None` still stops a
    token at the float32 floor, so a fixed count is an upper bound; the mean iterations say what ran."""
    rows = []
    model.eval()
    for steps, tol in settings:
        its = []
        with cg_setting(model, steps, tol, record=True) as layers:
            if device.type == 'cuda':
                torch.cuda.reset_peak_memory_stats(device)
            t0 = now(device)
            ev = evaluate(model, windows, device, batch_size,
                          on_batch=lambda: its.extend(m.last_cg_iters.float().mean().item() for m in layers))
            prefill = (now(device) - t0) / ev['tokens'] * 1e3
            ids = prompt.to(device)
            with autocast(device):
                model.generate(input_ids=ids, max_new_tokens=1, do_sample=False, use_cache=True)
                t0 = now(device)
                out = model.generate(input_ids=ids, max_new_tokens=decode_tokens, min_new_tokens=decode_tokens,
                                     do_sample=False, use_cache=True)
                decode = (now(device) - t0) / (out.shape[1] - ids.shape[1]) * 1e3
        rows.append({'cg_steps': steps, 'cg_tol': tol, 'loss': ev['loss'], 'bpb': ev['bpb'],
                     'mean_iters': sum(its) / len(its), 'prefill_ms_per_token': prefill,
                     'decode_ms_per_token': decode, 'peak_memory_mb': peak_memory_mb(device)})
    return rows


def format_test_time_table(rows: list[dict]) -> str:
    lines = ["| CG setting | val loss | bits/byte | mean CG iterations | prefill ms/token | decode ms/token "
             "| peak MiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        steps = f"{r['cg_steps']} step{'' if r['cg_steps'] == 1 else 's'}"
        name = steps if r['cg_tol'] is None else f"tol {r['cg_tol']:g} (<= {r['cg_steps']})"
        mem = '' if r['peak_memory_mb'] is None else f"{r['peak_memory_mb']:.0f}"
        lines.append(f"| {name} | {r['loss']:.4f} | {r['bpb']:.3f} | {r['mean_iters']:.2f} "
                     f"| {r['prefill_ms_per_token']:.4f} | {r['decode_ms_per_token']:.2f} | {mem} |")
    return '\n'.join(lines)


def peak_memory_mb(device: torch.device) -> float | None:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return None


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


class _PlainBar:
    """Stand-in for tqdm where it is not installed: prints `desc step/total postfix` about every 10%."""

    def __init__(self, iterable, desc='', disable=False, **_):
        self.items, self.desc, self.disable = list(iterable), desc, disable
        self.postfix = ''

    def __iter__(self):
        n = len(self.items)
        every = max(1, n // 10)
        for i, x in enumerate(self.items):
            yield x
            if not self.disable and ((i + 1) % every == 0 or i + 1 == n):
                print(f"{self.desc} {i + 1}/{n} {self.postfix}", flush=True)

    def set_postfix(self, **kw):
        self.postfix = ' '.join(f'{k}={v}' for k, v in kw.items())

    def close(self):
        pass


def progress(iterable, **kw):
    """tqdm progress bar, or a plain printer when tqdm is not installed."""
    try:
        from tqdm.auto import tqdm
    except Exception:  # noqa: BLE001
        return _PlainBar(iterable, **kw)
    return tqdm(iterable, **kw)
