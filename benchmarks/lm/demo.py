"""Train a small byte-level Mesa language model on the Python standard library's source, then evaluate it, count
the CG iterations its tokens need at inference and generate a sample.

    python benchmarks/lm/demo.py                 # CPU: a few minutes on 2 cores
    python benchmarks/lm/demo.py --big           # larger preset, meant for a GPU (picked automatically if present)

Data: `corpus.py` (bytes of the stdlib's *.py files, held-out files for validation; vocab 258 = 256 bytes + BOS +
EOS). Model: `MesaForCausalLM` from a `MesaConfig` (Mesa layers + SwiGLU MLPs, tied embeddings). Training uses a
fixed number of CG steps (`--cg-steps`, default 10 on the CPU preset for speed: the paper's appendix G.7 finds 10
sufficient; the paper trains with 30); evaluation reports the validation loss with that fixed count, then with CG
stopped at a relative residual `--eval-cg-tol` (default 1e-4, at most `--eval-cg-max` = 30 steps), along with how
many iterations the tokens needed per layer (the layers' `record_cg_iters` telemetry), then the test-time-compute
table the paper's reviewers asked for (validation loss, mean CG iterations, prefill and greedy-decode ms per token,
peak GPU memory) at 1, 2, 5, 10 and 30 steps and at tolerances 1e-2, 1e-3 and 1e-4.
On CUDA: bf16 autocast (fp32 weights) and fla's fused Triton modules.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time

T_START = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repo root on sys.path)

import torch  # noqa: E402

import corpus  # noqa: E402

PRESETS = {
    # name: hidden, layers, head_dim, seq_len, batch, steps, lr, cg_steps, val_windows, gen_tokens
    'cpu': dict(hidden_size=128, layers=2, head_dim=64, seq_len=128, batch_size=8, steps=500, lr=3e-3, cg_steps=10,
                val_windows=32, gen_tokens=160),
    'big': dict(hidden_size=512, layers=6, head_dim=128, seq_len=512, batch_size=32, steps=1000, lr=2e-3,
                cg_steps=30, val_windows=256, gen_tokens=400),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='auto', help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument('--big', action='store_true', help="larger preset (default on CUDA unless --small)")
    p.add_argument('--small', action='store_true', help="CPU preset even on CUDA")
    p.add_argument('--steps', type=int)
    p.add_argument('--seq-len', type=int)
    p.add_argument('--batch-size', type=int)
    p.add_argument('--hidden-size', type=int)
    p.add_argument('--layers', type=int)
    p.add_argument('--head-dim', type=int)
    p.add_argument('--lr', type=float)
    p.add_argument('--cg-steps', type=int, help="CG steps in training (fixed count)")
    p.add_argument('--eval-cg-tol', type=float, default=1e-4)
    p.add_argument('--eval-cg-max', type=int, default=30)
    p.add_argument('--val-windows', type=int)
    p.add_argument('--table-decode-tokens', type=int, default=64,
                   help="greedy tokens decoded per CG setting for the decode ms/token column")
    p.add_argument('--gen-tokens', type=int)
    p.add_argument('--prompt', default='def ')
    p.add_argument('--temperature', type=float, default=0.8)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int,
                   help="torch CPU threads (default on CPU: 1; this model's ops are small, and on a busy 2-core "
                        "machine 2 OpenMP threads were measured up to 20x slower than 1)")
    p.add_argument('--no-progress', action='store_true', help="no tqdm bar")
    p.add_argument('--out', help="write the metrics as JSON here")
    return p.parse_args(argv)


def resolve(args, device):
    preset = 'big' if (args.big or (device.type == 'cuda' and not args.small)) else 'cpu'
    return common.with_overrides(dict(PRESETS[preset], preset=preset), args)


def train(model, data, cfg: dict, device, seed: int, progress: bool = True) -> tuple[list[float], float]:
    """`cfg['steps']` AdamW steps (warm-up + cosine to `cfg['lr']`) on seeded random training windows; returns the
    losses and the training wall time."""
    opt = common.make_optimizer(model, cfg['lr'], fused=device.type == 'cuda')
    batches = corpus.TrainBatches(data.train, cfg['batch_size'], cfg['seq_len'], seed=seed)
    warmup = max(1, cfg['steps'] // 10)
    losses = []
    model.train()
    t_train0 = common.now(device)
    bar = common.progress(range(cfg['steps']), desc='train', disable=not progress, dynamic_ncols=True,
                          mininterval=1.0)
    for step in bar:
        ids = next(batches).to(device, non_blocking=True)
        loss = common.lm_train_step(model, opt, ids, common.lr_at(step, cfg['steps'], cfg['lr'], warmup), device)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"non-finite training loss at step {step}: {losses[-1]}")
        bar.set_postfix(loss=f'{losses[-1]:.3f}')
    bar.close()
    return losses, common.now(device) - t_train0


def mesa_model(cfg: dict, device):
    """The demo's MesaForCausalLM for `cfg` (`resolve`'s), on `device`, initialised from torch's current seed."""
    from fla_mesa import MesaForCausalLM
    config = common.mesa_config(cfg['hidden_size'], cfg['layers'], cfg['head_dim'], cfg['cg_steps'], device.type,
                                max_len=max(2048, cfg['seq_len']))
    return MesaForCausalLM(config).to(device)


