"""STM reports: format A (UDP-GRE-pcapng) and format B (generic TLV, HEP3 profile).

Sans-IO encoders (packets in, report payloads out) and decoders (payloads in, events out);
see ``gre_pcapng`` and ``hep``. Both decoders share per-stream accounting (``streams``)
and emit the events of ``events``.
"""

from stm.report.common import (
    STM_PEN,
    EncoderStats,
    stm_option,
    stm_options,
    stream_id_for,
    without_stm_options,
)
from stm.report.events import (
    Duplicate,
    Event,
    FragmentsExpired,
    Gap,
    Malformed,
    PacketBlocks,
    Packets,
    Reordered,
    Restarted,
    Stream,
    StreamStats,
)
from stm.report.gre_pcapng import FRAGMENT_KIND, Decoder, Encoder
from stm.report.hep import AutoDecoder, TlvDecoder, TlvEncoder

__all__ = [
    "FRAGMENT_KIND",
    "STM_PEN",
    "AutoDecoder",
    "Decoder",
    "Duplicate",
    "Encoder",
    "EncoderStats",
    "Event",
    "FragmentsExpired",
    "Gap",
    "Malformed",
    "PacketBlocks",
    "Packets",
    "Reordered",
    "Restarted",
    "Stream",
    "StreamStats",
    "TlvDecoder",
    "TlvEncoder",
    "stm_option",
    "stm_options",
    "stream_id_for",
    "without_stm_options",
]
