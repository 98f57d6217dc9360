"""Drop-in replacements for the CIF functions of other packages, built on :func:`cifops.cif`.

- :mod:`cifops.compat.funasr`: FunASR's ``cif``, ``cif_v1`` and ``cif_wo_hidden``.
- :mod:`cifops.compat.torch_cif`: torch_cif's ``cif_function``.

Each reproduces its peer's signature, shapes, dtypes and conventions wherever the peer is
self-consistent, and follows the contract (docs/cif-semantics.md) where it is not;
the module docstrings list the differences. Neither module imports its peer package.
"""
