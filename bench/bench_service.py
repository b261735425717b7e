"""A served model under load: uvicorn on 127.0.0.1, the fastnorm model against the torch one.

bench/service_app.py's model (conv -> batch norm -> ReLU, then linear -> layer norm -> GELU
twice, eval mode, weights from one state dict) is served by ``uvicorn --workers W`` on
127.0.0.1, once with fastnorm.nn and once with torch.nn, one core per worker (fastnorm and
torch set to one thread, OPENBLAS_NUM_THREADS=1). A bounded client (``--requests`` POSTs
from ``--concurrency`` threads on keep-alive connections, per-request and overall time
limits; it stops by itself) sends ``--payloads`` distinct batches in turn and checks every
response against the answer computed in this process by the same engine. Reported per
(engine, workers): throughput, p50/p99 latency, wrong answers, failed requests, and each
worker's RSS before and after the load. Engines alternate within each round and the
fastnorm/torch ratios are paired per round. ``--kill`` adds a run in which one worker is
killed (SIGKILL) halfway: uvicorn's supervisor starts another, the client retries the
requests whose connection died, and no answer may be wrong.

    python bench/bench_service.py                      # 1 and 2 workers, 2 rounds, kill runs
    python bench/bench_service.py --requests 200 --rounds 1 --workers 2 --engines fastnorm
"""
import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import service_app as sa  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``uvicorn --workers W`` serving service_app on 127.0.0.1, started and stopped here."""

    def __init__(self, engine, workers, model_path, log):
        self.engine, self.workers, self.port = engine, workers, free_port()
        env = dict(os.environ, SERVICE_ENGINE=engine, SERVICE_MODEL=model_path,
                   OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "uvicorn", "service_app:app", "--app-dir", HERE,
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers),
               "--log-level", "warning", "--no-access-log"]
        self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
        self._wait_ready(120.0)

    def _wait_ready(self, limit):
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"uvicorn exited with {self.proc.returncode}")
            if len(self.worker_pids()) == self.workers:
                try:
                    c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                    c.request("GET", "/health")
                    if c.getresponse().status == 200:
                        c.close()
                        return
                except OSError:
                    pass
            time.sleep(0.2)
        raise RuntimeError("the server did not become ready")

    def worker_pids(self):
        """The processes that serve: uvicorn's spawned children, or itself with 1 worker."""
        if self.workers == 1:
            return [self.proc.pid]
        try:
            kids = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []
        out = []
        for k in kids:
            try:
                if "spawn_main" in " ".join(k.cmdline()):
                    out.append(k.pid)
            except psutil.NoSuchProcess:
                pass
        return sorted(out)

    def rss(self):
        out = {}
        for pid in self.worker_pids():
            try:
                out[pid] = psutil.Process(pid).memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return out

    def wait_workers(self, n, limit=120.0):
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and len(self.worker_pids()) != n:
            time.sleep(0.2)
        return self.worker_pids()

    def wait_serving(self, pids, limit=60.0):
        """Until every pid in ``pids`` has answered /health (new connections each time)."""
        seen, deadline = set(), time.monotonic() + limit
        while not set(pids) <= seen and time.monotonic() < deadline:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/health")
                seen.add(json.loads(c.getresponse().read())["pid"])
                c.close()
            except OSError:
                time.sleep(0.1)
        return set(pids) <= seen

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def load(port, payloads, expected, n, concurrency, time_limit, at_half=None):
    """``n`` POSTs from ``concurrency`` threads; every answer checked. Bounded: stops after
    ``n`` requests or ``time_limit`` seconds, each request at most 3 tries of 30 s."""
    lock = threading.Lock()
    state = {"next": 0, "done": 0, "wrong": 0, "retried": 0, "failed": 0, "half": False}
    lat = []
    deadline = time.monotonic() + time_limit

    def take():
        with lock:
            if state["next"] >= n or time.monotonic() > deadline:
                return None
            state["next"] += 1
            return state["next"] - 1

    def run():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while (i := take()) is not None:
            k = i % len(payloads)
            for attempt in range(3):
                t0 = time.perf_counter()
                try:
                    conn.request("POST", "/predict", body=payloads[k],
                                 headers={"content-type": "application/octet-stream"})
                    r = conn.getresponse()
                    body = r.read()
                    dt = time.perf_counter() - t0
                    break
                except (OSError, http.client.HTTPException):
                    conn.close()   # the worker behind this connection died: a new one
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                    with lock:
                        state["retried"] += 1
            else:
                with lock:
                    state["failed"] += 1
                continue
            y = np.frombuffer(body, np.float32) if r.status == 200 else None
            want = expected[k].reshape(-1)
            ok = y is not None and y.shape == want.shape and bool(
                np.all(np.abs(y - want) <= 2e-5 * max(1.0, float(np.abs(want).max()))))
            with lock:
                state["done"] += 1
                state["wrong"] += not ok
                lat.append(dt)
                if at_half and not state["half"] and state["done"] >= n // 2:
                    state["half"] = True
                    at_half()
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat_ms = np.array(lat) * 1e3
    return dict(done=state["done"], wrong=state["wrong"], retried=state["retried"],
                failed=state["failed"], seconds=wall, rps=state["done"] / wall,
                p50=float(np.percentile(lat_ms, 50)) if lat else float("nan"),
                p99=float(np.percentile(lat_ms, 99)) if lat else float("nan"))


