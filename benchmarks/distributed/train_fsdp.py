"""Data-parallel training of `MesaForCausalLM` with PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`, default)
or DDP, on the stdlib byte corpus (`benchmarks/lm/corpus.py`).

    torchrun --nproc_per_node 2 benchmarks/distributed/train_fsdp.py --check --device cpu --tiny    # gloo, CPU
    TRITON_F32_DEFAULT=ieee torchrun --nproc_per_node 2 benchmarks/distributed/train_fsdp.py --check  # NCCL, GPUs
    torchrun --nproc_per_node 2 benchmarks/distributed/train_fsdp.py --steps 200                    # just train
    python benchmarks/distributed/train_fsdp.py --check --device cpu --tiny                         # 1 process

Every rank draws the same global batch (seeded) and takes its contiguous slice of `global_batch / world_size` rows;
each rank's loss is the mean over its rows (equal token counts), and FSDP/DDP average the gradients, so a step equals
a single-process step on the whole global batch. The model is initialised identically on every rank (same seed).

`--check` (10 steps unless --steps says otherwise): after the distributed run, rank 0 trains a fresh single-process model (same seed, same global batches,
same optimiser) and prints, per step, both losses, then the max abs loss difference, the max abs difference of the
final parameters, and PASS/FAIL against `--tol` (default 1e-4 on CPU fp32; 2e-3 on CUDA). Run the CUDA check under
TRITON_F32_DEFAULT=ieee: with fla's default tf32 products the two runs' losses part by 2.7e-2 within 3 steps (Adam's
first steps turn rounding differences in near-zero gradients into lr-sized updates); under ieee they agree to 2.4e-6
for 3 steps and to 1.5e-3 over 10 (H200 x2, benchmarks/RESULTS.md). `--optimizer sgd` (plain SGD) takes Adam's
amplification out: on CPU with gloo, 2 processes, 5 tiny steps, the losses then agree to 4.8e-7. Give it a learning
rate at which training is stable: at --lr 1.0 on the default preset the loss jumps and the runs part after 3 steps.
On CUDA the backend is NCCL (leave NCCL's environment as the machine sets it, e.g. NCCL_NVLS_ENABLE=0); on CPU gloo.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', 'lm'))
import common  # noqa: E402  (puts the repo root on sys.path)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import corpus  # noqa: E402

PRESETS = {
    'default': dict(hidden_size=256, layers=4, head_dim=64, seq_len=512, global_batch=16, steps=50, lr=1e-3,
                    cg_steps=30),
    'tiny': dict(hidden_size=64, layers=2, head_dim=32, seq_len=64, global_batch=4, steps=5, lr=3e-3, cg_steps=5),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--mode', choices=('fsdp', 'ddp'), default='fsdp')
    p.add_argument('--check', action='store_true', help="compare with a single-process run of the same batches")
    p.add_argument('--tiny', action='store_true')
    p.add_argument('--device', default='auto', help="auto, cpu or cuda (each rank takes cuda:LOCAL_RANK)")
    for name, typ in (('steps', int), ('hidden-size', int), ('layers', int), ('head-dim', int), ('seq-len', int),
                      ('global-batch', int), ('lr', float), ('cg-steps', int)):
        p.add_argument(f'--{name}', type=typ)
    p.add_argument('--optimizer', choices=('adamw', 'sgd'), default='adamw',
                   help="sgd (plain, no momentum) for a --check that does not amplify rounding differences")
    p.add_argument('--tol', type=float, help="max abs loss difference allowed by --check")
    p.add_argument('--autocast', action='store_true', help="bf16 autocast on CUDA (not with --check)")
    p.add_argument('--seed', type=int, default=0)
    return p.parse_args(argv)


def log(msg: str, rank: int) -> None:
    if rank == 0:
        print(msg, flush=True)


def no_decay_names(model) -> set[str]:
    """Names of the parameters without weight decay, decided before wrapping (FSDP2 replaces the Parameter
    objects, which drops the `_no_weight_decay` flags)."""
    return {n for n, p in model.named_parameters() if common.no_weight_decay(n, p)}


def make_optimizer(model, lr: float, nd: set[str], kind: str = 'adamw'):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        n = n.replace('module.', '', 1) if n.startswith('module.') else n  # DDP prefix
        (no_decay if n in nd else decay).append(p)
    groups = [{'params': decay, 'weight_decay': 0.1}, {'params': no_decay, 'weight_decay': 0.0}]
    if kind == 'sgd':
        return torch.optim.SGD(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-8)


def build(cfg, device, seed):
    from fla_mesa import MesaForCausalLM
    torch.manual_seed(seed)
    config = common.mesa_config(cfg['hidden_size'], cfg['layers'], cfg['head_dim'], cfg['cg_steps'], device.type,
                                max_len=cfg['seq_len'])
    model = MesaForCausalLM(config)  # built on CPU from the seed: identical on every rank and in the reference
    return model.to(device)


def batches(data, cfg, seed):
    return corpus.TrainBatches(data.train, cfg['global_batch'], cfg['seq_len'], seed=seed)


def full_params(model) -> dict[str, torch.Tensor]:
    """Full (unsharded) parameters on CPU; collective under FSDP2 (every rank must call it)."""
    out = {}
    for n, p in model.named_parameters():
        t = p.detach()
        if hasattr(t, 'full_tensor'):
            t = t.full_tensor()
        out[n.replace('module.', '', 1) if n.startswith('module.') else n] = t.float().cpu()
    return out


def train(model, opt, data_iter, cfg, device, rank, world, use_ac, label) -> list[float]:
    per_rank = cfg['global_batch'] // world
    warmup = max(1, cfg['steps'] // 10)
    losses = []
    t0 = common.now(device)
    for step in range(cfg['steps']):
        ids = next(data_iter)[rank * per_rank:(rank + 1) * per_rank].to(device)
        loss = common.lm_train_step(model, opt, ids, common.lr_at(step, cfg['steps'], cfg['lr'], warmup), device,
                                    use_ac)
        lv = loss.detach().float()
        if world > 1:
            dist.all_reduce(lv, op=dist.ReduceOp.SUM)
            lv = lv / world
        losses.append(lv.item())
        if rank == 0 and (step % max(1, cfg['steps'] // 10) == 0 or step + 1 == cfg['steps']):
            el = common.now(device) - t0
            tok = (step + 1) * cfg['global_batch'] * cfg['seq_len']
            print(f"  [{label}] step {step + 1:>4}/{cfg['steps']}  loss {losses[-1]:.6f}  {tok / el:,.0f} tok/s",
                  flush=True)
    return losses


def main(argv=None) -> int:
    args = parse_args(argv)
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    dev_name = args.device
    if dev_name == 'auto':
        dev_name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if dev_name.startswith('cuda'):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: CUDA is not available")
        device = torch.device('cuda', local_rank if world > 1 else torch.device(dev_name).index or 0)
        torch.cuda.set_device(device)
        backend = 'nccl'
    else:
        device = torch.device('cpu')
        torch.set_num_threads(1)
        backend = 'gloo'
    if world > 1:
        dist.init_process_group(backend=backend)
    cfg = common.with_overrides(PRESETS['tiny' if args.tiny else 'default'], args)
    if args.check and args.steps is None:
        cfg['steps'] = min(cfg['steps'], 10)  # a check compares a few steps; trajectories drift apart later
    if cfg['global_batch'] % world:
        raise SystemExit(f"--global-batch {cfg['global_batch']} is not divisible by world size {world}")
    use_ac = args.autocast and device.type == 'cuda'
    if args.check and use_ac:
        raise SystemExit("--check compares fp32 runs; drop --autocast")
    tol = args.tol if args.tol is not None else (1e-4 if device.type == 'cpu' else 2e-3)

    log(f"versions: {common.versions()}", rank)
    log(f"mode {args.mode}, optimizer {args.optimizer}, world {world}, backend {backend if world > 1 else 'none'}, "
        f"device {device}, seed {args.seed}, config {cfg}" + (f", NCCL_NVLS_ENABLE={os.environ.get('NCCL_NVLS_ENABLE')}"
                                             if backend == 'nccl' else ''), rank)
    data = corpus.ByteCorpus.load(max_train_bytes=2_000_000 if args.tiny else None)
    log(data.describe(), rank)

    model = build(cfg, device, args.seed)
    nd = no_decay_names(model)
    if world > 1 and args.mode == 'fsdp':
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (world,))
        for block in model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # root: embeddings + tied lm_head + final norm
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[device.index] if device.type == 'cuda' else None)
    opt = make_optimizer(model, cfg['lr'], nd, args.optimizer)
    log(f"MesaForCausalLM {common.count_params(model) if world == 1 or args.mode == 'ddp' else '(sharded)'} params; "
        f"{cfg['global_batch'] // world} rows per rank", rank)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    dist_losses = train(model, opt, batches(data, cfg, args.seed), cfg, device, rank, world, use_ac,
                        f"{args.mode} x{world}" if world > 1 else "1 process")
    log(f"distributed run: {time.perf_counter() - t0:.1f}s" + (
        f", peak memory rank 0 {common.peak_memory_mb(device):.0f} MB" if device.type == 'cuda' else ''), rank)
    dist_params = full_params(model) if args.check else None

    status = 0
    if args.check:
        if rank == 0:
            ref = build(cfg, device, args.seed)
            ref_opt = make_optimizer(ref, cfg['lr'], no_decay_names(ref), args.optimizer)
            ref_losses = train(ref, ref_opt, batches(data, cfg, args.seed), cfg, device, 0, 1, False,
                               "single process")
            ref_params = full_params(ref)
            print(f"\n{'step':>4}  {'distributed':>14}  {'single':>14}  {'abs diff':>10}")
            for i, (a, b) in enumerate(zip(dist_losses, ref_losses)):
                print(f"{i + 1:>4}  {a:>14.8f}  {b:>14.8f}  {abs(a - b):>10.3e}")
            loss_diff = max(abs(a - b) for a, b in zip(dist_losses, ref_losses))
            missing = set(ref_params) ^ set(dist_params)
            param_diff = max((ref_params[n] - dist_params[n]).abs().max().item()
                             for n in ref_params if n in dist_params)
            ok = loss_diff <= tol and not missing
            print(f"\nmax abs loss difference {loss_diff:.3e} (tol {tol:g}); max abs final-parameter difference "
                  f"{param_diff:.3e}" + (f"; parameter names differ: {sorted(missing)}" if missing else ''))
            print(f"{'PASS' if ok else 'FAIL'}: {args.mode} with {world} process(es) vs single process, "
                  f"{cfg['steps']} steps")
            if world == 1:
                print("(world size 1: run under torchrun --nproc_per_node 2 for a real check)")
            status = 0 if ok else 1
        if world > 1:
            flag = torch.tensor([status], dtype=torch.int32, device=device if backend == 'nccl' else 'cpu')
            dist.broadcast(flag, src=0)
            status = int(flag.item())
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return status


if __name__ == '__main__':
    sys.exit(main())
