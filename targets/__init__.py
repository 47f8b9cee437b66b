"""Built-in hardware target descriptions (TOML data files; see README.md in this folder)."""
