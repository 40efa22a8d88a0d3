"""The per-token-block exchange of the vocab-parallel fused linear loss (``process_group=``).

Each rank holds a contiguous slice of the lm_head rows (a column-parallel lm_head: the vocabulary
split across the group, slices of any size, ranks in order) and the same hidden states. The block
driver (driver.py) forms each token block's (C, V_r) logits locally; the kernels here turn them
into the loss over the whole vocabulary by exchanging per-row statistics only, never logits, as
vocab-parallel kd_loss does (fastkd/distributed.py). Bytes all-reduced per step, in the compute
dtype unless said:

    once per call   the slice sizes, for offsets                       (world,) int64 SUM
    soft term       per block, those of kd_loss with process_group      forward KL: (2, C) MAX and
                    (fastkd/distributed.py's docstring)                 (2, C) + (2, C) SUM
    top-k teacher   the student logits at the k ids, each from its owner  (k, C) SUM
                    "tail": both maxima, both shifted sums              (2, C) MAX, (2, C) SUM
    hard term       the student's row max at T = 1                      (1, C) MAX
                    Σ exp(x − max) and the label's logit (its owner's)  (2, C) SUM
    entropy         dense teacher: −Σ q log q, one more row in the      (1, C) SUM
                    soft term's last SUM (return_entropy)
                    top-k teacher: the student's row max at T;          (1, C) MAX,
                    Σ e^a and Σ e^a·a                                   (2, C) SUM
    grad_hidden     the partial products Σ_r grad_logits_r @ W_r        (N, Hs) SUM, hidden dtype
                    (grad_hidden_reduction="sum"; "none" leaves it partial)

All of it is O(N), independent of V. The collectives run inside the fused custom op (opaque to
torch.compile, which traces the op as one call), as eager ``torch.distributed`` calls.

Block rows. Every rank must run the same token blocks (the same collectives, of the same sizes,
in the same order), yet no rank knows the others' slice sizes on the host (learning them would be
a host synchronisation). So the rows of a block come only from what every rank knows alike
(``Exchange.block_columns``): N, the group size and, when given, the whole vocabulary's size
(``vocab_size``, or a DTensor head's global rows): rows = budget // ⌈V / world⌉; without it, the
budget // ASSUMED_SLICE_COLUMNS (65,536). A group of one sizes from its own slice. Slices of any
sizes (64 and 65 rows, 1001 over 3) then run the same blocks; the workspace per rank stays
independent of N (rows × V_r, the budget when V_r ≈ V / world).

Padding (``vocab_size`` below the sum of the slices): the columns at or past vocab_size (on the
last rank, or ranks) are set to −inf in every block's logits, both sides: zero probability, zero
gradient, as if those weight rows were sliced off as one device does, without the host knowing
any rank's offset (that would need a host synchronisation). With ``standardize`` the row mean and std
are taken over the real columns only: the padding is left out of the sums, and the count is
min(V, vocab_size), from the slice sizes already exchanged.
"""

import math

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d

from ... import distributed, divergences, logit_transforms
from ..layout import compute_dtype, row_chunks
from ..sparse.contract import TAIL_FLOOR


# Token-block width when no rank knows the whole vocabulary's size on the host (no vocab_size, no
# DTensor head): the block budget spread over this many columns. A slice this wide fills the
# budget; a wider one makes proportionally larger blocks, still independent of N.
ASSUMED_SLICE_COLUMNS = 1 << 16


def resolve_group(group_name):
    """The ProcessGroup registered under ``group_name`` (ProcessGroup.group_name): a custom op's
    schema carries strings, not groups, as torch's functional collectives do."""
    return distributed_c10d._resolve_process_group(group_name)


