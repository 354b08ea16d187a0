"""JPEG files damaged in known ways, for the tests of what each check catches."""

from __future__ import annotations


def jpeg_segments(b: bytes) -> list[tuple[int, int, int]]:
    """(marker, offset, length) of a JPEG's header segments, up to and including SOS."""
    out, i = [], 2
    while i < len(b):
        assert b[i] == 0xFF
        marker, seg = b[i + 1], int.from_bytes(b[i + 2 : i + 4], "big")
        out.append((marker, i, seg))
        if marker == 0xDA:
            return out
        i += 2 + seg
    raise AssertionError("no SOS segment")


def bogus_huffman(jpeg: bytes) -> bytes:
    """``jpeg`` with garbage Huffman tables (DHT): every one of the 16 code-length counts is 255,
    i.e. 4,080 codes in a segment of 31 or 181 bytes. The file is whole and its header (SOI, SOF)
    intact, so it passes the header check and reaches the decoder, and libjpeg rejects it for
    certain ("Bogus Huffman table definition", a fatal error, not a warning the decoder can skip,
    as random bytes in the scan data often are); PIL fails on it too ("broken data stream")."""
    b = bytearray(jpeg)
    dht = [i for marker, i, _ in jpeg_segments(jpeg) if marker == 0xC4]
    assert dht, "no DHT segment"
    for i in dht:
        b[i + 5 : i + 21] = b"\xff" * 16  # after FF C4, the length and the class/id byte
    return bytes(b)
