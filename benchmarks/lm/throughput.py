"""Training throughput (forward + backward tokens/s) of equal-size models: fla_mesa's Mesa beside fla's MesaNet
and Gated DeltaNet (one GPU).

    python benchmarks/lm/throughput.py                                    # 340M size, T=2048
    python benchmarks/lm/throughput.py --models mesa --device cpu --hidden-size 64 --layers 2 --vocab-size 300 \
        --head-dim 32 --batch-size 1 --seq-len 64 --iters 1                # CPU smoke test

Default size: configs/mesa_340M.json's (hidden 1024, 24 blocks, 8 heads of 128, SwiGLU ratio 4, vocab 32000,
untied embeddings); fla's models get the same width, depth, heads and vocab through `zoo.build_model` (Gated
DeltaNet with expand_v 1). Each model: fp32 weights, bf16 autocast, fused norm/SwiGLU/cross-entropy, random
token ids; `--warmup` untimed steps (which compile and autotune), then the mean of `--iters` timed forward+backward
passes. Prints tokens/s, ms per step and peak memory, and our tokens/s over each of fla's.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the repo root on sys.path)
import torch  # noqa: E402
import zoo  # noqa: E402


def measure(name: str, args, device) -> dict:
    torch.manual_seed(0)
    model, info = zoo.build_model(name, args.hidden_size, args.layers, args.vocab_size, device,
                                  head_dim=args.head_dim, cg_steps=args.cg_steps, max_len=args.seq_len,
                                  tie_word_embeddings=False)
    ids = torch.randint(0, args.vocab_size, (args.batch_size, args.seq_len), device=device)

    def step():
        with common.autocast(device):
            loss = common.causal_lm_loss(model, ids)
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    t0 = common.now(device)
    for _ in range(args.iters):
        step()
    ms = (common.now(device) - t0) / args.iters * 1e3
    row = {'model': name, 'params': info['params'], 'ms_per_step': ms,
           'tokens_per_s': args.batch_size * args.seq_len / ms * 1e3,
           'peak_memory_gib': None if device.type != 'cuda' else torch.cuda.max_memory_allocated(device) / 2 ** 30}
    print(f"[throughput] {name}: {info['params'] / 1e6:.1f}M params, {ms:.1f} ms per forward+backward, "
          f"{row['tokens_per_s']:,.0f} tokens/s")
    del model
    if device.type == 'cuda':
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--models', default='mesa,mesanet,gated_deltanet')
    p.add_argument('--device', default='auto')
    p.add_argument('--hidden-size', type=int, default=1024)
    p.add_argument('--layers', type=int, default=24)
    p.add_argument('--head-dim', type=int, default=128)
    p.add_argument('--vocab-size', type=int, default=32000)
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--seq-len', type=int, default=2048)
    p.add_argument('--cg-steps', type=int, default=30)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--iters', type=int, default=10)
    p.add_argument('--out')
    args = p.parse_args(argv)
    device = common.setup_device(args.device, None)
    names = zoo.parse_models(args.models)
    print(f"versions: {common.versions()}\ndevice {device}, batch {args.batch_size} x {args.seq_len}, hidden "
          f"{args.hidden_size}, {args.layers} layers, heads of {args.head_dim}, vocab {args.vocab_size}, "
          f"{args.cg_steps} CG steps")
    rows = []
    for name in names:
        rows.append(measure(name, args, device))
        if args.out:
            common.write_json(args.out, {'args': vars(args), 'versions': common.versions(), 'rows': rows})
    ours = next((r for r in rows if r['model'] == 'mesa'), None)
    print("\n| model | params | ms / fwd+bwd | tokens/s | peak GiB | mesa tokens/s over this |\n|---|---|---|---|---|---|")
    for r in rows:
        peak = '' if r['peak_memory_gib'] is None else f"{r['peak_memory_gib']:.1f}"
        ratio = '' if ours is None else f"{ours['tokens_per_s'] / r['tokens_per_s']:.2f}"
        print(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['ms_per_step']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{peak} | {ratio} |")
    return rows


if __name__ == '__main__':
    main()
