"""The `implicit` side of the recsys ALS benchmark (driven by `bench_als`, not run by hand).

Usage: python implicit_side.py WORK_DIR

Reads WORK_DIR/params.json and the train/test CSR matrices that `bench_als` wrote there
(raw little-endian arrays: <name>.indptr / .indices as int32, .data as float32 weights),
turns weights into confidences 1 + alpha * w, fits implicit's CPU ALS with alpha=1.0 on those
confidences (so both libraries minimise the same objective), evaluates with
implicit.evaluation.ranking_metrics_at_k, and prints one JSON line on stdout:
{fit_seconds, fit_cpu_seconds, ndcg10, precision10, peak_rss_mb, fit_peak_rss_mb, ...}.
"""

import json
import os
import sys
import time


def vm_hwm_mb():
    """Peak resident set size of this process so far, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def load_csr(work, name, meta):
    import numpy as np
    import scipy.sparse as sp

    m = meta[name]
    indptr = np.fromfile(os.path.join(work, name + ".indptr"), dtype="<i4")
    indices = np.fromfile(os.path.join(work, name + ".indices"), dtype="<i4")
    data = np.fromfile(os.path.join(work, name + ".data"), dtype="<f4")
    return sp.csr_matrix((data, indices, indptr), shape=(m["rows"], m["cols"]))


def main():
    work = sys.argv[1]
    with open(os.path.join(work, "params.json")) as f:
        params = json.load(f)

    import implicit
    import numpy as np
    import threadpoolctl
    from implicit.cpu.als import AlternatingLeastSquares
    from implicit.evaluation import ranking_metrics_at_k

    train = load_csr(work, "train", params["matrices"])
    test = load_csr(work, "test", params["matrices"])
    # Weights become confidences in place; ranking_metrics_at_k needs only the pattern of
    # train, which is the same (the recsys side does the same with its one copy).
    train.data *= np.float32(params["alpha"])
    train.data += np.float32(1.0)

    model = AlternatingLeastSquares(
        factors=params["factors"],
        regularization=params["regularization"],
        alpha=1.0,
        iterations=params["iterations"],
        use_cg=True,
        use_native=True,
        dtype=np.float32,
        num_threads=params["threads"],
        calculate_training_loss=False,
        random_state=params["seed"],
    )
    model.cg_steps = params["cg_steps"]

    cpu_start = time.process_time()
    start = time.perf_counter()
    model.fit(train, show_progress=False)
    fit_seconds = time.perf_counter() - start
    fit_cpu_seconds = time.process_time() - cpu_start
    fit_peak = vm_hwm_mb()

    metrics = ranking_metrics_at_k(model, train, test, K=params["k"], show_progress=False)
    blas = [
        "{} {} ({})".format(p.get("internal_api"), p.get("version"), p.get("architecture"))
        for p in threadpoolctl.threadpool_info()
        if p.get("user_api") == "blas"
    ]
    print(
        json.dumps(
            {
                "side": "implicit",
                "version": implicit.__version__,
                "fit_seconds": fit_seconds,
                "fit_cpu_seconds": fit_cpu_seconds,
                "ndcg10": float(metrics["ndcg"]),
                "precision10": float(metrics["precision"]),
                "fit_peak_rss_mb": fit_peak,
                "peak_rss_mb": vm_hwm_mb(),
                "blas": "; ".join(sorted(set(blas))),
            }
        )
    )


if __name__ == "__main__":
    main()
