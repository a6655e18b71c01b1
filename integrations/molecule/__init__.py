"""Molecule integration of orbit_pyg (QM9 / RDKit conformers). Installed as ``orbit_pyg.integrations.molecule``."""
