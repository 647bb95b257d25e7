"""Autograd registration shared by the ops: the backward runs on the backend the forward ran on.

``llama_fast.backend(name)`` is a context variable, and autograd may run a backward pass on
another thread (on CUDA it has a thread per device) or after the ``with`` block has closed;
so the choice in force at forward time is saved on the context and restored around the
backward formula. (In a torch.compile'd graph the backward custom ops choose at run time
from the environment: ``LLAMA_FAST_BACKEND`` or auto.)
"""
from __future__ import annotations

from llama_fast.backends import backend, current_backend


def register_autograd(op, backward, setup_context) -> None:
    def setup(ctx, inputs, output):
        ctx.backend_choice = current_backend()
        setup_context(ctx, inputs, output)

    def grad(ctx, *grads):
        with backend(ctx.backend_choice):
            return backward(ctx, *grads)

    op.register_autograd(grad, setup_context=setup)
