"""The choice after a model step on the CPU, by the C kernels of engine/sampling/_kernels.c.

On a CPU, choosing the next tokens with torch operations cost as much as a sixth of the model step for
greedy and two thirds for sampling (64 rows × 6,000 tokens): every operation is a pass over the rows,
and masks, scatters and cumulative sums run scalar. The kernels make one or two vectorised passes per
row. They rank what the torch path of engine/sampling/choice.py ranks — `bias + logits` for greedy and
sampling, `(bias + beam score) + (logits - lse)` for beam search — so greedy picks the same tokens
either way, and beam search too but for near ties (its log-sum-exp is rounded differently). Sampling keeps the same tokens and draws in proportion to their probabilities,
but by rejection (see `_kernels.c`), so a given uniform number picks another token than on the torch path.

`pip install` builds the extension where a C compiler is found (setup.py); without it `AVAILABLE` is
False and decoding.py uses torch operations on every device. Tensors must be on the CPU, float32 (int64
for indices) and contiguous: `usable` says whether the kernels can take them. `bias` is a decoding.Bias:
shared mask rows plus each row's few replaced entries, read in place.

    lse = logsumexp(logits)                                  # (R,)
    greedy(logits, bias)                                     # (R,) long, the first best token per row
    lse, values, flat = beam(logits, bias, beam_scores, width)  # (R,), then (G, width) each, best first
    sample(logits, bias, rows, temperature, top_k, top_p, uniform)  # (n,) long, one draw per listed row
"""

from __future__ import annotations

import torch

try:
    from engine.sampling import _kernels as _c
except ImportError:  # not built (no C compiler at install time)
    _c = None

AVAILABLE = _c is not None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors: built, and every tensor a contiguous float32 CPU tensor."""
    return AVAILABLE and all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                             for t in tensors)


def _np(t: torch.Tensor):
    return t.detach().numpy()  # a view: the kernels read and write the tensor's own memory


def logsumexp(x: torch.Tensor) -> torch.Tensor:
    """log Σ exp over each row of x (R, V): (R,) float32."""
    R, V = x.shape
    out = torch.empty(R, dtype=torch.float32)
    _c.logsumexp(_np(x), R, V, _np(out))
    return out


def _bias(bias) -> tuple:
    """A decoding.Bias as the kernels' five buffers: table, index, ptr, tokens, values."""
    return (_np(bias.table), _np(bias.index.contiguous()), _np(bias.ptr.contiguous()), _np(bias.tokens.contiguous()),
            _np(bias.values.float().contiguous()))


def greedy(x: torch.Tensor, bias) -> torch.Tensor:
    """The first token with the best `bias + x` in each row: (R,) long. `bias` is a decoding.Bias."""
    R, V = x.shape
    out = torch.empty(R, dtype=torch.long)
    _c.greedy(_np(x), *_bias(bias), R, V, _np(out))
    return out


def beam(x: torch.Tensor, bias, scores: torch.Tensor, width: int,
         keep: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One beam-search step for the groups of `width` rows: each row's log-sum-exp (R,), and the best
    `keep` (default `width`) of `(bias + score) + (x - lse)` over each group — values (G, keep) float32 and
    flat indices (G, keep) long (row within the group · V + token), best first, ties by index."""
    R, V = x.shape
    keep = keep or width
    lse = torch.empty(R, dtype=torch.float32)
    values = torch.empty(R // width * keep, dtype=torch.float32)
    flat = torch.empty(R // width * keep, dtype=torch.long)
    _c.beam(_np(x), *_bias(bias), _np(scores.float().contiguous()), R, V, width, keep, _np(lse), _np(values),
            _np(flat))
    return lse, values.view(-1, keep), flat.view(-1, keep)


def sample(x: torch.Tensor, bias, rows: torch.Tensor, temperature: torch.Tensor,
           top_k: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One draw for each of `rows` (n,) long from its scores `(bias + x) / temperature`, with top-k (0 = off)
    and top-p, at its uniform number: (n,) long. See decoding.sample_batch for the rule."""
    R, V = x.shape
    out = torch.empty(rows.shape[0], dtype=torch.long)
    args = [rows.long(), temperature.float(), top_k.long(), top_p.float(), uniform.float()]
    _c.sample(_np(x), *_bias(bias), R, V, *(_np(a.contiguous()) for a in args), _np(out))
    return out
