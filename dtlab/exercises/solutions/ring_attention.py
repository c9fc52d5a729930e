"""Reference solution: the online-softmax merge of ring attention."""
import torch


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
          lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)  # both -inf: no -inf - -inf
    lse = m + torch.log(torch.exp(lse_a - m) + torch.exp(lse_b - m))  # both -inf: log 0 = -inf
    shift = torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)
    out = torch.exp(lse_a - shift)[..., None] * out_a + torch.exp(lse_b - shift)[..., None] * out_b
    return out, lse
