"""Everything that touches frames: decode, faces, alignment, compositing, encode, jobs."""
