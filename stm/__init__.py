"""stm: 3GPP Signalling Traffic Monitoring reports in and out of pcapng."""

from stm.errors import MalformedPcapng, MalformedReport, ProtocolError, StmError, UsageError

__version__ = "0.1.0"

__all__ = [
    "MalformedPcapng",
    "MalformedReport",
    "ProtocolError",
    "StmError",
    "UsageError",
    "__version__",
]
