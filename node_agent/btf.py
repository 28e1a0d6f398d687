"""Pure-Python reader of BTF (from a compiled .bpf.o or a raw BTF blob).

The agent takes record layouts and .rodata offsets from the object it loads, so the C
struct stays the single source of truth for the numpy dtypes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Btf", "BtfError", "Member"]

# BTF wire format (include/uapi/linux/btf.h): header, then type records, then strings.
_BTF_MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")  # magic version flags hdr_len type_off/len str_off/len
_TYPE = struct.Struct("<III")  # name_off, info (vlen:16 | kind:5 << 24 | kflag << 31), size/type

_INT, _PTR, _ARRAY, _STRUCT, _UNION, _ENUM, _FWD, _TYPEDEF = 1, 2, 3, 4, 5, 6, 7, 8
_VOLATILE, _CONST, _RESTRICT, _FUNC, _FUNC_PROTO, _VAR, _DATASEC = 9, 10, 11, 12, 13, 14, 15
_FLOAT, _DECL_TAG, _TYPE_TAG, _ENUM64 = 16, 17, 18, 19
_MODIFIERS = frozenset({_TYPEDEF, _VOLATILE, _CONST, _RESTRICT, _TYPE_TAG})
# bytes of kind-specific data after the 12-byte common record: (fixed, per vlen entry)
_EXTRA = {
    _INT: (4, 0),
    _ARRAY: (12, 0),
    _STRUCT: (0, 12),
    _UNION: (0, 12),
    _ENUM: (0, 8),
    _FUNC_PROTO: (0, 8),
    _VAR: (4, 0),
    _DATASEC: (0, 12),
    _DECL_TAG: (4, 0),
    _ENUM64: (0, 12),
}
_INT_SIGNED, _INT_BOOL = 1, 4
_POINTER_SIZE = 8  # BPF and every 64-bit host the agent runs on

# ELF64 little-endian: the file header fields we need, section and symbol entries.
_ELF_SHDR = struct.Struct("<IIQQQQIIQQ")
_ELF_SYM = struct.Struct("<IBBHQQ")
_SHT_SYMTAB = 2


class BtfError(ValueError):
    """The BTF is malformed or lacks what was asked for (a struct, a section)."""


@dataclass(frozen=True, slots=True)
class Member:
    """One struct member: byte offset and size, kind ("int", "uint", "bytes", ...)."""

    name: str
    offset: int
    size: int
    kind: str


@dataclass(frozen=True, slots=True)
class _Type:
    kind: int
    name: str
    kflag: bool
    vlen: int
    size_or_type: int
    extra: bytes


class Btf:
    """Type table of one BTF blob, plus ELF symbols when read from an object file."""

    def __init__(self, data: bytes, symbols: dict[str, dict[str, int]] | None = None) -> None:
        """Parse a raw BTF blob; symbols maps section -> {symbol: offset} (ELF objects)."""
        if len(data) < _HEADER.size:
            raise BtfError("btf blob too short")
        magic, _version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(data)
        if magic != _BTF_MAGIC:
            raise BtfError(f"bad btf magic {magic:#x} (big-endian btf is not supported)")
        types_start, strs_start = hdr_len + type_off, hdr_len + str_off
        if types_start + type_len > len(data) or strs_start + str_len > len(data):
            raise BtfError("btf sections exceed the blob")
        self._strings = data[strs_start : strs_start + str_len]
        self._types = [_Type(0, "void", False, 0, 0, b"")]  # type id 0 is void
        self._by_name: dict[tuple[int, str], int] = {}
        pos, end = types_start, types_start + type_len
        while pos < end:
            name_off, info, size_or_type = _TYPE.unpack_from(data, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            fixed, per_entry = _EXTRA.get(kind, (0, 0))
            extra_len = fixed + per_entry * vlen
            pos += _TYPE.size
            record = _Type(
                kind,
                self._str(name_off),
                bool(info >> 31),
                vlen,
                size_or_type,
                data[pos : pos + extra_len],
            )
            pos += extra_len
            if record.name:
                self._by_name.setdefault((kind, record.name), len(self._types))
            self._types.append(record)
        self._symbols = symbols or {}

    @classmethod
    def from_file(cls, path: str | Path) -> Btf:
        """Read BTF from an ELF object's .BTF section or from a raw blob (vmlinux)."""
        data = Path(path).read_bytes()
        if data[:4] == b"\x7fELF":
            sections, symbols = _read_elf(data)
            if ".BTF" not in sections:
                raise BtfError(f"{path}: no .BTF section (build with clang -g)")
            return cls(sections[".BTF"], symbols)
        return cls(data)

    def members(self, struct_name: str) -> list[Member]:
        """Members of a struct by name, with byte offsets, sizes and kinds.

        A bitfield is listed with kind "bitfield", the byte holding its first bit and the
        bytes it spans; anonymous members have the name "".
        """
        t = self._type(self._struct_id(struct_name))
        out = []
        for name, type_id, bit_offset, bits in self._raw_members(t):
            if bits or bit_offset % 8:
                span = (bit_offset % 8 + (bits or 8 * self._size(type_id)) + 7) // 8
                out.append(Member(name, bit_offset // 8, span, "bitfield"))
            else:
                out.append(Member(name, bit_offset // 8, self._size(type_id), self._kind(type_id)))
        return out

    def member(self, struct_name: str, name: str) -> Member:
        """One member of a struct by name, looked up through anonymous struct/union members
        too (mm_struct's fields sit in an anonymous struct), with its offset from the
        outer struct's start. BtfError if there is none."""
        found = self._find_member(self._struct_id(struct_name), name, 0)
        if found is None:
            raise BtfError(f"struct {struct_name} has no member {name!r}")
        return found

    def _find_member(self, type_id: int, name: str, base_bits: int) -> Member | None:
        for member_name, member_type, bit_offset, bits in self._raw_members(self._type(type_id)):
            offset = base_bits + bit_offset
            if member_name == name:
                if bits or offset % 8:
                    span = (offset % 8 + (bits or 8 * self._size(member_type)) + 7) // 8
                    return Member(name, offset // 8, span, "bitfield")
                return Member(name, offset // 8, self._size(member_type), self._kind(member_type))
            inner_id, inner = self._resolve(member_type)
            if not member_name and inner.kind in (_STRUCT, _UNION):
                found = self._find_member(inner_id, name, offset)
                if found is not None:
                    return found
        return None

    def struct_size(self, struct_name: str) -> int:
        """sizeof(struct struct_name)."""
        return self._type(self._struct_id(struct_name)).size_or_type

    def struct_dtype(self, struct_name: str) -> np.dtype:
        """Little-endian numpy structured dtype with the struct's exact offsets and size."""
        return self._dtype(self._struct_id(struct_name))

    def datasec_vars(self, section: str) -> dict[str, tuple[int, int]]:
        """Variables of a DATASEC (e.g. ".rodata") as {name: (offset, size)}."""
        type_id = self._by_name.get((_DATASEC, section))
        if type_id is None:
            raise BtfError(f"no datasec {section!r} in btf")
        t = self._type(type_id)
        # clang leaves offsets 0 in object files (libbpf fixes them up from the symbol
        # table at open), so the ELF symbol value wins when there is one
        symbols = self._symbols.get(section, {})
        out = {}
        for i in range(t.vlen):
            var_id, offset, size = struct.unpack_from("<III", t.extra, i * 12)
            name = self._type(var_id).name
            out[name] = (symbols.get(name, offset), size)
        return out

    def _struct_id(self, struct_name: str) -> int:
        type_id = self._by_name.get((_STRUCT, struct_name))
        if type_id is None and (_TYPEDEF, struct_name) in self._by_name:
            # a typedef of an anonymous struct, e.g. the kernel's socket_lock_t
            resolved, t = self._resolve(self._by_name[(_TYPEDEF, struct_name)])
            type_id = resolved if t.kind == _STRUCT else None
        if type_id is None:
            raise BtfError(f"no struct {struct_name!r} in btf")
        return type_id

    def _str(self, off: int) -> str:
        end = self._strings.find(b"\0", off)
        return self._strings[off : end if end >= 0 else None].decode()

    def _type(self, type_id: int) -> _Type:
        if not 0 < type_id < len(self._types):
            raise BtfError(f"btf type id {type_id} out of range")
        return self._types[type_id]

    def _resolve(self, type_id: int) -> tuple[int, _Type]:
        t = self._type(type_id)
        while t.kind in _MODIFIERS:
            type_id = t.size_or_type
            t = self._type(type_id)
        return type_id, t

    def _array(self, t: _Type) -> tuple[int, int]:
        elem, _index, nelems = struct.unpack_from("<III", t.extra)
        return elem, nelems

    def _is_char(self, type_id: int) -> bool:
        _, t = self._resolve(type_id)
        return t.kind == _INT and t.name == "char"

    def _size(self, type_id: int) -> int:
        _, t = self._resolve(type_id)
        if t.kind == _PTR:
            return _POINTER_SIZE
        if t.kind == _ARRAY:
            elem, nelems = self._array(t)
            return nelems * self._size(elem)
        if t.kind in (_INT, _STRUCT, _UNION, _ENUM, _ENUM64, _FLOAT, _DATASEC):
            return t.size_or_type
        raise BtfError(f"btf type {t.name or '(anon)'} (kind {t.kind}) has no size")

    def _kind(self, type_id: int) -> str:
        _, t = self._resolve(type_id)
        if t.kind == _INT:
            encoding = struct.unpack_from("<I", t.extra)[0] >> 24
            if encoding & _INT_BOOL:
                return "bool"
            return "int" if encoding & _INT_SIGNED else "uint"
        if t.kind == _ARRAY:
            return "bytes" if self._is_char(self._array(t)[0]) else "array"
        names = {_PTR: "ptr", _STRUCT: "struct", _UNION: "union", _ENUM: "enum"}
        return names.get(t.kind, {_ENUM64: "enum", _FLOAT: "float"}.get(t.kind, "other"))

    def _dtype(self, type_id: int) -> np.dtype:
        type_id, t = self._resolve(type_id)
        size = self._size(type_id)
        if t.kind == _INT:
            encoding = struct.unpack_from("<I", t.extra)[0] >> 24
            if encoding & _INT_BOOL and size == 1:
                return np.dtype("?")
            return np.dtype(f"<{'i' if encoding & _INT_SIGNED else 'u'}{size}")
        if t.kind in (_ENUM, _ENUM64):
            return np.dtype(f"<{'i' if t.kflag else 'u'}{size}")
        if t.kind == _PTR:
            return np.dtype(f"<u{_POINTER_SIZE}")
        if t.kind == _FLOAT:
            return np.dtype(f"<f{size}")
        if t.kind == _ARRAY:
            elem, nelems = self._array(t)
            if self._is_char(elem):
                return np.dtype(f"S{nelems}")  # char[n]: fixed bytes, NUL padded
            inner = self._dtype(elem)
            if inner.subdtype is not None:  # int x[2][3]: one (2, 3) subarray
                base, shape = inner.subdtype
                return np.dtype((base, (nelems, *shape)))
            return np.dtype((inner, (nelems,)))
        if t.kind == _UNION:
            return np.dtype(f"V{size}")
        if t.kind == _STRUCT:
            members = self._members_of(type_id)
            return np.dtype(
                {
                    "names": [name for name, _, _ in members],
                    "formats": [self._dtype(member_type) for _, member_type, _ in members],
                    "offsets": [offset for _, _, offset in members],
                    "itemsize": size,
                }
            )
        raise BtfError(f"btf type {t.name or '(anon)'} (kind {t.kind}) has no numpy dtype")

    def _raw_members(self, t: _Type) -> list[tuple[str, int, int, int]]:
        """(name, type id, bit offset, bitfield bits or 0) of each member of t."""
        out = []
        for i in range(t.vlen):
            name_off, member_type, offset = struct.unpack_from("<III", t.extra, i * 12)
            # with kind_flag set, offset is bitfield_size << 24 | bit_offset
            bit_offset, bits = (offset & 0xFFFFFF, offset >> 24) if t.kflag else (offset, 0)
            out.append((self._str(name_off), member_type, bit_offset, bits))
        return out

    def _members_of(self, type_id: int) -> list[tuple[str, int, int]]:
        """(name, type id, byte offset) of each member; bitfields and anonymous members are
        refused (a numpy field needs a name and whole bytes)."""
        t = self._type(type_id)
        out = []
        for name, member_type, bit_offset, bits in self._raw_members(t):
            if bits or bit_offset % 8:
                raise BtfError(f"struct {t.name}.{name}: bitfields are not supported")
            if not name:
                raise BtfError(f"struct {t.name}: anonymous members are not supported")
            out.append((name, member_type, bit_offset // 8))
        return out


def _read_elf(data: bytes) -> tuple[dict[str, bytes], dict[str, dict[str, int]]]:
    """Sections by name and {section: {symbol: value}} of a little-endian ELF64 file."""
    if data[4] != 2 or data[5] != 1:
        raise BtfError("only little-endian ELF64 objects are supported")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    # section header: name type flags addr offset size link info addralign entsize
    headers = [_ELF_SHDR.unpack_from(data, shoff + i * shentsize) for i in range(shnum)]

    def blob(i: int) -> bytes:
        offset, size = headers[i][4], headers[i][5]
        return data[offset : offset + size]

    def cstr(table: bytes, off: int) -> str:
        return table[off : table.index(b"\0", off)].decode()

    shstr = blob(shstrndx)
    names = [cstr(shstr, h[0]) for h in headers]
    sections = {names[i]: blob(i) for i in range(shnum)}
    symbols: dict[str, dict[str, int]] = {}
    for i, h in enumerate(headers):
        if h[1] != _SHT_SYMTAB:
            continue
        table, strtab = blob(i), blob(h[6])  # sh_link: the symbol names' string table
        for off in range(0, len(table), _ELF_SYM.size):
            name_off, _info, _other, shndx, value, _size = _ELF_SYM.unpack_from(table, off)
            if name_off and 0 < shndx < shnum:
                symbols.setdefault(names[shndx], {})[cstr(strtab, name_off)] = value
    return sections, symbols
