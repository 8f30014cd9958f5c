"""Multi-query associative recall (MQAR), generated locally in the style of Zoology's `multiquery_ar`
(Arora et al., 2023, "Zoology: Measuring and Improving Recall in Efficient Language Models"); no download.

One example of length `seq_len` with `num_kv_pairs = D`:
    positions 0 .. 2D-1:  k_1 v_1 k_2 v_2 ... k_D v_D      keys distinct, from [1, vocab/2); values distinct, from
                                                             [vocab/2, vocab)
    positions 2D .. L-1:  each key queried once, at position 2D + 2*g_i (g_i distinct "gaps" drawn with probability
                          proportional to g^(a-1), g = 1..(L-2D)//2, a = `power_a` (0.01): a power law favouring
                          early queries); every other position holds token 0, replaced by a uniformly random token of
                          the whole vocab when `random_non_queries` (as Zoology).
    labels: -100 everywhere except at the query positions, where the label is the value bound to that key; labels
            are already aligned with the inputs (the label at position i is the prediction from position i), so the
            loss is `cross_entropy(logits[:, i], labels[:, i])`, no shift.

Seeded with a `numpy.random.Generator`: the same (arguments, seed) gives the same tensors anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

IGNORE = -100


@dataclass
class MQARBatch:
    inputs: torch.Tensor  # [N, L] int64
    labels: torch.Tensor  # [N, L] int64, IGNORE except at query positions
    vocab_size: int
    num_kv_pairs: int


BLOCK = 512  # examples generated per block (bounds memory; part of the seeded stream, so fixed)


def _block(rng, n, L, D, V, power_a, random_non_queries):
    ctx = 2 * D
    key_vocab = np.arange(1, V // 2)
    value_vocab = np.arange(V // 2, V)
    # D distinct keys / values per example: the first D of a random permutation
    keys = key_vocab[np.argsort(rng.random((n, key_vocab.size)), axis=1)[:, :D]]
    values = value_vocab[np.argsort(rng.random((n, value_vocab.size)), axis=1)[:, :D]]
    kvs = np.empty((n, ctx), dtype=np.int64)
    kvs[:, 0::2], kvs[:, 1::2] = keys, values

    space = (L - ctx) // 2
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    p = p / p.sum()
    # D distinct gaps per example drawn without replacement with probabilities p (Gumbel top-k)
    gumbel = -np.log(-np.log(rng.random((n, space))))
    gaps = np.argsort(-(np.log(p)[None] + gumbel), axis=1)[:, :D]

    queries = np.zeros((n, L - ctx), dtype=np.int64)
    np.put_along_axis(queries, gaps * 2, keys, axis=1)
    inputs = np.concatenate([kvs, queries], axis=1)
    labels = np.full((n, L), IGNORE, dtype=np.int64)
    np.put_along_axis(labels, ctx + gaps * 2, values, axis=1)
    if random_non_queries:
        filler = rng.integers(0, V, size=inputs.shape)
        filler_mask = np.zeros_like(inputs, dtype=bool)
        filler_mask[:, ctx:] = inputs[:, ctx:] == 0
        inputs = np.where(filler_mask, filler, inputs)
    return inputs, labels


def multiquery_ar(num_examples: int, seq_len: int, num_kv_pairs: int, vocab_size: int = 8192, seed: int = 0,
                  power_a: float = 0.01, random_non_queries: bool = True) -> MQARBatch:
    D, L, V = num_kv_pairs, seq_len, vocab_size
    if D < 1:
        raise ValueError(f"num_kv_pairs must be >= 1, got {D}")
    if L < 4 * D:
        raise ValueError(f"seq_len={L} must be >= 4 * num_kv_pairs={4 * D} (keys/values, then a query slot per key)")
    if V // 2 - 1 < D:
        raise ValueError(f"vocab_size={V} too small for {D} distinct keys in [1, {V // 2})")
    rng = np.random.default_rng(seed)
    blocks = [_block(rng, min(BLOCK, num_examples - i), L, D, V, power_a, random_non_queries)
              for i in range(0, num_examples, BLOCK)]
    inputs = np.concatenate([b[0] for b in blocks]) if blocks else np.zeros((0, L), dtype=np.int64)
    labels = np.concatenate([b[1] for b in blocks]) if blocks else np.zeros((0, L), dtype=np.int64)
    return MQARBatch(torch.from_numpy(inputs), torch.from_numpy(labels), V, D)


def check_example(inputs: torch.Tensor, labels: torch.Tensor, num_kv_pairs: int) -> None:
    """Raises AssertionError unless every labelled position queries a key of the prefix and its label is that
    key's value (checked one example at a time; for tests)."""
    ctx = 2 * num_kv_pairs
    for x, y in zip(inputs.tolist(), labels.tolist()):
        bound = dict(zip(x[0:ctx:2], x[1:ctx:2]))
        assert len(bound) == num_kv_pairs, "keys are not distinct"
        queried = [i for i, t in enumerate(y) if t != IGNORE]
        assert len(queried) == num_kv_pairs, f"{len(queried)} queries, expected {num_kv_pairs}"
        for i in queried:
            assert i >= ctx, f"label inside the key-value prefix at {i}"
            assert x[i] in bound, f"query token {x[i]} at {i} is not a key"
            assert y[i] == bound[x[i]], f"label {y[i]} at {i} is not the value {bound[x[i]]} of key {x[i]}"
        assert sorted(x[i] for i in queried) == sorted(bound), "not every key is queried exactly once"
