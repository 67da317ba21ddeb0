"""Feast side of the online-feature benchmark (tests/src/bin/bench_features.rs runs it).

  setup    writes a feature repo (one entity, one FeatureView of FEATURES float features over a
           parquet FileSource, Redis online store), applies it and writes the same values the
           Rust side writes into Redis through Feast (write_to_online_store).
  sdk      times FeatureStore.get_online_features(...).to_dict() for one shape, sequentially,
           and prints the latencies (ms) as JSON on the last line.
  teardown removes the project's keys from Redis (FeatureStore.teardown).

`feast serve` is started by the Rust program, which loads it with the same HTTP client it uses
for recsys. Values: feature j of user i is (i * 1000 + j) / 7, as on the Rust side.
"""

import argparse
import json
import random
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

FV = "bench_fv"


def value(i: int, j: int) -> float:
    return (i * 1000 + j) / 7.0


def feature_name(j: int) -> str:
    return f"f{j:03d}"


def write_repo(repo: Path, redis: str, project: str, features: int) -> None:
    repo.mkdir(parents=True, exist_ok=True)
    (repo / "feature_store.yaml").write_text(
        f"""project: {project}
registry: {repo / "registry.db"}
provider: local
online_store:
  type: redis
  connection_string: "{redis}"
offline_store:
  type: file
entity_key_serialization_version: 3
"""
    )
    fields = ",\n        ".join(
        f'Field(name="{feature_name(j)}", dtype=Float64)' for j in range(features)
    )
    (repo / "features.py").write_text(
        f"""from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource
from feast.types import Float64
from feast.value_type import ValueType

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING)
source = FileSource(path="{repo / "data.parquet"}", timestamp_field="event_timestamp")
{FV} = FeatureView(
    name="{FV}",
    entities=[user],
    ttl=timedelta(days=1),
    schema=[
        {fields}
    ],
    online=True,
    source=source,
)
"""
    )


def frame(entities: int, features: int):
    import pandas as pd

    now = datetime.now(timezone.utc)
    data = {
        "user_id": [f"u{i}" for i in range(entities)],
        "event_timestamp": [now - timedelta(seconds=1)] * entities,
    }
    for j in range(features):
        data[feature_name(j)] = [value(i, j) for i in range(entities)]
    return pd.DataFrame(data)


def store(repo: Path):
    from feast import FeatureStore

    return FeatureStore(repo_path=str(repo))


def setup(args) -> None:
    repo = Path(args.repo)
    write_repo(repo, args.redis, args.project, args.features)
    df = frame(args.entities, args.features)
    df.to_parquet(repo / "data.parquet")
    sys.path.insert(0, str(repo))
    import features as defs  # noqa: E402  (the repo written above)

    fs = store(repo)
    fs.apply([defs.user, getattr(defs, FV)])
    started = time.perf_counter()
    fs.write_to_online_store(FV, df)
    took = time.perf_counter() - started
    print(json.dumps({"loaded_values": args.entities * args.features, "seconds": took}))


def sdk(args) -> None:
    fs = store(Path(args.repo))
    rng = random.Random(args.seed)
    feats = [f"{FV}:{feature_name(j)}" for j in range(args.n_features)]

    def one():
        ids = rng.sample(range(args.entities), args.n_entities)
        rows = [{"user_id": f"u{i}"} for i in ids]
        out = fs.get_online_features(features=feats, entity_rows=rows).to_dict()
        return ids, out

    # Correctness once: the values we wrote come back.
    ids, out = one()
    got = out[feature_name(args.n_features - 1)][0]
    want = value(ids[0], args.n_features - 1)
    if got is None or abs(got - want) > 1e-9:
        raise SystemExit(f"feast returned {got!r} for u{ids[0]}, expected {want}")
    for _ in range(args.warmup):
        one()
    lat = []
    for _ in range(args.requests):
        t = time.perf_counter()
        one()
        lat.append((time.perf_counter() - t) * 1000.0)
    print(json.dumps({"latencies_ms": lat}))


def teardown(args) -> None:
    store(Path(args.repo)).teardown()


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup")
    s.add_argument("--repo", required=True)
    s.add_argument("--redis", required=True, help="host:port")
    s.add_argument("--project", required=True)
    s.add_argument("--entities", type=int, required=True)
    s.add_argument("--features", type=int, required=True)
    s = sub.add_parser("sdk")
    s.add_argument("--repo", required=True)
    s.add_argument("--entities", type=int, required=True)
    s.add_argument("--n-entities", type=int, required=True)
    s.add_argument("--n-features", type=int, required=True)
    s.add_argument("--requests", type=int, required=True)
    s.add_argument("--warmup", type=int, default=20)
    s.add_argument("--seed", type=int, default=7)
    s = sub.add_parser("teardown")
    s.add_argument("--repo", required=True)
    args = p.parse_args()
    {"setup": setup, "sdk": sdk, "teardown": teardown}[args.cmd](args)


if __name__ == "__main__":
    main()
