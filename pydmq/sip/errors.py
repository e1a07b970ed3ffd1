"""The one error type the SIP layer raises for bad input."""

from __future__ import annotations


class SipParseError(ValueError):
    """Malformed SIP input.

    ``reason`` is short and safe to put in a reason phrase (``400 Bad CSeq``).
    ``answerable`` is true when enough of a *request* was read (request line, Via, From, To,
    Call-ID, CSeq) to send a ``400`` back; otherwise the input is dropped and counted.
    """

    def __init__(self, reason: str, *, answerable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.answerable = answerable
