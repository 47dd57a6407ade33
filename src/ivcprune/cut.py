"""Cutting a batch down to its kept tokens: small pure functions, batch first, no model inside.

Rows of a batch keep different numbers of tokens. The cut batch is therefore *re-left-padded*: row ``b``
keeps ``n_b`` tokens, the cut sequence has ``M = max_b n_b`` slots, and row ``b``'s tokens sit in its
last ``n_b`` slots (so the last slot of every row is a real token, as ``generate`` expects). The first
``M - n_b`` slots are padding: they hold a copy of one of the row's tokens (finite values), attend only to
themselves, and no real token ever attends to them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FLASH_PREFIXES = ("flash", "kernels-community/flash", "kernels-community/vllm-flash")


def keep_index(keeps: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather index and validity of a re-left-padded cut.

    Args:
        keeps: per row, the sorted indices (into the row of the uncut batch) of the tokens it keeps;
            at least one per row.

    Returns:
        ``(index, valid)``, both ``(B, M)``: ``index[b]`` are the positions to gather (padding slots repeat
        the row's first kept index), ``valid[b]`` is False on padding slots.
    """
    if any(k.numel() == 0 for k in keeps):
        raise ValueError("every row must keep at least one token")
    width = max(int(k.numel()) for k in keeps)
    index = torch.empty(len(keeps), width, dtype=torch.long)
    valid = torch.zeros(len(keeps), width, dtype=torch.bool)
    for b, k in enumerate(keeps):
        k = k.to(torch.long).cpu()
        pad = width - k.numel()
        index[b, :pad] = k[0]
        index[b, pad:] = k
        valid[b, pad:] = True
    return index, valid


def gather_tokens(x: torch.Tensor, index: torch.Tensor, seq_dim: int, batch_dim: int | None = None) -> torch.Tensor:
    """``x`` cut along ``seq_dim`` row by row; the batch is ``batch_dim`` (default: the dim just before the
    sequence; size B, or 1 to broadcast).

    ``index`` is ``(B, M)``; the result has size ``B`` in the batch dim and ``M`` in ``seq_dim``."""
    seq_dim = seq_dim % x.dim()
    batch_dim = seq_dim - 1 if batch_dim is None else batch_dim % x.dim()
    if batch_dim < 0 or batch_dim == seq_dim:
        raise ValueError("gather_tokens needs a batch dim other than the sequence dim")
    B, M = index.shape
    if x.shape[batch_dim] == 1 and B > 1:
        shape = list(x.shape)
        shape[batch_dim] = B
        x = x.expand(shape)
    view = [1] * x.dim()
    view[batch_dim], view[seq_dim] = B, M
    idx = index.to(x.device).view(view)
    shape = list(x.shape)
    shape[seq_dim] = M
    return torch.gather(x, seq_dim, idx.expand(shape))


def extend_index(index: torch.Tensor, past: int) -> torch.Tensor:
    """Cut index over a cache that already held ``past`` tokens before this chunk (all of them kept)."""
    if past == 0:
        return index
    head = torch.arange(past, dtype=index.dtype).expand(index.shape[0], past)
    return torch.cat([head, index + past], dim=1)


def cut_cache(keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut one layer's ``(B, H, T, d)`` keys and values to the ``(B, M)`` index (over ``T``)."""
    return gather_tokens(keys, index, 2, 0), gather_tokens(values, index, 2, 0)


def is_flash(attn_implementation: str | None) -> bool:
    return bool(attn_implementation) and attn_implementation.startswith(FLASH_PREFIXES)


def attention_mask(valid_kv: torch.Tensor, q_len: int, *, attn_implementation: str | None, dtype: torch.dtype,
                   device: torch.device | str) -> torch.Tensor | None:
    """The mask layers get for ``q_len`` new tokens over ``valid_kv`` ``(B, T)`` cache slots (the new tokens
    are the last ``q_len`` of them), in the format the attention implementation reads.

    - flash attention: the 2-D padding mask (``None`` when there is no padding);
    - sdpa: a 4-D bool mask, True where a query may attend; ``None`` (sdpa's own causal path, which
      fast kernels take) when there is no padding and no earlier cache;
    - eager (and others): a 4-D additive float mask (0 / dtype minimum).

    A query attends to earlier-or-equal slots that are valid; padding queries attend to themselves only,
    so no row is fully masked (sdpa would return NaN there)."""
    valid_kv = valid_kv.to(device)
    if is_flash(attn_implementation):
        return None if bool(valid_kv.all()) else valid_kv.to(torch.long)
    B, T = valid_kv.shape
    if attn_implementation == "sdpa" and T == q_len and bool(valid_kv.all()):
        return None
    rows = torch.arange(T - q_len, T, device=device)[:, None]
    cols = torch.arange(T, device=device)[None, :]
    allowed = (cols <= rows)[None] & valid_kv[:, None, :]
    own = (cols == rows)[None] & ~valid_kv[:, T - q_len :, None]
    allowed = (allowed | own)[:, None]  # (B, 1, q, T)
    if attn_implementation == "sdpa":
        return allowed
    out = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return out.masked_fill_(~allowed, torch.finfo(dtype).min)


def contiguous_positions(valid: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Text position ids for a cut sequence that only flash attention reads (to detect packed sequences):
    one contiguous run per row starting at ``first`` ``(B,)``, padding slots at the row's first value."""
    run = (valid.long().cumsum(-1) - 1).clamp(min=0)
    return run + first.view(-1, 1)
