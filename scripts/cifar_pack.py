#!/usr/bin/env python
"""Pack the offline JPEG CIFAR-10 folder small enough to travel to a GPU machine, and unpack it there.

Every file of the offline copy shares one JPEG header (same tables, same 32x32 size; see its
PROVENANCE.md), so the pack keeps that header once and each image's scan bytes: 55 MB of files
become about 20 MB. Unpacking writes the same bytes back, file for file (checked by hash).

  python scripts/cifar_pack.py pack ../shared/data/cifar10 .gpu/cifar10.pack
  python scripts/cifar_pack.py unpack .gpu/cifar10.pack /tmp/cifar10
"""
from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path


def split_header(data: bytes) -> int:
    """Offset just past the SOS segment (where the entropy-coded scan starts)."""
    i = 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        i += 2 + length
        if marker == 0xDA:
            return i
    raise ValueError("no SOS marker: not a baseline JPEG")


def pack(src: Path, dst: Path) -> None:
    files = sorted(p for p in src.rglob("*.jpg"))
    header, names, scans = None, [], []
    digest = hashlib.sha256()
    for p in files:
        data = p.read_bytes()
        digest.update(data)
        cut = split_header(data)
        if header is None:
            header = data[:cut]
        if data[:cut] != header:
            raise ValueError(f"{p}: its JPEG header differs from the first file's; cannot pack")
        names.append(str(p.relative_to(src)))
        scans.append(data[cut:])
    index = json.dumps({"names": names, "sizes": [len(s) for s in scans], "sha256": digest.hexdigest()}).encode()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with open(dst, "wb") as f:
        f.write(struct.pack(">II", len(header), len(index)) + header + index + b"".join(scans))
    print(f"{len(files)} files -> {dst} ({dst.stat().st_size / 1e6:.1f} MB)")


def unpack(src: Path, dst: Path) -> None:
    blob = src.read_bytes()
    n_header, n_index = struct.unpack(">II", blob[:8])
    header = blob[8:8 + n_header]
    index = json.loads(blob[8 + n_header:8 + n_header + n_index])
    pos = 8 + n_header + n_index
    digest = hashlib.sha256()
    for name, size in zip(index["names"], index["sizes"]):
        data = header + blob[pos:pos + size]
        pos += size
        digest.update(data)
        path = dst / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    if digest.hexdigest() != index["sha256"]:
        raise ValueError("unpacked bytes differ from the packed folder's hash")
    print(f"{len(index['names'])} files -> {dst}")


if __name__ == "__main__":
    command, a, b = sys.argv[1:4]
    {"pack": pack, "unpack": unpack}[command](Path(a), Path(b))
