"""ASE integration of orbit_pyg (calculator, sampler, generate). Installed as ``orbit_pyg.integrations.ase``."""
