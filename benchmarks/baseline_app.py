"""The serving benchmark's baseline: the same bundle behind a minimal Starlette endpoint (single-row
``inplace_predict``, no batching, no feature store, no metrics, no logs).

Run: ``FW_SERVE__MODEL_DIR=<bundle> uvicorn benchmarks.baseline_app:app --host 127.0.0.1 --port P``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.api.schema import RefundRequest, confidence_of
from service.artifacts.bundle import ScoringModel, load_bundle
from service.data.features import DEFAULT_AGGREGATES, feature_matrix
from service.settings import get_settings

ROUTE = "/api/v1/refund-predict"


def load_model() -> ScoringModel:
    model_dir = get_settings().serve.model_dir
    if model_dir is None:
        raise RuntimeError("set FW_SERVE__MODEL_DIR to a bundle directory")
    return load_bundle(Path(model_dir), nthread=1)


MODEL = load_model()


async def predict(request: Request) -> Response:
    try:
        parsed = RefundRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        return JSONResponse({"error": str(exc)}, status_code=422)
    row = {"yearsActive": parsed.yearsActive, "amount": parsed.amount, "ipAccounts": parsed.ipAccounts}
    score = float(MODEL.scores(feature_matrix([row], [DEFAULT_AGGREGATES]))[0])
    prediction = int(score >= MODEL.threshold)
    return JSONResponse({"prediction": prediction, "confidence": confidence_of(score, prediction), "score": score})


async def readyz(_: Request) -> Response:
    return Response("\n")


app = Starlette(routes=[Route(ROUTE, predict, methods=["POST"]), Route("/readyz", readyz)])
