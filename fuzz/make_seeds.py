#!/usr/bin/env python3
"""Writes the committed seed corpus, fuzz/seeds/TARGET/NAME, one small file
per meaningful input. Rerun after editing; the files are committed, so the
script is only needed to change them. Layout of each target's input is in the
doc comment of fuzz_targets/TARGET.rs (e.g. ws_frames: 1 control byte, then
the client stream)."""

import os
import shutil
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
SEEDS = os.path.join(HERE, "seeds")

KEY = b"\x37\xfa\x21\x3d"  # RFC 6455 §5.7
WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3


def masked(b0, payload, key=KEY, length_bytes=None):
    """A client frame (masked). length_bytes forces the 16/64-bit form."""
    n = len(payload)
    if length_bytes == 8 or (length_bytes is None and n > 0xFFFF):
        head = bytes([b0, 0x80 | 127]) + struct.pack(">Q", n)
    elif length_bytes == 2 or (length_bytes is None and n > 125):
        head = bytes([b0, 0x80 | 126]) + struct.pack(">H", n)
    else:
        head = bytes([b0, 0x80 | n])
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def ws_head(target, extra="", version="HTTP/1.1"):
    return (
        f"GET {target} {version}\r\nHost: example.com\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    ).encode()


def request_head():
    ok = ws_head("/ws?channel=news&channel=sport&channel=news&since=41")
    seeds = {
        "ws_upgrade": ok,
        "ws_upgrade_then_frame": ok + masked(0x81, b"Hello"),
        "ws_header_variants": (
            f"GET /ws?channel=a%2Fb HTTP/1.1\r\nupgrade: WebSocket\r\n"
            f"connection: keep-alive, Upgrade\r\nsec-websocket-key:   {WS_KEY}  \r\n"
            "SEC-WEBSOCKET-VERSION: 13\r\n\r\n"
        ).encode(),
        "echo_upgrade": ws_head("/echo"),
        "ws_deflate_offers": ws_head(
            "/ws?channel=a",
            "Sec-WebSocket-Extensions: permessage-deflate; server_max_window_bits=8, "
            "permessage-deflate; server_max_window_bits=10; client_max_window_bits\r\n"
            "Sec-WebSocket-Extensions: x-webkit-deflate-frame\r\n",
        ),
        "sse": b"GET /events?channel=news HTTP/1.1\r\nAccept: text/event-stream\r\n"
        b"Last-Event-ID: 42\r\n\r\n",
        "sse_since_empty_last_event_id": b"GET /events?channel=news&since=7 HTTP/1.1\r\n"
        b"Accept: text/event-stream\r\nLast-Event-ID: \r\n\r\n",
        "sse_repeated_last_event_id": b"GET /events?channel=a HTTP/1.1\r\n"
        b"Accept: text/event-stream\r\nLast-Event-ID: 1\r\nLast-Event-ID: 2\r\n\r\n",
        "longpoll": b"GET /events?channel=news&channel=b.c:d@e&since=18446744073709551615 HTTP/1.1\r\n"
        b"Host: x\r\n\r\n",
        "longpoll_http10": b"GET /events?channel=a HTTP/1.0\r\n\r\n",
        "healthz": b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        "healthz_close": b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n",
        "healthz_bare_lf": b"GET /healthz HTTP/1.1\nHost: x\n\n",
        "healthz_leading_empty_lines": b"\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n",
        "pipelined": b"GET /healthz HTTP/1.1\r\n\r\nGET /healthz HTTP/1.1\r\n\r\n",
        "partial": b"GET /ws?channel=news HTTP/1.1\r\nUpgrade: websocket\r\nConn",
        "partial_request_line": b"GET /events?chan",
        "post": b"POST /events?channel=a HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
        "head_method": b"HEAD /healthz HTTP/1.1\r\n\r\n",
        "content_length": b"GET /healthz HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
        "chunked": b"GET /healthz HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
        "not_found": b"GET /wss HTTP/1.1\r\n\r\n",
        "ws_http10": ws_head("/ws?channel=a", version="HTTP/1.0"),
        "ws_no_upgrade": b"GET /ws?channel=a HTTP/1.1\r\nSec-WebSocket-Key: x\r\n\r\n",
        "ws_version_8": ws_head("/ws?channel=a").replace(b"Version: 13", b"Version: 8"),
        "ws_short_key": ws_head("/ws?channel=a").replace(WS_KEY.encode(), b"dGhlIHNhbXBsZQ=="),
        "ws_repeated_key": ws_head("/ws?channel=a", f"Sec-WebSocket-Key: {WS_KEY}\r\n"),
        "ws_no_channel": ws_head("/ws"),
        "ws_bad_percent": ws_head("/ws?channel=%"),
        "ws_non_utf8_channel": ws_head("/ws?channel=%FF"),
        "ws_empty_channel": ws_head("/ws?channel="),
        "ws_bad_cursor": ws_head("/ws?channel=a&since=18446744073709551616"),
        "ws_two_cursors": ws_head("/ws?channel=a&since=1&since=2"),
        "too_many_channels": b"GET /events?channel=a&channel=b&channel=c HTTP/1.1\r\n\r\n",
        "long_channel": b"GET /events?channel=abcdefghij HTTP/1.1\r\n\r\n",
        "too_many_headers": b"GET /healthz HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\nE: 5\r\n\r\n",
        "url_too_long": b"GET /healthz?" + b"a" * 80 + b" HTTP/1.1\r\n\r\n",
        "head_too_large": b"GET /healthz HTTP/1.1\r\nX: " + b"y" * 300 + b"\r\n\r\n",
        "malformed_header": b"GET /ws HTTP/1.1\r\nA B: c\r\n\r\n",
        "malformed_version": b"GET /healthz HTTP/2.0\r\n\r\n",
    }
    # HTTP/1.1 needs a Host (RFC 9112 3.2): added where a seed is about
    # something else, so that it reaches the rule it is about.
    for name, data in seeds.items():
        if b"HTTP/1.1\r\n" in data and b"host:" not in data.lower():
            seeds[name] = data.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nHost: x\r\n", 1)
    seeds.update({
        "no_host": b"GET /healthz HTTP/1.1\r\n\r\n",
        "two_hosts": b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
        "absolute_form": b"GET http://gw.example.com:8080/events?channel=a HTTP/1.1\r\nHost: x\r\n\r\n",
        "head_readyz": b"HEAD /readyz HTTP/1.1\r\nHost: x\r\n\r\n",
        "ws_subprotocols": ws_head("/ws?channel=a", "Sec-WebSocket-Protocol: chat, gateway.v1\r\n"),
    })
    return seeds


def frames():
    """Client streams shared by ws_frames and ws_session."""
    return {
        "rfc_masked_hello": bytes.fromhex("818537fa213d7f9f4d5158"),
        "rfc_masked_pong_hello": bytes.fromhex("8a8537fa213d7f9f4d5158"),
        "fragmented_hel_ping_lo": masked(0x01, b"Hel") + masked(0x89, b"ping", b"\x09\x08\x07\x06")
        + masked(0x80, b"lo"),
        "fragmented_utf8_split": masked(0x01, "h\u00e9\u20ac".encode()[:3]) + masked(0x8A, b"pong")
        + masked(0x00, "h\u00e9\u20ac".encode()[3:5]) + masked(0x80, "h\u00e9\u20ac\U0001F600".encode()[5:]),
        "three_messages_with_pings": masked(0x82, bytes(range(10))) + masked(0x89, b"")
        + masked(0x02, b"ab") + masked(0x89, b"x" * 125) + masked(0x00, b"") + masked(0x80, b"cd")
        + masked(0x81, "caf\u00e9".encode()),
        "binary_256_16bit_length": masked(0x82, bytes(i % 251 for i in range(256))),
        "binary_64bit_length_nonminimal": masked(0x82, b"tiny", length_bytes=8),
        "text_16bit_length_nonminimal": masked(0x81, b"tiny", length_bytes=2),
        "empty_text": masked(0x81, b""),
        "close_empty": masked(0x88, b""),
        "close_1000_bye": masked(0x88, b"\x03\xe8bye"),
        "close_4000": masked(0x88, b"\x0f\xa0x"),
        "close_one_byte": masked(0x88, b"\x03"),
        "close_1005": masked(0x88, b"\x03\xed"),
        "close_bad_utf8": masked(0x88, b"\x03\xe8\xff"),
        "ping_then_close_then_ping": masked(0x89, b"hi") + masked(0x88, b"\x03\xe8")
        + masked(0x89, b"late"),
        "text_invalid_utf8": masked(0x81, b"ok\xce\xba\xf4\x90"),
        "text_truncated_utf8": masked(0x81, b"a\xe2\x82"),
        "text_invalid_in_second_fragment": masked(0x01, b"ok") + masked(0x80, b"\xed\xa0\x80"),
        "unmasked_rfc_hello": bytes.fromhex("810548656c6c6f"),
        "rsv1": masked(0xC1, b"x"),
        "reserved_opcode": masked(0x83, b""),
        "fragmented_ping": masked(0x09, b""),
        "ping_126": masked(0x89, b"\x00" * 126),
        "length_msb": bytes([0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0]) + KEY,
        "lone_continuation": masked(0x80, b"x"),
        "expected_continuation": masked(0x01, b"a") + masked(0x81, b"b"),
        "fragments_over_limit": masked(0x02, b"123456") + masked(0x00, b"78901"),
    }


def ws_frames():
    # Control byte: low 3 bits pick the size limit (7 = u64::MAX, 2 = 10),
    # the rest the chunk size - 1.
    seeds = {}
    for name, stream in frames().items():
        seeds[name] = b"\x07" + stream  # unlimited, 1-byte chunks
        seeds[name + "_chunk5_limit10"] = b"\x22" + stream  # limit 10, chunks of 5
    return seeds


def deflated(payload):
    """One message compressed on its own, as permessage-deflate sends it."""
    c = zlib.compressobj(wbits=-15)
    data = c.compress(payload) + c.flush(zlib.Z_SYNC_FLUSH)
    assert data.endswith(b"\x00\x00\xff\xff")
    return data[:-4]


def ws_session():
    # Byte 0: split point (mod len+1); byte 1: limit (3 = 64 KiB, 1 = 10)
    # and permessage-deflate negotiated (4).
    seeds = {}
    for name, stream in frames().items():
        seeds[name] = bytes([len(stream) // 2 % 256, 3]) + stream
    seeds["fragments_over_limit_10"] = b"\x05\x01" + frames()["fragments_over_limit"]
    text = ("caf\u00e9 " * 40).encode()
    z = deflated(text)
    compressed = {
        # RFC 7692 §7.2.3.1.
        "deflate_rfc_hello": masked(0xC1, bytes.fromhex("f248cdc9c90700")),
        "deflate_fragmented_with_ping": masked(0x41, z[:5]) + masked(0x89, b"ping")
        + masked(0x00, z[5:9]) + masked(0x80, z[9:]) + masked(0x82, b"plain"),
        "deflate_binary": masked(0xC2, deflated(bytes(range(256)) * 4)),
        "deflate_corrupt": masked(0xC2, b"\xff\xff\xff"),
        "deflate_not_utf8": masked(0xC1, deflated(b"ok\xce\xba\xf4\x90")),
        "deflate_rsv1_continuation": masked(0x41, z[:5]) + masked(0xC0, z[5:]),
        "deflate_rsv1_ping": masked(0xC9, b""),
    }
    for name, stream in compressed.items():
        seeds[name] = bytes([len(stream) // 2 % 256, 7]) + stream
    # Decompressed past the 10-byte limit.
    seeds["deflate_bomb_10"] = b"\x05\x05" + masked(0xC2, deflated(b"\x00" * 1000))
    return seeds


def cursor():
    return {
        "zero": b"0",
        "small": b"42",
        "leading_zeros": b"007",
        "u64_max": b"18446744073709551615",
        "u64_max_plus_1": b"18446744073709551616",
        "twenty_nines": b"99999999999999999999",
        "twenty_one_digits": b"000000000000000000001",
        "empty": b"",
        "plus": b"+1",
        "minus": b"-1",
        "space": b" 1",
        "hex": b"0x1f",
        "channel": b"news",
        "channel_all_punctuation": b"A-Z_a.z:0@9/x",
        "channel_space": b"a b",
        "channel_plus": b"a+b",
        "channel_percent": b"a%2F",
        "channel_utf8": "caf\u00e9".encode(),
        "channel_not_utf8": b"caf\xe9",
        "channel_nul": b"a\x00",
        "channel_128": b"a" * 128,
        "channel_129": b"a" * 129,
    }


def close_payload():
    text = "a\u00e9\u20ac\U0001F600z".encode()
    return {
        "empty": b"",
        "one_byte": b"\x03",
        "1000": b"\x03\xe8",
        "1001_bye": b"\x03\xe9bye",
        "1003": b"\x03\xeb",
        "1004": b"\x03\xec",
        "1005": b"\x03\xed",
        "1006": b"\x03\xee",
        "1014": b"\x03\xf6",
        "1015": b"\x03\xf7",
        "2999": b"\x0b\xb7",
        "3000": b"\x0b\xb8",
        "4999": b"\x13\x87",
        "5000": b"\x13\x88",
        "1000_bad_utf8": b"\x03\xe8\xff",
        "1000_long_multibyte_reason": b"\x03\xe8" + "\u00e9".encode() * 70,
        "1000_reason_123": b"\x03\xe8" + b"r" * 123,
        # For the Utf8Stream half the first byte seeds the piece sizes.
        "utf8_mixed": b"\x01" + text,
        "utf8_mixed_other_split": b"\x9c" + text * 3,
        "utf8_surrogate": b"\x05a\xed\xa0\x80",
        "utf8_overlong": b"\x05\xc0\xaf",
        "utf8_f4_90": b"\x05\xf4\x90\x80\x80",
        "utf8_truncated": b"\x05a\xe2\x82",
        "utf8_lone_continuation": b"\x05ab\x80",
        "utf8_f5": b"\x05\xf5\x80",
    }


PP2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"  # proxy-protocol.txt §2.2


def pp2(ver_cmd, fam, block):
    """A PROXY protocol v2 header: signature, version/command, family, length, block."""
    return PP2_SIGNATURE + bytes([ver_cmd, fam]) + struct.pack(">H", len(block)) + block


def pp2_tlv(kind, value):
    return bytes([kind]) + struct.pack(">H", len(value)) + value


def proxy_header():
    ipv6_max = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    v4 = bytes([192, 168, 0, 1, 192, 168, 0, 11]) + struct.pack(">HH", 56324, 443)
    v6 = (bytes.fromhex("20010db8000000000000000000000001")
          + bytes.fromhex("00000000000000000000ffffc0000201") + struct.pack(">HH", 65535, 0))
    tlvs = (pp2_tlv(0x01, b"h2") + pp2_tlv(0x02, b"example.com") + pp2_tlv(0x04, b"")
            + pp2_tlv(0x05, b"\x07" * 128) + pp2_tlv(0x20, b"\x01\x00\x00\x00\x00"))
    request = b"GET /healthz HTTP/1.1\r\n\r\n"
    return {
        # v1, §2.1: the example and the maximum lengths.
        "v1_tcp4_spec_example": b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n" + request,
        "v1_tcp4_max": b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n",
        "v1_tcp6_max": f"PROXY TCP6 {ipv6_max} {ipv6_max} 65535 65535\r\n".encode(),
        "v1_tcp6_compressed_mapped": b"PROXY TCP6 2001:db8::1 ::ffff:192.0.2.1 0 80\r\n",
        "v1_unknown": b"PROXY UNKNOWN\r\n" + request,
        "v1_unknown_107": f"PROXY UNKNOWN {ipv6_max} {ipv6_max} 65535 65535\r\n".encode(),
        "v1_partial": b"PROXY TCP4 192.168.0.1 192.16",
        "v1_cr_only": b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r",
        "v1_leading_zero": b"PROXY TCP4 192.168.0.01 192.168.0.11 56324 443\r\n",
        "v1_port_65536": b"PROXY TCP4 192.168.0.1 192.168.0.11 65536 443\r\n",
        "v1_double_space": b"PROXY TCP4  192.168.0.1 192.168.0.11 56324 443\r\n",
        "v1_family_mismatch": b"PROXY TCP4 ::1 192.168.0.11 56324 443\r\n",
        "v1_bare_lf": b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\n",
        "v1_too_long": b"PROXY UNKNOWN " + b"a" * 100 + b"\r\n",
        # v2, §2.2: HAProxy's own output (172.19.0.1:42578 -> 172.19.0.3:80), then
        # each family, TLVs, LOCAL, and each error.
        "v2_haproxy_tcp4": bytes.fromhex("0d0a0d0a000d0a515549540a2111000cac130001ac130003a6520050")
        + request,
        "v2_tcp4": pp2(0x21, 0x11, v4),
        "v2_tcp4_tlvs": pp2(0x21, 0x11, v4 + tlvs) + request,
        "v2_udp4": pp2(0x21, 0x12, v4),
        "v2_tcp6_tlvs": pp2(0x21, 0x21, v6 + tlvs),
        "v2_udp6": pp2(0x21, 0x22, v6),
        "v2_unix": pp2(0x21, 0x31, b"/run/a.sock".ljust(108, b"\x00") * 2),
        "v2_unspec": pp2(0x21, 0x00, b""),
        "v2_local": pp2(0x20, 0x00, b"") + request,
        "v2_local_with_block": pp2(0x20, 0x11, v4),
        "v2_max_536": pp2(0x21, 0x11, v4 + pp2_tlv(0x04, b"\x00" * 505)),
        "v2_too_long": pp2(0x21, 0x11, v4 + pp2_tlv(0x04, b"\x00" * 506)),
        "v2_bad_version": pp2(0x11, 0x11, v4),
        "v2_bad_command": pp2(0x22, 0x11, v4),
        "v2_bad_family": pp2(0x21, 0x13, v4),
        "v2_address_too_short": pp2(0x21, 0x21, v4),
        "v2_partial": pp2(0x21, 0x21, v6)[:30],
        # Neither signature.
        "http": request,
        "http_after_empty_lines": b"\r\n\r\n" + request,
    }


def publication():
    sep = b"\xff"
    return {
        "two_frames": b"\x00news" + sep + b"hello",
        "with_event": b"\x00news" + sep + b"hello" + sep + b'{"event":"price"}',
        "with_id": b"\x00orders" + sep + b"x" + sep + b'{"id":"42","event":"e"}',
        "id_number": b"\x00orders" + sep + b"x" + sep + b'{"id":42}',
        "id_at_floor": b"\x00orders" + sep + b"x" + sep + b'{"id":72057594037927936}',
        "nulls": b"\x00a" + sep + sep + b'{"event":null,"id":null}',
        "unknown_field": b"\x00a" + sep + b"x" + sep + b'{"evnt":"x"}',
        "bad_event": b"\x00a" + sep + b"x" + sep + b'{"event":"a b"}',
        "binary_payload": b"\x00bin" + sep + bytes(range(0, 255)),
        "one_frame": b"\x00news",
        "four_frames": b"\x00a" + sep + b"b" + sep + b"{}" + sep + b"d",
        "small_limits": b"\x01longer-than-8" + sep + b"0123456789abcdef0",
    }


def jwt(claims, secret=b"0123456789abcdef0123456789abcdef", kid="k1", alg="HS256"):
    import base64, hashlib, hmac, json

    def b64(raw):
        return base64.urlsafe_b64encode(raw).rstrip(b"=")

    head = b64(json.dumps({"alg": alg, "kid": kid, "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    signature = b64(hmac.new(secret, head + b"." + body, hashlib.sha256).digest())
    return head + b"." + body + b"." + signature


def token():
    now = 1_800_000_000
    good = {"exp": now + 60, "aud": "gateway", "sub": "u1", "channels": ["news", "sport.*"]}
    return {
        "valid": jwt(good),
        "aud_list": jwt(dict(good, aud=["billing", "gateway"])),
        "expired": jwt(dict(good, exp=now - 60)),
        "no_aud": jwt({k: v for k, v in good.items() if k != "aud"}),
        "other_secret": jwt(good, secret=b"fedcba9876543210fedcba9876543210"),
        "unknown_kid": jwt(good, kid="k2"),
        "alg_none": jwt(good, alg="none"),
        "not_before": jwt(dict(good, nbf=now + 600)),
        "bad_channels": jwt(dict(good, channels=["a b"])),
        "two_parts": b"eyJhbGciOiJIUzI1NiJ9.e30",
        "empty": b"",
    }


def origin():
    return {
        "exact": b"\x00https://app.example.com\nhttps://app.example.com",
        "exact_other": b"\x01https://app.example.com\nhttps://evil.example.com",
        "pattern": b"\x00https://*.example.com\nhttps://a.b.example.com",
        "pattern_lookalike": b"\x00https://*.example.com\nhttps://example.com.evil.net",
        "any": b"\x00*\nhttps://anything.example",
        "port": b"\x01http://localhost:3000\nhttp://localhost:3001\nhttp://localhost:3000",
        "empty_list": b"\x00https://app.example.com",
        "bad_entry": b"\x00https://app.example.com/path\nhttps://app.example.com",
    }


def main():
    targets = {
        "publication": publication(),
        "token": token(),
        "origin": origin(),
        "request_head": request_head(),
        "ws_frames": ws_frames(),
        "ws_session": ws_session(),
        "cursor": cursor(),
        "close_payload": close_payload(),
        "proxy_header": proxy_header(),
    }
    for target, seeds in targets.items():
        d = os.path.join(SEEDS, target)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        for name, data in seeds.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        print(f"{target}: {len(seeds)} seeds")


if __name__ == "__main__":
    main()
