"""Drive the service's ASGI app in-process (no sockets): CPU per /classify request through the
whole middleware stack, and a cProfile of it. Usage: inproc.py N [profile]"""
import asyncio, os, sys, time, cProfile, pstats
os.environ.setdefault("BENTOML_HOME", "/tmp/serve-cost/bentoml"); os.environ.setdefault("SERVE_MODELS", "digits")
import httpx
from serve.service import Classifier

img = open("/tmp/serve-cost/imgs/d03_3.jpg", "rb").read()
req = httpx.Request("POST", "http://127.0.0.1:3000/classify", files={"image": ("digit.jpg", img, "image/jpeg")})
body = req.read(); ctype = req.headers["content-type"].encode()

async def main(n, profile):
    app = Classifier.to_asgi(is_main=True)
    # lifespan startup
    q = asyncio.Queue(); await q.put({"type": "lifespan.startup"})
    started = asyncio.Event()
    async def lrecv():
        return await q.get()
    async def lsend(m):
        if m["type"] == "lifespan.startup.complete": started.set()
        elif m["type"] == "lifespan.startup.failed": print(m); sys.exit(1)
    life = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, lrecv, lsend))
    await started.wait()
    inst = __import__("bentoml").get_current_service()
    while not inst.ready: await asyncio.sleep(0.1)
    headers = [(b"host", b"127.0.0.1:3000"), (b"content-type", ctype), (b"content-length", str(len(body)).encode()),
               (b"user-agent", b"wrk")]
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/classify", "raw_path": b"/classify", "query_string": b"", "root_path": "",
             "headers": headers, "client": ("127.0.0.1", 5555), "server": ("127.0.0.1", 3000), "state": {}}
    statuses = []
    async def one():
        sent = False
        async def receive():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.sleep(3600)
        async def send(m):
            if m["type"] == "http.response.start": statuses.append(m["status"])
        await app(dict(scope), receive, send)
    for _ in range(50): await one()
    pr = cProfile.Profile() if profile else None
    t0, c0 = time.perf_counter(), time.process_time()
    if pr: pr.enable()
    for _ in range(n): await one()
    if pr: pr.disable()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"{n} requests: {1000*wall/n:.3f} ms wall, {1000*cpu/n:.3f} ms CPU (all threads) per request; statuses {set(statuses)}")
    if pr:
        st = pstats.Stats(pr); st.sort_stats("cumulative").print_stats(45)
    os._exit(0)

asyncio.run(main(int(sys.argv[1]), len(sys.argv) > 2))
