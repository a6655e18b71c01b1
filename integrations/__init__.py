"""Adapters from orbit_pyg to the materials and molecule ecosystem.

Installed as ``orbit_pyg.integrations`` (never a bare top-level ``integrations``). Each adapter
lives in its own subpackage (crystal, molecule, ase, matbench) and imports ``orbit_pyg``; the core
never imports them. Heavy dependencies come from the package extras
(``pip install orbit-pyg[crystal]``, ``[molecule]``, ``[ase]``, ``[matbench]``).
"""

__all__: list[str] = []
