"""bench: latency, throughput and accuracy of a run's models on ONNX Runtime and PyTorch,
and HTTP load tests of the service. Reports are JSON + Markdown + PNG."""
