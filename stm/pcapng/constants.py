"""Numbers from draft-ietf-opsawg-pcapng and the classic pcap format (draft-ietf-opsawg-pcap)."""

from __future__ import annotations

# Block types.
SHB = 0x0A0D0D0A
IDB = 0x00000001
PB = 0x00000002  # obsolete Packet Block
SPB = 0x00000003
NRB = 0x00000004
ISB = 0x00000005
EPB = 0x00000006
DSB = 0x0000000A
CB_COPY = 0x00000BAD
CB_NOCOPY = 0x40000BAD

BYTE_ORDER_MAGIC = 0x1A2B3C4D

# Options common to every block.
OPT_ENDOFOPT = 0
OPT_COMMENT = 1
OPT_CUSTOM_STR = 2988
OPT_CUSTOM_BIN = 2989
OPT_CUSTOM_STR_NOCOPY = 19372
OPT_CUSTOM_BIN_NOCOPY = 19373
CUSTOM_OPTIONS = frozenset(
    (OPT_CUSTOM_STR, OPT_CUSTOM_BIN, OPT_CUSTOM_STR_NOCOPY, OPT_CUSTOM_BIN_NOCOPY)
)

# Section header block.
SHB_HARDWARE = 2
SHB_OS = 3
SHB_USERAPPL = 4

# Interface description block.
IF_NAME = 2
IF_DESCRIPTION = 3
IF_IPV4ADDR = 4
IF_IPV6ADDR = 5
IF_MACADDR = 6
IF_EUIADDR = 7
IF_SPEED = 8
IF_TSRESOL = 9
IF_TZONE = 10
IF_FILTER = 11
IF_OS = 12
IF_FCSLEN = 13
IF_TSOFFSET = 14
IF_HARDWARE = 15
IF_TXSPEED = 16
IF_RXSPEED = 17
IF_IANA_TZNAME = 18

# Enhanced packet block (and the obsolete packet block's pack_flags/pack_hash).
EPB_FLAGS = 2
EPB_HASH = 3
EPB_DROPCOUNT = 4
EPB_PACKETID = 5
EPB_QUEUE = 6
EPB_VERDICT = 7
EPB_PROCESSID_THREADID = 8

# Name resolution block.
NRB_RECORD_END = 0
NRB_RECORD_IPV4 = 1
NRB_RECORD_IPV6 = 2
NRB_RECORD_EUI48 = 3
NRB_RECORD_EUI64 = 4
NS_DNSNAME = 2
NS_DNSIP4ADDR = 3
NS_DNSIP6ADDR = 4

# Interface statistics block.
ISB_STARTTIME = 2
ISB_ENDTIME = 3
ISB_IFRECV = 4
ISB_IFDROP = 5
ISB_FILTERACCEPT = 6
ISB_OSDROP = 7
ISB_USRDELIV = 8

# Classic pcap magic numbers, as read in little-endian order.
PCAP_MAGIC_US = 0xA1B2C3D4
PCAP_MAGIC_NS = 0xA1B23C4D
PCAP_MAGIC_KUZNETSOV = 0xA1B2CD34  # "modified pcap" of Alexey Kuznetsov's patches
PCAP_MAGIC_NAVTEL = 0xA12B3C4D  # Navtel Communications, unsupported

# Link types that stm knows by name (the others pass through by number).
LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276

LINKTYPE_NAMES = {
    LINKTYPE_NULL: "NULL",
    LINKTYPE_ETHERNET: "ETHERNET",
    12: "RAW (legacy 12)",
    LINKTYPE_RAW: "RAW",
    LINKTYPE_LOOP: "LOOP",
    LINKTYPE_LINUX_SLL: "LINUX_SLL",
    LINKTYPE_IPV4: "IPV4",
    LINKTYPE_IPV6: "IPV6",
    LINKTYPE_LINUX_SLL2: "LINUX_SLL2",
}

# The default block size limit: a corrupt length field must not make a reader allocate gigabytes.
DEFAULT_MAX_BLOCK = 16 * 1024 * 1024
