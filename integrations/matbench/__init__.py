"""matbench integration of orbit_pyg (pretrained encoder baseline). Installed as ``orbit_pyg.integrations.matbench``."""
