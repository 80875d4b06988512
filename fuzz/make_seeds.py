#!/usr/bin/env python3
"""Writes the hand-made seed inputs into fuzz/corpus/<target>/seed-*.

Run from anywhere: python3 fuzz/make_seeds.py. The byte layouts follow the `Input layout`
comments of the check functions in fuzz/src/checks.rs.
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def mask(payload, key):
    return bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def frame(fin, op, payload, key=None):
    b0 = (0x80 if fin else 0) | op
    mbit = 0x80 if key else 0
    n = len(payload)
    if n < 126:
        h = bytes([b0, mbit | n])
    elif n <= 0xFFFF:
        h = bytes([b0, mbit | 126]) + struct.pack(">H", n)
    else:
        h = bytes([b0, mbit | 127]) + struct.pack(">Q", n)
    if key:
        return h + bytes(key) + mask(payload, key)
    return h + payload


KEY = [0x37, 0xFA, 0x21, 0x3D]
K2 = [0xA1, 0xB2, 0xC3, 0xD4]


def frame_input(stream, client=False, unlimited=False, bytewise=False, max_message=4096,
                max_fragments=8, cuts=(), rt=b""):
    flags = (1 if client else 0) | (2 if unlimited else 0) | (4 if bytewise else 0)
    out = bytes([flags])
    if not unlimited:
        out += struct.pack("<H", max_message)
    out += bytes([max_fragments, len(cuts)])
    for c in cuts:
        out += struct.pack("<H", c)
    out += bytes([len(rt)]) + rt + stream
    return out


def rt_frame(fin, op_index, payload, key=None, long16=False, long64=False):
    b = (0x80 if fin else 0) | (0x40 if key else 0) | op_index
    if long64:
        b |= 0x30
    elif long16:
        b |= 0x20
    out = bytes([b]) + (bytes(key) if key else b"") + bytes([len(payload)]) + payload
    if long16 and not long64:
        out += struct.pack("<H", 300)
    return out


# --- frame_decoder -------------------------------------------------------------------------
# RFC 6455 §5.7 examples.
write("frame_decoder", "rfc-masked-hello", frame_input(frame(True, 1, b"Hello", KEY), cuts=[3]))
write("frame_decoder", "rfc-unmasked-hello", frame_input(frame(True, 1, b"Hello"), client=True))
write("frame_decoder", "rfc-fragmented-hello",
      frame_input(frame(False, 1, b"Hel") + frame(True, 0, b"lo"), client=True, cuts=[5, 6]))
write("frame_decoder", "rfc-ping-pong",
      frame_input(frame(True, 9, b"Hello", KEY) + frame(True, 10, b"Hello", KEY), cuts=[1, 12]))
write("frame_decoder", "rfc-256-binary",
      frame_input(frame(True, 2, bytes(256)), client=True, cuts=[2, 3, 100]))
# 64 KiB header (64-bit length) with only part of the payload, no limit: must not allocate ahead.
write("frame_decoder", "rfc-64k-header-truncated",
      frame_input(frame(True, 2, bytes(65536))[:10 + 200], client=True, unlimited=True))
# Fragmented text with empty continuation and an interleaved ping, byte by byte.
s = (frame(False, 1, "κό".encode(), K2) + frame(False, 0, b"", K2) + frame(True, 9, b"p", K2)
     + frame(True, 0, "σμε".encode(), K2) + frame(True, 2, bytes([1, 2, 3]), K2))
write("frame_decoder", "fragmented-text-interleaved-ping", frame_input(s, bytewise=True))
# Text split inside a code point across fragments.
s = frame(False, 1, b"\xf0\x9f", K2) + frame(True, 0, b"\x98\x80!", K2)
write("frame_decoder", "fragmented-split-codepoint", frame_input(s, cuts=[7, 9]))
# Close frames: normal with reason, empty, 1-byte (error), reserved code 1005 (error),
# invalid UTF-8 reason (1007).
write("frame_decoder", "close-1000-bye", frame_input(frame(True, 8, b"\x03\xe8bye", KEY)))
write("frame_decoder", "close-empty", frame_input(frame(True, 8, b"", KEY)))
write("frame_decoder", "close-one-byte", frame_input(frame(True, 8, b"\x03", KEY)))
write("frame_decoder", "close-1005", frame_input(frame(True, 8, b"\x03\xed", KEY)))
write("frame_decoder", "close-bad-utf8", frame_input(frame(True, 8, b"\x03\xe8\xff", KEY)))
# Protocol errors.
write("frame_decoder", "invalid-utf8-mid-frame",
      frame_input(frame(True, 1, b"ab\xffcdefgh" * 20, KEY), cuts=[12]))
write("frame_decoder", "rsv-bits", frame_input(bytes([0xC1, 0x80, 0, 0, 0, 0])))
write("frame_decoder", "len64-msb", frame_input(bytes([0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0])))
write("frame_decoder", "continuation-without-message", frame_input(frame(True, 0, b"x", KEY)))
write("frame_decoder", "too-many-fragments",
      frame_input(b"".join(frame(False, 2 if i == 0 else 0, b"a", KEY) for i in range(5)),
                  max_fragments=3))
write("frame_decoder", "message-too-big",
      frame_input(frame(False, 2, bytes(6), KEY) + frame(True, 0, bytes(5), KEY), max_message=10))
# Round trips: every opcode, masked and not, 7-, 16- and 64-bit lengths, invalid control frames.
rt = (rt_frame(True, 1, b"Hello", KEY) + rt_frame(False, 2, b"\x00\x01", None)
      + rt_frame(True, 0, b"", K2) + rt_frame(True, 3, b"\x03\xe8", None)
      + rt_frame(True, 4, b"ping", KEY) + rt_frame(True, 5, b"", None)
      + rt_frame(True, 2, b"xyz", KEY, long16=True) + rt_frame(False, 4, b"bad", None))
write("frame_decoder", "round-trip-mix", frame_input(b"", rt=rt))
write("frame_decoder", "round-trip-64bit", frame_input(b"", rt=rt_frame(True, 2, b"ab", K2, long64=True)))

# --- forwarded -----------------------------------------------------------------------------
# flags byte, then "\n"-separated: a CIDR list, then header values (bit 3: XFF/Forwarded alternate).
def fw_input(flags, cidrs, *values):
    return bytes([flags]) + b"\n".join([cidrs.encode()] + [v.encode() for v in values])


write("forwarded", "xff-chain", fw_input(8, "10.0.0.0/8,192.0.2.0/24", "6.6.6.6, 198.51.100.1, 10.0.0.2"))
write("forwarded", "xff-all-trusted", fw_input(8, "10.0.0.0/8,192.0.2.99", "10.0.0.7, 10.0.0.2"))
write("forwarded", "xff-v6-port", fw_input(9, "2001:db8::/32", "[2001:db8:cafe::17]:4711, 2001:db8::5"))
write("forwarded", "rfc7239", fw_input(0, "192.0.2.0/24", 'for=192.0.2.43, for="[2001:db8:cafe::17]:4711";proto=https'))
write("forwarded", "obfuscated", fw_input(0, "192.0.2.0/24", "for=_hidden, for=unknown"))
write("forwarded", "untrusted-peer", fw_input(4 | 8, "10.0.0.0/8", "1.1.1.1"))
write("forwarded", "trust-all-garbage", fw_input(2 | 8, "", "garbage,,[::1", 'for="[::1', "for=1.2.3.4:99999"))
write("forwarded", "bad-cidrs", fw_input(8, "10.0.0.1/33,::/129,x,10.1.2.3/8,::ffff:10.0.0.1", "10.9.9.9"))


# --- handshake -----------------------------------------------------------------------------
def hs_input(text, cut=0, max_head_sel=255, max_headers=15, origins=False):
    if isinstance(text, str):
        text = text.encode()
    return bytes([max_head_sel, max_headers]) + struct.pack("<H", cut) + bytes([1 if origins else 0]) + text


chrome = ("GET /ws HTTP/1.1\r\n"
          "Host: localhost:8080\r\n"
          "Connection: Upgrade\r\n"
          "Pragma: no-cache\r\n"
          "Cache-Control: no-cache\r\n"
          "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36\r\n"
          "Upgrade: websocket\r\n"
          "Origin: http://localhost:8080\r\n"
          "Sec-WebSocket-Version: 13\r\n"
          "Accept-Encoding: gzip, deflate, br\r\n"
          "Accept-Language: en-US,en;q=0.9\r\n"
          "Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n"
          "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n")
firefox = ("GET /chat HTTP/1.1\r\n"
           "Host: example.com\r\n"
           "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0\r\n"
           "Accept: */*\r\n"
           "Sec-WebSocket-Version: 13\r\n"
           "Origin: http://example.com\r\n"
           "Sec-WebSocket-Extensions: permessage-deflate\r\n"
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
           "Connection: keep-alive, Upgrade\r\n"
           "Upgrade: websocket\r\n\r\n")
rfc = ("GET /chat HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\n"
       "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
       "Origin: http://example.com\r\nSec-WebSocket-Protocol: chat, superchat\r\n"
       "Sec-WebSocket-Version: 13\r\n\r\n")
write("handshake", "chrome-upgrade", hs_input(chrome, cut=200))
write("handshake", "firefox-upgrade-origin-list", hs_input(firefox, cut=100, origins=True))
write("handshake", "rfc-upgrade-pipelined-frame",
      hs_input(rfc.encode() + frame(True, 1, b"Hello", KEY), cut=len(rfc)))
write("handshake", "static-get", hs_input("GET /index.html?x=1 HTTP/1.1\r\nHost: h\r\n\r\n", cut=10))
write("handshake", "http10", hs_input("GET / HTTP/1.0\r\n\r\n"))
write("handshake", "absolute-form", hs_input("GET http://example.com/a?b HTTP/1.1\r\nHost: h\r\n\r\n"))
write("handshake", "body-rejected", hs_input("POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello"))
write("handshake", "chunked-rejected", hs_input("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"))
write("handshake", "tls-hello", hs_input(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"))
write("handshake", "too-many-headers", hs_input("GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n", max_headers=2))
write("handshake", "head-too-large", hs_input(chrome, max_head_sel=20, cut=50))
write("handshake", "version-8", hs_input(rfc.replace("Version: 13", "Version: 8")))
write("handshake", "bad-key", hs_input(rfc.replace("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZR==")))
write("handshake", "evil-origin", hs_input(rfc.replace("http://example.com", "http://evil.example"), origins=True))

# --- utf8 ----------------------------------------------------------------------------------
def u8_input(data, cuts=()):
    if isinstance(data, str):
        data = data.encode()
    out = bytes([len(cuts)])
    for c in cuts:
        out += struct.pack("<H", c)
    return out + data


write("utf8", "kosme", u8_input("κόσμε", cuts=[1, 3]))                       # Autobahn 6.2
write("utf8", "kosme-then-surrogate",                                         # 6.3
      u8_input(b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited", cuts=[12]))
write("utf8", "boundaries", u8_input("\x00\u007f\u0080\u07ff\u0800\uffff\U00010000\U0010ffff",
                                     cuts=[2, 4, 7, 11]))                     # 6.5-6.7
write("utf8", "above-max", u8_input(b"\xf4\x90\x80\x80", cuts=[1, 2]))        # 6.8
write("utf8", "five-six-byte", u8_input(b"\xf8\x88\x80\x80\x80\xfc\x84\x80\x80\x80\x80"))
write("utf8", "lone-continuation", u8_input(b"a\x80\xbfb", cuts=[1]))         # 6.9
write("utf8", "truncated-sequences", u8_input(b"\xc0\xe0\x80\xf0\x80\x80", cuts=[1, 3]))  # 6.14
write("utf8", "overlong-slash", u8_input(b"\xc0\xaf\xe0\x80\xaf\xf0\x80\x80\xaf"))  # 6.16-6.17
write("utf8", "surrogate-pair", u8_input(b"\xed\xa0\x80\xed\xb0\x80", cuts=[2]))  # 6.19
write("utf8", "noncharacters", u8_input("\ufffe\uffff\U0001fffe", cuts=[1, 5]))   # 6.22
write("utf8", "truncated-4byte-at-end", u8_input(b"ok\xf0\x9f\x98", cuts=[3]))
write("utf8", "music-split", u8_input("𝄞 music", cuts=[1, 2, 3]))
write("utf8", "empty", u8_input(b""))
