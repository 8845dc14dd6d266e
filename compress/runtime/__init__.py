"""The runtime layer: everything that creates ONNX Runtime sessions, binds their inputs and
outputs, and times them. Torch-free (numpy and onnxruntime only), so the HTTP service uses
it without pulling in torch.

Layers, bottom up (imports only go downwards)::

    compress.runtime   sessions (providers, CUDA preload, threads), IO binding, timing, machine
    compress           data, training, pruning, export, quantize, manifest, latency, closing report
    bench              `bench` CLI: deeper model benchmarks, HTTP load tests, comparisons
    serve              the BentoML service (uses compress.runtime and compress.imaging only)
"""
