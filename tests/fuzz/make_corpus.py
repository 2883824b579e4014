"""Writes the seed corpora for the libFuzzer harnesses: tests/fuzz/corpus/{checkpoint,idx}/.

Small valid files (what kdcore and the safetensors format allow) and hostile ones (one
broken rule each), so the fuzzer starts from every branch of the readers. Deterministic:
rerunning it rewrites the same bytes. The directories also hold inputs merged from long
fuzzing runs (named by their SHA-1; `fuzz_X -merge=1 tests/fuzz/corpus/X build/fuzz/corpus-X`
adds only inputs that reach new coverage) and crash regressions (`regress-*`); those are
not generated here.
"""
import gzip
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def st_file(header, data=b"", raw_header=None, hlen=None):
    h = raw_header if raw_header is not None else json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(h) if hlen is None else hlen) + h + data


def f32(n):
    return struct.pack(f"<{n}f", *[0.5 * i - 1 for i in range(n)])


def checkpoint_seeds():
    s = {}
    s["valid-two-f32-meta"] = st_file(
        {"__metadata__": {"epoch": "3", "format": "kdcore"},
         "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
         "b": {"dtype": "F32", "shape": [3], "data_offsets": [24, 36]}}, f32(9))
    s["valid-empty"] = st_file({})
    s["valid-scalar-i64"] = st_file({"step": {"dtype": "I64", "shape": [], "data_offsets": [0, 8]}},
                                    struct.pack("<q", 1234))
    s["valid-zero-size"] = st_file({"e": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]},
                                    "u": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]}}, b"abc")
    dts = [("F64", 8), ("F16", 2), ("I32", 4), ("I16", 2), ("I8", 1), ("U64", 8), ("U32", 4), ("U16", 2)]
    hdr, off = {}, 0
    for name, size in dts:
        hdr["t_" + name] = {"dtype": name, "shape": [1, 2], "data_offsets": [off, off + 2 * size]}
        off += 2 * size
    s["valid-all-dtypes"] = st_file(hdr, bytes(range(off)))
    # Escapes, a surrogate pair, raw UTF-8, spaces: the JSON subset in full.
    s["valid-escapes"] = st_file(None, b"\x01\x02", raw_header=(
        b'{ "n\\u00e9\\"\\\\\\/\\b\\f\\n\\r\\t\\ud83d\\ude00" : {"dtype":"U8","shape":[2],'
        b'"data_offsets":[0,2]}, "__metadata__": {"k\xc3\xa9": "v\xe2\x82\xac"}}   '))
    s["valid-padded-aligned"] = st_file(None, f32(2), raw_header=b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}' + b" " * 8)
    # Hostile: one rule broken per file.
    s["bad-short"] = b"\x05\x00\x00"
    s["bad-hlen-huge"] = struct.pack("<Q", 2**63) + b"{}"
    s["bad-hlen-past-end"] = struct.pack("<Q", 100) + b"{}"
    s["bad-not-object"] = st_file(None, raw_header=b"[1,2]")
    s["bad-trailing"] = st_file(None, raw_header=b"{} x")
    s["bad-deep"] = st_file(None, raw_header=b'{"a":' + b"[" * 9 + b"]" * 9 + b"}")
    s["bad-true-null"] = st_file(None, raw_header=b'{"a":{"dtype":true,"shape":null}}')
    s["bad-float"] = st_file(None, raw_header=b'{"a":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}}')
    s["bad-negative"] = st_file(None, raw_header=b'{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}')
    s["bad-leading-zero"] = st_file(None, raw_header=b'{"a":{"dtype":"F32","shape":[01],"data_offsets":[0,4]}}')
    s["bad-u64-overflow"] = st_file(None, raw_header=b'{"a":{"dtype":"F32","shape":[18446744073709551616],"data_offsets":[0,4]}}')
    s["bad-numel-overflow"] = st_file({"a": {"dtype": "F64", "shape": [2**32, 2**32, 0], "data_offsets": [0, 0]}})
    s["bad-dup-name"] = st_file(None, f32(2), raw_header=(
        b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'))
    s["bad-dup-key"] = st_file(None, f32(1), raw_header=b'{"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}')
    s["bad-extra-key"] = st_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": "y"}}, f32(1))
    s["bad-dtype"] = st_file({"a": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}}, b"\0\0")
    s["bad-too-many-dims"] = st_file({"a": {"dtype": "U8", "shape": [1] * 33, "data_offsets": [0, 1]}}, b"\0")
    s["bad-offsets-reversed"] = st_file({"a": {"dtype": "U8", "shape": [0], "data_offsets": [4, 0]}}, b"\0" * 4)
    s["bad-offsets-beyond"] = st_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, f32(1))
    s["bad-offsets-size"] = st_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, f32(1))
    s["bad-overlap"] = st_file({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, f32(3))
    s["bad-gap"] = st_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                            "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}, f32(3))
    s["bad-uncovered-tail"] = st_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, f32(2))
    s["bad-meta-not-string"] = st_file(None, raw_header=b'{"__metadata__":{"a":["b"]}}')
    s["bad-meta-dup"] = st_file(None, raw_header=b'{"__metadata__":{"a":"1","a":"2"}}')
    s["bad-nul-escape"] = st_file(None, raw_header=b'{"__metadata__":{"a":"\\u0000"}}')
    s["bad-lone-surrogate"] = st_file(None, raw_header=b'{"__metadata__":{"a":"\\ud800x"}}')
    s["bad-utf8-overlong"] = st_file(None, raw_header=b'{"__metadata__":{"a":"\xc0\xaf"}}')
    s["bad-utf8-truncated"] = st_file(None, raw_header=b'{"__metadata__":{"a":"\xe2\x82')
    s["bad-control-char"] = st_file(None, raw_header=b'{"__metadata__":{"a":"\x01"}}')
    s["bad-unterminated-escape"] = st_file(None, raw_header=b'{"__metadata__":{"a":"\\')
    return s


