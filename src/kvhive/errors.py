"""One error tree.  Each subclass maps to a wire error code; broad catches live only at
request or task boundaries, where an error becomes an error reply or a counted drop."""

from __future__ import annotations


class KvhiveError(Exception):
    """Base of every error kvhive raises on purpose."""

    code = "internal"


class ConfigError(KvhiveError):
    """A configuration value is invalid.  ``flag`` names the offending flag."""

    code = "config"

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag
        self.message = message


class ProtocolError(KvhiveError):
    """A request frame could not be decoded or does not match the operation."""

    code = "protocol"


class UnknownOperation(ProtocolError):
    code = "unknown_op"


class RequestTooLarge(ProtocolError):
    """A request is over a limit checked before decoding: an argument frame too large for
    its operation, an array with too many entries (a registration's layers), or nesting
    deeper than the decoder follows."""

    code = "too_large"


class TooManyOutstanding(KvhiveError):
    """The connection already has the most requests queued or running that the server
    accepts from one connection; it must read its replies before it sends more."""

    code = "too_many_outstanding"


class BadRequest(KvhiveError):
    """The request decoded but its values are unacceptable (token range, salt, ...)."""

    code = "bad_request"


class UnknownInstance(KvhiveError):
    """No KV cache is registered under this instance id."""

    code = "unknown_instance"


class TransferFailed(KvhiveError):
    """A store or retrieve decoded but could not be served (unknown instance, objects gone,
    too few block ids).  The client gets the operation's soft-failure value, not an error."""

    code = "transfer_failed"


class RegistrationError(KvhiveError):
    """A KV-cache registration cannot be served (bad descriptor, unmappable segment)."""

    code = "registration"


class UnsupportedError(KvhiveError):
    """A feature is not available in this build or configuration (e.g. torch missing)."""

    code = "unsupported"


class OutOfMemory(KvhiveError):
    """L1 has no room even after inline eviction."""

    code = "oom"


class LayoutError(KvhiveError):
    """A KV layout cannot be mapped onto the chunk object layout."""

    code = "layout"


class L2Error(KvhiveError):
    """An L2 adapter operation failed (I/O error, backend refused, bad response)."""

    code = "l2"


class ObjectMissing(L2Error):
    """The L2 backend holds no object under this key."""

    code = "l2_missing"


class CorruptObject(L2Error):
    """An L2 object failed its length or checksum check; it is treated as a miss."""

    code = "l2_corrupt"


class CapacityExceeded(L2Error):
    """The L2 tier has no room for this object (full slots or capacity reached)."""

    code = "l2_full"
