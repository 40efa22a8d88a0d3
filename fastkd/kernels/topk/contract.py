"""The contract of the topk family (a teacher's top-k log-probabilities from hidden states): what
fills the rows a caller marks as ignored."""

# Ignored rows (label == ignore_index) hold this id and a log-probability of -inf in every entry:
# an id outside [0, V), so a loss given the same labels skips the row and one given none makes it
# NaN rather than silently training on padding.
PAD_ID = -1
