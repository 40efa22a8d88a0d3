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
    """y − mean(y) (R, V), the row's sample std (R, 1) and its mean (R, 1); the sum of squares as a
    row dot product (one read, no squared temporary)."""
    mean = y.mean(-1, keepdim=True)
    centred = torch.sub(y, mean)
    sum_squares = torch.linalg.vecdot(centred, centred)[:, None]
    return centred, sum_squares.div_(max(y.shape[-1] - 1, 1)).sqrt_(), mean


def forward(x, scale, softcap, standardize, eps, moments=None):
    """The transformed logits of x (R, V). With ``standardize``, a list ``moments`` receives the
    row mean and sample std (R,) of scale_and_cap(x): what the kd_rows forward saves
    (kernels/logits/contract.py)."""
    y = scale_and_cap(x, scale, softcap)
    if not standardize:
        return y
    centred, std, mean = _centred_and_std(y)
    if moments is not None:
        moments += [mean[:, 0], std[:, 0]]
    return centred.mul_((std + eps).reciprocal_())


def backward(x, grad, scale, softcap, standardize, eps):
    """∂L/∂x from ∂L/∂(transformed logits) ``grad``, both (R, V); recomputes what it needs from x.

    Standardisation, z = c/(σ + eps) with c = y − mean(y), σ² = Σc²/(V − 1):
    ∂L/∂y = (g − mean(g))/(σ + eps) − c·(Σ_j g_j c_j)/((σ + eps)²·(V − 1)·σ), the second term 0
    where σ = 0 (a constant row: σ has no derivative there, and c is 0)."""
    if standardize:
        centred, std, _ = _centred_and_std(scale_and_cap(x, scale, softcap))
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
