"""sentence-transformers' CPU backends on the pairs run.py scores: ONNX, ONNX dynamic
int8 and OpenVINO. What a CPU user would pick instead of rstar-batch.

Runs in a Python of its own, because optimum-onnx / optimum-intel pin transformers
and huggingface-hub below what rstar-batch uses (README, "Benchmarks"):

    python3.11 -m venv .st-venv
    .st-venv/bin/pip install torch==2.13.0 "sentence-transformers[onnx,openvino]" pyarrow
    python benchmarks/run.py --st-python .st-venv/bin/python

run.py calls it as `PYTHON st_backends.py MODEL PAIRS.parquet OUT.json ROUNDS`; each
backend is loaded (exported to ONNX / OpenVINO IR from the model folder on first use,
not timed), warmed up, then timed in interleaved rounds; OUT.json holds each
backend's scores and round times. A backend that fails to load is reported, not fatal.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback


def _load(model: str, backend: str, work: str):
    from sentence_transformers import CrossEncoder

    if backend == "onnx-int8":
        from sentence_transformers import export_dynamic_quantized_onnx_model

        folder = os.path.join(work, "onnx-int8")
        if not os.path.isdir(folder):
            shutil.copytree(model, folder)
            CrossEncoder(folder, backend="onnx").save_pretrained(folder)   # exports ONNX
            export_dynamic_quantized_onnx_model(
                CrossEncoder(folder, backend="onnx"), quantization_config="avx512_vnni",
                model_name_or_path=folder)
        return CrossEncoder(folder, backend="onnx", max_length=512,
                            model_kwargs={"file_name": "onnx/model_qint8_avx512_vnni.onnx"})
    return CrossEncoder(model, backend=backend, max_length=512)


def main() -> int:
    model, pairs_file, out, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    import pyarrow.parquet as pq

    table = pq.read_table(pairs_file)
    pairs = list(zip(table["query"].to_pylist(), table["passage"].to_pylist()))
    work = os.path.join(os.path.dirname(out), "st-backends")
    os.makedirs(work, exist_ok=True)
    encoders, failed = {}, {}
    for backend in ("onnx", "onnx-int8", "openvino"):
        try:
            encoder = _load(model, backend, work)
            encoder.predict(pairs[:64], batch_size=32, show_progress_bar=False)  # warm-up
            encoders[backend] = encoder
        except Exception as exc:  # noqa: BLE001 - reported in the table, not fatal
            traceback.print_exc()
            failed[backend] = f"{type(exc).__name__}: {exc}"[:300]
    seconds = {name: [] for name in encoders}
    scores = {}
    for _ in range(rounds):
        for name, encoder in encoders.items():
            started = time.perf_counter()
            scores[name] = encoder.predict(pairs, batch_size=32, show_progress_bar=False)
            seconds[name].append(time.perf_counter() - started)
    import sentence_transformers
    import transformers

    with open(out, "w", encoding="utf-8") as fh:
        json.dump({"scores": {k: [float(x) for x in v] for k, v in scores.items()},
                   "seconds": seconds, "failed": failed,
                   "versions": {"sentence-transformers": sentence_transformers.__version__,
                                "transformers": transformers.__version__}}, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
