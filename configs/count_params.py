"""Instantiates every configs/mesa_*.json on the meta device and prints its parameter counts.

    python configs/count_params.py [config.json ...]
"""

import glob
import json
import os
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import fla_mesa  # noqa: F401  (registers the 'mesa' model type)


def count(path: str) -> dict:
    with open(path) as f:
        config = AutoConfig.for_model(**json.load(f))
    with torch.device('meta'):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())  # shared (tied) parameters are listed once
    embedding = model.model.embeddings.weight.numel()
    head = 0 if model.lm_head.weight is model.model.embeddings.weight else model.lm_head.weight.numel()
    mixer = sum(p.numel() for layer in model.model.layers for p in layer.attn.parameters())
    mlp = sum(p.numel() for layer in model.model.layers for p in layer.mlp.parameters())
    return dict(total=total, non_embedding=total - embedding - head, embedding=embedding, lm_head=head,
                mixers=mixer, mlps=mlp, tied=config.tie_word_embeddings)


def main(paths):
    here = os.path.dirname(os.path.abspath(__file__))
    paths = paths or sorted(glob.glob(os.path.join(here, 'mesa_*.json')))
    print(f"{'config':<16}{'total':>14}{'non-embedding':>16}{'embedding':>12}{'lm_head':>12}{'mixers':>14}{'mlps':>14}"
          f"  tied")
    for path in paths:
        c = count(path)
        print(f"{os.path.basename(path):<16}{c['total']:>14,}{c['non_embedding']:>16,}{c['embedding']:>12,}"
              f"{c['lm_head']:>12,}{c['mixers']:>14,}{c['mlps']:>14,}  {c['tied']}")


if __name__ == '__main__':
    main(sys.argv[1:])