def layer_times(fm, tm, x, repeats=200):
    """Median ms of each layer of the two models on ``x``, alternating engines per repeat."""
    import fastnorm as fn
    import torch
    names = [type(m).__name__ for m in tm]
    times = {"fastnorm": [[] for _ in names], "torch": [[] for _ in names]}
    for _ in range(repeats):
        with fn.no_grad():
            h = fn.Tensor(x)
            for i, layer in enumerate(fm):
                t0 = time.perf_counter()
                h = layer(h)
                times["fastnorm"][i].append(time.perf_counter() - t0)
        with torch.inference_mode():
            h = torch.from_numpy(x)
            for i, layer in enumerate(tm):
                t0 = time.perf_counter()
                h = layer(h)
                times["torch"][i].append(time.perf_counter() - t0)
    return [(n, statistics.median(times["fastnorm"][i]) * 1e3,
             statistics.median(times["torch"][i]) * 1e3) for i, n in enumerate(names)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--engines", default="fastnorm,torch")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="images per request")
    ap.add_argument("--payloads", type=int, default=32, help="distinct request bodies")
    ap.add_argument("--time-limit", type=float, default=300.0, help="seconds per load run")
    ap.add_argument("--no-kill", action="store_true", help="skip the killed-worker runs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    engines = args.engines.split(",")
    workers = [int(w) for w in args.workers.split(",")]
    tmp = tempfile.mkdtemp(prefix="fastnorm-service-")
    model_path = os.path.join(tmp, "model.npz")
    state = sa.make_state(0)
    np.savez(model_path, **state)
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((args.batch,) + sa.IN_SHAPE).astype(np.float32)
          for _ in range(args.payloads)]
    payloads = [x.tobytes() for x in xs]
    expected = {}
    import fastnorm
    fastnorm.set_num_threads(1)
    fm = sa.build_fastnorm(state)
    expected["fastnorm"] = [sa.predict_fastnorm(fm, x) for x in xs]
    if "torch" in engines:
        import torch
        torch.set_num_threads(1)
        tm = sa.build_torch(state)
        expected["torch"] = [sa.predict_torch(tm, x) for x in xs]
        gap = max(float(np.abs(a - b).max())
                  for a, b in zip(expected["fastnorm"], expected["torch"]))
        print(f"in process: fastnorm and torch models agree to {gap:.2g} (max abs, logits)")
        from threadpoolctl import threadpool_limits
        with threadpool_limits(1):   # one BLAS thread, as in the workers
            rows = layer_times(fm, tm, xs[0])
        print("in process, one request's batch, median ms per layer (one thread each):")
        for name, a, b in rows:
            print(f"  {name:12s} fastnorm {a:7.3f}  torch {b:7.3f}")
        print(f"  {'total':12s} fastnorm {sum(r[1] for r in rows):7.3f}  torch "
              f"{sum(r[2] for r in rows):7.3f}")
    print(f"{args.requests} requests of {args.batch} images, "
          f"concurrency {args.concurrency}, {os.cpu_count()} CPUs, uvicorn on 127.0.0.1")
    log = open(os.path.join(tmp, "server.log"), "w")
    runs = []

    def one(engine, w, kill):
        srv = Server(engine, w, model_path, log)
        try:
            warm = load(srv.port, payloads, expected[engine], 20 * w, args.concurrency,
                        60.0)
            before = srv.rss()
            killed = []

            def kill_one():
                pid = srv.worker_pids()[0]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            res = load(srv.port, payloads, expected[engine], args.requests,
                       args.concurrency, args.time_limit, kill_one if kill else None)
            after_pids = srv.wait_workers(w) if kill else srv.worker_pids()
            if kill:   # the new worker has loaded the model once it answers
                srv.wait_serving(after_pids)
            after = srv.rss()
            res.update(engine=engine, workers=w, kill=kill, warm_wrong=warm["wrong"],
                       rss_before={str(k): v for k, v in before.items()},
                       rss_after={str(k): v for k, v in after.items()},
                       killed=killed, replaced=kill and len(after_pids) == w
                       and not set(killed) & set(after_pids))
            return res
        finally:
            srv.stop()

    for r in range(args.rounds):
        order = engines if r % 2 == 0 else engines[::-1]
        for w in workers:
            for engine in order:
                res = one(engine, w, False)
                res["round"] = r
                runs.append(res)
                print(_row(res), flush=True)
    if not args.no_kill:
        w = max(workers) if max(workers) > 1 else 2
        for engine in engines:
            res = one(engine, w, True)
            runs.append(res)
            print(_row(res) + f"  killed {res['killed']}, replaced: {res['replaced']}",
                  flush=True)
    print()
    _summary(runs, engines, workers)
    bad = sum(r["wrong"] + r["warm_wrong"] + r["failed"] for r in runs)
    bad += sum(not r["replaced"] for r in runs if r["kill"])
    print(f"{'every response right' if not bad else f'{bad} WRONG/FAILED/NOT REPLACED'}; "
          f"server log: {log.name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)
    return 1 if bad else 0


def _mib(d):
    return "/".join(f"{v / 2**20:.0f}" for v in d.values())


def _row(r):
    tag = "kill" if r["kill"] else f"round {r['round']}"
    return (f"{r['engine']:8s} workers={r['workers']} {tag:8s} {r['done']:5d} ok in "
            f"{r['seconds']:5.1f} s  {r['rps']:7.1f} req/s  p50 {r['p50']:6.2f} ms  p99 "
            f"{r['p99']:6.2f} ms  wrong {r['wrong']}  retried {r['retried']}  failed "
            f"{r['failed']}  worker RSS MiB {_mib(r['rss_before'])} -> {_mib(r['rss_after'])}")


def _summary(runs, engines, workers):
    plain = [r for r in runs if not r["kill"]]
    print("| engine | workers | req/s (median of rounds) | p50 ms | p99 ms | worker RSS MiB "
          "before -> after | wrong |")
    print("|---|---|---|---|---|---|---|")
    for w in workers:
        for e in engines:
            rs = [r for r in plain if r["engine"] == e and r["workers"] == w]
            if not rs:
                continue
            med = {k: statistics.median(r[k] for r in rs) for k in ("rps", "p50", "p99")}
            print(f"| {e} | {w} | {med['rps']:.0f} | {med['p50']:.2f} | {med['p99']:.2f} | "
                  f"{_mib(rs[-1]['rss_before'])} -> {_mib(rs[-1]['rss_after'])} | "
                  f"{sum(r['wrong'] for r in rs)} |")
    if len(engines) == 2:
        for w in workers:
            pairs = [(a, b) for a in plain for b in plain if a["round"] == b["round"]
                     and a["workers"] == b["workers"] == w and a["engine"] == engines[0]
                     and b["engine"] == engines[1]]
            if pairs:
                ratio = statistics.median(a["rps"] / b["rps"] for a, b in pairs)
                p50 = statistics.median(a["p50"] / b["p50"] for a, b in pairs)
                print(f"workers={w}: {engines[0]}/{engines[1]} throughput {ratio:.2f}x, "
                      f"p50 latency {p50:.2f}x (median of {len(pairs)} paired rounds)")


if __name__ == "__main__":
    sys.exit(main())
