"""Prometheus metrics shared by decoders and workers (one definition of each)."""

from prometheus_client import Counter, Histogram

WIRE_INVALID = Counter("gpen_wire_invalid_messages_total", "ZeroMQ messages dropped because they failed validation",
                       ["side"])
CROPS_RESTORED = Counter("gpen_crops_restored_total", "Face crops restored by this process's workers", ["model"])
MODEL_SECONDS = Histogram("gpen_model_batch_seconds", "Wall time of one restorer call (a batch)", ["model"],
                          buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30))
FRAMES_WRITTEN = Counter("gpen_frames_written_total", "Video frames encoded by file jobs")
FACES_PASTED = Counter("gpen_faces_pasted_total", "Restored faces composited into frames")
CORRUPT_FRAMES = Counter("gpen_corrupt_frames_total", "Input frames that could not be decoded and were skipped")
WORKER_FAILOVERS = Counter("gpen_worker_failovers_total", "Workers declared dead by a decoder; their crops re-sent")
