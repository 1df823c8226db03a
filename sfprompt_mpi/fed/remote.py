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
        step = self.step
        self.step += 1
        wire_BND = to_wire(acts_BND, self.wire)
        reply = self._exchange(Kind.ACTS, wire_BND, step, int(need_grad), "body output")
        expect(reply.header, Kind.BODY_OUT, round=self.rnd, attempt=self.attempt, client=self.cid, step=step,
               shape=tuple(acts_BND.shape))
        return step, from_wire(reply.payload, self.device)

    def backward(self, step: int, g_BND: torch.Tensor) -> torch.Tensor:
        """GRAD_OUT -> GRAD_ACTS for ``step``; -> dL/d(activations) as float32 on the device."""
        wire_BND = to_wire(g_BND, self.wire)
        reply = self._exchange(Kind.GRAD_OUT, wire_BND, step, 0, "activation gradient")
        expect(reply.header, Kind.GRAD_ACTS, round=self.rnd, attempt=self.attempt, client=self.cid, step=step,
               shape=tuple(g_BND.shape))
        return from_wire(reply.payload, self.device)

    def _exchange(self, kind: Kind, wire_BND: torch.Tensor, step: int, aux: int, what: str):
        t0 = time.perf_counter()
        self.transport.send(SERVER, kind, wire_BND, round=self.rnd, attempt=self.attempt, client=self.cid, step=step,
                            aux=aux)
        reply = self.mailbox.recv(f"round {self.rnd} {what} for client {self.cid} step {step}")
        self.waited += time.perf_counter() - t0
        return reply


class _BodyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, acts_BND: torch.Tensor, link: RemoteBody) -> torch.Tensor:  # type: ignore[override]
        ctx.link = link
        ctx.step, body_BND = link.forward(acts_BND, ctx.needs_input_grad[0])
        return body_BND

    @staticmethod
    def backward(ctx, g_BND: torch.Tensor):  # type: ignore[override]
        return ctx.link.backward(ctx.step, g_BND), None
