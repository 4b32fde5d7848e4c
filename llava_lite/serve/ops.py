"""`GET /health` (liveness and readiness) and `GET /metrics` (Prometheus text)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from llava_lite.serve.engine import ChatEngine
from llava_lite.serve.gate import GateState
from llava_lite.serve.metrics import CONTENT_TYPE, ServerMetrics


def build_ops_router(engine: ChatEngine, gate: GateState, metrics: ServerMetrics) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    def health() -> JSONResponse:
        # The engine exists only once its model is loaded; readiness ends when draining starts.
        ready = not gate.draining
        body = {"status": "ok" if ready else "draining", "live": True, "ready": ready, "model_loaded": True,
                "model": engine.model_name, "quantization": engine.lite.quantization,
                "in_flight": engine.in_flight, "queue_depth": engine.queue_depth}
        return JSONResponse(body, status_code=200 if ready else 503)

    @router.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return router
