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
    """y − mean(y) (R, V) and the row's sample std (R, 1); the sum of squares as a row dot product
    (one read, no squared temporary)."""
    centred = torch.sub(y, y.mean(-1, keepdim=True))
    sum_squares = torch.linalg.vecdot(centred, centred)[:, None]
    return centred, sum_squares.div_(max(y.shape[-1] - 1, 1)).sqrt_()


def row_mean_and_std(x, scale, softcap):
    """The mean and sample std (R,) of the rows of scale_and_cap(x) (R, V): what standardisation
    divides by (the kd_rows forward saves them, kernels/logits/contract.py)."""
    y = scale_and_cap(x, scale, softcap)
    _, std = _centred_and_std(y)
    return y.mean(-1), std[:, 0]


def forward(x, scale, softcap, standardize, eps):
    """The transformed logits of x (R, V)."""
    y = scale_and_cap(x, scale, softcap)
    if not standardize:
        return y
    centred, std = _centred_and_std(y)
    return centred.mul_((std + eps).reciprocal_())


def backward(x, grad, scale, softcap, standardize, eps):
    """∂L/∂x from ∂L/∂(transformed logits) ``grad``, both (R, V); recomputes what it needs from x.

    Standardisation, z = c/(σ + eps) with c = y − mean(y), σ² = Σc²/(V − 1):
    ∂L/∂y = (g − mean(g))/(σ + eps) − c·(Σ_j g_j c_j)/((σ + eps)²·(V − 1)·σ), the second term 0
    where σ = 0 (a constant row: σ has no derivative there, and c is 0)."""
    if standardize:
        centred, std = _centred_and_std(scale_and_cap(x, scale, softcap))
        inv_denominator = (std + eps).reciprocal_()
        dot = torch.linalg.vecdot(grad, centred)[:, None]  # one read of each, no (R, V) temporary
        through_std = torch.where(std > 0, dot * inv_denominator.square() / (std * max(x.shape[-1] - 1, 1)),
                                  torch.zeros((), dtype=grad.dtype, device=grad.device))
        grad = torch.sub(grad, grad.mean(-1, keepdim=True)).mul_(inv_denominator)
        grad = grad.addcmul_(centred, through_std, value=-1)
    if softcap > 0:
        tanh = torch.tanh(x * (scale / softcap))
        grad = torch.where(torch.isneginf(x), torch.zeros((), dtype=grad.dtype, device=grad.device),
                           grad * (1 - tanh * tanh))
    return grad * scale if scale != 1.0 else grad
