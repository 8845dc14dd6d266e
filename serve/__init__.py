"""serve: the BentoML HTTP service for registered models (one model or a voting ensemble).

``serve.service`` holds the BentoML services; the other modules are plain Python (settings,
input decoding, ONNX Runtime sessions, voting) so they can be tested without a server."""
