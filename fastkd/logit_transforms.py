"""How a model's raw logits x become the logits of the softmax, per side, before the temperature.

    y = scale · x                          (Cohere/Granite-style logit multiplier)
    y = softcap · tanh(y / softcap)        (Gemma-2/3 final-logit soft-capping; softcap > 0 only)
    z = (y − mean(y)) / (std(y) + eps)     (logit standardisation, Sun et al. 2024; optional)

``std`` is the sample standard deviation (divisor V − 1, ``torch.std``'s default), as the
standardisation paper's code computes it; a row of one element has std 0. Masked entries
(x = −inf) stay −inf through the scale and the soft-cap; standardising a row that holds −inf is
undefined (NaN), as in the paper's code.

The forward and the chain rule are written once here, on (R, V) blocks of whole rows in any
float dtype: the torch backend runs them, the kernels mirror them.
"""

import torch


def scale_and_cap(x, scale, softcap):
    """scale·x, then softcap·tanh(·/softcap) when softcap > 0; −inf stays −inf."""
    y = x * scale if scale != 1.0 else x
    if softcap > 0:
        y = torch.where(torch.isneginf(x), x, softcap * torch.tanh(y / softcap))
    return y


def _centred_and_std(y):
    centred = y - y.mean(-1, keepdim=True)
    denominator = max(y.shape[-1] - 1, 1)
    return centred, (centred.square().sum(-1, keepdim=True) / denominator).sqrt()


def forward(x, scale, softcap, standardize, eps):
    """The transformed logits of x (R, V)."""
    y = scale_and_cap(x, scale, softcap)
    if not standardize:
        return y
    centred, std = _centred_and_std(y)
    return centred / (std + eps)


def backward(x, grad, scale, softcap, standardize, eps):
    """∂L/∂x from ∂L/∂(transformed logits) ``grad``, both (R, V); recomputes what it needs from x."""
    if standardize:
        centred, std = _centred_and_std(scale_and_cap(x, scale, softcap))
        denominator = std + eps
        grad = (grad - grad.mean(-1, keepdim=True)) / denominator
        # Through the std: zero for a constant row, where std has no derivative (and centred is 0).
        through_std = (grad * denominator * centred).sum(-1, keepdim=True) / denominator
        per_unit = torch.where(std > 0, through_std / (denominator * std * max(x.shape[-1] - 1, 1)),
                               torch.zeros((), dtype=grad.dtype, device=grad.device))
        grad = grad - per_unit * centred
    if softcap > 0:
        tanh = torch.tanh(x * (scale / softcap))
        grad = torch.where(torch.isneginf(x), torch.zeros((), dtype=grad.dtype, device=grad.device),
                           grad * (1 - tanh * tanh))
    return grad * scale if scale != 1.0 else grad
