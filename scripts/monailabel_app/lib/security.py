"""What the server accepts from a request, on top of MONAI Label 0.8.5 (every field is treated as hostile).

MONAI Label joins request values into paths, lets a request pick the model file, answers every web origin
with credentials unless ``MONAI_LABEL_CORS_ORIGINS`` is set (and in 0.8.5 setting it stops the server at
start: its settings log cannot serialise the URLs), accepts bodies of any size and answers a request for an
unknown image, model or strategy with HTTP 500. The app closes these in four places:

- ``lib.datastore.StudyDatastore``: image/label ids and tags must be plain names on every datastore method;
  uploads must be NIfTI studies / BraTS label maps.
- ``check_infer_request`` (``BraTSUncertaintyApp.infer``): the model must be an infer task (404 otherwise),
  the image a study id in the datastore (400 / 404), and only the task's own options pass (``model_filename``,
  ``result_extension``, ``timeout``... are dropped; ``save_label``/``label_tag``, which batch inference sends,
  are taken out and the label is saved through the checked datastore); ``check_strategy_request`` does the
  same for active-learning strategies.
- ``RequestGuard``, an ASGI middleware: bodies over the upload cap get 413; query parameters that name a
  study, label or tag (``ID_PARAMS``) must be plain ids and a path may not hold ``.``/``..`` segments (400);
  sessions (arbitrary uploads, archives unpacked on the server), model uploads/deletions over HTTP and the
  dataset archive (``GET /datastore/dataset``: MONAI Label zips every study and label into a temporary file
  it never removes, so each request costs the datastore's size in disk) are refused (403): studies come from
  the datastore, models from training or the administrator.
- ``secure_server``: installs ``RequestGuard``, answers cross-origin requests only for the origins of the app
  conf ``cors_origins`` (none by default; credentials only for listed origins, never for ``*``), and maps
  errors to 4xx answers naming the problem (``ERROR_STATUS``; a model that cannot serve, e.g. with non-finite
  weights, is a 503 naming the file).

``secure_server`` works on the running ``monailabel.app`` FastAPI application: the app object is created
inside its start-up, when Starlette has already built the middleware stack, so it edits the middleware list
and drops the built stack, which Starlette rebuilds on the next request (uvicorn serves no request before
start-up ends).
"""

from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import dataclass
from typing import Mapping, Optional
from urllib.parse import parse_qsl

from fastapi import HTTPException
from fastapi.middleware import Middleware
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from monailabel.config import settings
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.exception import ImageNotFoundException, LabelNotFoundException

from custom.core.errors import BraTSInputError, CheckpointError
from custom.data.studies import StudyIdError, check_study_id
from lib.transforms import check_threshold

logger = logging.getLogger(__name__)

#: query parameters that name a study, a label or a label tag (MONAI Label's datastore and infer routes)
ID_PARAMS = ("image", "id", "label", "tag")
#: default cap on a request body (a BraTS study, 4 x 240 x 240 x 155 float32, is 143 MB uncompressed)
DEFAULT_MAX_UPLOAD_MB = 512
#: request keys an infer task accepts besides its own ``config()`` options
INFER_REQUEST_KEYS = ("model", "image", "client_id")
#: error type -> HTTP status of the answer (the first matching entry wins)
ERROR_STATUS = (
    (StudyIdError, 400),
    (CheckpointError, 503),  # the server's model cannot serve (e.g. non-finite weights): not the request's fault
    (BraTSInputError, 422),
    (ImageNotFoundException, 404),
    (LabelNotFoundException, 404),
)


def _detail(exc: Exception) -> str:
    return str(getattr(exc, "msg", None) or exc)


