"""Merging static libraries into one, in Python.

Each layer compiles to its own GNU ``ar`` archive; an app wants one ``lib<model>.a``. Host ``ar``
cannot always index objects of another architecture (x86 binutils and AArch64 ELF), so the merge
reuses the symbol indexes Halide already wrote, with offsets recomputed for the merged file.
"""

from __future__ import annotations

import struct
from pathlib import Path

MAGIC = b"!<arch>\n"
HEADER = struct.Struct("16s12s6s6s8s10s2s")


def is_whole(path: Path) -> bool:
    """Whether ``path`` is an archive cut nowhere: its member headers run to its end and its
    symbol index points at members inside it (a cut at a member boundary leaves the headers
    whole). Reads the headers and the index, not the members: a cheap check for an archive
    cut short by a crash or a full disk."""
    try:
        with path.open("rb") as file:
            end = file.seek(0, 2)
            file.seek(0)
            if file.read(len(MAGIC)) != MAGIC:
                return False
            pos, odd, indexed = len(MAGIC), False, 0
            while pos < end:
                file.seek(pos)
                header = file.read(HEADER.size)
                if len(header) < HEADER.size:
                    return False
                raw_name, *_, size_field, fmag = HEADER.unpack(header)
                if fmag != b"`\n":
                    return False
                size = _member_size(size_field)
                if raw_name.rstrip() in (b"/", b"/SYM64/"):
                    indexed = max(indexed, *_index_offsets(raw_name, file.read(size)), 0)
                odd = bool(size & 1)
                pos += HEADER.size + size + odd
    except (OSError, ValueError, struct.error):
        return False
    whole = pos == end or (odd and pos == end + 1)  # an odd last member's padding may be cut
    return whole and indexed + HEADER.size <= end


def _member_size(field: bytes) -> int:
    """A member header's size: decimal digits, space-padded. int() also took a sign, and a size
    of -60 never moved past its header (a damaged cache entry hung every build)."""
    digits = field.rstrip(b" ")
    if not digits.isdigit():
        raise ValueError(f"a member size of {field!r}")
    return int(digits)


def _index_offsets(raw_name: bytes, body: bytes) -> tuple[int, ...]:
    """The member offsets a symbol index ("/" or "/SYM64/") lists."""
    width = "I" if raw_name.rstrip() == b"/" else "Q"
    count = struct.unpack_from(f">{width}", body)[0]
    return struct.unpack_from(f">{count}{width}", body, struct.calcsize(width))


def _members(path: Path) -> tuple[list[tuple[str, bytes]], dict[int, list[bytes]]]:
    """Members in order, and the symbols each member (by index) defines."""
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise ValueError(f"{path}: not an ar archive")
    pos, long_names = len(MAGIC), b""
    members: list[tuple[str, bytes]] = []
    symbol_offsets: list[tuple[int, bytes]] = []
    offset_to_index: dict[int, int] = {}
    while pos < len(data):
        raw_name, *_, size_field, fmag = HEADER.unpack_from(data, pos)
        if fmag != b"`\n":
            raise ValueError(f"{path}: corrupt member header at byte {pos}")
        try:
            size = _member_size(size_field)
        except ValueError as exc:
            raise ValueError(f"{path}: corrupt member header at byte {pos}: {exc}") from exc
        if pos + HEADER.size + size > len(data):
            raise ValueError(f"{path}: truncated: a member at byte {pos} runs past the end")
        body = data[pos + HEADER.size : pos + HEADER.size + size]
        name = raw_name.decode().rstrip()
        if name == "/":
            count = struct.unpack_from(">I", body)[0]
            offsets = struct.unpack_from(f">{count}I", body, 4)
            names = body[4 + 4 * count :].split(b"\0")[:count]
            symbol_offsets = list(zip(offsets, names, strict=True))
        elif name == "/SYM64/":
            count = struct.unpack_from(">Q", body)[0]
            offsets = struct.unpack_from(f">{count}Q", body, 8)
            names = body[8 + 8 * count :].split(b"\0")[:count]
            symbol_offsets = list(zip(offsets, names, strict=True))
        elif name == "//":
            long_names = body
        else:
            if name.startswith("/") and name[1:].isdigit():
                start = int(name[1:])
                name = long_names[start : long_names.index(b"/\n", start)].decode()
            offset_to_index[pos] = len(members)
            members.append((name.rstrip("/"), body))
        pos += HEADER.size + size + (size & 1)
    symbols: dict[int, list[bytes]] = {}
    for offset, symbol in symbol_offsets:
        if offset not in offset_to_index:
            raise ValueError(
                f"{path}: its symbol index names a member at byte {offset}, where none begins "
                "(cut short at a member's end, or damaged)"
            )
        symbols.setdefault(offset_to_index[offset], []).append(symbol)
    return members, symbols