def trained_model(argv) -> tuple:
    """The demo's model trained as `main` trains it, for the studies of a trained model (`argv`: their options,
    `parse_args`'s; no progress bar). Returns `(model, data, cfg, device)`."""
    args = parse_args(['--no-progress'] + list(argv))
    device = common.setup_device(args.device, args.threads)
    cfg = resolve(args, device)
    torch.manual_seed(args.seed)
    data = corpus.ByteCorpus.load()
    model = mesa_model(cfg, device)
    losses, train_s = train(model, data, cfg, device, args.seed, progress=False)
    print(f"trained {cfg['steps']} steps in {train_s:.0f}s, mean loss of the last 10 "
          f"{statistics.mean(losses[-10:]):.4f}")
    return model, data, cfg, device


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = common.setup_device(args.device, args.threads)
    cfg = resolve(args, device)
    torch.manual_seed(args.seed)

    print(f"versions: {common.versions()}")
    print(f"device {device}, preset '{cfg['preset']}', seed {args.seed}")
    t0 = time.perf_counter()
    data = corpus.ByteCorpus.load()
    print(data.describe() + f"  [{time.perf_counter() - t0:.1f}s]")

    model = mesa_model(cfg, device)
    n_params = common.count_params(model)
    print(f"MesaForCausalLM: hidden {cfg['hidden_size']}, {cfg['layers']} layers, {model.config.num_heads} heads x "
          f"{cfg['head_dim']}, {n_params / 1e6:.2f}M params; training CG steps {cfg['cg_steps']}; "
          f"seq {cfg['seq_len']} x batch {cfg['batch_size']} x {cfg['steps']} steps, peak lr {cfg['lr']:g}")

    val = corpus.fixed_windows(data.val, cfg['val_windows'], cfg['seq_len'] + 1)

    t_eval0 = time.perf_counter()
    val_start = common.evaluate(model, val, device)
    t_eval = time.perf_counter() - t_eval0
    print(f"validation before training: loss {val_start['loss']:.4f}, {val_start['bpb']:.3f} bits/byte "
          f"(uniform over 258 ids: {math.log(258):.4f}) [{t_eval:.1f}s]")

    losses, train_s = train(model, data, cfg, device, args.seed, progress=not args.no_progress)
    tokens = cfg['steps'] * cfg['batch_size'] * cfg['seq_len']
    k = max(1, min(10, len(losses) // 5))
    print(f"trained {cfg['steps']} steps ({tokens:,} tokens) in {train_s:.1f}s ({tokens / train_s:,.0f} tok/s); "
          f"train loss first {losses[0]:.4f}, mean of first {k} {statistics.mean(losses[:k]):.4f}, "
          f"mean of last {k} {statistics.mean(losses[-k:]):.4f}")

    t_eval0 = time.perf_counter()
    val_end = common.evaluate(model, val, device)
    print(f"validation after training ({cfg['cg_steps']} CG steps): loss {val_end['loss']:.4f}, "
          f"{val_end['bpb']:.3f} bits/byte  (start {val_start['loss']:.4f} -> end {val_end['loss']:.4f}) "
          f"[{time.perf_counter() - t_eval0:.1f}s]")

    t_cg0 = time.perf_counter()
    cg = common.cg_iteration_stats(model, val, device, cg_tol=args.eval_cg_tol, max_steps=args.eval_cg_max)
    print(common.format_cg_stats(cg) + f"  [{time.perf_counter() - t_cg0:.1f}s]")

    prompt = corpus.encode_text(args.prompt)[None].to(device)
    t_tab0 = time.perf_counter()
    table = common.test_time_compute_table(model, val, device, prompt, decode_tokens=args.table_decode_tokens)
    print(f"test-time compute: validation loss, CG iterations and speed per CG setting "
          f"[{time.perf_counter() - t_tab0:.1f}s]\n" + common.format_test_time_table(table))

    t_gen0 = time.perf_counter()
    model.eval()
    torch.manual_seed(args.seed)  # sampling draws from the global generator
    with torch.no_grad(), common.autocast(device):
        out = model.generate(input_ids=prompt, max_new_tokens=cfg['gen_tokens'], do_sample=True,
                             temperature=args.temperature, top_k=40, pad_token_id=corpus.EOS,
                             eos_token_id=corpus.EOS, use_cache=True)
    sample = corpus.decode(out[0, 1:].cpu())
    gen_s = time.perf_counter() - t_gen0
    n_new = out.shape[1] - prompt.shape[1]
    print(f"sample ({n_new} new bytes, {cfg['cg_steps']} CG steps per decoded token, temperature "
          f"{args.temperature}, top-k 40) [{gen_s:.1f}s]:\n{'-' * 60}\n{sample}\n{'-' * 60}")

    total_s = time.perf_counter() - T_START
    print(f"total wall time {total_s:.1f}s (including imports and data)")
    metrics = {
        'preset': cfg['preset'], 'device': str(device), 'seed': args.seed, 'config': cfg, 'params': n_params,
        'versions': common.versions(), 'corpus_fingerprint': data.fingerprint,
        'val_start': val_start, 'val_end': val_end, 'train_loss_first': losses[0],
        'train_loss_last_mean': statistics.mean(losses[-k:]), 'train_losses': losses, 'train_seconds': train_s,
        'tokens_per_second': tokens / train_s, 'cg_tol_eval': cg, 'test_time_table': table, 'sample': sample,
        'total_seconds': total_s,
        'peak_memory_mb': common.peak_memory_mb(device),
    }
    if args.out:
        common.write_json(args.out, metrics)
        print(f"metrics written to {args.out}")
    return metrics


if __name__ == '__main__':
    main()
