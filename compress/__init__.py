"""compress: fine-tune a torchvision ResNet on an image folder, prune it by L1 filter norm in
steps with retraining, export every step to ONNX with a parity check, and report the
accuracy-vs-latency trade-off. The run directory (``manifest.json``) is the contract between
stages and with ``bench`` and ``serve``."""

__version__ = "0.1.0"
