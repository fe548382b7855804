"""Jobs built on the engine: a file restore (restore_file), and next a live feed."""
