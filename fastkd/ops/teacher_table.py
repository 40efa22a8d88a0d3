"""Custom ops for a teacher given as a table of token ids and one value per id (a top-k teacher's
log-probs, a sampled teacher's weights), against full student logits: the per-row loss forward,
its backward, their fakes and autograd, defined once for every such family."""

from ..kernels import registry
from ..kernels.layout import compute_dtype
from .schema import define, flatten, no_gradients, unflatten


def define_teacher_table_rows(name, family, options_class, ids_name, values_name, mode_field):
    """Registers ``fastkd::name`` (student (N, V), ids (N, k), values (N, k), labels (N,)?, the options'
    fields) → per-row losses (N,), and ``fastkd::name_backward`` → ∂(Σ grad_rows·loss)/∂student. The
    kernels of ``family`` are called as rows_forward(student, ids, values, labels, spec, mode,
    ignore_index), mode the options' ``mode_field``. Returns rows(student, ids, values, labels, options)."""

    def kernels(options, tensor):
        return registry.implementation(family, options.backend, tensor.device.type)

    tensors = f"Tensor student, Tensor {ids_name}, Tensor {values_name}, Tensor? labels"

    @define(name, tensors, options_class, "Tensor")
    def forward(student, ids, values, labels, *flat):
        options, _ = unflatten(options_class, flat)
        return kernels(options, student).rows_forward(student, ids, values, labels, options.spec,
                                                      getattr(options, mode_field), options.ignore_index)

    @forward.register_fake
    def _forward_fake(student, ids, values, *args):
        return student.new_empty(student.shape[0], dtype=compute_dtype(student, values))

    @define(f"{name}_backward", f"Tensor grad_rows, {tensors}", options_class, "Tensor")
    def backward_op(grad_rows, student, ids, values, labels, *flat):
        options, _ = unflatten(options_class, flat)
        return kernels(options, student).rows_backward(grad_rows, student, ids, values, labels, options.spec,
                                                       getattr(options, mode_field), options.ignore_index)

    @backward_op.register_fake
    def _backward_fake(grad_rows, student, *args):
        return student.new_empty(student.shape)

    def setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:4])
        ctx.options = tuple(inputs[4:])

    def backward(ctx, grad_rows):
        grad = None
        if ctx.needs_input_grad[0]:
            grad = backward_op(grad_rows.contiguous(), *ctx.saved_tensors, *ctx.options)
        return (grad, None, None, None, *no_gradients(options_class))

    forward.register_autograd(backward, setup_context=setup)

    def rows(student, ids, values, labels, options):
        return forward(student, ids, values, labels, *flatten(options))

    return rows
