"""What the train, export and batch_job stages share (no TensorFlow): the one preprocessing function,
DICOM decoding, the class labels, the metrics at an operating point, and atomic file publishing."""
