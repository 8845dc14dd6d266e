"""In-process CPU per request of the service's ASGI app, GET /livez or POST /classify, with middlewares removed by name."""
import asyncio, os, sys, time
os.environ.setdefault("BENTOML_HOME", "/tmp/serve-cost/bentoml"); os.environ.setdefault("SERVE_MODELS", "digits")
import httpx
from serve.service import Classifier
what, n, drop = sys.argv[1], int(sys.argv[2]), set(sys.argv[3].split(",")) if len(sys.argv) > 3 else set()
img = open("/tmp/serve-cost/imgs/d03_3.jpg", "rb").read()
req = httpx.Request("POST", "http://127.0.0.1:3000/classify", files={"image": ("digit.jpg", img, "image/jpeg")})
body = req.read(); ctype = req.headers["content-type"].encode()
async def main():
    app = Classifier.to_asgi(is_main=True)
    names = [m.cls.__name__ for m in app.user_middleware]
    app.user_middleware = [m for m in app.user_middleware if m.cls.__name__ not in drop]
    if os.environ.get("HOIST"):
        g = [m for m in app.user_middleware if m.cls.__name__ == "UploadGuard"]
        r = [m for m in app.user_middleware if m.cls.__name__ != "UploadGuard"]
        app.user_middleware = r[:1] + g + r[1:]
        names = [m.cls.__name__ for m in app.user_middleware]
    q = asyncio.Queue(); await q.put({"type": "lifespan.startup"}); started = asyncio.Event()
    async def lrecv(): return await q.get()
    async def lsend(m):
        if m["type"] == "lifespan.startup.complete": started.set()
    asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, lrecv, lsend))
    await started.wait()
    inst = __import__("bentoml").get_current_service()
    while not inst.ready: await asyncio.sleep(0.1)
    if what == "livez":
        headers = [(b"host", b"127.0.0.1:3000"), (b"user-agent", b"wrk")]; method, path, b = "GET", "/livez", b""
    else:
        headers = [(b"host", b"127.0.0.1:3000"), (b"content-type", ctype), (b"content-length", str(len(body)).encode()), (b"user-agent", b"wrk")]
        method, path, b = "POST", "/classify", body
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 3000), "state": {}}
    statuses = []
    async def one():
        sent = False
        async def receive():
            nonlocal sent
            if not sent:
                sent = True; return {"type": "http.request", "body": b, "more_body": False}
            await asyncio.sleep(3600)
        async def send(m):
            if m["type"] == "http.response.start": statuses.append(m["status"])
        await app(dict(scope), receive, send)
    for _ in range(200): await one()
    if os.environ.get("PROF"):
        import cProfile, pstats
        pr = cProfile.Profile(); pr.enable()
        for _ in range(n): await one()
        pr.disable(); st = pstats.Stats(pr); st.sort_stats(os.environ["PROF"]).print_stats(int(os.environ.get("TOP", "50"))); os._exit(0)
    best = None
    for rep in range(3):
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n): await one()
        cpu = 1000 * (time.process_time() - c0) / n
        best = cpu if best is None else min(best, cpu)
    print(f"{what} drop={sorted(drop)} middlewares={names}: {best:.3f} ms CPU/request (best of 3 x {n}); statuses {set(statuses)}")
    os._exit(0)
import uvloop
uvloop.run(main())