def known_cause(exc: BaseException) -> tuple[BaseException | None, int]:
    """The first exception of ``exc``'s chain (itself, then ``__cause__``/``__context__``) that
    :data:`ERROR_STATUS` maps, with its status; ``(None, 500)`` when none does. MONAI wraps an error raised
    inside a transform or a config expression in a ``RuntimeError``: the input error is its cause."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for kind, code in ERROR_STATUS:
            if isinstance(exc, kind):
                return exc, code
        exc = exc.__cause__ or exc.__context__
    return None, 500


async def _answer_error(request, exc: Exception) -> JSONResponse:
    inner, status = known_cause(exc)
    if inner is None:  # an unexpected failure: a short answer, the traceback stays in the server log
        logger.error("request %s failed", request.url.path, exc_info=exc)
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the server log"}, status_code=500)
    return JSONResponse({"detail": _detail(inner)}, status_code=status)


async def _send_json(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass


class RequestGuard:
    """ASGI middleware: refuse oversized bodies, non-plain ids in query parameters, dot segments, sessions,
    model uploads and the dataset archive, before MONAI Label's routes see the request.

    Args:
        app: the ASGI application it wraps.
        max_body_bytes: largest accepted request body; larger ones are answered 413 (by ``Content-Length``,
            or while the body is read when it is sent without one).
    """

    def __init__(self, app, max_body_bytes: int):
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")
        self.app = app
        self.max_body_bytes = int(max_body_bytes)

    def refusal(self, scope) -> tuple[int, str] | None:
        """``(status, reason)`` when the request line alone is refused, else None."""
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        segments = path.split("/")
        if any(s in (".", "..") for s in segments) or "\\" in path or "\x00" in path:
            return 400, f"path {path[:200]!r} holds '.' or '..' segments, a backslash or NUL"
        params = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        if (len(segments) > 1 and segments[1] == "session") or any(k == "session_id" for k, _ in params):
            return 403, ("sessions are disabled in this app: upload the study to the datastore "
                         "(PUT /datastore/image) and use its id")
        if segments[1:3] == ["datastore", "dataset"]:  # a full-dataset zip left in /tmp per request
            return 403, ("the dataset archive is disabled in this app (each request would leave a copy of every "
                         "study in the server's temporary folder): copy the studies folder on the server instead")
        if len(segments) > 1 and segments[1] == "model" and scope.get("method") in ("PUT", "DELETE"):
            return 403, ("model files are not uploaded or deleted over HTTP in this app: training publishes them, "
                         "or an administrator copies them (see the app README)")
        for key, value in params:
            if key in ID_PARAMS and value:
                try:
                    check_study_id(value, f"query parameter '{key}'")
                except StudyIdError as exc:
                    return 400, str(exc)
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refused = self.refusal(scope)
        if refused is not None:
            logger.warning(f"refused {scope.get('method')} {scope.get('path')}: {refused[1]}")
            return await _send_json(send, *refused)
        too_large = (f"request body larger than the upload cap of {self.max_body_bytes / 2**20:g} MiB "
                     f"(--conf max_upload_mb)")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await _send_json(send, 413, too_large)

        received, rejected, answered = 0, False, False

        async def counted_receive():
            nonlocal received, rejected
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    rejected = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message):
            nonlocal answered
            if not rejected:
                return await send(message)
            if not answered:  # the route turned the aborted body into its own error: answer 413 instead
                answered = True
                await _send_json(send, 413, too_large)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not rejected:
                raise
        if rejected and not answered:
            await _send_json(send, 413, too_large)


def check_cors_origins(origins) -> list[str]:
    """Web origins allowed to call the server: ``scheme://host[:port]`` each (no path), or ``*`` for any.

    Raises ``BraTSInputError`` naming a malformed origin.
    """
    checked = []
    for origin in origins or ():
        origin = str(origin).strip().rstrip("/")
        if origin != "*" and not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+", origin):
            raise BraTSInputError([f"cors_origins: {origin!r} is not an origin like https://viewer.example.org:8443"],
                                  "invalid MONAI Label app conf")
        checked.append(origin)
    return checked


def listen_host(argv) -> str:
    """The address ``monailabel start_server`` binds, from its command line (MONAI Label's default: 0.0.0.0)."""
    for i, arg in enumerate(argv):
        if arg in ("-i", "--host") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    return "0.0.0.0"


def secure_server(max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, cors_origins=()) -> bool:
    """Install ``RequestGuard``, the CORS policy and the 4xx error answers on the running ``monailabel.app``.

    Idempotent (MONAI Label's ``/reload`` builds the app object again). Returns False, with a warning, when
    no MONAI Label server application is loaded in this process (e.g. the app object built by a script).
    """
    module = sys.modules.get("monailabel.app")
    server = getattr(module, "app", None)
    if server is None:
        logger.warning("monailabel.app is not loaded: request guard, CORS policy and error answers not installed")
        return False
    host = listen_host(sys.argv)
    if host not in ("127.0.0.1", "localhost", "::1") and not settings.MONAI_LABEL_AUTH_ENABLE:
        logger.warning(f"listening on {host} without authentication: every client that reaches this port can read "
                       f"studies, upload, delete and train (start with --host 127.0.0.1, or enable "
                       f"MONAI_LABEL_AUTH_ENABLE; see the app README)")
    origins = check_cors_origins(cors_origins)
    cors = Middleware(CORSMiddleware, allow_origins=origins, allow_credentials=bool(origins) and "*" not in origins,
                      allow_methods=["GET", "HEAD", "POST", "PUT", "DELETE"], allow_headers=["*"])
    guard = Middleware(RequestGuard, max_body_bytes=int(float(max_upload_mb) * 2**20))
    others = [m for m in server.user_middleware if m.cls not in (CORSMiddleware, RequestGuard)]
    server.user_middleware = [cors, guard] + others
    # RuntimeError: MONAI's wrapper around an input error raised inside the bundle's transforms
    for kind in [k for k, _ in ERROR_STATUS] + [RuntimeError]:
        server.add_exception_handler(kind, _answer_error)
    server.middleware_stack = None  # rebuilt from the lists above on the next request
    logger.info(f"request guard installed: upload cap {max_upload_mb} MiB; CORS origins {origins or 'none'}")
    return True


@dataclass
class InferRequest:
    """A checked infer request: what MONAI Label runs, and whether to save the result as a label."""

    request: dict  #: ``model``, ``image`` (the study's file in the datastore) and the task's options
    image_id: str  #: the study id
    save_label_tag: Optional[str]  #: label tag to save the result under (batch inference), or None


def check_infer_request(request: Mapping, infers: Mapping, datastore) -> InferRequest:
    """The infer request MONAI Label may run: a known task, a study of the datastore, the task's own options.

    The request's ``image`` becomes the study's file in the datastore, so that MONAI Label never takes an id
    for a path on the server's disk (and then does not save labels itself: ``save_label_tag`` says whether the
    caller should). Raises ``HTTPException`` 404 for an unknown model or image, 400 for an image that is not a
    plain study id, ``StudyIdError`` for a bad label tag and ``BraTSInputError`` for a bad option value.
    """
    model = request.get("model")
    task = infers.get(model) if isinstance(model, str) else None
    if task is None:
        raise HTTPException(404, f"no infer task {model!r}; this app serves {sorted(infers)}")
    image = request.get("image")
    if not isinstance(image, str) or not image:
        raise HTTPException(400, "give the id of a study in the datastore: /infer/<model>?image=<id> "
                                 "(this app does not infer uploaded files or sessions)")
    try:
        check_study_id(image)
    except StudyIdError as exc:
        raise HTTPException(400, f"{exc} (this app infers studies of its datastore by id, not files)") from None
    uri = datastore.get_image_uri(image)
    if not uri:
        raise HTTPException(404, f"image {image!r} is not in the datastore (GET /datastore/?output=all lists them)")
    options = task.config()
    allowed = set(INFER_REQUEST_KEYS) | set(options)
    dropped = sorted(set(request) - allowed)
    save = request.get("save_label", False)
    if not isinstance(save, bool):
        raise BraTSInputError([f"save_label must be true or false, got {save!r}"], "invalid infer request")
    tag = check_study_id(str(request.get("label_tag", DefaultLabelTag.ORIGINAL.value)), "label tag") if save else None
    dropped = sorted(set(dropped) - {"save_label", "label_tag"})
    checked = {k: v for k, v in request.items() if k in allowed}
    if "device" in checked:  # a name the task lists (Slicer sends these), or a torch device (batch inference)
        devices = list(options.get("device") or [])
        device = checked["device"]
        if not (device in devices or (isinstance(device, str) and re.fullmatch(r"cpu|cuda(:\d{1,2})?", device))):
            raise BraTSInputError([f"device must be one of {devices}, 'cpu' or 'cuda[:N]', got {device!r}"],
                                  "invalid infer request")
    if "uncertain_threshold" in checked:
        checked["uncertain_threshold"] = check_threshold(checked["uncertain_threshold"])
    if dropped:
        logger.info(f"infer {model}: ignoring request keys {dropped} (not options of this task)")
    checked["image"] = uri
    return InferRequest(checked, image, tag)


def check_strategy_request(request: Mapping, strategies: Mapping) -> None:
    """Raise ``HTTPException`` 404 naming the strategies when ``request["strategy"]`` is not one of them."""
    strategy = request.get("strategy") or "random"
    if strategy not in strategies:
        raise HTTPException(404, f"no active-learning strategy {strategy!r}; this app serves {sorted(strategies)}")
