"""python -m batch_job (or pneumonia-batch): score X-ray folders with a published ONNX model (Apache Beam)."""
import logging
import os
import signal
import sys
import time


def main() -> int:
    started = time.perf_counter()
    from batch_job.interrupts import GATE

    signal.signal(signal.SIGINT, GATE.handler)  # Ctrl-C is held while the outputs are published
    # Importing Beam logs a warning about optional GCP client libraries (apitools/BigQuery) that this job
    # never uses: the root logger stays at ERROR until Beam is imported.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", level=logging.ERROR)
    from batch_job.cli import main as job_main

    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("batch_job").setLevel(logging.INFO)
    for noisy in ("apache_beam", "distributed", "dask"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    code = job_main(started=started)
    if code != 0:
        # After a Ctrl-C or a failed pipeline, Beam's worker threads and gRPC servers may still be running; the
        # interpreter's teardown can then abort the process (SIGABRT, "terminate called without an active
        # exception": 2 Ctrl-C runs of 8 here) and replace the job's exit code. Its outputs are settled by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