# ELF64 (the build makes 64-bit code only), after e_ident's 16 bytes: the section table's
# offset, entry size and count; a section's type, offset, size, link and entry size; a symbol's
# name, info and section.
_ELF_SECTION_TABLE = "16x24xQ10xHH"
_ELF_SECTION = "4xI16xQQI12xQ"
_ELF_SYMBOL = "IBxH16x"
_SHT_SYMTAB, _STB_WEAK = 2, 2


def elf_weak_symbols(body: bytes) -> set[bytes]:
    """The weak symbols an ELF64 object defines (Halide's profiling code defines its helpers
    weak in every pipeline's object); empty for another format, whose definitions then all
    count as strong."""
    if body[:5] != b"\x7fELF\x02" or body[5] not in (1, 2):
        return set()
    order = "<" if body[5] == 1 else ">"

    def unpack(layout: str, at: int) -> tuple[int, ...]:
        return struct.unpack_from(order + layout, body, at)

    shoff, shentsize, shnum = unpack(_ELF_SECTION_TABLE, 0)
    sections = [unpack(_ELF_SECTION, shoff + i * shentsize) for i in range(shnum)]
    weak = set()
    for kind, offset, size, link, entsize in sections:
        if kind != _SHT_SYMTAB or not entsize:
            continue
        strings_at = sections[link][1]
        for at in range(offset, offset + size, entsize):
            name, info, shndx = unpack(_ELF_SYMBOL, at)
            if info >> 4 == _STB_WEAK and shndx != 0:
                start = strings_at + name
                weak.add(body[start : body.index(b"\0", start)])
    return weak


def _header(name: bytes, size: int) -> bytes:
    fields = (name, b"0", b"0", b"0", b"644", str(size).encode())
    widths = (16, 12, 6, 6, 8, 10)
    return b"".join(f.ljust(w) for f, w in zip(fields, widths, strict=True)) + b"`\n"


def _check_single_definitions(
    members: list[tuple[str, bytes]], symbols: list[tuple[int, bytes]], dest: Path
) -> None:
    """No symbol defined by two members, unless every definition is weak (the profiler's
    helpers in each layer's object): the linker would take either one silently, and from an
    archive it does not pull a member in to override a weak definition it already has."""
    definers: dict[bytes, set[int]] = {}
    for member, symbol in symbols:
        definers.setdefault(symbol, set()).add(member)
    weak: dict[int, set[bytes]] = {}  # read only from the members a duplicate names
    for symbol, where in definers.items():
        if len(where) < 2:
            continue
        for m in where - weak.keys():
            weak[m] = elf_weak_symbols(members[m][1])
        if not all(symbol in weak[m] for m in where):
            raise ValueError(f"symbol {symbol.decode()} defined twice while merging into {dest}")


def merge_archives(sources: list[Path], dest: Path) -> None:
    """Writes ``dest`` holding every member of ``sources`` and one combined symbol index."""
    members: list[tuple[str, bytes]] = []
    symbols: list[tuple[int, bytes]] = []
    for source in sources:
        found, by_member = _members(source)
        for index, member in enumerate(found):
            for symbol in by_member.get(index, []):
                symbols.append((len(members), symbol))
            members.append(member)
    names = [m[0] for m in members]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate object names while merging into {dest}: {names}")
    _check_single_definitions(members, symbols, dest)

    long_table = b"".join(n.encode() + b"/\n" for n in names)
    name_fields, cursor = [], 0
    for n in names:
        name_fields.append(f"/{cursor}".encode())
        cursor += len(n.encode()) + 2
    sym_body_len = 4 + 4 * len(symbols) + sum(len(s) + 1 for _, s in symbols)
    first = len(MAGIC) + HEADER.size + sym_body_len + (sym_body_len & 1)
    first += HEADER.size + len(long_table) + (len(long_table) & 1)
    offsets, pos = [], first
    for _, body in members:
        offsets.append(pos)
        pos += HEADER.size + len(body) + (len(body) & 1)

    sym_body = struct.pack(f">I{len(symbols)}I", len(symbols), *(offsets[i] for i, _ in symbols))
    sym_body += b"".join(s + b"\0" for _, s in symbols)
    out = [MAGIC, _header(b"/", len(sym_body)), sym_body, b"\n" * (len(sym_body) & 1)]
    out += [_header(b"//", len(long_table)), long_table, b"\n" * (len(long_table) & 1)]
    for field, (_, body) in zip(name_fields, members, strict=True):
        out += [_header(field, len(body)), body, b"\n" * (len(body) & 1)]
    dest.write_bytes(b"".join(out))
