"""The server's body as an autograd function over the transport.

``body_BND = remote_body(acts_BND)`` sends the activations (ACTS) and returns
the server's body output (BODY_OUT); when the activations need a gradient,
autograd's backward sends dL/d(body output) (GRAD_OUT) and takes the
server's dL/d(activations) (GRAD_ACTS) as the gradient of ``acts_BND``. So a
client's split training is its local training loop with
``forward = lambda x: tail(remote_body(head(x)))``.
"""

from __future__ import annotations

import time

import torch

from ..comm.protocol import Kind, expect, from_wire, to_wire
from .mailbox import SERVER, Mailbox


class RemoteBody:
    """Client ``cid``'s link to the server's body in one round attempt; numbers its steps, times its waits."""

    def __init__(self, mailbox: Mailbox, rnd: int, attempt: int, cid: int, *, wire: torch.dtype,
                 device: torch.device) -> None:
        self.mailbox = mailbox
        self.transport = mailbox.transport
        self.rnd, self.attempt, self.cid = rnd, attempt, cid
        self.wire = wire
        self.device = device
        self.step = 0
        #: Seconds spent waiting for the server's replies.
        self.waited = 0.0

    def __call__(self, acts_BND: torch.Tensor) -> torch.Tensor:
        return _BodyFunction.apply(acts_BND, self)

    def forward(self, acts_BND: torch.Tensor, need_grad: bool) -> tuple[int, torch.Tensor]:
        """ACTS -> BODY_OUT for the next step; -> (step, body output as float32 on the device)."""
        step = self.post_acts(acts_BND, need_grad)
        return step, self.body_out(step, tuple(acts_BND.shape))

    def backward(self, step: int, g_BND: torch.Tensor) -> torch.Tensor:
        """GRAD_OUT -> GRAD_ACTS for ``step``; -> dL/d(activations) as float32 on the device."""
        self.post_grad(step, g_BND)
        return self.grad_acts(step, tuple(g_BND.shape))

    # The halves of an exchange, for clients that run in lockstep (a host sends every client's
    # activations of a step before it waits for any reply).
    def post_acts(self, acts_BND: torch.Tensor, need_grad: bool) -> int:
        """Send the next step's activations (ACTS); -> the step."""
        step = self.step
        self.step += 1
        self._send(Kind.ACTS, to_wire(acts_BND, self.wire), step, int(need_grad))
        return step

    def body_out(self, step: int, shape: tuple[int, ...]) -> torch.Tensor:
        """The server's BODY_OUT for ``step``, as float32 on the device."""
        return self._reply(Kind.BODY_OUT, step, shape, "body output")

    def post_grad(self, step: int, g_BND: torch.Tensor) -> None:
        """Send dL/d(body output) of ``step`` (GRAD_OUT)."""
        self._send(Kind.GRAD_OUT, to_wire(g_BND, self.wire), step, 0)

    def grad_acts(self, step: int, shape: tuple[int, ...]) -> torch.Tensor:
        """The server's GRAD_ACTS for ``step``: dL/d(activations), float32 on the device."""
        return self._reply(Kind.GRAD_ACTS, step, shape, "activation gradient")

    def _send(self, kind: Kind, wire_BND: torch.Tensor, step: int, aux: int) -> None:
        self.transport.send(SERVER, kind, wire_BND, round=self.rnd, attempt=self.attempt, client=self.cid, step=step,
                            aux=aux)

    def _reply(self, kind: Kind, step: int, shape: tuple[int, ...], what: str) -> torch.Tensor:
        t0 = time.perf_counter()
        reply = self.mailbox.reply(kind, self.cid, step, f"round {self.rnd} {what} for client {self.cid} step {step}")
        self.waited += time.perf_counter() - t0
        expect(reply.header, kind, round=self.rnd, attempt=self.attempt, client=self.cid, step=step, shape=shape)
        return from_wire(reply.payload, self.device)


class _BodyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, acts_BND: torch.Tensor, link: RemoteBody) -> torch.Tensor:  # type: ignore[override]
        ctx.link = link
        ctx.step, body_BND = link.forward(acts_BND, ctx.needs_input_grad[0])
        return body_BND

    @staticmethod
    def backward(ctx, g_BND: torch.Tensor):  # type: ignore[override]
        return ctx.link.backward(ctx.step, g_BND), None
