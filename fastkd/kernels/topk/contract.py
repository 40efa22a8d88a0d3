"""The contract of the topk family (a teacher's top-k log-probabilities from hidden states): what
fills the rows a caller marks as ignored."""

# Ignored rows (label == ignore_index) hold this id and a log-probability of -inf in every entry:
# the sparse losses' default pad_id, so such a row has no present entry and is ignored by them too
# (loss 0, left out of the mean), given its labels or not.
PAD_ID = -1
