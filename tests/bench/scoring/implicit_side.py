"""implicit side of the scoring benchmark (tests/src/bin/bench_scoring.rs starts it).

What a team would write without recsys: the `implicit` library's ALS model, loaded with
factors trained elsewhere, behind FastAPI under uvicorn.

    GET /v1/recommendations?user_id=u42&k=20
      -> {"user_id": "u42", "items": [{"product_id": "p7", "score": 0.41}, ...]}
    GET /healthz -> {"status": "ok"}

The model is `implicit.cpu.als.AlternatingLeastSquares` with `user_factors` and `item_factors`
set to the benchmark's. Each request calls `model.recommend(row, user_items[row], N=k,
filter_already_liked_items=True)` with the user's row of the interaction matrix (CSR), so the
products the user interacted with are left out, as the scorer leaves out the user's history.

The Rust side writes the model to the directory named by $RECSYS_BENCH_IMPLICIT_DATA:

    params.json          {"users": U, "items": I, "factors": F}
    user_factors.f32     U x F little-endian float32, row-major
    item_factors.f32     I x F likewise
    seen_indptr.i32      the interaction matrix (U x I, CSR): U + 1 row offsets
    seen_indices.i32     its column indices, ascending within a row (every value is 1)
    user_ids.txt         one id per line, in row order
    item_ids.txt         likewise

and starts it with `python -m uvicorn implicit_side:app --app-dir tests/bench/scoring`.
"""

import json
import os
from pathlib import Path

import numpy as np
from fastapi import FastAPI, HTTPException, Query
from implicit.cpu.als import AlternatingLeastSquares
from scipy.sparse import csr_matrix


def load(data: Path):
    """The model, the interaction matrix and the id maps written by the Rust side."""
    p = json.loads((data / "params.json").read_text())
    users, items, factors = p["users"], p["items"], p["factors"]

    def matrix(name: str, rows: int) -> np.ndarray:
        return np.fromfile(data / name, dtype="<f4").reshape(rows, factors)

    # One request is one query: the parallelism is across requests (uvicorn workers), so
    # implicit's own thread pool is not used.
    model = AlternatingLeastSquares(factors=factors, num_threads=1)
    model.user_factors = matrix("user_factors.f32", users)
    model.item_factors = matrix("item_factors.f32", items)
    indptr = np.fromfile(data / "seen_indptr.i32", dtype="<i4")
    indices = np.fromfile(data / "seen_indices.i32", dtype="<i4")
    user_items = csr_matrix(
        (np.ones(len(indices), dtype=np.float32), indices, indptr), shape=(users, items)
    )
    user_rows = {u: i for i, u in enumerate((data / "user_ids.txt").read_text().splitlines())}
    item_ids = (data / "item_ids.txt").read_text().splitlines()
    if len(user_rows) != users or len(item_ids) != items:
        raise ValueError(
            f"{data}: {len(user_rows)} user ids and {len(item_ids)} item ids for a model of "
            f"{users} users and {items} items"
        )
    return model, user_items, user_rows, item_ids


MODEL, USER_ITEMS, USER_ROWS, ITEM_IDS = load(Path(os.environ["RECSYS_BENCH_IMPLICIT_DATA"]))

app = FastAPI(title="implicit recommendations")


@app.get("/healthz")
def healthz():
    return {"status": "ok"}


# A plain `def`, as FastAPI advises for blocking calls: it runs in FastAPI's thread pool and
# the event loop keeps serving. With `async def` (recommend() on the event loop) 2 workers
# reached about 550 requests/s here instead of about 1,850.
@app.get("/v1/recommendations")
def recommendations(user_id: str, k: int = Query(20, ge=1, le=200)):
    row = USER_ROWS.get(user_id)
    if row is None:
        raise HTTPException(status_code=404, detail=f"unknown user {user_id!r}")
    ids, scores = MODEL.recommend(
        row, USER_ITEMS[row], N=k, filter_already_liked_items=True
    )
    return {
        "user_id": user_id,
        "items": [
            {"product_id": ITEM_IDS[i], "score": s}
            for i, s in zip(ids.tolist(), scores.tolist())
        ],
    }
