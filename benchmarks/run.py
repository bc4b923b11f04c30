"""Scoring throughput of rstar-batch against the alternatives: one machine, one run.

    python benchmarks/run.py                       # CPU: 2,000 pairs in-process, 20,000 for the job
    python benchmarks/run.py --device cuda --pairs 20000 --job-pairs 2000000
                                                   # a GPU (dtype auto = bf16/fp16): more pairs,
                                                   # plus GPU busy and two replicas per GPU
    python benchmarks/run.py --smoke               # tiny sizes and one round, --compile
                                                   # included, for CI; prints, writes nothing
Exits 1 when, on CPU, our float32 scores (default, model's own forward, --compile) are
more than 1e-5 from the plain transformers loop's or from each other.

Methods, all on the same pairs, model and device:
  (a) sentence-transformers CrossEncoder.predict(batch_size=32)
  (b) a plain transformers loop in input order, batches of 32, padded per batch
  (c) our scorer in-process: the Tokenize stage and Scorer (length-sorted token budget)
  (d) the whole `rstar-batch rerank` job, read to write, on an embedded local Ray
  (e) the whole `rstar-batch score-corpus` job over as many pairs (20 queries × a corpus)
plus our scorer with the model's own forward instead of the [CLS]-only last layer
(bert_cls.py), and its options (int8 quantization, torch.compile), each with
its score drift against (c). The in-process methods take turns in --rounds rounds and
each reports its median round. Results are appended to BENCHMARKS.md with the machine and versions.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gpu_busy import GpuBusy  # noqa: E402
from metrics import drift  # noqa: E402

from rstar_batch import Columns, RerankConfig, rerank, score_corpus  # noqa: E402
from rstar_batch.base import columns as C  # noqa: E402
from rstar_batch.base.cores import usable_cores  # noqa: E402
from rstar_batch.model import auto_cpu_dtype, cpu_flags, describe_model  # noqa: E402
from rstar_batch.stages.normalize import Normalize  # noqa: E402
from rstar_batch.stages.score import Scorer  # noqa: E402
from rstar_batch.stages.tokenize import Tokenize  # noqa: E402
from rstar_batch.testing import make_candidates, make_tiny_model  # noqa: E402


def timed_rounds(runners: dict, rounds: int) -> dict:
    """name → (scores, median seconds, every round's seconds). The methods take turns
    in each round, so a slow spell of the machine falls on all of them alike."""
    seconds = {name: [] for name in runners}
    scores = {}
    for _ in range(rounds):
        for name, run in runners.items():
            started = time.perf_counter()
            scores[name] = np.asarray(run(), dtype=np.float32)
            seconds[name].append(time.perf_counter() - started)
    return {name: (scores[name], float(np.median(seconds[name])), seconds[name])
            for name in runners}


def st_backends(args, model: str, table: pa.Table, workdir: str) -> dict:
    """backend → (scores, median seconds, versions) of sentence-transformers' ONNX, ONNX int8 and
    OpenVINO backends, timed in a Python of their own (st_backends.py); {} when none
    is given or on GPU."""
    if args.device != "cpu":
        return {}
    if not args.st_python:
        print("sentence-transformers' ONNX/OpenVINO backends skipped: no --st-python "
              "(see benchmarks/st_backends.py)", file=sys.stderr)
        return {}
    import json
    import subprocess

    pairs, out = os.path.join(workdir, "st-pairs.parquet"), os.path.join(workdir, "st.json")
    pq.write_table(table.select(["query", "passage"]), pairs)
    subprocess.run([args.st_python, str(HERE / "st_backends.py"), model, pairs, out,
                    str(args.rounds)], check=True)
    found = json.load(open(out))
    for backend, why in found["failed"].items():
        print(f"sentence-transformers backend {backend} failed: {why}", file=sys.stderr)
    return {name: (np.asarray(scores, dtype=np.float32), float(np.median(found["seconds"][name])),
                   found["versions"]) for name, scores in found["scores"].items()}


def crossencoder(model: str, table: pa.Table, device: str, dtype):
    try:
        from sentence_transformers import CrossEncoder
    except ImportError:
        raise SystemExit("sentence-transformers is missing: pip install 'rstar-batch[bench]'")
    # the dtype the other methods use: float32 on CPU, bf16/fp16 on a GPU
    encoder = CrossEncoder(model, device=device, max_length=512, model_kwargs={"dtype": dtype})
    pairs = list(zip(table["query"].to_pylist(), table["passage"].to_pylist()))
    encoder.predict(pairs[:64], batch_size=32)  # warm-up
    return lambda: encoder.predict(pairs, batch_size=32, show_progress_bar=False)


def transformers_loop(model: str, table: pa.Table, device: str, dtype):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    net = AutoModelForSequenceClassification.from_pretrained(model, dtype=dtype).to(device)
    def run(queries=table["query"].to_pylist(), passages=table["passage"].to_pylist()):
        out = []
        with torch.inference_mode():
            for i in range(0, len(queries), 32):
                enc = tokenizer(queries[i:i + 32], passages[i:i + 32], padding=True,
                                truncation=True, max_length=512, return_tensors="pt").to(device)
                out.append(torch.sigmoid(net(**enc).logits[:, 0].float()).cpu().numpy())
        return np.concatenate(out)
    run(table["query"].to_pylist()[:32], table["passage"].to_pylist()[:32])  # warm-up
    return run


def ours(model: str, table: pa.Table, device: str, dtype: str, **options):
    info = describe_model(model)
    tokenize = Tokenize(info, max_length=512)
    scorer = Scorer(info, device=device, dtype=dtype, **options)
    normalize = Normalize(Columns(), 1)
    warm = tokenize(normalize(table.slice(0, 64)))
    scorer.score(warm[C.INPUT_IDS].combine_chunks(), warm[C.TOKEN_TYPE_IDS].combine_chunks())

    def run():
        tokens = tokenize(normalize(table))
        return scorer.score(tokens[C.INPUT_IDS].combine_chunks(),
                            tokens[C.TOKEN_TYPE_IDS].combine_chunks())
    return run


def whole_job(model: str, table: pa.Table, device: str, workdir: str,
              gpus_per_replica: float = 1.0) -> tuple[float, int]:
    candidates = os.path.join(workdir, "job-candidates")
    os.makedirs(candidates, exist_ok=True)
    step = -(-table.num_rows // 4)
    for i in range(4):
        pq.write_table(table.slice(i * step, step), os.path.join(candidates, f"part-{i}.parquet"))
    summary = rerank(RerankConfig(candidates=[candidates], output=os.path.join(workdir, "job-out"),
                                  model=model, device=device, overwrite=True, restart=True,
                                  gpus_per_replica=gpus_per_replica))
    return summary.seconds, summary.pairs


def corpus_job(model: str, table: pa.Table, device: str, workdir: str,
               pairs: int) -> tuple[float, int, int, int]:
    """score-corpus over about `pairs` pairs: 20 of the queries × that many / 20
    distinct passages of the same data."""
    queries = table.group_by(["query_id", "query"]).aggregate([]).slice(0, 20)
    passages = table.group_by(["doc_id", "passage"]).aggregate([])
    corpus = passages.slice(0, max(1, pairs // queries.num_rows))
    folder = os.path.join(workdir, "corpus-job")
    os.makedirs(folder, exist_ok=True)
    pq.write_table(queries, os.path.join(folder, "queries.parquet"))
    pq.write_table(corpus, os.path.join(folder, "corpus.parquet"))
    summary = score_corpus(RerankConfig(
        queries=os.path.join(folder, "queries.parquet"),
        corpus=os.path.join(folder, "corpus.parquet"), output=os.path.join(folder, "out"),
        model=model, device=device, top_k=100, overwrite=True, restart=True))
    return summary.seconds, summary.pairs, queries.num_rows, corpus.num_rows


def machine(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, {usable_cores()} CPU cores"
    name, flags = platform.processor() or "cpu", cpu_flags()
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    # the vector units decide float32 peak (AVX2 vs AVX-512) and what bf16 would get (AMX)
    isa = [label for flag, label in (("avx512f", "AVX-512"), ("avx512_vnni", "AVX-512 VNNI"),
                                      ("avx512_bf16", "AVX-512 BF16"), ("amx_bf16", "AMX-BF16"),
                                      ("amx_int8", "AMX-INT8")) if flag in flags] or (
        ["AVX2"] if "avx2" in flags else [])
    if "avx512f" in flags and "amx_tile" not in flags:
        isa.append("no AMX")
    return f"{name}{''.join(f', {i}' for i in isa)}, {usable_cores()} cores, no GPU"


def versions() -> str:
    import ray
    import torch
    import transformers

    parts = [f"torch {torch.__version__}", f"transformers {transformers.__version__}",
             f"ray {ray.__version__}"]
    try:
        import sentence_transformers

        parts.append(f"sentence-transformers {sentence_transformers.__version__}")
    except ImportError:
        pass
    return ", ".join(parts)


HALF_DRIFT_PAIRS = 300
FLOAT32_TOLERANCE = 1e-5  # issue 6: scores equal to the float32 reference within 1e-5
LOOP = "(b) transformers loop, input order, batch 32"
CROSSENCODER = "(a) CrossEncoder.predict(batch_size=32)"
OURS = "(c) rstar-batch scorer, in-process"
OWN_FORWARD = "(c) with the model's own forward, not the [CLS]-only last layer"
INT8 = "(c) + --quantize int8"
COMPILE = "(c) + --compile (after warm-up)"
BF16 = "(c) with --dtype bfloat16"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=2000, help="pairs for (a)-(c) (default 2000)")
    parser.add_argument("--job-pairs", type=int, default=20000,
                        help="pairs for the whole job (d) (default 20000)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default=None, help="model folder (default: tiny R* model)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved timing rounds of (a)-(c); the median counts (default 3)")
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI; writes nothing")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["crossencoder", "loop", "int8", "compile", "job", "half",
                                 "corpus"])
    parser.add_argument("--st-python", default=os.environ.get("RSTAR_ST_PYTHON"),
                        help="a Python with sentence-transformers[onnx,openvino] (its own "
                        "venv: they pin older transformers); times their CPU backends "
                        "(benchmarks/st_backends.py). Default: $RSTAR_ST_PYTHON, else skipped")
    parser.add_argument("--out", default=str(HERE.parent / "BENCHMARKS.md"))
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be 1 or more")
    if args.smoke:
        args.pairs, args.job_pairs, args.rounds = 48, 200, 1
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    workdir = tempfile.mkdtemp(prefix="rstar-bench-")
    model = args.model or make_tiny_model(os.path.join(workdir, "model"))
    per_query = 100
    job_table = make_candidates(max(1, args.job_pairs // per_query), per_query, seed=3)
    table = job_table.slice(0, args.pairs)
    dtype = "float32" if args.device == "cpu" else "auto"
    torch_dtype = torch.float32 if args.device == "cpu" else (
        torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)

    runners = {}  # label → prepared callable; timed below in interleaved rounds
    if "loop" not in args.skip:
        runners[LOOP] = transformers_loop(model, table, args.device, torch_dtype)
    if "crossencoder" not in args.skip:
        runners[CROSSENCODER] = crossencoder(model, table, args.device, torch_dtype)
    runners[OURS] = ours(model, table, args.device, dtype)
    runners[OWN_FORWARD] = ours(model, table, args.device, dtype, full_forward=True)
    if args.device == "cpu" and "int8" not in args.skip:
        runners[INT8] = ours(model, table, "cpu", "float32", quantize="int8")
    if "compile" not in args.skip:
        runners[COMPILE] = ours(model, table, args.device, dtype, compile=True)
    # what the job's default (--dtype auto) scores in on this CPU, and bfloat16 timed:
    # native where the CPU has AMX or AVX-512 BF16, emulated elsewhere
    auto = auto_cpu_dtype() if args.device == "cpu" else ("auto", "per GPU")
    if args.device == "cpu" and ("half" not in args.skip or auto[0] == "bfloat16"):
        runners[BF16] = ours(model, table, "cpu", "bfloat16")
    timed = timed_rounds(runners, args.rounds)
    rows = [(name, len(scores), seconds) for name, (scores, seconds, _) in timed.items()]
    spread = {name: (len(scores) / max(every), len(scores) / min(every))
              for name, (scores, _, every) in timed.items()}
    # each round's ratio, then their median: the rounds pair the methods up
    paired = {name: tuple(float(np.median(np.divide(timed[to][2], every)))
                          if to in timed else None for to in (CROSSENCODER, OURS))
              for name, (_, _, every) in timed.items()}
    base = timed[OURS][0]
    # the jobs run with --dtype auto: their "× our scorer" is against the scorer in it
    same = BF16 if auto[0] == "bfloat16" else OURS
    ours_rate = len(timed[same][0]) / timed[same][1]
    reference = timed[LOOP][0] if LOOP in timed else None
    options = [(label, timed[name][0]) for name, label in (
        (OWN_FORWARD, "model's own forward"), (INT8, "--quantize int8"),
        (COMPILE, "--compile"), (BF16, "--dtype bfloat16")) if name in timed]
    if args.device == "cpu" and "half" not in args.skip:
        # GPUs score in bf16 or fp16; fp16's drift is arithmetic, not the device's, so
        # it is measured here on CPU (emulated, slow: a slice, not timed).
        head = table.slice(0, min(len(table), HALF_DRIFT_PAIRS))
        scores = np.asarray(ours(model, head, "cpu", "float16")(), dtype=np.float32)
        options.append((f"--dtype float16 (a GPU dtype; CPU-emulated, first "
                        f"{len(head)} pairs, not timed)", scores))
    st = st_backends(args, model, table, workdir)
    for backend, (scores, seconds, their) in st.items():
        rows.append((f"(a) CrossEncoder backend={backend} (sentence-transformers "
                     f"{their['sentence-transformers']}, transformers {their['transformers']}"
                     "; a process of its own, its rounds in turn)", len(scores), seconds))
        options.append((f"sentence-transformers backend={backend}", scores))
    busy = None
    if "job" not in args.skip:
        with GpuBusy() as sampler:
            seconds, pairs = whole_job(model, job_table, args.device, workdir)
        busy = sampler.summary()
        rows.append(("(d) rstar-batch rerank job, read to write", pairs, seconds))
        if args.device == "cpu":  # the rate start-up does not weigh on: a small run's
            small, small_pairs = whole_job(model, job_table.slice(0, args.job_pairs // 8),
                                           args.device, workdir)
            rows.append((f"(d) marginal: (pairs, seconds) of {pairs} − of {small_pairs} pairs",
                         pairs - small_pairs, seconds - small))
        if args.device == "cuda":  # two replicas per GPU: kept if measured faster
            seconds, pairs = whole_job(model, job_table, args.device, workdir, 0.5)
            rows.append(("(d) with --gpus-per-replica 0.5 (two replicas per GPU)", pairs,
                         seconds))
    if "corpus" not in args.skip:
        seconds, pairs, nq, nc = corpus_job(model, job_table, args.device, workdir,
                                            args.job_pairs)
        rows.append((f"(e) rstar-batch score-corpus, {nq} queries × {nc} passages, top 100",
                     pairs, seconds))

    report = render(args, table, rows, base, reference, options, ours_rate, busy, spread,
                    paired, auto)
    print(report)
    if not args.smoke:
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write("\n" + report)
        print(f"appended to {args.out}")
    if args.device == "cpu":  # float32 throughout: the fast paths must not change scores
        same = [("the plain transformers loop", reference)] + [
            (label, scores) for label, scores in options
            if label in ("model's own forward", "--compile")]
        off = {label: float(np.abs(base - scores).max()) for label, scores in same
               if scores is not None and np.abs(base - scores).max() > FLOAT32_TOLERANCE}
        if off:
            print(f"our float32 scores differ by more than {FLOAT32_TOLERANCE} from: {off}",
                  file=sys.stderr)
            return 1
    return 0


def render(args, table, rows, base, reference, options, ours_rate, busy=None,
           spread=None, paired=None, auto=("auto", "")) -> str:
    ce_rate = next((p / s for name, p, s in rows if name.startswith("(a)")), None)
    tokens = np.mean([len(q.split()) + len(p.split()) for q, p in zip(
        table["query"].to_pylist(), table["passage"].to_pylist())])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:])
    lines = [f"## {stamp}: {args.device}, {machine(args.device)}", "",
             f"`{command.strip()}`; {versions()}; R* architecture"
             f"{' (random weights)' if not args.model else ''}; "
             f"{'dtype auto' if args.device == 'cuda' else 'float32 unless a row says'}; "
             f"pairs average {tokens:.0f} words.", "",
             f"--dtype auto, the jobs' default, is {auto[0]} here ({auto[1]}); (d) and (e) "
             "run with it and their × our scorer is against the scorer in that dtype.", "",
             f"In-process methods: the median of {args.rounds} interleaved round(s), "
             "each method once per round; the range is the slowest and fastest round; "
             "their ratios are the median of each round's ratio.", "",
             "| method | pairs | seconds | pairs/s | range | × CrossEncoder | × our scorer |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    spread, paired = spread or {}, paired or {}
    for name, pairs, seconds in rows:
        rate = pairs / seconds
        vs_ce, vs_ours = paired.get(name, (rate / ce_rate if ce_rate else None,
                                           rate / ours_rate))
        low, high = spread.get(name, (None, None))
        span = f"{low:.0f}–{high:.0f}" if low is not None else "one run"
        lines.append(f"| {name} | {pairs} | {seconds:.1f} | {rate:.1f} | {span} | "
                     f"{'n/a' if vs_ce is None else f'{vs_ce:.2f}'} | {vs_ours:.2f} |")
    st_rows = [(pairs / seconds, name) for name, pairs, seconds in rows if name.startswith("(a)")]
    if st_rows and args.device == "cpu":
        best, best_name = max(st_rows)
        jobs = {name.split(" ")[1].rstrip(":"): p / s for name, p, s in rows
                if name.startswith("(d)")}
        lines += ["", f"The fastest sentence-transformers option here: {best_name.split(' (')[0]}"
                  f" at {best:.1f} pairs/s. Our scorer with --dtype auto ({auto[0]}): "
                  f"{ours_rate / best:.2f}× it" + "".join(
                      f"; the whole job (d), {'its marginal rate' if kind == 'marginal' else 'end to end'}: "
                      f"{rate / best:.2f}×" for kind, rate in jobs.items()) + "."]
    if any(name.startswith(("(d)", "(e)")) for name, _, _ in rows):
        lines += ["", "(d) and (e) run on their own, larger pair sets, and their seconds "
                  "include starting Ray and loading the model in every actor."]
    if busy is not None:
        lines += ["", f"GPU busy during (d): median {busy['median']:.0f}%, mean "
                  f"{busy['mean']:.0f}% of {busy['samples']} nvidia-smi samples."]
    if reference is not None:
        lines += ["", f"Our scores vs the plain transformers loop (same dtype): max |Δ| = "
                  f"{np.abs(base - reference).max():.2e}."]
    if options:
        qids = table["query_id"].to_numpy()
        lines += ["", "| option | max abs Δ vs (c) | Spearman | top-10 overlap per query |",
                  "| --- | ---: | ---: | ---: |"]
        for name, scores in options:
            n = len(scores)  # a head of the pairs for the CPU-emulated dtypes
            d = drift(base[:n], scores, qids[:n])
            lines.append(f"| {name} | {d['max_abs']:.2e} | {d['spearman']:.5f} | "
                         f"{d['top10_overlap']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
