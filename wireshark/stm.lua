--[[
stm.lua: Wireshark dissector for 3GPP STM reports (TS 28.560) as stm writes them.

  Format A, UDP-GRE-pcapng: GRE (over UDP 4754, or any GRE) with protocol type 0x88B5,
      whose payload is one pcapng section (SHB, IDBs, EPBs/SPBs, stm's fragment blocks).
  Format B, generic TLV in the HEP3 profile: "HEP3" messages over UDP or TCP, port 9060,
      with HEP's generic chunks and stm's own (vendor 0x5354).

Every block, option and chunk is shown with its fields (all under "stm."), and every packet
that a report carries is handed to the dissector of its link type (format A, and format B
frames rebuilt from stm's chunks) or, for foreign HEP3, its payload to the dissector of its
protocol type or port; so SIP, Diameter, NGAP, HTTP/2 and the rest show inside.

Install: copy into the personal Lua plugins folder (Help > About Wireshark > Folders), or
run `wireshark -X lua_script:stm.lua` / `tshark -X lua_script:stm.lua`. See
docs/wireshark.md. Tested with Wireshark 4.0 (Debian 12, Lua 5.2); written for any Lua from
5.1 to 5.4 (what Wireshark 3.6 to 4.x embed): no bitwise operators, no integer division, no
goto, and numbers printed with %d (Lua 5.3+ prints a float 7 as "7.0").

Wire profile: docs/format.md of stm.
]]

local STM_PEN = 32473
local STM_VENDOR = 0x5354
local HEP_PORT = 9060
local GRE_UDP_PORT = 4754
local DEFAULT_PROTOCOL_TYPE = 0x88B5
local TWO32 = 4294967296

local stm = Proto("stm", "3GPP STM Report")
local PT_TCP = 2 -- pinfo.port_type of a TCP payload (enum port_type)

-------------------------------------------------------------------------------------------
-- Value tables
-------------------------------------------------------------------------------------------

local FORMATS = { [1] = "A: UDP-GRE-pcapng", [2] = "B: generic TLV (HEP3)" }

local BLOCK_TYPES = {
    [0x0A0D0D0A] = "Section Header Block (SHB)",
    [0x00000001] = "Interface Description Block (IDB)",
    [0x00000002] = "Packet Block (obsolete)",
    [0x00000003] = "Simple Packet Block (SPB)",
    [0x00000004] = "Name Resolution Block (NRB)",
    [0x00000005] = "Interface Statistics Block (ISB)",
    [0x00000006] = "Enhanced Packet Block (EPB)",
    [0x0000000A] = "Decryption Secrets Block (DSB)",
    [0x00000BAD] = "Custom Block (copiable)",
    [0x40000BAD] = "Custom Block (do not copy)",
}
-- Option names: the ones every block has, then per block.
local OPT_COMMON = {
    [0] = "opt_endofopt", [1] = "opt_comment",
    [2988] = "opt_custom (string, copiable)", [2989] = "opt_custom (binary, copiable)",
    [19372] = "opt_custom (string, do not copy)", [19373] = "opt_custom (binary, do not copy)",
}
local OPT_NAMES = {
    shb = { [2] = "shb_hardware", [3] = "shb_os", [4] = "shb_userappl" },
    idb = {
        [2] = "if_name", [3] = "if_description", [4] = "if_IPv4addr", [5] = "if_IPv6addr",
        [6] = "if_MACaddr", [7] = "if_EUIaddr", [8] = "if_speed", [9] = "if_tsresol",
        [10] = "if_tzone", [11] = "if_filter", [12] = "if_os", [13] = "if_fcslen",
        [14] = "if_tsoffset", [15] = "if_hardware", [16] = "if_txspeed", [17] = "if_rxspeed",
        [18] = "if_iana_tzname",
    },
    epb = {
        [2] = "epb_flags", [3] = "epb_hash", [4] = "epb_dropcount", [5] = "epb_packetid",
        [6] = "epb_queue", [7] = "epb_verdict", [8] = "epb_processid_threadid",
    },
    isb = {
        [2] = "isb_starttime", [3] = "isb_endtime", [4] = "isb_ifrecv", [5] = "isb_ifdrop",
        [6] = "isb_filteraccept", [7] = "isb_osdrop", [8] = "isb_usrdeliv",
    },
    other = {},
}

-- pcap/pcapng LINKTYPE_* values (tcpdump.org link-layer header types).
local LINKTYPES = {
    [0] = "NULL (BSD loopback)", [1] = "ETHERNET", [3] = "AX25", [6] = "IEEE802_5",
    [7] = "ARCNET_BSD", [8] = "SLIP", [9] = "PPP", [10] = "FDDI", [12] = "RAW (DLT 12)",
    [14] = "RAW (DLT 14)", [50] = "PPP_HDLC", [51] = "PPP_ETHER", [101] = "RAW",
    [104] = "C_HDLC", [105] = "IEEE802_11", [107] = "FRELAY", [108] = "LOOP",
    [113] = "LINUX_SLL", [119] = "PRISM_HEADER", [127] = "IEEE802_11_RADIOTAP",
    [139] = "MTP2_WITH_PHDR", [140] = "MTP2", [141] = "MTP3", [142] = "SCCP",
    [143] = "DOCSIS", [147] = "USER0", [148] = "USER1", [149] = "USER2", [150] = "USER3",
    [151] = "USER4", [152] = "USER5", [153] = "USER6", [154] = "USER7", [155] = "USER8",
    [156] = "USER9", [157] = "USER10", [158] = "USER11", [159] = "USER12",
    [160] = "USER13", [161] = "USER14", [162] = "USER15", [177] = "LINUX_LAPD",
    [187] = "BLUETOOTH_HCI_H4", [189] = "USB_LINUX", [192] = "PPI",
    [195] = "IEEE802_15_4", [201] = "BLUETOOTH_HCI_H4_WITH_PHDR", [220] = "USB_LINUX_MMAPPED",
    [228] = "IPV4", [229] = "IPV6", [239] = "NFLOG", [248] = "SCTP",
    [252] = "WIRESHARK_UPPER_PDU", [274] = "NORDIC_BLE", [276] = "LINUX_SLL2",
}

-- How to dissect a packet of each link type: dissector names to try, then the Wiretap
-- encapsulation (its number in the wtap_encap table; looked up by name in wtap_encaps when
-- the running Wireshark has that table, else the number given here).
local LINK_DISSECTORS = {
    [0] = { wtap = "NULL", num = 15 },
    [1] = { names = { "eth_maybefcs", "eth_withoutfcs" }, wtap = "ETHERNET", num = 1 },
    [9] = { names = { "ppp_hdlc" }, wtap = "PPP", num = 4 },
    [12] = { names = { "raw_ip" }, wtap = "RAW_IP", num = 7 },
    [14] = { names = { "raw_ip" }, wtap = "RAW_IP", num = 7 },
    [50] = { names = { "ppp_hdlc" }, wtap = "PPP", num = 4 },
    [101] = { names = { "raw_ip" }, wtap = "RAW_IP", num = 7 },
    [104] = { wtap = "CHDLC", num = 28 },
    [105] = { names = { "wlan_withoutfcs" }, wtap = "IEEE_802_11", num = 20 },
    [108] = { wtap = "LOOP", num = 174 },
    [113] = { names = { "sll_v1", "sll" }, wtap = "SLL", num = 25 },
    [127] = { names = { "radiotap" }, wtap = "IEEE_802_11_RADIOTAP", num = 23 },
    [140] = { names = { "mtp2" }, wtap = "MTP2", num = 42 },
    [141] = { names = { "mtp3" }, wtap = "MTP3", num = 43 },
    [177] = { names = { "lapd" }, wtap = "LINUX_LAPD", num = 88 },
    [228] = { names = { "ip" }, wtap = "RAW_IP4", num = 129 },
    [229] = { names = { "ipv6" }, wtap = "RAW_IP6", num = 130 },
    [239] = { names = { "nflog" }, wtap = "NFLOG", num = 141 },
    [248] = { names = { "sctp" }, wtap = "SCTP", num = 149 },
    [252] = { names = { "exported_pdu" }, wtap = "WIRESHARK_UPPER_PDU", num = 155 },
    [276] = { names = { "sll_v2", "sll2" }, wtap = "SLL2", num = 210 },
}
for i = 0, 15 do
    LINK_DISSECTORS[147 + i] = { wtap = "USER" .. i, num = 45 + i }
end

local HEP_VENDORS = {
    [0x0000] = "generic", [0x0001] = "FreeSWITCH", [0x0002] = "Kamailio",
    [0x0003] = "OpenSIPS", [0x0004] = "Asterisk", [0x0005] = "Homer", [0x0006] = "SipXecs",
    [0x0007] = "Yeti", [0x0008] = "Genesys", [STM_VENDOR] = "stm",
}

local HEP_PROTO_TYPES = {
    [0x00] = "unknown", [0x01] = "SIP", [0x02] = "XMPP", [0x03] = "SDP", [0x04] = "RTP",
    [0x05] = "RTCP (JSON)", [0x06] = "MGCP", [0x07] = "MEGACO (H.248)", [0x08] = "M2UA",
    [0x09] = "M3UA", [0x0a] = "IAX", [0x0b] = "H.322", [0x0c] = "H.321", [0x0d] = "M2PA",
    [0x22] = "MOS full report (JSON)", [0x23] = "MOS short report", [0x32] = "SIP (JSON)",
    [0x35] = "DNS (JSON)", [0x36] = "M3UA ISUP (JSON)", [0x37] = "RTSP", [0x38] = "Diameter",
    [0x39] = "GSM MAP", [0x3a] = "RTCP (PION)", [0x3c] = "CDR", [0x64] = "Log",
}
-- Payload dissector for a HEP protocol type, for foreign HEP3 (no rebuilt frame).
local HEP_PROTO_DISSECTORS = {
    [0x01] = "sip", [0x02] = "xmpp", [0x03] = "sdp", [0x04] = "rtp", [0x05] = "json",
    [0x06] = "mgcp", [0x07] = "megaco", [0x08] = "m2ua", [0x09] = "m3ua", [0x0a] = "iax2",
    [0x0d] = "m2pa", [0x22] = "json", [0x32] = "json", [0x35] = "json", [0x36] = "json",
    [0x37] = "rtsp", [0x38] = "diameter", [0x39] = "gsm_map", [0x64] = "data-text-lines",
}

local IP_FAMILIES = { [2] = "IPv4 (AF_INET)", [10] = "IPv6 (AF_INET6)" }
local IP_PROTOS = { [1] = "ICMP", [6] = "TCP", [17] = "UDP", [58] = "ICMPv6", [132] = "SCTP" }

local DIRECTIONS = { [0] = "not available", [1] = "inbound", [2] = "outbound", [3] = "invalid" }
local RECEPTIONS = {
    [0] = "not specified", [1] = "unicast", [2] = "multicast", [3] = "broadcast",
    [4] = "promiscuous",
}

-------------------------------------------------------------------------------------------
-- Fields
-------------------------------------------------------------------------------------------

local f = {
    -- What both formats have.
    format = ProtoField.uint8("stm.format", "Report format", base.DEC, FORMATS),
    producer = ProtoField.string("stm.producer", "Producer"),
    session = ProtoField.string("stm.session", "Session"),
    stream_id = ProtoField.uint32("stm.stream_id", "Stream ID", base.HEX),
    sequence = ProtoField.uint32("stm.sequence", "Sequence number"),
    seq_expected = ProtoField.uint32("stm.sequence.expected", "Expected sequence number"),
    seq_lost = ProtoField.uint32("stm.sequence.lost", "Reports lost before this one"),
    packets = ProtoField.uint32("stm.packets", "Packets in this report"),
    linktype = ProtoField.uint16("stm.linktype", "Link type", base.DEC, LINKTYPES),
    snaplen = ProtoField.uint32("stm.snaplen", "Snapshot length"),
    if_index = ProtoField.uint32("stm.if", "Source interface (stm if=N)"),
    interface_id = ProtoField.uint32("stm.interface_id", "Interface ID"),
    timestamp = ProtoField.absolute_time("stm.timestamp", "Timestamp", base.UTC),
    ts_tsresol = ProtoField.uint8("stm.timestamp.tsresol", "Timestamp resolution (if_tsresol)",
        base.HEX),
    ts_ticks = ProtoField.uint64("stm.timestamp.ticks", "Timestamp (units of the resolution)"),
    ts_tsoffset = ProtoField.int64("stm.timestamp.tsoffset", "Timestamp offset (if_tsoffset)"),
    ts_high = ProtoField.uint32("stm.timestamp.high", "Timestamp (high)", base.HEX),
    ts_low = ProtoField.uint32("stm.timestamp.low", "Timestamp (low)", base.HEX),
    caplen = ProtoField.uint32("stm.caplen", "Captured length"),
    origlen = ProtoField.uint32("stm.origlen", "Original length"),
    packet_data = ProtoField.bytes("stm.packet_data", "Packet data"),
    padding = ProtoField.bytes("stm.padding", "Padding"),
    comment = ProtoField.string("stm.comment", "Comment"),
    flags = ProtoField.uint32("stm.flags", "Packet flags (epb_flags)", base.HEX),
    flags_direction = ProtoField.uint32("stm.flags.direction", "Direction", base.DEC,
        DIRECTIONS, 0x00000003),
    flags_reception = ProtoField.uint32("stm.flags.reception", "Reception type", base.DEC,
        RECEPTIONS, 0x0000001C),
    flags_fcslen = ProtoField.uint32("stm.flags.fcslen", "FCS length", base.DEC, nil,
        0x000001E0),
    flags_errors = ProtoField.uint32("stm.flags.link_errors", "Link-layer errors", base.HEX,
        nil, 0xFFFF0000),
    hash = ProtoField.bytes("stm.hash", "Packet hash (epb_hash)"),
    dropcount = ProtoField.uint64("stm.dropcount", "Drop count (epb_dropcount)"),
    packetid = ProtoField.uint64("stm.packetid", "Packet ID (epb_packetid)"),
    queue = ProtoField.uint32("stm.queue", "Queue (epb_queue)"),
    verdict = ProtoField.bytes("stm.verdict", "Verdict (epb_verdict)"),
    if_name = ProtoField.string("stm.if_name", "Interface name"),
    if_description = ProtoField.string("stm.if_description", "Interface description"),
    if_tsresol = ProtoField.uint8("stm.if_tsresol", "Timestamp resolution", base.HEX),
    if_tsoffset = ProtoField.int64("stm.if_tsoffset", "Timestamp offset (seconds)"),
    if_fcslen = ProtoField.uint8("stm.if_fcslen", "FCS length"),
    if_speed = ProtoField.uint64("stm.if_speed", "Interface speed (bit/s)"),
    if_text = ProtoField.string("stm.if_text", "Interface text option"),
    -- Pieces of a packet too big for one report (both formats).
    fragment = ProtoField.none("stm.fragment", "Fragment"),
    fragment_kind = ProtoField.uint16("stm.fragment.kind", "Kind", base.DEC,
        { [1] = "piece of a packet block" }),
    fragment_reserved = ProtoField.uint16("stm.fragment.reserved", "Reserved"),
    fragment_packet_id = ProtoField.uint32("stm.fragment.packet_id", "Packet ID"),
    fragment_offset = ProtoField.uint32("stm.fragment.offset", "Offset"),
    fragment_total = ProtoField.uint32("stm.fragment.total_length", "Total length"),
    fragment_data = ProtoField.bytes("stm.fragment.data", "Piece"),
    fragment_last = ProtoField.bool("stm.fragment.last", "Last piece"),
    -- Format A: the pcapng blocks and options.
    block = ProtoField.none("stm.block", "Block"),
    block_type = ProtoField.uint32("stm.block.type", "Block type", base.HEX, BLOCK_TYPES),
    block_length = ProtoField.uint32("stm.block.length", "Block total length"),
    block_length2 = ProtoField.uint32("stm.block.length_trailer", "Block total length (trailer)"),
    block_data = ProtoField.bytes("stm.block.data", "Block body"),
    shb_magic = ProtoField.uint32("stm.shb.magic", "Byte-order magic", base.HEX),
    shb_byte_order = ProtoField.string("stm.shb.byte_order", "Byte order"),
    shb_major = ProtoField.uint16("stm.shb.version_major", "Major version"),
    shb_minor = ProtoField.uint16("stm.shb.version_minor", "Minor version"),
    shb_section_length = ProtoField.int64("stm.shb.section_length", "Section length"),
    shb_hardware = ProtoField.string("stm.shb.hardware", "Hardware (shb_hardware)"),
    shb_os = ProtoField.string("stm.shb.os", "OS (shb_os)"),
    shb_userappl = ProtoField.string("stm.shb.userappl", "Application (shb_userappl)"),
    idb_reserved = ProtoField.uint16("stm.idb.reserved", "Reserved"),
    spb_origlen = ProtoField.uint32("stm.spb.origlen", "Original length"),
    pb_drops = ProtoField.uint16("stm.pb.drops_count", "Drops count"),
    option = ProtoField.none("stm.option", "Option"),
    option_code = ProtoField.uint16("stm.option.code", "Option code"),
    option_length = ProtoField.uint16("stm.option.length", "Option length"),
    option_value = ProtoField.bytes("stm.option.value", "Option value"),
    custom_pen = ProtoField.uint32("stm.custom.pen", "Private Enterprise Number", base.DEC,
        { [STM_PEN] = "stm (32473, RFC 5612 documentation PEN)" }),
    custom_string = ProtoField.string("stm.custom.string", "Custom string"),
    custom_data = ProtoField.bytes("stm.custom.data", "Custom data"),
    -- Format B: the message, its chunks, HEP's generic values and stm's own.
    hep_id = ProtoField.string("stm.hep.protocol_id", "Protocol ID"),
    hep_length = ProtoField.uint16("stm.hep.length", "Total length"),
    chunk = ProtoField.none("stm.chunk", "Chunk"),
    chunk_vendor = ProtoField.uint16("stm.chunk.vendor", "Vendor ID", base.HEX, HEP_VENDORS),
    chunk_type = ProtoField.uint16("stm.chunk.type", "Type ID", base.HEX),
    chunk_length = ProtoField.uint16("stm.chunk.length", "Chunk length"),
    chunk_value = ProtoField.bytes("stm.chunk.value", "Value"),
    ip_family = ProtoField.uint8("stm.hep.ip_family", "IP family", base.DEC, IP_FAMILIES),
    ip_proto = ProtoField.uint8("stm.hep.ip_proto", "IP protocol", base.DEC, IP_PROTOS),
    src_ip = ProtoField.ipv4("stm.hep.src_ip", "Source IPv4 address"),
    dst_ip = ProtoField.ipv4("stm.hep.dst_ip", "Destination IPv4 address"),
    src_ipv6 = ProtoField.ipv6("stm.hep.src_ipv6", "Source IPv6 address"),
    dst_ipv6 = ProtoField.ipv6("stm.hep.dst_ipv6", "Destination IPv6 address"),
    src_port = ProtoField.uint16("stm.hep.src_port", "Source port"),
    dst_port = ProtoField.uint16("stm.hep.dst_port", "Destination port"),
    ts_sec = ProtoField.uint32("stm.hep.ts_sec", "Timestamp (seconds)"),
    ts_usec = ProtoField.uint32("stm.hep.ts_usec", "Timestamp (microseconds)"),
    proto_type = ProtoField.uint8("stm.hep.proto_type", "Protocol type", base.HEX,
        HEP_PROTO_TYPES),
    capture_id = ProtoField.uint32("stm.hep.capture_id", "Capture agent ID", base.HEX),
    keepalive = ProtoField.uint16("stm.hep.keepalive", "Keep-alive timer"),
    auth_key = ProtoField.string("stm.hep.auth_key", "Authentication key"),
    payload = ProtoField.bytes("stm.hep.payload", "Payload"),
    compressed = ProtoField.bytes("stm.hep.compressed_payload", "Compressed payload"),
    correlation_id = ProtoField.string("stm.hep.correlation_id", "Correlation ID"),
    vlan_id = ProtoField.uint16("stm.hep.vlan_id", "VLAN ID"),
    group_id = ProtoField.string("stm.hep.group_id", "Group ID"),
    src_mac = ProtoField.bytes("stm.hep.src_mac", "Source MAC", base.COLON),
    dst_mac = ProtoField.bytes("stm.hep.dst_mac", "Destination MAC", base.COLON),
    ethertype = ProtoField.uint16("stm.hep.ethertype", "Ethernet type", base.HEX),
    tcp_flags = ProtoField.uint8("stm.hep.tcp_flags", "TCP flags", base.HEX),
    ip_tos = ProtoField.uint8("stm.hep.ip_tos", "IP TOS", base.HEX),
    mos = ProtoField.uint16("stm.hep.mos", "MOS"),
    r_factor = ProtoField.uint16("stm.hep.r_factor", "R-factor"),
    geo_location = ProtoField.string("stm.hep.geo_location", "Geo location"),
    jitter = ProtoField.uint32("stm.hep.jitter", "Jitter"),
    transaction_type = ProtoField.string("stm.hep.transaction_type", "Transaction type"),
    payload_json_keys = ProtoField.string("stm.hep.payload_json_keys", "Payload JSON keys"),
    tags_values = ProtoField.string("stm.hep.tags_values", "Tags values"),
    tag_type = ProtoField.uint16("stm.hep.tag_type", "Tag type"),
    frame_header = ProtoField.bytes("stm.frame_header", "Frame header"),
    frame = ProtoField.bytes("stm.frame", "Frame"),
    frame_trailer = ProtoField.bytes("stm.frame_trailer", "Frame trailer"),
    session_bytes = ProtoField.bytes("stm.session_bytes", "Session (bytes)"),
}
local field_list = {}
for _, v in pairs(f) do field_list[#field_list + 1] = v end
stm.fields = field_list

local e = {
    malformed = ProtoExpert.new("stm.malformed", "Malformed STM report",
        expert.group.MALFORMED, expert.severity.ERROR),
    gap = ProtoExpert.new("stm.gap", "Sequence gap: reports lost",
        expert.group.SEQUENCE, expert.severity.WARN),
    duplicate = ProtoExpert.new("stm.duplicate", "Duplicate report",
        expert.group.SEQUENCE, expert.severity.WARN),
    late = ProtoExpert.new("stm.late", "Late report (reordered)",
        expert.group.SEQUENCE, expert.severity.NOTE),
    restart = ProtoExpert.new("stm.restart", "Sender restarted (new session)",
        expert.group.SEQUENCE, expert.severity.NOTE),
    no_sequence = ProtoExpert.new("stm.no_sequence", "Report without a sequence number",
        expert.group.SEQUENCE, expert.severity.NOTE),
    fragmented = ProtoExpert.new("stm.fragmented",
        "Piece of a packet too big for one report (stm-recv reassembles it; not done here)",
        expert.group.REASSEMBLE, expert.severity.NOTE),
    snapped = ProtoExpert.new("stm.snapped", "Captured shorter than its original length",
        expert.group.PROTOCOL, expert.severity.NOTE),
    unknown = ProtoExpert.new("stm.unknown", "Unknown block, option or chunk",
        expert.group.UNDECODED, expert.severity.NOTE),
    foreign = ProtoExpert.new("stm.foreign", "HEP3 message without stm chunks",
        expert.group.PROTOCOL, expert.severity.CHAT),
    no_reassembly = ProtoExpert.new("stm.no_reassembly",
        "Part of a message split across TCP segments: turn TCP reassembly on "
        .. "(tcp.desegment_tcp_streams) to see it whole",
        expert.group.REASSEMBLE, expert.severity.NOTE),
}
stm.experts = { e.malformed, e.gap, e.duplicate, e.late, e.restart, e.no_sequence,
    e.fragmented, e.snapped, e.unknown, e.foreign, e.no_reassembly }

-------------------------------------------------------------------------------------------
-- Preferences
-------------------------------------------------------------------------------------------

stm.prefs.protocol_type = Pref.string("GRE protocol type (format A)", "0x88B5",
    "GRE protocol type of format-A reports, as stm-send --protocol-type: hex (0x88B5) or "
    .. "decimal")
stm.prefs.gre_udp_ports = Pref.range("Extra GRE-in-UDP ports (format A)", "",
    "UDP ports other than 4754 to dissect as GRE-in-UDP (format A)", 65535)
stm.prefs.udp_ports = Pref.range("UDP ports (format B)", tostring(HEP_PORT),
    "UDP ports of format-B (HEP3) reports; others are found by the HEP3 heuristic", 65535)
stm.prefs.tcp_ports = Pref.range("TCP ports (format B)", tostring(HEP_PORT),
    "TCP ports of format-B (HEP3) reports; others are found by the HEP3 heuristic", 65535)
stm.prefs.dissect_packets = Pref.bool("Dissect the packets inside", true,
    "Hand every packet a report carries to the dissector of its link type")
stm.prefs.rebuild = Pref.bool("Rebuild format-B frames", true,
    "Dissect stm's format-B messages as the frame rebuilt from FRAME_HEADER + PAYLOAD + "
    .. "FRAME_TRAILER; off: dissect PAYLOAD alone, as for foreign HEP3")
stm.prefs.track_sequence = Pref.bool("Track sequence numbers", true,
    "Flag gaps, duplicates, late reports and restarts per stream")

-------------------------------------------------------------------------------------------
-- Small helpers (no bitwise operators: Lua 5.1 and 5.2 have none)
-------------------------------------------------------------------------------------------

-- The GRE protocol type preference as a number (the default when it is not one).
local function protocol_type()
    local v = tonumber(stm.prefs.protocol_type)
    if v == nil or v < 0 or v > 0xFFFF or v % 1 ~= 0 then return DEFAULT_PROTOCOL_TYPE end
    return v
end

local function bit_set(value, bitvalue)
    return math.floor(value / bitvalue) % 2 == 1
end

-- A whole number as text. Tvb readers give floats under Lua 5.3+ in some Wireshark
-- versions, and tostring(7.0) is "7.0" there; "%d" takes any integral number.
local function int(v)
    return string.format("%d", v)
end

local function pad4(n)
    return (4 - n % 4) % 4
end

local function u16(tvb, off, le)
    local r = tvb(off, 2)
    if le then return r:le_uint() end
    return r:uint()
end

local function u32(tvb, off, le)
    local r = tvb(off, 4)
    if le then return r:le_uint() end
    return r:uint()
end

-- tree:add or tree:add_le, as the byte order says.
local function add(tree, field, range, le, ...)
    if le then return tree:add_le(field, range, ...) end
    return tree:add(field, range, ...)
end

local function add_text(tree, field, range)
    return tree:add_packet_field(field, range, ENC_UTF_8)
end

local function generated(tree, field, value)
    local item = tree:add(field, value)
    item:set_generated()
    return item
end

local function last_value(extractor)
    local all = { extractor() }
    local fi = all[#all]
    if fi == nil then return nil end
    return fi.value
end

local function hex(range)
    return tostring(range:bytes()):lower()
end

-- The capture time of a pcapng timestamp: ticks (UInt64) in units of if_tsresol, plus
-- if_tsoffset seconds. nil for a resolution that cannot be (over 10^-19 or 2^-63).
local function nstime(ticks, tsresol, tsoffset)
    local secs, nsec
    if tsresol >= 128 then
        local p = tsresol - 128
        if p > 63 then return nil end
        secs = ticks:rshift(p)
        local frac = (ticks - secs:lshift(p)):tonumber()
        nsec = math.floor(frac / 2 ^ p * 1e9)
    else
        if tsresol > 19 then return nil end
        local units = UInt64(1)
        for _ = 1, tsresol do units = units * 10 end
        secs = ticks / units
        local frac = (ticks - secs * units):tonumber()
        if tsresol <= 9 then
            nsec = frac * 10 ^ (9 - tsresol)
        else
            nsec = math.floor(frac / 10 ^ (tsresol - 9))
        end
    end
    return NSTime.new(secs:tonumber() + (tsoffset or 0), math.floor(nsec))
end

local function fmt_time(t)
    if t == nil then return "?" end
    local s = t.secs
    local ok, text = pcall(os.date, "!%Y-%m-%d %H:%M:%S", s)
    if not ok or text == nil then return tostring(t) end
    return string.format("%s.%09d UTC", text, t.nsecs)
end

-------------------------------------------------------------------------------------------
-- The dissectors of what reports carry
-------------------------------------------------------------------------------------------

local link_cache = {}
local data_dissector = Dissector.get("data")

local function link_dissector(linktype)
    local d = link_cache[linktype]
    if d ~= nil then return d or nil end
    local spec = LINK_DISSECTORS[linktype]
    d = false
    if spec then
        for _, name in ipairs(spec.names or {}) do
            local ok, found = pcall(Dissector.get, name)
            if ok and found then d = found break end
        end
        if not d then
            local num = spec.num
            if type(wtap_encaps) == "table" and wtap_encaps[spec.wtap] then
                num = wtap_encaps[spec.wtap]
            end
            local ok, table_ = pcall(DissectorTable.get, "wtap_encap")
            if ok and table_ then
                local ok2, found = pcall(table_.get_dissector, table_, num)
                if ok2 and found then d = found end
            end
        end
    end
    link_cache[linktype] = d
    return d or nil
end

local depth = 0 -- reports inside reports: stop at 4
local depth_frame = nil

-- Hand a packet to a dissector; a malformed packet inside is that dissector's business
-- (it shows it), not a Lua error.
local function call_dissector(d, tvb, pinfo, tree)
    if depth_frame ~= pinfo.number then
        depth, depth_frame = 0, pinfo.number
    end
    if depth >= 4 then return false end
    depth = depth + 1
    local ok = pcall(d.call, d, tvb, pinfo, tree)
    depth = depth - 1
    return ok
end

-- Each packet after the first of a report starts its own part of the Info column.
local function info_separator(pinfo, ctx)
    if ctx.inner_count > 0 then
        -- Some dissectors (SIP) end their text with " | " already.
        if not tostring(pinfo.cols.info):match("|%s*$") then
            pinfo.cols.info:append(" | ")
        end
        pinfo.cols.info:fence()
    end
    ctx.inner_count = ctx.inner_count + 1
end

local function dissect_packet(ctx, linktype, tvb, pinfo, tree)
    if not stm.prefs.dissect_packets or tvb == nil then return end
    info_separator(pinfo, ctx)
    local d = link_dissector(linktype) or data_dissector
    call_dissector(d, tvb, pinfo, tree)
end

-------------------------------------------------------------------------------------------
-- Sequence accounting, per stream
-------------------------------------------------------------------------------------------

-- stream key -> {session, top, seen = {seq = true}, fifo = {...}}; set on the first pass.
local streams = {}
-- message key -> what the first pass found, for every later pass (GUI redissection).
local seq_results = {}
local WINDOW = 1024

local function seq_diff(a, b)
    local d = (a - b) % TWO32
    if d >= TWO32 / 2 then d = d - TWO32 end
    return d
end

local function remember(st, seq)
    if st.seen[seq] then return end
    st.seen[seq] = true
    st.fifo[#st.fifo + 1] = seq
    if #st.fifo > WINDOW then
        st.seen[table.remove(st.fifo, 1)] = nil
    end
end

local function track(pinfo, skey, session, seq, mkey)
    if not pinfo.visited then
        local st = streams[skey]
        local r
        if st == nil or (session ~= nil and st.session ~= session) then
            r = { kind = st and "restart" or "first" }
            st = { session = session, top = seq, seen = {}, fifo = {} }
            streams[skey] = st
        else
            local d = seq_diff(seq, st.top)
            if d == 1 then
                r = { kind = "next" }
                st.top = seq
            elseif d > 1 then
                r = { kind = "gap", expected = (st.top + 1) % TWO32, lost = d - 1 }
                st.top = seq
            elseif st.seen[seq] then
                r = { kind = "duplicate" }
            elseif d > -WINDOW then
                r = { kind = "late", top = st.top }
            else
                r = { kind = "restart" }
                st.top = seq
            end
        end
        remember(st, seq)
        seq_results[mkey] = r
    end
    return seq_results[mkey]
end

local function sequence_items(ctx, pinfo, tree, item, skey, session, seq, mkey)
    if seq == nil then
        tree:add_proto_expert_info(e.no_sequence)
        return
    end
    if not stm.prefs.track_sequence then return end
    local r = track(pinfo, skey, session, seq, mkey)
    if r == nil then return end
    if r.kind == "gap" then
        generated(item, f.seq_expected, r.expected)
        generated(item, f.seq_lost, r.lost)
        item:add_proto_expert_info(e.gap, string.format(
            "Sequence gap: %d report(s) lost (expected %d, got %d)", r.lost, r.expected, seq))
        ctx.note = string.format(" [%d lost]", r.lost)
    elseif r.kind == "duplicate" then
        item:add_proto_expert_info(e.duplicate,
            string.format("Duplicate report: sequence %d seen before", seq))
        ctx.note = " [duplicate]"
    elseif r.kind == "late" then
        item:add_proto_expert_info(e.late, string.format(
            "Late report: sequence %d arrived after %d", seq, r.top))
        ctx.note = " [late]"
    elseif r.kind == "restart" then
        item:add_proto_expert_info(e.restart, string.format(
            "Sender restarted: new session, sequence starts again at %d", seq))
    end
end

-------------------------------------------------------------------------------------------
-- pcapng options (format A blocks; format B INTERFACE and PACKET_OPTIONS chunks)
-------------------------------------------------------------------------------------------

local function malformed(ctx, tree, text)
    tree:add_proto_expert_info(e.malformed, "Malformed STM report: " .. text)
    ctx.malformed = ctx.malformed or text
end

-- stm's own "key=value" custom options.
local function stm_custom(ctx, tree, range, info)
    local text = range:string()
    local key, value = text:match("^([^=]*)=(.*)$")
    if key == nil then return end
    local vrange = nil
    if #value > 0 then vrange = range(#key + 1, #value) end
    if key == "producer" then
        ctx.producer = value
        if vrange then add_text(tree, f.producer, vrange) else generated(tree, f.producer, "") end
    elseif key == "session" then
        ctx.session = value
        if vrange then add_text(tree, f.session, vrange) end
    elseif key == "if" then
        local n = tonumber(value)
        if n and vrange then
            tree:add(f.if_index, vrange, n)
            if info then info.if_index = n end
        end
    end
end

local FIXED_OPTION = {
    idb = { [9] = 1, [13] = 1, [14] = 8, [8] = 8, [16] = 8, [17] = 8, [10] = 4, [4] = 8,
        [5] = 17, [6] = 6, [7] = 8 },
    epb = { [2] = 4, [4] = 8, [5] = 8, [6] = 4 },
}

-- Walks the options in [off, stop) in the given byte order. `kind` picks the names (shb,
-- idb, epb, isb, other). `info` (may be nil) collects what the caller needs (if_tsresol,
-- if_tsoffset, stm's if=N, epb_flags). Returns the number of options.
local function dissect_options(ctx, tvb, off, stop, le, tree, kind, info)
    local names = OPT_NAMES[kind] or OPT_NAMES.other
    local count = 0
    while off < stop do
        if stop - off < 4 then
            malformed(ctx, tree, string.format("%d stray bytes after the options", stop - off))
            return count
        end
        local code = u16(tvb, off, le)
        local olen = u16(tvb, off + 2, le)
        local name = names[code] or OPT_COMMON[code] or string.format("unknown option %d", code)
        if code == 0 then
            local oitem = tree:add(f.option, tvb(off, 4))
            oitem:set_text("opt_endofopt")
            add(oitem, f.option_code, tvb(off, 2), le)
            add(oitem, f.option_length, tvb(off + 2, 2), le)
            off = off + 4
            if off < stop then
                malformed(ctx, oitem, string.format("%d bytes after opt_endofopt", stop - off))
            end
            return count
        end
        if off + 4 + olen > stop then
            local oitem = tree:add(f.option, tvb(off, stop - off))
            oitem:set_text(string.format("%s: length %d runs past the end", name, olen))
            add(oitem, f.option_code, tvb(off, 2), le)
            add(oitem, f.option_length, tvb(off + 2, 2), le)
            malformed(ctx, oitem, string.format("option %d of length %d runs past the end "
                .. "of its block", code, olen))
            return count
        end
        local whole = 4 + olen + pad4(olen)
        if off + whole > stop then whole = stop - off end
        local oitem = tree:add(f.option, tvb(off, whole))
        add(oitem, f.option_code, tvb(off, 2), le):append_text(" (" .. name .. ")")
        add(oitem, f.option_length, tvb(off + 2, 2), le)
        local vr = nil
        if olen > 0 then vr = tvb(off + 4, olen) end
        local label = name
        local fixed = FIXED_OPTION[kind] and FIXED_OPTION[kind][code]
        if fixed and olen ~= fixed then
            malformed(ctx, oitem, string.format("%s has %d bytes, not %d", name, olen, fixed))
            if vr then oitem:add(f.option_value, vr) end
        elseif vr == nil then
            -- an empty option: nothing more to show
        elseif code == 1 then
            add_text(oitem, f.comment, vr)
            label = name .. ": " .. vr:string(ENC_UTF_8)
            if info then info.comments = (info.comments or 0) + 1 end
        elseif code == 2988 or code == 2989 or code == 19372 or code == 19373 then
            if olen < 4 then
                malformed(ctx, oitem, "custom option shorter than its PEN")
                oitem:add(f.option_value, vr)
            else
                local pen = u32(tvb, off + 4, le)
                add(oitem, f.custom_pen, tvb(off + 4, 4), le)
                if olen > 4 then
                    local dr = tvb(off + 8, olen - 4)
                    if code == 2988 or code == 19372 then
                        add_text(oitem, f.custom_string, dr)
                        label = string.format("%s: PEN %d, \"%s\"", name, pen, dr:string())
                        if pen == STM_PEN then stm_custom(ctx, oitem, dr, info) end
                    else
                        oitem:add(f.custom_data, dr)
                        label = string.format("%s: PEN %d, %d bytes", name, pen, olen - 4)
                    end
                end
            end
        elseif kind == "shb" and (code == 2 or code == 3 or code == 4) then
            local fld = ({ [2] = f.shb_hardware, [3] = f.shb_os, [4] = f.shb_userappl })[code]
            add_text(oitem, fld, vr)
            label = name .. ": " .. vr:string(ENC_UTF_8)
        elseif kind == "idb" then
            if code == 2 then
                add_text(oitem, f.if_name, vr)
                label = name .. ": " .. vr:string(ENC_UTF_8)
            elseif code == 3 then
                add_text(oitem, f.if_description, vr)
                label = name .. ": " .. vr:string(ENC_UTF_8)
            elseif code == 9 then
                local v = vr:uint()
                oitem:add(f.if_tsresol, vr)
                if info then info.tsresol = v end
                if v >= 128 then
                    label = string.format("%s: 2^-%d s", name, v - 128)
                else
                    label = string.format("%s: 10^-%d s", name, v)
                end
            elseif code == 14 then
                local v
                if le then v = vr:le_int64() else v = vr:int64() end
                add(oitem, f.if_tsoffset, vr, le)
                if info then info.tsoffset = v:tonumber() end
                label = name .. ": " .. tostring(v) .. " s"
            elseif code == 13 then
                oitem:add(f.if_fcslen, vr)
                label = name .. ": " .. int(vr:uint())
            elseif code == 8 or code == 16 or code == 17 then
                add(oitem, f.if_speed, vr, le)
            elseif code == 12 or code == 15 or code == 18 then
                add_text(oitem, f.if_text, vr)
                label = name .. ": " .. vr:string(ENC_UTF_8)
            else
                oitem:add(f.option_value, vr)
            end
        elseif kind == "epb" then
            if code == 2 then
                local v = u32(tvb, off + 4, le)
                local fi = add(oitem, f.flags, vr, le)
                add(fi, f.flags_direction, vr, le)
                add(fi, f.flags_reception, vr, le)
                add(fi, f.flags_fcslen, vr, le)
                add(fi, f.flags_errors, vr, le)
                label = string.format("%s: 0x%08x (%s)", name, v, DIRECTIONS[v % 4])
            elseif code == 3 then
                oitem:add(f.hash, vr)
            elseif code == 4 then
                add(oitem, f.dropcount, vr, le)
                label = name .. ": " .. tostring(le and vr:le_uint64() or vr:uint64())
            elseif code == 5 then
                add(oitem, f.packetid, vr, le)
                label = name .. ": " .. tostring(le and vr:le_uint64() or vr:uint64())
            elseif code == 6 then
                add(oitem, f.queue, vr, le)
                label = name .. ": " .. int(u32(tvb, off + 4, le))
            elseif code == 7 then
                oitem:add(f.verdict, vr)
            else
                oitem:add(f.option_value, vr)
            end
        else
            oitem:add(f.option_value, vr)
        end
        oitem:set_text(label)
        if names[code] == nil and OPT_COMMON[code] == nil then
            oitem:add_proto_expert_info(e.unknown, "Unknown option " .. int(code))
        end
        count = count + 1
        off = off + whole
    end
    return count
end

-------------------------------------------------------------------------------------------
-- Format A: GRE payload = one pcapng section
-------------------------------------------------------------------------------------------

-- The GRE key (stream ID) and sequence number of the report. On UDP the plugin reads them
-- itself in front of the GRE dissector (gre_front, below), because field extractors only
-- see what a protocol tree holds, and there is no tree on a first pass without filters;
-- GRE reached some other way (over IP) falls back to the extractors.
local gre_key_field = Field.new("gre.key")
local gre_seq_field = Field.new("gre.sequence_number")
local gre_hint = nil -- {number, key, seq} of the GRE header just read by gre_front

local function gre_header_fields(pinfo)
    local hint = gre_hint
    if hint ~= nil and hint.number == pinfo.number then
        return hint.key, hint.seq
    end
    return last_value(gre_key_field), last_value(gre_seq_field)
end

local function new_root(tree, tvb, format)
    local root = tree:add(stm, tvb())
    generated(root, f.format, format)
    return root
end

local function block_label(btype)
    return BLOCK_TYPES[btype] or string.format("Unknown block type 0x%08x", btype)
end

local function a_shb(ctx, tvb, off, blen, le, btree)
    if blen < 28 then
        malformed(ctx, btree, string.format("SHB of %d bytes, below 28", blen))
        return
    end
    add(btree, f.shb_magic, tvb(off + 8, 4), le)
    generated(btree, f.shb_byte_order, le and "little-endian" or "big-endian")
    add(btree, f.shb_major, tvb(off + 12, 2), le)
    add(btree, f.shb_minor, tvb(off + 14, 2), le)
    add(btree, f.shb_section_length, tvb(off + 16, 8), le)
    local major = u16(tvb, off + 12, le)
    if major ~= 1 then
        malformed(ctx, btree, string.format("pcapng version %d.%d", major,
            u16(tvb, off + 14, le)))
    end
    dissect_options(ctx, tvb, off + 24, off + blen - 4, le, btree, "shb", nil)
end

local function a_idb(ctx, tvb, off, blen, le, btree)
    if blen < 20 then
        malformed(ctx, btree, string.format("IDB of %d bytes, below 20", blen))
        return
    end
    local info = { linktype = u16(tvb, off + 8, le), snaplen = u32(tvb, off + 12, le),
        tsresol = 6, tsoffset = 0 }
    local id = #ctx.ifaces
    ctx.ifaces[id + 1] = info
    generated(btree, f.interface_id, id)
    add(btree, f.linktype, tvb(off + 8, 2), le)
    add(btree, f.idb_reserved, tvb(off + 10, 2), le)
    add(btree, f.snaplen, tvb(off + 12, 4), le)
    dissect_options(ctx, tvb, off + 16, off + blen - 4, le, btree, "idb", info)
    local text = string.format("Interface %d: %s, snaplen %d", id,
        LINKTYPES[info.linktype] or ("link type " .. int(info.linktype)), info.snaplen)
    if info.if_index then text = text .. string.format(", stm if=%d", info.if_index) end
    btree:append_text(" (" .. text .. ")")
end

local function snapped(ctx, tree, caplen, origlen)
    if caplen < origlen then
        tree:add_proto_expert_info(e.snapped, string.format(
            "Packet captured with %d of its %d bytes", caplen, origlen))
    end
end

-- EPB (6) and the obsolete PB (2).
local function a_epb(ctx, tvb, off, blen, le, btree, pinfo, tree, obsolete)
    if blen < 32 then
        malformed(ctx, btree, string.format("%s of %d bytes, below 32",
            obsolete and "PB" or "EPB", blen))
        return
    end
    local ifid
    if obsolete then
        ifid = u16(tvb, off + 8, le)
        add(btree, f.interface_id, tvb(off + 8, 2), le, ifid)
        add(btree, f.pb_drops, tvb(off + 10, 2), le)
    else
        ifid = u32(tvb, off + 8, le)
        add(btree, f.interface_id, tvb(off + 8, 4), le)
    end
    local high = u32(tvb, off + 12, le)
    local low = u32(tvb, off + 16, le)
    local caplen = u32(tvb, off + 20, le)
    local origlen = u32(tvb, off + 24, le)
    local iface = ctx.ifaces[ifid + 1]
    local ts = nil
    if iface then ts = nstime(UInt64.new(low, high), iface.tsresol, iface.tsoffset) end
    if ts then
        btree:add(f.timestamp, tvb(off + 12, 8), ts)
    end
    add(btree, f.ts_high, tvb(off + 12, 4), le)
    add(btree, f.ts_low, tvb(off + 16, 4), le)
    generated(btree, f.ts_ticks, UInt64.new(low, high))
    add(btree, f.caplen, tvb(off + 20, 4), le)
    add(btree, f.origlen, tvb(off + 24, 4), le)
    if iface == nil then
        malformed(ctx, btree, string.format("packet on interface %d, but the report has %d "
            .. "IDB(s)", ifid, #ctx.ifaces))
    end
    if caplen > blen - 32 then
        malformed(ctx, btree, string.format("captured length %d exceeds the block (%d bytes)",
            caplen, blen))
        return
    end
    local ptvb = nil
    if caplen > 0 then
        btree:add(f.packet_data, tvb(off + 28, caplen))
        ptvb = tvb(off + 28, caplen):tvb()
    end
    local pad = pad4(caplen)
    local optoff = off + 28 + caplen + pad
    if optoff > off + blen - 4 then
        malformed(ctx, btree, "packet data padding runs past the block")
        optoff = off + blen - 4
    elseif pad > 0 then
        btree:add(f.padding, tvb(off + 28 + caplen, pad))
    end
    dissect_options(ctx, tvb, optoff, off + blen - 4, le, btree, "epb", nil)
    snapped(ctx, btree, caplen, origlen)
    ctx.packets = ctx.packets + 1
    local lt = iface and iface.linktype or -1
    btree:append_text(string.format(" (packet %d: interface %d, %s, %d bytes, %s)",
        ctx.packets, ifid, LINKTYPES[lt] or ("link type " .. int(lt)), caplen, fmt_time(ts)))
    if iface and ptvb then
        dissect_packet(ctx, iface.linktype, ptvb, pinfo, tree)
    end
end

local function a_spb(ctx, tvb, off, blen, le, btree, pinfo, tree)
    if blen < 16 then
        malformed(ctx, btree, string.format("SPB of %d bytes, below 16", blen))
        return
    end
    local origlen = u32(tvb, off + 8, le)
    add(btree, f.spb_origlen, tvb(off + 8, 4), le)
    local iface = ctx.ifaces[1]
    if iface == nil then
        malformed(ctx, btree, "SPB without an IDB (interface 0)")
    end
    local caplen = math.min(origlen, blen - 16)
    if iface and iface.snaplen > 0 then caplen = math.min(caplen, iface.snaplen) end
    generated(btree, f.interface_id, 0)
    generated(btree, f.caplen, caplen)
    ctx.packets = ctx.packets + 1
    btree:append_text(string.format(" (packet %d: interface 0, %d bytes, no timestamp)",
        ctx.packets, caplen))
    if caplen > 0 then
        btree:add(f.packet_data, tvb(off + 12, caplen))
        snapped(ctx, btree, caplen, origlen)
        if iface then
            dissect_packet(ctx, iface.linktype, tvb(off + 12, caplen):tvb(), pinfo, tree)
        end
    end
end

local function fragment_info(pinfo, ctx, pid, offset, size, total)
    ctx.fragments = ctx.fragments + 1
    ctx.fragment_text = string.format("fragment of packet %d: bytes %d-%d of %d", pid, offset,
        offset + size, total)
    info_separator(pinfo, ctx)
    pinfo.cols.info:append(string.format("Fragment of packet %d: bytes %d-%d of %d", pid,
        offset, offset + size, total))
end

local function a_custom(ctx, tvb, off, blen, le, btree, pinfo)
    if blen < 16 then
        malformed(ctx, btree, string.format("custom block of %d bytes, below 16", blen))
        return
    end
    local pen = u32(tvb, off + 8, le)
    add(btree, f.custom_pen, tvb(off + 8, 4), le)
    local body = blen - 16
    if pen ~= STM_PEN then
        if body > 0 then btree:add(f.custom_data, tvb(off + 12, body)) end
        return
    end
    if body < 16 then
        malformed(ctx, btree, string.format("stm custom block of %d bytes, below 32", blen))
        if body > 0 then btree:add(f.custom_data, tvb(off + 12, body)) end
        return
    end
    local kind = u16(tvb, off + 12, le)
    if kind ~= 1 then
        add(btree, f.fragment_kind, tvb(off + 12, 2), le)
        btree:add_proto_expert_info(e.unknown, "Unknown stm custom block kind " .. int(kind))
        btree:add(f.custom_data, tvb(off + 16, body - 4))
        return
    end
    local pid = u32(tvb, off + 16, le)
    local offset = u32(tvb, off + 20, le)
    local total = u32(tvb, off + 24, le)
    local room = body - 16
    local size = room
    if offset <= total and total - offset < room then size = total - offset end
    local frag = btree:add(f.fragment, tvb(off + 12, body))
    frag:set_text(string.format("Fragment of packet %d: bytes %d-%d of %d", pid, offset,
        offset + size, total))
    add(frag, f.fragment_kind, tvb(off + 12, 2), le)
    add(frag, f.fragment_reserved, tvb(off + 14, 2), le)
    add(frag, f.fragment_packet_id, tvb(off + 16, 4), le)
    add(frag, f.fragment_offset, tvb(off + 20, 4), le)
    add(frag, f.fragment_total, tvb(off + 24, 4), le)
    if size > 0 then frag:add(f.fragment_data, tvb(off + 28, size)) end
    generated(frag, f.fragment_last, offset + size == total)
    if offset > total or room - size >= 4 then
        malformed(ctx, frag, string.format("piece at offset %d of %d bytes runs past the "
            .. "total length %d", offset, room, total))
    elseif #ctx.ifaces == 0 then
        malformed(ctx, frag, "fragment without an interface")
    end
    frag:add_proto_expert_info(e.fragmented)
    btree:append_text(string.format(" (fragment of packet %d, offset %d)", pid, offset))
    fragment_info(pinfo, ctx, pid, offset, size, total)
end

local function new_ctx(format)
    return { format = format, ifaces = {}, packets = 0, fragments = 0, inner_count = 0 }
end

-- The Info column: "STM A amf-1 #7: <what the packets inside say>". The inner dissectors
-- write after a fence; info_finish puts our head in front once the report is read.
-- `keep` keeps what the column already says (an earlier message of the same TCP segment).
local INFO_MARK = "STM: "
local function info_start(pinfo, keep)
    pinfo.cols.protocol = "STM"
    local base = ""
    if keep then base = tostring(pinfo.cols.info) .. " || " end
    pinfo.cols.info:clear_fence()
    pinfo.cols.info = base .. INFO_MARK
    pinfo.cols.info:fence()
    return base
end

local function info_finish(pinfo, base, head, ctx)
    pinfo.cols.info:clear_fence()
    local text = tostring(pinfo.cols.info)
    local inner = text
    local i, j = text:find(INFO_MARK, 1, true)
    if i then
        -- What the packets inside wrote; some dissectors (TCP analysis) prepend theirs in
        -- front of the fence, so before our mark, and before `base` too.
        local before = text:sub(1, i - 1)
        if before:sub(1, #base) == base then
            before = before:sub(#base + 1)
        elseif before:sub(-#base) == base then
            before = before:sub(1, #before - #base)
        end
        inner = before .. text:sub(j + 1)
    end
    inner = inner:gsub("[%s|]+$", "")
    if inner == "" then
        if ctx.malformed then
            inner = ctx.malformed
        elseif ctx.partial then
            inner = ctx.partial
        elseif ctx.format == 1 then
            inner = string.format("%d packet(s)", ctx.packets)
        end
    end
    pinfo.cols.info = base .. head .. ": " .. inner
    pinfo.cols.info:fence()
end

local function dissect_a(tvb, pinfo, tree)
    local len = tvb:len()
    local reported = tvb:reported_len()
    local ctx = new_ctx(1)
    local root = new_root(tree, tvb, 1)
    local key, seq = gre_header_fields(pinfo)
    if key ~= nil then generated(root, f.stream_id, key) end
    local seq_item = root
    if seq ~= nil then seq_item = generated(root, f.sequence, seq) end
    local base = info_start(pinfo, false)

    local off = 0
    local le = nil
    local nblocks = 0
    while off < len do
        if len - off < 12 then
            if reported > len then
                ctx.partial = string.format("report captured with %d of its %d bytes", len,
                    reported)
                root:add_proto_expert_info(e.snapped, "Report captured with "
                    .. ctx.partial:sub(22))
            else
                malformed(ctx, root, string.format("%d stray bytes after the last block",
                    len - off))
            end
            break
        end
        local btype_be = tvb(off, 4):uint()
        if btype_be == 0x0A0D0D0A then
            local magic = tvb(off + 8, 4):uint()
            if magic == 0x1A2B3C4D then
                le = false
            elseif magic == 0x4D3C2B1A then
                le = true
            else
                local bi = root:add(f.block, tvb(off, len - off))
                bi:set_text("Section Header Block with a bad byte-order magic")
                malformed(ctx, bi, string.format("bad byte-order magic 0x%08x", magic))
                break
            end
            if nblocks > 0 then
                malformed(ctx, root, "a second section in one report")
            end
        elseif nblocks == 0 then
            local bi = root:add(f.block, tvb(off, len - off))
            bi:set_text("Not a pcapng section")
            malformed(ctx, bi, string.format("the payload starts with 0x%08x, not a Section "
                .. "Header Block", btype_be))
            break
        end
        local btype = u32(tvb, off, le)
        local blen = u32(tvb, off + 4, le)
        if blen >= 12 and blen % 4 == 0 and blen > len - off and blen <= reported - off then
            -- The capture kept less of the report than it had (its snaplen).
            local bi = root:add(f.block, tvb(off, len - off))
            bi:set_text(block_label(btype) .. string.format(": %d of its %d bytes captured",
                len - off, blen))
            add(bi, f.block_type, tvb(off, 4), le)
            add(bi, f.block_length, tvb(off + 4, 4), le)
            ctx.partial = string.format("report captured with %d of its %d bytes", len,
                reported)
            root:add_proto_expert_info(e.snapped, "Report captured with " .. ctx.partial:sub(22))
            break
        end
        if blen < 12 or blen % 4 ~= 0 or blen > len - off then
            local bi = root:add(f.block, tvb(off, len - off))
            bi:set_text(block_label(btype))
            add(bi, f.block_type, tvb(off, 4), le)
            add(bi, f.block_length, tvb(off + 4, 4), le)
            if blen > len - off then
                malformed(ctx, bi, string.format("block of %d bytes runs past the end of the "
                    .. "report (%d bytes left)", blen, len - off))
            else
                malformed(ctx, bi, string.format("block length %d", blen))
            end
            break
        end
        nblocks = nblocks + 1
        local btree = root:add(f.block, tvb(off, blen))
        btree:set_text(block_label(btype))
        add(btree, f.block_type, tvb(off, 4), le)
        add(btree, f.block_length, tvb(off + 4, 4), le)
        if btype == 0x0A0D0D0A then
            a_shb(ctx, tvb, off, blen, le, btree)
        elseif btype == 1 then
            a_idb(ctx, tvb, off, blen, le, btree)
        elseif btype == 6 then
            a_epb(ctx, tvb, off, blen, le, btree, pinfo, tree, false)
        elseif btype == 2 then
            a_epb(ctx, tvb, off, blen, le, btree, pinfo, tree, true)
        elseif btype == 3 then
            a_spb(ctx, tvb, off, blen, le, btree, pinfo, tree)
        elseif btype == 0x00000BAD or btype == 0x40000BAD then
            a_custom(ctx, tvb, off, blen, le, btree, pinfo)
        else
            if blen > 12 then btree:add(f.block_data, tvb(off + 8, blen - 12)) end
            if BLOCK_TYPES[btype] == nil then
                btree:add_proto_expert_info(e.unknown, string.format("Unknown block type "
                    .. "0x%08x", btype))
            end
        end
        local trailer = u32(tvb, off + blen - 4, le)
        local ti = add(btree, f.block_length2, tvb(off + blen - 4, 4), le)
        if trailer ~= blen then
            malformed(ctx, ti, string.format("trailing block length %d differs from %d",
                trailer, blen))
        end
        off = off + blen
    end
    if len == 0 then
        malformed(ctx, root, "an empty report (a GRE header and no pcapng section)")
    elseif nblocks > 0 and ctx.packets == 0 and ctx.fragments == 0 and not ctx.malformed
        and not ctx.partial then
        malformed(ctx, root, "a report without packets")
    end
    if ctx.producer == nil and nblocks > 0 then
        root:add_proto_expert_info(e.unknown, "No producer option in the SHB")
    end
    generated(root, f.packets, ctx.packets)

    if ctx.malformed then
        -- stm-recv drops a malformed report before its sequence number counts
    elseif seq ~= nil then -- no key (K bit clear): stream ID 0, as stm-recv takes it
        sequence_items(ctx, pinfo, root, seq_item, "A/" .. (ctx.producer or "") .. "/"
            .. int(key or 0), ctx.session, seq, string.format("%d:%d:%d", pinfo.number,
            tvb:offset(), seq))
    else
        root:add_proto_expert_info(e.no_sequence)
    end
    local text = string.format("STM format A, producer %s, stream 0x%08x, seq %s, %d packet(s)",
        ctx.producer or "?", key or 0, seq ~= nil and int(seq) or "-", ctx.packets)
    if ctx.fragment_text then text = text .. ", " .. ctx.fragment_text end
    root:set_text(text)
    if ctx.malformed then
        root:append_text(" [malformed]")
    end
    info_finish(pinfo, base, string.format("STM A %s #%s%s%s", ctx.producer or "?",
        seq ~= nil and int(seq) or "-", ctx.note or "",
        ctx.malformed and " [malformed]" or ""), ctx)
    return len
end

-------------------------------------------------------------------------------------------
-- Format B: HEP3 messages
-------------------------------------------------------------------------------------------

local G = { -- generic chunk types: name, field, expected value size (nil: any)
    [0x0001] = { "IP_FAMILY", f.ip_family, 1 },
    [0x0002] = { "IP_PROTO", f.ip_proto, 1 },
    [0x0003] = { "IPV4_SRC", f.src_ip, 4 },
    [0x0004] = { "IPV4_DST", f.dst_ip, 4 },
    [0x0005] = { "IPV6_SRC", f.src_ipv6, 16 },
    [0x0006] = { "IPV6_DST", f.dst_ipv6, 16 },
    [0x0007] = { "SRC_PORT", f.src_port, 2 },
    [0x0008] = { "DST_PORT", f.dst_port, 2 },
    [0x0009] = { "TIMESTAMP_SEC", f.ts_sec, 4 },
    [0x000a] = { "TIMESTAMP_USEC", f.ts_usec, 4 },
    [0x000b] = { "PROTO_TYPE", f.proto_type, 1 },
    [0x000c] = { "CAPTURE_ID", f.capture_id, 4 },
    [0x000d] = { "KEEPALIVE_TIMER", f.keepalive, 2 },
    [0x000e] = { "AUTH_KEY", f.auth_key, nil, true },
    [0x000f] = { "PAYLOAD", f.payload },
    [0x0010] = { "COMPRESSED_PAYLOAD", f.compressed },
    [0x0011] = { "CORRELATION_ID", f.correlation_id, nil, true },
    [0x0012] = { "VLAN_ID", f.vlan_id, 2 },
    [0x0013] = { "GROUP_ID", f.group_id, nil, true },
    [0x0014] = { "SRC_MAC", f.src_mac },
    [0x0015] = { "DST_MAC", f.dst_mac },
    [0x0016] = { "ETHERNET_TYPE", f.ethertype, 2 },
    [0x0017] = { "TCP_FLAGS", f.tcp_flags, 1 },
    [0x0018] = { "IP_TOS", f.ip_tos, 1 },
    [0x0020] = { "MOS", f.mos, 2 },
    [0x0021] = { "R_FACTOR", f.r_factor, 2 },
    [0x0022] = { "GEO_LOCATION", f.geo_location, nil, true },
    [0x0023] = { "JITTER", f.jitter, 4 },
    [0x0024] = { "TRANSACTION_TYPE", f.transaction_type, nil, true },
    [0x0025] = { "PAYLOAD_JSON_KEYS", f.payload_json_keys, nil, true },
    [0x0026] = { "TAGS_VALUES", f.tags_values, nil, true },
    [0x0027] = { "TAG_TYPE", f.tag_type, 2 },
}
local S = { -- stm's chunk types (vendor 0x5354)
    [0x5301] = { "FRAME_HEADER", f.frame_header },
    [0x5302] = { "FRAME", f.frame },
    [0x5303] = { "LINKTYPE", f.linktype, 2 },
    [0x5304] = { "TIMESTAMP", nil, 17 },
    [0x5305] = { "ORIGINAL_LENGTH", f.origlen, 4 },
    [0x5306] = { "INTERFACE", nil },
    [0x5307] = { "PRODUCER", f.producer, nil, true },
    [0x5308] = { "SESSION", nil },
    [0x5309] = { "STREAM_ID", f.stream_id, 4 },
    [0x530a] = { "SEQUENCE", f.sequence, 4 },
    [0x530b] = { "COMMENT", f.comment, nil, true },
    [0x530c] = { "FLAGS", nil, 4 },
    [0x530d] = { "FRAGMENT", nil },
    [0x530e] = { "FRAME_TRAILER", f.frame_trailer },
    [0x530f] = { "PACKET_OPTIONS", nil },
}

local udp_port_table = DissectorTable.get("udp.port")
local tcp_port_table = DissectorTable.get("tcp.port")
local sctp_port_table = nil
do
    local ok, t = pcall(DissectorTable.get, "sctp.port")
    if ok then sctp_port_table = t end
end

local function b_payload(ctx, c, tvb, pinfo, tree)
    -- Foreign HEP3 (or rebuild turned off): the payload alone, by protocol type, else port.
    local pr = c.range[0x000f]
    if pr == nil or not stm.prefs.dissect_packets then return end
    local ptvb = pr:tvb()
    info_separator(pinfo, ctx)
    local ptype = c.value[0x000b]
    local name = ptype and HEP_PROTO_DISSECTORS[ptype]
    if name then
        local ok, d = pcall(Dissector.get, name)
        if ok and d then
            call_dissector(d, ptvb, pinfo, tree)
            return
        end
    end
    local proto = c.value[0x0002]
    local ports_table = udp_port_table
    if proto == 6 then ports_table = tcp_port_table elseif proto == 132 then
        ports_table = sctp_port_table
    end
    if ports_table then
        for _, key in ipairs({ 0x0008, 0x0007 }) do -- destination port first
            local port = c.value[key]
            if port and port ~= HEP_PORT then
                local d = ports_table:get_dissector(port)
                if d then
                    call_dissector(d, ptvb, pinfo, tree)
                    return
                end
            end
        end
    end
    call_dissector(data_dissector, ptvb, pinfo, tree)
end

local function b_chunk_value(ctx, tvb, coff, clen, vendor, ctype, citem, c)
    local vlen = clen - 6
    local vr = nil
    if vlen > 0 then vr = tvb(coff + 6, vlen) end
    local spec
    if vendor == 0 then spec = G[ctype] elseif vendor == STM_VENDOR then spec = S[ctype] end
    local name
    if spec then
        name = spec[1]
    else
        name = string.format("%s chunk 0x%04x", HEP_VENDORS[vendor] or
            string.format("vendor 0x%04x", vendor), ctype)
    end
    local key = vendor * 65536 + ctype
    local label = name
    c.range[key] = vr
    c.present[key] = true
    c.items[key] = citem
    if vendor == STM_VENDOR then c.any_stm = true end
    if spec and spec[3] and vlen ~= spec[3] then
        malformed(ctx, citem, string.format("%s value of %d bytes, not %d", name, vlen,
            spec[3]))
        if vr then citem:add(f.chunk_value, vr) end
        citem:set_text(label .. " (bad size)")
        c.range[key] = nil
        c.present[key] = nil
        return
    end
    if vr == nil then
        citem:set_text(label .. " (empty)")
        if key == STM_VENDOR * 65536 + 0x5307 then ctx.producer = "" end
        return
    end
    if spec == nil then
        citem:add(f.chunk_value, vr)
        citem:add_proto_expert_info(e.unknown, string.format("Unknown chunk %s", name))
        citem:set_text(label)
        return
    end
    local fld = spec[2]
    if key == STM_VENDOR * 65536 + 0x5304 then -- TIMESTAMP: u8 tsresol, u64 ticks, i64 offset
        local tsresol = vr(0, 1):uint()
        local ticks = vr(1, 8):uint64()
        local tsoffset = vr(9, 8):int64()
        local ts = nstime(ticks, tsresol, tsoffset:tonumber())
        if ts then citem:add(f.timestamp, vr, ts) end
        citem:add(f.ts_tsresol, vr(0, 1))
        citem:add(f.ts_ticks, vr(1, 8))
        citem:add(f.ts_tsoffset, vr(9, 8))
        c.ts = ts
        label = "TIMESTAMP: " .. fmt_time(ts)
    elseif key == STM_VENDOR * 65536 + 0x5306 then -- INTERFACE: snaplen + IDB options
        if vlen < 4 then
            malformed(ctx, citem, "INTERFACE value below 4 bytes")
            citem:add(f.chunk_value, vr)
        else
            citem:add(f.snaplen, vr(0, 4))
            local info = { tsresol = 6, tsoffset = 0 }
            dissect_options(ctx, tvb, coff + 10, coff + clen, false, citem, "idb", info)
            c.iface = info
            label = string.format("INTERFACE: snaplen %d", vr(0, 4):uint())
            if info.if_index then label = label .. ", stm if=" .. int(info.if_index) end
        end
    elseif key == STM_VENDOR * 65536 + 0x530f then -- PACKET_OPTIONS: EPB options
        dissect_options(ctx, tvb, coff + 6, coff + clen, false, citem, "epb", nil)
        label = "PACKET_OPTIONS"
    elseif key == STM_VENDOR * 65536 + 0x530c then -- FLAGS
        local fi = citem:add(f.flags, vr)
        fi:add(f.flags_direction, vr)
        fi:add(f.flags_reception, vr)
        fi:add(f.flags_fcslen, vr)
        fi:add(f.flags_errors, vr)
        label = string.format("FLAGS: 0x%08x", vr:uint())
    elseif key == STM_VENDOR * 65536 + 0x5308 then -- SESSION
        citem:add(f.session_bytes, vr)
        generated(citem, f.session, hex(vr))
        ctx.session = hex(vr)
        label = "SESSION: " .. ctx.session
    elseif key == STM_VENDOR * 65536 + 0x530d then -- FRAGMENT
        local frag = citem
        if vlen < 12 then
            malformed(ctx, citem, string.format("FRAGMENT value of %d bytes, below 12", vlen))
            citem:add(f.chunk_value, vr)
        else
            local pid, offset, total = vr(0, 4):uint(), vr(4, 4):uint(), vr(8, 4):uint()
            frag:add(f.fragment_packet_id, vr(0, 4))
            frag:add(f.fragment_offset, vr(4, 4))
            frag:add(f.fragment_total, vr(8, 4))
            local size = vlen - 12
            if size > 0 then frag:add(f.fragment_data, vr(12, size)) end
            generated(frag, f.fragment_last, offset + size == total)
            if offset > total or size > total - offset then
                malformed(ctx, frag, string.format("piece at offset %d of %d bytes runs past "
                    .. "the total length %d", offset, size, total))
            end
            c.fragment = { pid = pid, offset = offset, size = size, total = total }
            frag:add_proto_expert_info(e.fragmented)
            label = string.format("FRAGMENT: packet %d, bytes %d-%d of %d", pid, offset,
                offset + size, total)
        end
    elseif spec[4] then -- text
        add_text(citem, fld, vr)
        label = name .. ": " .. vr:string(ENC_UTF_8)
        if key == STM_VENDOR * 65536 + 0x5307 then ctx.producer = vr:string(ENC_UTF_8) end
    elseif spec[3] then -- fixed-size number or address
        local item = citem:add(fld, vr)
        local v
        if spec[3] <= 4 and fld ~= f.src_ip and fld ~= f.dst_ip then
            v = vr:uint()
            c.value[key] = v
            label = string.format("%s: %d", name, v)
            if key == 0x0009 then
                local ok, t = pcall(os.date, "!%Y-%m-%d %H:%M:%S UTC", v)
                if ok and t then item:append_text(" (" .. t .. ")") end
            elseif key == 0x000b then
                label = string.format("%s: %s (%d)", name, HEP_PROTO_TYPES[v] or "?", v)
            elseif key == 0x0001 then
                label = string.format("%s: %s (%d)", name, IP_FAMILIES[v] or "?", v)
            elseif key == 0x0002 then
                label = string.format("%s: %s (%d)", name, IP_PROTOS[v] or "?", v)
            elseif key == 0x000c or key == STM_VENDOR * 65536 + 0x5309 then
                label = string.format("%s: 0x%08x", name, v)
            elseif key == STM_VENDOR * 65536 + 0x5303 then
                label = string.format("%s: %s (%d)", name, LINKTYPES[v] or "?", v)
            end
        elseif spec[3] == 16 then
            label = name .. ": " .. tostring(vr:ipv6())
        else
            label = name .. ": " .. tostring(vr:ipv4())
        end
    else -- bytes
        citem:add(fld, vr)
        label = string.format("%s: %d bytes", name, vlen)
    end
    citem:set_text(label)
end

local SK = function(t) return STM_VENDOR * 65536 + t end

-- One message: tvb holds it (perhaps truncated: `size` is the message's real size).
local function dissect_b_message(tvb, pinfo, tree, size, keep)
    local len = tvb:len()
    local ctx = new_ctx(2)
    local root = new_root(tree, tvb, 2)
    local base = info_start(pinfo, keep)
    local c = { range = {}, value = {}, present = {}, items = {} }
    local function finish(text)
        root:set_text(text)
        info_finish(pinfo, base, "HEP3 [malformed]", ctx)
        return len
    end
    if len < 6 or tvb(0, 4):string() ~= "HEP3" then
        local first = len > 0 and tvb(0, 1):uint() or -1
        local why = "not a HEP3 message"
        if first == 1 or first == 2 then
            why = string.format("HEPv%d is not supported (HEP3 only)", first)
        end
        malformed(ctx, root, why)
        return finish("STM format B [malformed]: " .. why)
    end
    root:add(f.hep_id, tvb(0, 4))
    local total = tvb(4, 2):uint()
    local litem = root:add(f.hep_length, tvb(4, 2))
    if total ~= size then
        malformed(ctx, litem, string.format("length field says %d bytes, the message has %d",
            total, size))
    end
    local stop = math.min(len, total)
    if stop < 6 then stop = len end
    -- Less of the message than it has: the capture's snaplen, or TCP reassembly off.
    local partial = total >= 6 and len < math.min(total, size)
    if partial then
        ctx.partial = string.format("message captured with %d of its %d bytes", len,
            math.min(total, size))
        root:add_proto_expert_info(e.snapped, "Message captured with " .. ctx.partial:sub(23))
    end
    local off = 6
    local nchunks = 0
    while off < stop do
        if stop - off < 6 then
            if partial then break end
            malformed(ctx, root, string.format("truncated chunk header at byte %d", off))
            break
        end
        local vendor, ctype, clen = tvb(off, 2):uint(), tvb(off + 2, 2):uint(),
            tvb(off + 4, 2):uint()
        if partial and clen >= 6 and off + clen > stop and off + clen <= total then
            local citem = root:add(f.chunk, tvb(off, stop - off))
            citem:set_text(string.format("Chunk 0x%04x/0x%04x: %d of its %d bytes captured",
                vendor, ctype, stop - off, clen))
            citem:add(f.chunk_vendor, tvb(off, 2))
            citem:add(f.chunk_type, tvb(off + 2, 2))
            citem:add(f.chunk_length, tvb(off + 4, 2))
            break
        end
        if clen < 6 or off + clen > stop then
            local citem = root:add(f.chunk, tvb(off, stop - off))
            citem:set_text(string.format("Chunk 0x%04x/0x%04x: bad length %d", vendor, ctype,
                clen))
            citem:add(f.chunk_vendor, tvb(off, 2))
            citem:add(f.chunk_type, tvb(off + 2, 2))
            citem:add(f.chunk_length, tvb(off + 4, 2))
            malformed(ctx, citem, string.format("chunk 0x%04x/0x%04x at byte %d has length "
                .. "%d (%s)", vendor, ctype, off, clen, clen < 6 and "below its 6-byte header"
                or "past the end of the message"))
            break
        end
        local citem = root:add(f.chunk, tvb(off, clen))
        citem:add(f.chunk_vendor, tvb(off, 2))
        citem:add(f.chunk_type, tvb(off + 2, 2))
        citem:add(f.chunk_length, tvb(off + 4, 2))
        b_chunk_value(ctx, tvb, off, clen, vendor, ctype, citem, c)
        nchunks = nchunks + 1
        off = off + clen
    end
    if nchunks == 0 and not ctx.malformed then
        malformed(ctx, root, "empty chunk list")
    end

    local ours = c.present[SK(0x5309)] ~= nil
    local stream_id = c.value[SK(0x5309)] or c.value[0x000c]
    local seq = c.value[SK(0x530a)]
    local linktype = c.value[SK(0x5303)]
    if ours then
        local need = { [SK(0x5303)] = "LINKTYPE", [SK(0x5306)] = "INTERFACE" }
        if c.fragment == nil then
            need[SK(0x5305)] = "ORIGINAL_LENGTH"
            if c.present[SK(0x5302)] == nil then
                need[SK(0x5301)] = "FRAME_HEADER"
                need[0x000f] = "PAYLOAD"
            end
        end
        local missing = {}
        for k, name in pairs(need) do
            if c.present[k] == nil then missing[#missing + 1] = name end
        end
        if #missing > 0 and not ctx.malformed and not partial then
            table.sort(missing)
            malformed(ctx, root, "a required chunk is missing: " .. table.concat(missing, ", "))
        end
        local seq_item = c.items[SK(0x530a)] or root
        if ctx.malformed then
            -- not counted, as in stm-recv
        elseif seq ~= nil then
            sequence_items(ctx, pinfo, root, seq_item, "B/" .. (ctx.producer or "") .. "/"
                .. int(stream_id), ctx.session, seq, string.format("%d:%d:%d", pinfo.number,
                tvb:offset(), seq))
        else
            root:add_proto_expert_info(e.no_sequence)
        end
    else
        root:add_proto_expert_info(e.foreign, "HEP3 message without stm chunks: the payload "
            .. "is dissected alone")
    end

    -- The packet inside.
    local what
    if c.fragment then
        local fr = c.fragment
        fragment_info(pinfo, ctx, fr.pid, fr.offset, fr.size, fr.total)
        what = "fragment"
    elseif partial then
        -- what the packet needs was not captured
    elseif ours and stm.prefs.rebuild and not ctx.malformed and linktype ~= nil then
        local ftvb = nil
        local fr = c.range[SK(0x5302)]
        if fr then
            ftvb = fr:tvb()
        else
            local hr, pr = c.range[SK(0x5301)], c.range[0x000f]
            local ba = ByteArray.new()
            if hr then ba:append(hr:bytes()) end
            if pr then ba:append(pr:bytes()) end
            local tr = c.range[SK(0x530e)]
            if tr then ba:append(tr:bytes()) end
            if ba:len() > 0 then ftvb = ba:tvb("STM rebuilt frame") end
        end
        if ftvb then
            local origlen = c.value[SK(0x5305)]
            if origlen then snapped(ctx, root, ftvb:len(), origlen) end
            generated(root, f.caplen, ftvb:len())
            ctx.packets = 1
            dissect_packet(ctx, linktype, ftvb, pinfo, tree)
        end
    elseif c.present[0x000f] and not (ours and ctx.malformed) then
        ctx.packets = 1
        b_payload(ctx, c, tvb, pinfo, tree)
    end
    generated(root, f.packets, ctx.packets)

    local text = string.format("STM format B, producer %s, stream 0x%08x, seq %s",
        ctx.producer or ((ours or c.any_stm) and "?" or "(foreign HEP3)"), stream_id or 0,
        seq ~= nil and int(seq) or "-")
    if what == "fragment" then text = text .. ", " .. ctx.fragment_text end
    if ctx.malformed then text = text .. " [malformed]" end
    root:set_text(text)
    local head
    if ours or c.any_stm then
        head = string.format("STM B %s #%s%s%s", ctx.producer or "?",
            seq ~= nil and int(seq) or "-", ctx.note or "",
            ctx.malformed and " [malformed]" or "")
    else
        head = "HEP3" .. (ctx.malformed and " [malformed]" or "")
    end
    info_finish(pinfo, base, head, ctx)
    return len
end

local function dissect_b_udp(tvb, pinfo, tree)
    dissect_b_message(tvb, pinfo, tree, tvb:reported_len(), false)
    return tvb:len()
end

-- TCP: messages back to back; one split across segments is reassembled by TCP.
local function dissect_b_tcp(tvb, pinfo, tree)
    local len = tvb:len()
    local off = 0
    local n = 0
    while off < len do
        local left = len - off
        if left < 6 then
            if tvb(off, left):string() ~= ("HEP3"):sub(1, left) then
                dissect_b_message(tvb(off, left):tvb(), pinfo, tree, left, n > 0)
                return len
            end
            if pinfo.can_desegment > 0 then
                pinfo.desegment_offset = off
                pinfo.desegment_len = DESEGMENT_ONE_MORE_SEGMENT
            end
            return len
        end
        if tvb(off, 4):string() ~= "HEP3" and off == 0 and pinfo.can_desegment == 0 then
            -- Without TCP reassembly, the rest of a message that an earlier segment began.
            local root = new_root(tree, tvb, 2)
            root:set_text("STM format B: part of a message (TCP reassembly is off)")
            root:add_proto_expert_info(e.no_reassembly)
            pinfo.cols.protocol = "STM"
            pinfo.cols.info = "STM B: part of a message (TCP reassembly is off)"
            return len
        end
        if tvb(off, 4):string() ~= "HEP3" then
            -- A framing error: stm-recv closes such a connection. Show the rest as one.
            dissect_b_message(tvb(off, left):tvb(), pinfo, tree, left, n > 0)
            return len
        end
        local total = tvb(off + 4, 2):uint()
        if total < 6 then
            dissect_b_message(tvb(off, left):tvb(), pinfo, tree, left, n > 0)
            return len
        end
        if left < total then
            if pinfo.can_desegment > 0 then
                pinfo.desegment_offset = off
                pinfo.desegment_len = total - left
                return len
            end
            -- TCP reassembly is off: show what this segment has of the message.
            dissect_b_message(tvb(off, left):tvb(), pinfo, tree, total, n > 0)
            tree:add_proto_expert_info(e.no_reassembly)
            return len
        end
        dissect_b_message(tvb(off, total):tvb(), pinfo, tree, total, n > 0)
        n = n + 1
        off = off + total
    end
    return len
end

-------------------------------------------------------------------------------------------
-- Entry points, heuristics, registration
-------------------------------------------------------------------------------------------

-- GRE-in-UDP: read the header, then hand the datagram to Wireshark's GRE dissector, which
-- gives the payload back to stm through the gre.proto table.
local gre_handle = udp_port_table:get_dissector(GRE_UDP_PORT)
if gre_handle == nil then
    local ok, t = pcall(DissectorTable.get, "ip.proto")
    if ok and t then gre_handle = t:get_dissector(47) end
end

local function gre_header_length(tvb)
    local len = tvb:len()
    if len < 4 then return nil end
    local flags = tvb(0, 2):uint()
    if flags % 8 ~= 0 or bit_set(flags, 0x4000) then return nil end -- version 0, no routing
    local hlen = 4
    if bit_set(flags, 0x8000) then hlen = hlen + 4 end
    local key_at, seq_at
    if bit_set(flags, 0x2000) then key_at = hlen; hlen = hlen + 4 end
    if bit_set(flags, 0x1000) then seq_at = hlen; hlen = hlen + 4 end
    if len < hlen then return nil end
    return hlen, tvb(2, 2):uint(), key_at and tvb(key_at, 4):uint(), seq_at and tvb(seq_at, 4):uint()
end

local function gre_front(tvb, pinfo, tree)
    local hlen, _, key, seq = gre_header_length(tvb)
    if hlen then gre_hint = { number = pinfo.number, key = key, seq = seq } end
    if gre_handle then call_dissector(gre_handle, tvb, pinfo, tree) end
    gre_hint = nil
    return tvb:len()
end

-- One protocol for both formats, so that "stm" filters every report and expert infos say
-- STM. What called it tells the format apart: the GRE protocol-type table (format A, the
-- payload starts with an SHB), the UDP port of GRE-in-UDP (4754: the GRE header), the TCP
-- or UDP ports of format B ("HEP3").
local function is_gre_udp_port(port)
    if port == GRE_UDP_PORT then return true end
    local ranges = tostring(stm.prefs.gre_udp_ports or "")
    for part in ranges:gmatch("[^,%s]+") do
        local lo, hi = part:match("^(%d+)-(%d+)$")
        if lo then
            if port >= tonumber(lo) and port <= tonumber(hi) then return true end
        elseif tonumber(part) == port then
            return true
        end
    end
    return false
end

function stm.dissector(tvb, pinfo, tree)
    if pinfo.port_type == PT_TCP then
        return dissect_b_tcp(tvb, pinfo, tree)
    end
    local len = tvb:len()
    local head = len >= 4 and tvb(0, 4):uint() or 0
    if head == 0x48455033 then -- "HEP3"
        return dissect_b_udp(tvb, pinfo, tree)
    end
    if head == 0x0A0D0D0A or pinfo.match_uint == protocol_type() then
        return dissect_a(tvb, pinfo, tree)
    end
    if is_gre_udp_port(pinfo.match_uint) then
        return gre_front(tvb, pinfo, tree)
    end
    return dissect_b_udp(tvb, pinfo, tree)
end

local function looks_like_hep3(tvb)
    return tvb:len() >= 6 and tvb(0, 4):string() == "HEP3" and tvb(4, 2):uint() >= 12
end

local function heur_b_udp(tvb, pinfo, tree)
    if not looks_like_hep3(tvb) or tvb(4, 2):uint() ~= tvb:reported_len() then return false end
    dissect_b_udp(tvb, pinfo, tree)
    return true
end

-- TCP: a segment that starts a HEP3 message; the rest of the connection follows it.
local function heur_tcp(tvb, pinfo, tree)
    if not looks_like_hep3(tvb) then return false end
    pcall(function() pinfo.conversation = stm end)
    dissect_b_tcp(tvb, pinfo, tree)
    return true
end

-- Format A on a UDP port other than 4754: GRE with our protocol type, then an SHB.
local function heur_a_udp(tvb, pinfo, tree)
    local hlen, ptype = gre_header_length(tvb)
    if hlen == nil or ptype ~= protocol_type() or bit_set(tvb(0, 2):uint(), 0x0800)
        or bit_set(tvb(0, 2):uint(), 0x0400) then
        return false
    end
    if tvb:len() < hlen + 12 or tvb(hlen, 4):uint() ~= 0x0A0D0D0A then return false end
    gre_front(tvb, pinfo, tree)
    return true
end

local function heur_udp(tvb, pinfo, tree)
    return heur_b_udp(tvb, pinfo, tree) or heur_a_udp(tvb, pinfo, tree)
end

function stm.init()
    streams = {}
    seq_results = {}
    depth = 0
end

-- What is registered now, so that a change of preferences can take it back.
local registered = { protocol_type = nil, udp = "", tcp = "", gre_udp = "" }
udp_port_table:add(GRE_UDP_PORT, stm)

local function register_tables()
    local gre_table = DissectorTable.get("gre.proto")
    local ptype = protocol_type()
    if registered.protocol_type ~= ptype then
        if registered.protocol_type then gre_table:remove(registered.protocol_type, stm) end
        gre_table:add(ptype, stm)
        registered.protocol_type = ptype
    end
    local function swap(table_, key, new, proto)
        new = tostring(new or "")
        if registered[key] == new then return end
        if registered[key] ~= "" then pcall(table_.remove, table_, registered[key], proto) end
        if new ~= "" then table_:add(new, proto) end
        registered[key] = new
    end
    swap(udp_port_table, "udp", stm.prefs.udp_ports, stm)
    swap(tcp_port_table, "tcp", stm.prefs.tcp_ports, stm)
    swap(udp_port_table, "gre_udp", stm.prefs.gre_udp_ports, stm)
end

function stm.prefs_changed()
    register_tables()
end

register_tables()
stm:register_heuristic("udp", heur_udp)
stm:register_heuristic("tcp", heur_tcp)
