"""The agent client's errors, as branches of the shim's one error tree (`spinbox.shim.errors`).

    GuestError
    └── AgentError                 anything the agent client raises on purpose
        ├── AgentProtocolError     (also a GuestProtocolError) the guest broke the contract → INTERNAL
        └── AgentUnavailable       (also a GuestUnavailable) no usable connection           → UNAVAILABLE

Errors the guest *reported* are `ttrpc.TTRPCError`s with the guest's code, not these.
"""
from __future__ import annotations

import logging

from ..errors import GuestError, GuestProtocolError, GuestUnavailable

log = logging.getLogger(__name__)


class AgentError(GuestError):
    """Base of the agent client's own errors."""


class AgentProtocolError(AgentError, GuestProtocolError):
    """The guest sent something that breaks the protocol; the guest is not trusted."""


class AgentUnavailable(AgentError, GuestUnavailable):
    """No usable connection to the guest agent (lost, or the client closed)."""
