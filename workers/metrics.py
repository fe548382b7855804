"""Prometheus metrics shared by decoders and workers (one definition of each)."""

from prometheus_client import Counter, Gauge, Histogram

WIRE_INVALID = Counter("gpen_wire_invalid_messages_total", "ZeroMQ messages dropped because they failed validation",
                       ["side"])
CROPS_RESTORED = Counter("gpen_crops_restored_total", "Face crops restored by this process's workers", ["model"])
MODEL_SECONDS = Histogram("gpen_model_batch_seconds", "Wall time of one restorer call (a batch)", ["model"],
                          buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30))
FRAMES_WRITTEN = Counter("gpen_frames_written_total", "Video frames encoded by file jobs")
FACES_PASTED = Counter("gpen_faces_pasted_total", "Restored faces composited into frames")
CORRUPT_FRAMES = Counter("gpen_corrupt_frames_total", "Input frames that could not be decoded and were skipped")
DAMAGED_INPUT = Counter("gpen_damaged_input_total",
                        "Input damage that was handled: frames the decoder concealed, spots where a container lost sync")
OOM_RETRIES = Counter("gpen_oom_retries_total", "Out-of-memory errors answered by halving the batch", ["model"])
WORKER_FAILOVERS = Counter("gpen_worker_failovers_total", "Workers declared dead by a decoder; their crops re-sent")
PEERS_EXPIRED = Counter("gpen_worker_peers_expired_total",
                        "Decoders a worker forgot (with their temporal state) after they went silent")
FACES_PASSED = Counter("gpen_faces_passed_through_total",
                       "Faces sent out unrestored (live jobs: late, failed or no worker)", ["reason"])
MODEL_LOADS = Counter("gpen_model_loads_total", "Models and detectors loaded into this process", ["kind"])

# gpen-stream serve
JOBS = Counter("gpen_jobs_total", "Jobs that reached a state at this daemon (done, failed, cancelled, retried, dead)",
               ["state"])
JOBS_RUNNING = Gauge("gpen_jobs_running", "Jobs running at this daemon now")
JOB_QUEUE = Gauge("gpen_job_queue", "Jobs in Redis: queued (not yet delivered), pending (delivered, not "
                  "acknowledged), dead", ["kind"])
JOB_SECONDS = Histogram("gpen_job_seconds", "Wall time of a job at this daemon, from start to its final state",
                        buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600))
WORKERS = Gauge("gpen_workers", "Workers this process can use now")

# live feeds: mirrors of each live job's figures (labelled by job), refreshed once a second
LIVE = Gauge("gpen_live", "Live job figures: fps_in, fps_out, hit_rate, latency_p50_ms, latency_p99_ms, dropped, "
             "reconnects, stalls, repeats", ["job", "figure"])
LIVE_FIGURES = ("fps_in", "fps_out", "frames_out", "hit_rate", "latency_p50_ms", "latency_p99_ms", "dropped",
                "dropped_out", "reconnects", "stalls", "repeats")


def publish_live(job: str, snapshot: dict) -> None:
    for figure in LIVE_FIGURES:
        value = snapshot.get(figure)
        if value is not None:
            LIVE.labels(job=job, figure=figure).set(value)