class Exchange:
    """The soft and hard kernels of one vocab-parallel call, with the signatures of the logits
    backends (kernels/logits/torch.py: kd_rows_forward/backward, ce_rows_forward/backward) and of
    the sparse one (kernels/sparse/torch.py: block_loss), each reducing its per-row statistics
    over the group.

    n_cols: V_r, this rank's columns; vocab_limit: the real vocabulary size (global columns at or
    past it are padding), or −1 for none; global_vocab: the whole vocabulary's size as every rank
    knows it alike (options.global_vocab), or −1; with_entropy: also the student's entropy per row.
    """

    def __init__(self, group_name, n_cols, device, vocab_limit, global_vocab=-1, with_entropy=False):
        self.group = resolve_group(group_name)
        self.layout = distributed.Layout(n_cols, device, self.group, vocab_limit)
        self.n_cols = n_cols
        self.padding = self.layout.padding
        self.limit = self.layout.columns
        self.global_vocab = global_vocab
        self.with_entropy = with_entropy
        self._entropy = None  # the last kd_rows_forward's entropy, until entropy_rows takes it

    def block_columns(self):
        """The width the token blocks are sized for, the same on every rank (module docstring)."""
        world = dist.get_world_size(self.group)
        if world == 1:
            return self.n_cols
        if self.global_vocab > 0:
            return -(-self.global_vocab // world)
        return ASSUMED_SLICE_COLUMNS

    def mask_padding(self, logits):
        """−inf in place on the padding columns of a (C, V_r) block; idempotent."""
        if self.padding is not None:
            logits.masked_fill_(self.padding, -math.inf)
        return logits

    def kd_rows_forward(self, student, teacher, labels, spec, ignore_index):
        """student, teacher: (C, V_r) block logits (padding masked here, in place, so that every
        later reader of the block sees it masked). Returns ((C,) losses, a distributed.RowState)."""
        self.mask_padding(student)
        self.mask_padding(teacher)
        loss, state = distributed.rows_forward(student, teacher, labels, spec, ignore_index, self.group, self.layout,
                                               self.with_entropy)
        self._entropy = state.entropy
        return loss, state

    def entropy_rows(self, student_logits, labels, options):
        """The student's entropy over the whole vocabulary per row of a (C, V_r) block, at T after
        its transforms (as entropy.py on one device); 0 on ignored rows. A dense teacher's
        kd_rows_forward computed it on this block already (one more row in its last SUM); a top-k
        teacher's exchanges its own: the row max (1, C) MAX, then Σ e^a and Σ e^a·a (a = z − max)
        (2, C) SUM, H = log Σ e^a − Σ e^a·a / Σ e^a (both terms ≥ 0)."""
        entropy, self._entropy = self._entropy, None
        if entropy is None:
            entropy = self._exchanged_entropy(student_logits, options.spec)
        if labels is not None:
            entropy = torch.where(labels != options.ignore_index, entropy, 0.0)
        return entropy

    def _exchanged_entropy(self, logits, spec):
        self.mask_padding(logits)
        n_rows = logits.shape[0]
        dtype = compute_dtype(logits)

        def scaled(start, stop):
            x = logits[start:stop].to(dtype)
            return logit_transforms.scale_and_cap(x, spec.student_scale, spec.student_softcap) * spec.inv_temperature

        row_max = torch.empty(1, n_rows, dtype=dtype, device=logits.device)
        for start, stop in self._chunks(n_rows):
            row_max[0, start:stop] = scaled(start, stop).amax(-1)
        distributed.all_reduce(row_max, dist.ReduceOp.MAX, self.group)
        sums = torch.empty(2, n_rows, dtype=dtype, device=logits.device)
        for start, stop in self._chunks(n_rows):
            shifted = scaled(start, stop) - row_max[0, start:stop, None]
            exps = shifted.exp()
            sums[0, start:stop] = exps.sum(-1)
            # e^a·a is 0·(−inf) = NaN on masked columns: they hold no probability.
            sums[1, start:stop] = torch.where(exps > 0, exps * shifted, 0.0).sum(-1)
        distributed.all_reduce(sums, dist.ReduceOp.SUM, self.group)
        return sums[0].log() - sums[1] / sums[0]

    def kd_rows_backward(self, grad_loss, student, teacher, labels, state, spec, ignore_index):
        """∂(Σ grad_loss·loss)/∂student: (C, V_r) in the student block's dtype."""
        return distributed.rows_backward(grad_loss, student, teacher, labels, state, spec, ignore_index, self.group)

    def ce_rows_forward(self, logits, labels, ignore_index):
        """Hard-label cross-entropy per row at T = 1 over the whole vocabulary:
        CE_i = max_i + log Σ_v exp(x_iv − max_i) − x_i,label, the label's logit given by the rank
        that holds its column.

        logits: (C, V_r); labels: (C,) global ids. Returns ((C,) losses, (C, 2) max and log-sum)
        in the compute dtype; ignored rows 0; a label outside [0, vocab) NaN (as on one device).
        """
        self.mask_padding(logits)
        n_rows = logits.shape[0]
        dtype = compute_dtype(logits)
        local, owns, in_range = self._label_columns(labels)
        row_max = torch.empty(1, n_rows, dtype=dtype, device=logits.device)
        for start, stop in self._chunks(n_rows):
            row_max[0, start:stop] = logits[start:stop].to(dtype).amax(-1)
        distributed.all_reduce(row_max, dist.ReduceOp.MAX, self.group)
        sums = torch.empty(2, n_rows, dtype=dtype, device=logits.device)
        for start, stop in self._chunks(n_rows):
            x = logits[start:stop].to(dtype)
            sums[0, start:stop] = (x - row_max[0, start:stop, None]).exp().sum(-1)
            picked = x.gather(1, local[start:stop, None])[:, 0]
            sums[1, start:stop] = torch.where(owns[start:stop], picked, 0.0)
        distributed.all_reduce(sums, dist.ReduceOp.SUM, self.group)
        log_sum = sums[0].log()
        row_loss = torch.where(in_range, (row_max[0] - sums[1]) + log_sum, math.nan)
        active = labels != ignore_index
        stats = torch.where(active[:, None], torch.stack([row_max[0], log_sum], 1), 0.0)
        return torch.where(active, row_loss, 0.0), stats

    def ce_rows_backward(self, grad_loss, logits, labels, stats, ignore_index, out):
        """Adds grad_loss_i · (softmax(x_i) − onehot(label_i)) on this rank's columns into ``out``
        (C, V_r), in place (the −1 only on the label's owner); NaN on rows whose label is out of
        range. Local: the statistics were exchanged in the forward."""
        n_rows = logits.shape[0]
        dtype = compute_dtype(logits)
        local, owns, in_range = self._label_columns(labels)
        active = labels != ignore_index
        scale = torch.where(active, grad_loss.to(dtype), 0.0)
        for start, stop in self._chunks(n_rows):
            x = logits[start:stop].to(dtype)
            rows_active = active[start:stop, None]
            # Ignored rows carry zero statistics: exp(x − 0) could overflow, and inf·0 = NaN.
            log_p = x - stats[start:stop, :1].to(dtype) - stats[start:stop, 1:].to(dtype)
            g = torch.where(rows_active, log_p, -math.inf).exp()
            g.scatter_add_(1, local[start:stop, None], -owns[start:stop, None].to(dtype))
            g = g * scale[start:stop, None]
            g = torch.where(rows_active & ~in_range[start:stop, None], math.nan, g)
            out[start:stop] += g.to(out.dtype)
        return out

    def block_loss(self, student_logits, indices, logprobs, labels, spec, missing_mass, ignore_index, scale=None):
        """The sparse_kd block contract (kernels/sparse/torch.py, whose formulas this follows) over
        the whole vocabulary, for a top-k teacher. The ids are global: each rank gathers the
        student logits of the ids in its slice (0 elsewhere) and one (k, C) SUM gives every rank
        all k; "tail" also needs the row's log-sum-exp and the student's mass outside the support:
        (2, C) MAX of both maxima, (2, C) SUM of both shifted sums. Every rank then holds the same
        bucket losses; the gradient is this rank's columns.

        student_logits: (C, V_r); indices, logprobs: (C, k); labels: (C,) or None. Returns (loss
        (C,) in the compute dtype, ∂(Σ scale·loss)/∂student_logits (C, V_r) in the logits' dtype,
        or None without ``scale``). A row with an id outside [0, vocab) is NaN, as on one device.
        """
        self.mask_padding(student_logits)
        dtype = compute_dtype(student_logits, logprobs)
        s = student_logits.to(dtype) * spec.inv_temperature
        teacher_log = logprobs.to(dtype) * spec.inv_temperature
        # Absent entries (masked or padding ids, folded to -inf log-probs by the public function)
        # are no bucket: no rank owns them, and a row with none has loss and gradient 0.
        present = teacher_log != -math.inf
        has_support = present.any(-1)
        ids = indices.long()
        bad_row = (present & ((ids < 0) | (ids >= self.limit))).any(-1)
        local = ids - self.layout.offset
        owns = present & (local >= 0) & (local < self.n_cols)
        index = torch.where(owns, local, 0)
        s_support = distributed.all_reduce(torch.where(owns, s.gather(1, index), 0.0), dist.ReduceOp.SUM, self.group)
        s_support = s_support.masked_fill_(~present, -math.inf)
        # Entries this rank does not own point at column 0 with a zero: scatter_add_, never scatter_
        # (two writes to one column would race).
        if missing_mass == "renormalize":
            empty = ~has_support[:, None]  # all -inf would give a NaN softmax: zeros, dropped below
            log_p = torch.log_softmax(teacher_log.masked_fill(empty, 0.0), -1)
            log_q = torch.log_softmax(s_support.masked_fill(empty, 0.0), -1)
            loss, grad_support = divergences.kl_and_grad_on_buckets(spec.name, log_p, log_q)
            grad = None if scale is None else torch.zeros_like(s).scatter_add_(
                1, index, torch.where(owns, grad_support, 0.0))
        else:
            support = torch.zeros_like(s).scatter_add_(1, index, owns.to(dtype)) > 0  # (C, V_r) owned ids
            rest = s.masked_fill(support, -math.inf)
            maxima = distributed.all_reduce(torch.stack([s.amax(-1), rest.amax(-1)]), dist.ReduceOp.MAX, self.group)
            shifts = torch.where(maxima > -math.inf, maxima, 0.0)
            # The mass outside the support is shifted by its own maximum: it keeps its precision when
            # the top-k holds nearly all the mass (as kernels/sparse/torch.py).
            sums = torch.stack([(s - shifts[0, :, None]).exp().sum(-1), (rest - shifts[1, :, None]).exp().sum(-1)])
            distributed.all_reduce(sums, dist.ReduceOp.SUM, self.group)
            row_max, log_sum = shifts[0], sums[0].log()
            log_q_support = (s_support - row_max[:, None]) - log_sum[:, None]
            log_q_tail = (sums[1].log() + (shifts[1] - row_max)) - log_sum
            p_tail = (1 - teacher_log.exp().sum(-1)).clamp(min=TAIL_FLOOR if spec.name == "reverse_kl" else 0.0)
            p_tail = torch.where(log_q_tail > -math.inf, p_tail, 0.0)  # no tail bucket without student mass there
            log_p = torch.cat([teacher_log, p_tail.log()[:, None]], 1)
            log_q = torch.cat([log_q_support, log_q_tail[:, None]], 1)
            loss, _ = divergences.kl_and_grad_on_buckets(spec.name, log_p, log_q)
            grad = None
            if scale is not None:
                if spec.name == "forward_kl":
                    tail_factor = 1 - (log_p[:, -1] - log_q[:, -1]).exp()
                    support_grad = log_q_support.exp() - teacher_log.exp()
                else:
                    d = log_q - log_p
                    tail_factor = d[:, -1] - loss
                    support_grad = divergences.safe_weighted(log_q_support.exp(), d[:, :-1] - loss[:, None])
                tail_factor = torch.where(log_q_tail > -math.inf, tail_factor, 0.0)
                q = divergences.log_probs(s, row_max, log_sum).exp()
                grad = (q * tail_factor[:, None]).masked_fill_(support, 0.0).scatter_add_(
                    1, index, torch.where(owns, support_grad, 0.0))
        loss = torch.where(has_support, torch.where(bad_row, math.nan, loss), 0.0)
        if grad is not None:
            grad = torch.where(has_support[:, None], torch.where(bad_row[:, None], math.nan, grad), 0.0)
        if labels is not None:
            active = labels != ignore_index
            loss = torch.where(active, loss, 0.0)
            if grad is not None:
                grad = torch.where(active[:, None], grad, 0.0)
        if grad is not None:
            grad = (grad * (scale.to(dtype) * spec.inv_temperature)[:, None]).to(student_logits.dtype)
        return loss, grad

    def sum_over_group(self, tensor):
        """In place: the sum of ``tensor`` over the group (a column-parallel linear's grad_input)."""
        return distributed.all_reduce(tensor, dist.ReduceOp.SUM, self.group)

    def _label_columns(self, labels):
        """(local column of each label, 0 where this rank does not hold it; whether it does;
        whether the label is a class of the real vocabulary)."""
        labels = labels.long()
        local = labels - self.layout.offset
        in_range = (labels >= 0) & (labels < self.limit)
        owns = (local >= 0) & (local < self.n_cols) & in_range
        return torch.where(owns, local, 0), owns, in_range

    def _chunks(self, n_rows):
        return row_chunks(n_rows, self.n_cols, distributed.CHUNK_ELEMENTS)