def idx(dims, payload=None, type_byte=0x08, magic=b"\0\0"):
    n = 1
    for d in dims:
        n *= d
    if payload is None:
        payload = bytes((7 * i + 3) % 256 for i in range(n))
    return magic + bytes([type_byte, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims) + payload


def gz(b):
    return gzip.compress(b, compresslevel=6, mtime=0)


def idx_seeds():
    s = {}
    s["valid-labels-1d"] = idx([10])
    s["valid-images-3d"] = idx([2, 4, 4])
    s["valid-4d"] = idx([1, 2, 2, 3])
    s["valid-labels-1d.gz"] = gz(idx([10]))
    s["valid-images-3d.gz"] = gz(idx([3, 5, 5]))
    s["valid-two-members.gz"] = gz(idx([6])[:7]) + gz(idx([6])[7:])
    s["bad-magic"] = idx([4], magic=b"\1\0")
    s["bad-type-float"] = idx([1], payload=b"\0" * 4, type_byte=0x0D)
    s["bad-ndim-0"] = b"\0\0\x08\x00"
    s["bad-ndim-5"] = idx([1, 1, 1, 1, 1])
    s["bad-dim-zero"] = idx([3, 0], payload=b"")
    s["bad-truncated-header"] = idx([2, 2])[:9]
    s["bad-truncated-payload"] = idx([4, 4])[:-3]
    s["bad-trailing"] = idx([4]) + b"xx"
    # Exactly 2^31 bytes claimed (the limit), 3 present: kd_idx_read used to malloc 2 GiB
    # first (libFuzzer: out-of-memory); the first crash the harness found.
    s["bad-huge"] = idx([65536, 32768], payload=b"\1\2\3")
    s["bad-over-2g"] = idx([65536, 65536], payload=b"")
    s["bad-truncated.gz"] = gz(idx([3, 5, 5]))[:-12]
    s["bad-crc.gz"] = (lambda b: b[:-8] + bytes([b[-8] ^ 1]) + b[-7:])(gz(idx([8])))
    s["bad-trailing-garbage.gz"] = gz(idx([8])) + b"garbage"
    s["bad-payload-short.gz"] = gz(idx([3, 5, 5])[:-5])
    s["bad-empty"] = b""
    return s


def main():
    for sub, seeds in (("checkpoint", checkpoint_seeds()), ("idx", idx_seeds())):
        d = os.path.join(HERE, "corpus", sub)
        os.makedirs(d, exist_ok=True)
        for name, data in seeds.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        print(f"{d}: {len(seeds)} seeds, {sum(map(len, seeds.values()))} bytes")


if __name__ == "__main__":
    main()
