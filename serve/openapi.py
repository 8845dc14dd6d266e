"""The OpenAPI document served at ``/docs.json``: BentoML's, corrected to say what the
service really accepts and answers (tests/test_serve_hardening.py runs schemathesis on it).

BentoML 1.4.39 derives it from the API signatures alone, so it left out ``GET /metadata``,
allowed extra multipart fields and an empty ``images`` list (both refused), did not list the
413/415/408/503 answers, listed a 404 no API gives, and described every answer as a free
object."""
from __future__ import annotations

import copy
from typing import Any

ERROR = {"type": "object", "required": ["error"],
         "properties": {"error": {"type": "string", "description": "What is wrong, for a person to read"}}}

PREDICTION = {
    "type": "object",
    "required": ["label", "class_index", "confidence", "top_k", "model"],
    "properties": {
        "label": {"type": "string"},
        "class_index": {"type": "integer", "minimum": 0},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "top_k": {"type": "array", "items": {
            "type": "object", "required": ["label", "confidence"],
            "properties": {"label": {"type": "string"}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}}}},
        "model": {"type": "string"},
        "votes": {"type": "array", "items": {"type": "string"}, "description": "Each ensemble member's label"},
    },
}

GPU = {"type": "object", "required": ["index", "id", "name"],
       "properties": {"index": {"type": "integer", "minimum": 0, "description": "among the visible GPUs: ONNX Runtime's device_id"},
                      "id": {"type": "string", "description": "the CUDA_VISIBLE_DEVICES entry, or NVML's index"},
                      "name": {"type": ["string", "null"]}}}

METADATA = {
    "type": "object",
    "required": ["model", "models", "classes", "voting", "providers", "precisions", "runtime", "onnxruntime",
                 "input_sizes", "limits", "batching", "worker", "workers"],
    "properties": {
        "model": {"type": "string"},
        "models": {"type": "array", "items": {"type": "object", "required": ["tag", "input_size"]}},
        "classes": {"type": "array", "items": {"type": "string"}},
        "voting": {"type": ["string", "null"], "enum": ["soft", "hard", None]},
        "providers": {"type": "object", "additionalProperties": {"type": "string"}},
        "precisions": {"type": "object", "additionalProperties": {"type": "string", "enum": ["fp32", "fp16", "int8"]}},
        "runtime": {"type": "object", "required": ["model_threads", "sessions", "batch_shapes", "warmed_batch_sizes"],
                    "properties": {"model_threads": {"type": "integer", "minimum": 1},
                                   "sessions": {"type": "string", "enum": ["shared", "per-thread"]},
                                   "batch_shapes": {"type": "string", "enum": ["buckets", "exact"]},
                                   "intra_op_threads": {"type": ["integer", "null"]},
                                   "cuda_options": {"type": ["object", "null"]},
                                   "warmed_batch_sizes": {"type": "array", "items": {"type": "integer"}}}},
        "onnxruntime": {"type": "string"},
        "input_sizes": {"type": "array", "items": {"type": "integer"}},
        "limits": {"type": "object"},
        "batching": {"type": "object"},
        "worker": {"type": "object", "required": ["index", "pid", "gpu"],
                   "properties": {"index": {"type": ["integer", "null"], "minimum": 1}, "pid": {"type": "integer"},
                                  "gpu": {"oneOf": [{"type": "null"}, GPU]}},
                   "description": "The worker that answered and the GPU it serves (serve/devices.py)"},
        "workers": {"type": "array", "items": {"type": "object", "required": ["worker", "gpu"],
                    "properties": {"worker": {"type": "integer", "minimum": 1}, "gpu": {"oneOf": [{"type": "null"}, GPU]}}},
                    "description": "Every worker's GPU: worker i serves visible GPU (i - 1) mod N"},
    },
}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Any]:
    descriptions = {
        400: "Bad request: the body or an image cannot be used (the message says why)",
        408: "The request body did not arrive in time",
        413: "Too large: the body, an image file, or the number of files is over the limit",
        415: "Unsupported Content-Type",
        500: "Unexpected error",
        503: "The models are still loading (retry)",
        504: "Not answered within the service's timeout (the model is overloaded)",
    }
    return {str(status): _json(descriptions[status], {"$ref": "#/components/schemas/Error"}) for status in statuses}


def build(spec: dict[str, Any], *, max_files: int) -> dict[str, Any]:
    """BentoML's document (``Service.openapi_spec.asdict()``) with the service's real contract."""
    doc = copy.deepcopy(spec)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.update({"Error": ERROR, "Prediction": PREDICTION, "Metadata": METADATA})
    paths = doc["paths"]
    upload_errors = _errors(400, 408, 413, 415, 500, 503, 504)

    classify = paths["/classify"]["post"]
    classify["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["image"], "additionalProperties": False,
        "properties": {"image": {"type": "string", "format": "binary", "description": "One image file"}}}}}}
    classify["responses"] = {"200": _json("The prediction", {"$ref": "#/components/schemas/Prediction"}),
                             **upload_errors}

    batch = paths["/classify_batch"]["post"]
    batch["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["images"], "additionalProperties": False,
        "properties": {"images": {"type": "array", "minItems": 1, "maxItems": max_files,
                                  "items": {"type": "string", "format": "binary"},
                                  "description": "Image files, the field repeated once per file"}}}}}}
    batch["responses"] = {"200": _json("One prediction per image, in order",
                                       {"type": "array", "items": {"$ref": "#/components/schemas/Prediction"}}),
                          **upload_errors}

    metadata = paths["/metadata"]["post"]
    metadata["requestBody"] = {"required": False, "content": {"application/json": {"schema": {
        "type": "object", "description": "Ignored: the endpoint takes no arguments"}}}}
    metadata["responses"] = {"200": _json("Models, classes, voting, providers, limits, batching",
                                          {"$ref": "#/components/schemas/Metadata"}),
                             **_errors(400, 408, 413, 415, 500, 503)}
    get = {key: value for key, value in metadata.items() if key != "requestBody"}
    get["operationId"] = f"{metadata.get('operationId', 'metadata')}__get"
    get["responses"] = {"200": metadata["responses"]["200"], **_errors(500, 503)}
    paths["/metadata"] = {"get": get, "post": metadata}

    if "/readyz" in paths:
        paths["/readyz"]["get"]["responses"]["503"] = {"description": "Not ready: the models are still loading"}
    if "/metrics" in paths:
        paths["/metrics"]["get"]["responses"]["200"] = {
            "description": "Prometheus metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}
    return doc
