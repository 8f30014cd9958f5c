"""Does Jacobi preconditioning pay in a trained model? Trains the demo's model (`demo.py`'s options and preset), then
prints how far lambda spread over channels, and the validation loss and mean CG iterations per layer with plain CG
(`cg_precond='none'`) and with Jacobi-preconditioned CG, at the float32 floor and at `cg_tol=1e-4`.

    python benchmarks/lm/cg_precond_trained.py [demo.py options, e.g. --steps 200]
"""

import statistics
import sys

import torch

import common
import corpus
import demo


def main(argv=None) -> dict:
    model, data, cfg, device = demo.trained_model(sys.argv[1:] if argv is None else argv)
    val = corpus.fixed_windows(data.val, cfg['val_windows'], cfg['seq_len'] + 1)
    layers = [block.attn for block in model.model.layers]
    for i, layer in enumerate(layers):
        lamb = layer.get_lambda().detach()
        spread = (lamb.max(1).values / lamb.min(1).values).tolist()
        print(f"layer {i}: lambda in [{lamb.min():.3f}, {lamb.max():.3f}], max / min per head "
              f"{[round(r, 2) for r in spread]}")
    out = {}
    print("\n| stopping rule | CG | val loss | mean CG iterations per layer |\n|---|---|---|---|")
    for tol in (None, 1e-4):
        for precond in ('none', 'jacobi'):
            iters = [[] for _ in layers]
            for layer in layers:
                layer.cg_precond, layer.cg_tol, layer.cg_steps, layer.record_cg_iters = precond, tol, 30, True

            def grab():
                for i, layer in enumerate(layers):
                    iters[i].append(layer.last_cg_iters.float().mean().item())
            with torch.no_grad():
                loss = common.evaluate(model, val, device, on_batch=grab)['loss']
            means = [statistics.mean(v) for v in iters]
            out[(tol, precond)] = (loss, means)
            print(f"| {'fp32 floor' if tol is None else f'cg_tol={tol:g}'} | {precond} | {loss:.4f} | "
                  f"{' / '.join(f'{m:.2f}' for m in means)} |", flush=True)
    return out


if __name__ == '__main__':
    main()
