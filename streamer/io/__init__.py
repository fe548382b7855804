"""Media in and out: opening and describing inputs (probe), the file source and sink, and exact
YUV <-> RGB for face regions (yuv)."""
