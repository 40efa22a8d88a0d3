"""How a drop-in's numbers must agree with its peer's, when both are float32 implementations of the
same definition and a float64 transcription of it is at hand."""

from reference import rel_err


def assert_agrees_like_peer(ours, theirs, exact, floor=1e-5):
    """Ours equals the peer to ``floor``, or, where the peer's own error against the float64
    definition is larger (peaked softmaxes make mixture gradients and 1 − Σp forms cancel in
    float32), to within 3× that error; and ours is no less accurate than the peer (2× slack). A
    wrong drop-in fails the second check even where the peer is imprecise."""
    their_err = rel_err(theirs, exact)
    assert rel_err(ours, theirs) < max(floor, 3 * their_err), (rel_err(ours, theirs), their_err)
    assert rel_err(ours, exact) < max(floor, 2 * their_err), (rel_err(ours, exact), their_err)
