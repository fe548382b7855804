"""Inference workers: receive aligned crops over ZeroMQ, batch them, run GPEN, reply."""
