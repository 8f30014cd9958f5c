"""Where a chunk program's tokens are, for the fixed-length and the packed (varlen) layouts: shared by the CG kernel
and the GLA gradient kernels (fla's kernels inline the same lookup of `prepare_chunk_indices`' pairs)."""

import triton
import triton.language as tl


@triton.jit
def chunk_position(i_t, i_b, chunk_indices, cu_seqlens, T, BT: tl.constexpr, IS_VARLEN: tl.constexpr):
    # (this chunk's index into the chunk states, its sequence's first row, that sequence's length, the chunk's first
    # token within it); with IS_VARLEN, i_t indexes `chunk_indices`' (sequence, chunk) pairs and i_b is unused
    if IS_VARLEN:
        i_tg = i_t
        i_n, i_t = tl.load(chunk_indices + i_t * 2).to(tl.int32), tl.load(chunk_indices + i_t * 2 + 1).to(tl.int32)
        bos, eos = tl.load(cu_seqlens + i_n).to(tl.int64), tl.load(cu_seqlens + i_n + 1).to(tl.int64)
        T = (eos - bos).to(tl.int32)
    else:
        i_tg = i_b * tl.cdiv(T, BT) + i_t
        bos = (i_b * T).to(tl.int64)
    return i_tg, bos, T, i_t * BT
