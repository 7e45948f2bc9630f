"""Built-in `elm bench` grids (`--preset NAME` reads NAME.yaml here)."""
