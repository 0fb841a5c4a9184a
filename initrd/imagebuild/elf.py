"""Just enough ELF parsing to list DT_NEEDED entries (no binutils needed on the build host)."""
from __future__ import annotations

import struct
from pathlib import Path

_PT_DYNAMIC = 2
_DT_NEEDED = 1
_DT_STRTAB = 5


def is_elf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def needed(path: Path) -> list[str]:
    """DT_NEEDED sonames of a 64-bit little-endian ELF file ([] for a static one)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path}: not a 64-bit little-endian ELF file")
    e_phoff, = struct.unpack_from("<Q", data, 0x20)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
    segments = []
    dynamic = None
    for i in range(e_phnum):
        p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", data, e_phoff + i * e_phentsize)
        segments.append((p_type, p_offset, p_vaddr, p_filesz))
        if p_type == _PT_DYNAMIC:
            dynamic = (p_offset, p_filesz)
    if dynamic is None:
        return []
    entries = []
    strtab_vaddr = None
    off, size = dynamic
    for pos in range(off, off + size, 16):
        tag, val = struct.unpack_from("<qQ", data, pos)
        if tag == 0:
            break
        if tag == _DT_NEEDED:
            entries.append(val)
        elif tag == _DT_STRTAB:
            strtab_vaddr = val
    if strtab_vaddr is None:
        return []
    # DT_STRTAB holds a virtual address: map it back to a file offset through PT_LOAD.
    strtab_off = None
    for p_type, p_offset, p_vaddr, p_filesz in segments:
        if p_type == 1 and p_vaddr <= strtab_vaddr < p_vaddr + p_filesz:
            strtab_off = p_offset + (strtab_vaddr - p_vaddr)
    if strtab_off is None:
        raise ValueError(f"{path}: DT_STRTAB outside every PT_LOAD segment")
    names = []
    for name_off in entries:
        start = strtab_off + name_off
        names.append(data[start:data.index(b"\0", start)].decode())
    return names
