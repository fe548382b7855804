"""Test and benchmark support, kept out of the shipped packages: generated clips with ground
truth (clips) and the official reference formulation of GPEN (reference)."""
