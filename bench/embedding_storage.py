"""How an embedding job's vectors are stored: one output row per input, the vector in the
row's JSON `data` as a list of floats (A) or as a little-endian float32 base64 string (B,
what core/embeddings.py does). Per backend and format: the time to write a job's rows
through db/outputs.add_outputs and commit, to read them back through list_outputs and
turn them into lists of floats (what a `"float"` answer needs), and the bytes of `data`.

    python -m bench.embedding_storage [--inputs 512] [--dim 384] [--rounds 5]
        [--admin-url postgresql://postgres@127.0.0.1:5432/postgres]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from core.embeddings import EMBEDDING_KEY, base64_to_vector, vector_to_base64
from core.enums import JobKind
from db.jobs import create_job
from db.outputs import OutputRecord, add_outputs, list_outputs
from db.session import get_engine, migrate, session_scope

Encode = Callable[[list[float]], Any]
Decode = Callable[[Any], list[float]]
FORMATS: dict[str, tuple[Encode, Decode]] = {
    "A json floats": (lambda v: v, lambda d: list(d)),
    "B float32 base64": (vector_to_base64, base64_to_vector),
}


def _vectors(inputs: int, dim: int) -> list[list[float]]:
    rng = random.Random(0)
    # float32 values, as the worker has them (a float64 list would be longer still)
    return [
        base64_to_vector(vector_to_base64([rng.gauss(0, 0.05) for _ in range(dim)]))
        for _ in range(inputs)
    ]


def _round(
    url: str, vectors: list[list[float]], encode: Encode, decode: Decode
) -> dict[str, float]:
    with session_scope(url) as session:
        job = create_job(
            session, kind=JobKind.EMBED, spec={}, priority=0, max_attempts=1, metadata={}
        )
        job_id = job.id
    records = [
        OutputRecord(i, 0, "", "embedding", 8, 0, {EMBEDDING_KEY: encode(v)})
        for i, v in enumerate(vectors)
    ]
    started = time.perf_counter()
    with session_scope(url) as session:
        add_outputs(session, job_id, records)
    write_s = time.perf_counter() - started
    started = time.perf_counter()
    with session_scope(url, readonly=True) as session:
        read = [decode((o.data or {})[EMBEDDING_KEY]) for o in list_outputs(session, job_id)]
    read_s = time.perf_counter() - started
    assert read == vectors
    size = sum(len(json.dumps(r.data)) for r in records)
    return {"write_ms": write_s * 1000, "read_ms": read_s * 1000, "bytes": size}


def run(url: str, inputs: int, dim: int, rounds: int) -> dict[str, dict[str, float]]:
    migrate(url)
    vectors = _vectors(inputs, dim)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in FORMATS}
    for _ in range(rounds):  # alternating, so drift on a shared machine hits both
        for name, (encode, decode) in FORMATS.items():
            results[name].append(_round(url, vectors, encode, decode))
    return {
        name: {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        for name, rows in results.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=512)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        backends = {"sqlite": f"sqlite:///{Path(tmp) / 'bench.db'}"}
        name = f"bench_embeddings_{uuid.uuid4().hex[:8]}"
        admin = psycopg.connect(args.admin_url, autocommit=True)
        admin.execute(f'CREATE DATABASE "{name}"')
        base = args.admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://")
        backends["postgresql"] = f"{base}/{name}"
        try:
            for backend, url in backends.items():
                figures = run(url, args.inputs, args.dim, args.rounds)
                a, b = figures["A json floats"], figures["B float32 base64"]
                for fmt, f in figures.items():
                    print(
                        f"{backend:10} {fmt:18} write {f['write_ms']:7.1f} ms  read+decode "
                        f"{f['read_ms']:7.1f} ms  data {f['bytes'] / args.inputs:7.0f} B/row"
                    )
                print(
                    f"{backend:10} A/B: write {a['write_ms'] / b['write_ms']:.2f}x, read "
                    f"{a['read_ms'] / b['read_ms']:.2f}x, size {a['bytes'] / b['bytes']:.2f}x"
                )
                get_engine(url).dispose()
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            admin.close()


if __name__ == "__main__":
    main()
