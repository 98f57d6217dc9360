"""Does a built cifops._C share the process's C++ runtime, or carry a copy of its own?

An extension that links libstdc++ (with libsupc++: __cxa_throw, the personality
routine, iostreams and locales), libgcc's unwinder or libgomp statically holds a
second C++ runtime next to the one torch runs with. Exceptions (every TORCH_CHECK),
streams and locales then cross between the two, and a mismatch of their versions
kills the process (SIGSEGV or SIGABRT) instead of raising RuntimeError in Python.
This is what a relocated compiler whose own library folder holds libstdc++.a but no
libstdc++.so does by default (setup.py links the shared runtime explicitly, then
runs :func:`private_runtime_symbols` on the result and refuses it if needed).

Pure Python, no torch import: setup.py loads this file by path.
"""

import struct

# Symbols that only the C++ runtime libraries define: if the extension defines one,
# that library (or the part of it holding the symbol) was linked into it statically.
RUNTIME_SYMBOLS = {
    "__cxa_throw": "libstdc++",
    "__cxa_begin_catch": "libstdc++",
    "__cxa_allocate_exception": "libstdc++",
    "__gxx_personality_v0": "libstdc++",
    "_ZTVN10__cxxabiv117__class_type_infoE": "libstdc++",
    "_ZNSt6locale7classicEv": "libstdc++",
    "_ZNSt8ios_base4InitC1Ev": "libstdc++",
    "_Unwind_RaiseException": "libgcc_s (the unwinder)",
    "_Unwind_Resume": "libgcc_s (the unwinder)",
    "GOMP_parallel": "libgomp",
    "omp_get_num_threads": "libgomp",
}

_SHT_SYMTAB, _SHT_DYNAMIC, _SHT_DYNSYM = 2, 6, 11
_DT_NEEDED = 1


def _cstr(data, offset):
    end = data.index(b"\0", offset)
    return data[offset:end].decode("utf-8", "replace")


def elf_summary(path):
    """(needed, defined) of a 64-bit little-endian ELF shared object.

    needed: its DT_NEEDED entries; defined: the names of RUNTIME_SYMBOLS that it
    defines in its dynamic or (unstripped) full symbol table. None for a file that is
    not such an ELF object (another platform: nothing is checked).
    """
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    wanted = {name.encode() for name in RUNTIME_SYMBOLS}
    needed, defined = [], set()
    for _, sh_type, _, _, offset, size, link, _, _, entsize in sections:
        if sh_type in (_SHT_SYMTAB, _SHT_DYNSYM):
            strtab = sections[link][4]
            for pos in range(offset, offset + size, entsize or 24):
                st_name, _, _, st_shndx, _, _ = struct.unpack_from("<IBBHQQ", data, pos)
                if st_shndx == 0 or st_name == 0:  # undefined, or no name
                    continue
                start = strtab + st_name
                end = data.index(b"\0", start)
                if data[start:end] in wanted:
                    defined.add(data[start:end].decode())
        elif sh_type == _SHT_DYNAMIC:
            strtab = sections[link][4]
            for pos in range(offset, offset + size, entsize or 16):
                tag, value = struct.unpack_from("<qQ", data, pos)
                if tag == _DT_NEEDED:
                    needed.append(_cstr(data, strtab + value))
    return needed, defined


def private_runtime_symbols(path):
    """{symbol: runtime library} for each runtime symbol the library defines itself."""
    summary = elf_summary(path)
    if summary is None:
        return {}
    return {name: RUNTIME_SYMBOLS[name] for name in sorted(summary[1])}


def describe(path, private):
    libraries = sorted(set(private.values()))
    return (
        f"{path} carries its own copy of {', '.join(libraries)} (it defines "
        f"{', '.join(sorted(private))}): the C++ runtime was linked statically. C++ "
        f"exceptions raised by cifops (every argument check) would then cross between "
        f"two C++ runtimes and kill Python (SIGSEGV/SIGABRT) instead of raising "
        f"RuntimeError."
    )
