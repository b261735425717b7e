"""The ASGI app of bench/bench_service.py: a small eval-mode model behind POST /predict.

The model is a conv -> batch norm -> ReLU block and two linear -> layer norm -> GELU
blocks, built from fastnorm.nn (``SERVICE_ENGINE=fastnorm``) or torch.nn (``=torch``),
its weights loaded from the state dict in ``SERVICE_MODEL`` (an .npz) when the module is
imported, that is in each server worker before it serves. POST /predict takes the raw
float32 bytes of an (N, 3, 16, 16) batch and answers the (N, 10) logits, float32 bytes;
GET /health answers the worker's pid. A plain ASGI callable: nothing beyond uvicorn.
"""
import json
import os

import numpy as np

IN_SHAPE = (3, 16, 16)    # one image
OUT = 10
WIDTH, HIDDEN = 16, 256   # conv channels, linear width


# ------------------------------------------------------------------------ fastnorm model

def build_fastnorm(state=None):
    from fastnorm import nn
    model = nn.Sequential(nn.Conv2d(3, WIDTH, 3, padding=1), nn.BatchNorm2d(WIDTH), nn.ReLU(),
                          nn.Flatten(), nn.Linear(WIDTH * 16 * 16, HIDDEN), nn.LayerNorm(HIDDEN),
                          nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.LayerNorm(HIDDEN), nn.GELU(),
                          nn.Linear(HIDDEN, OUT))
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def predict_fastnorm(model, x):
    import fastnorm as fn
    with fn.no_grad():
        return np.ascontiguousarray(model(fn.Tensor(x)).data, np.float32)


# --------------------------------------------------------------------------- torch model

def build_torch(state):
    import torch
    from torch import nn
    model = nn.Sequential(nn.Conv2d(3, WIDTH, 3, padding=1), nn.BatchNorm2d(WIDTH),
                          nn.ReLU(), nn.Flatten(), nn.Linear(WIDTH * 16 * 16, HIDDEN),
                          nn.LayerNorm(HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN),
                          nn.LayerNorm(HIDDEN), nn.GELU(), nn.Linear(HIDDEN, OUT))
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return model.eval()


def predict_torch(model, x):
    import torch
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def make_state(seed=0):
    """A state dict (torch's keys) with random weights and non-trivial running stats."""
    rng = np.random.default_rng(seed)
    model = build_fastnorm()
    state = {}
    for k, v in model.state_dict().items():
        v = np.array(v)
        if k.endswith("num_batches_tracked"):
            state[k] = np.array(100, np.int64)
        elif k.endswith("running_var"):
            state[k] = rng.uniform(0.5, 2.0, v.shape).astype(np.float32)
        elif k.endswith("running_mean") or k.endswith("bias"):
            state[k] = rng.normal(0, 0.2, v.shape).astype(np.float32)
        else:   # weights: fan-in scaled; norm weights around 1
            fan = int(np.prod(v.shape[1:])) if v.ndim > 1 else 0
            state[k] = (rng.normal(0, 1 / np.sqrt(fan), v.shape) if fan else
                        rng.normal(1, 0.1, v.shape)).astype(np.float32)
    return state


# ----------------------------------------------------------------------------- the app

ENGINE = os.environ.get("SERVICE_ENGINE", "fastnorm")
MODEL = PREDICT = None
if os.environ.get("SERVICE_MODEL"):
    _state = dict(np.load(os.environ["SERVICE_MODEL"]))
    if ENGINE == "torch":
        import torch
        torch.set_num_threads(1)   # one core per worker, as for fastnorm below
        MODEL, PREDICT = build_torch(_state), predict_torch
    else:
        import fastnorm
        fastnorm.set_num_threads(1)
        MODEL, PREDICT = build_fastnorm(_state), predict_fastnorm
    PREDICT(MODEL, np.zeros((1,) + IN_SHAPE, np.float32))   # first call before serving


async def _body(receive):
    chunks = []
    while True:
        msg = await receive()
        chunks.append(msg.get("body", b""))
        if not msg.get("more_body"):
            return b"".join(chunks)


async def _send(send, status, body, ctype):
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype), (b"content-length",
                                                       str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            msg = await receive()
            if msg["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif msg["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if scope["path"] == "/health":
        await _send(send, 200, json.dumps({"pid": os.getpid(), "engine": ENGINE}).encode(),
                    b"application/json")
        return
    if scope["path"] != "/predict" or scope["method"] != "POST":
        await _send(send, 404, b"not found", b"text/plain")
        return
    body = await _body(receive)
    per = int(np.prod(IN_SHAPE)) * 4
    if not body or len(body) % per:
        await _send(send, 400, b"body must be float32 (N, 3, 16, 16)", b"text/plain")
        return
    x = np.frombuffer(body, np.float32).reshape((-1,) + IN_SHAPE)
    y = PREDICT(MODEL, x)   # runs on the event loop: one request at a time per worker
    await _send(send, 200, y.tobytes(), b"application/octet-stream")
