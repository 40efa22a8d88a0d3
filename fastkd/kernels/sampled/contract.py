"""The contract of the sampled_kd family (random-sampling KD, Anshumann et al. 2025): token ids
drawn from the teacher with their weights, and the cross-entropy against the sampled target.

An entry with weight 0 is absent (the public functions turn masked and padding entries into
weight 0): its id is never read as a token id. A row whose weights sum to 0 is an ignored row.
``sample_count`` ≤ 0 normalises each row by the sum of its weights; > 0 divides by that fixed
number of draws instead (see sampled/torch.py).
"""

SELF_NORMALIZED = 0.0
