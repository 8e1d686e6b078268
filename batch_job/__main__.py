"""python -m batch_job: score X-ray folders with a published ONNX model (Apache Beam)."""
import sys

from batch_job.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
