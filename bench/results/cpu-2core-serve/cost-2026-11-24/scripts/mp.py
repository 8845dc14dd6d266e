import asyncio, time, httpx, io
from starlette.datastructures import Headers
from serve.guard import UploadGuard, UploadRule, BodyReader, BodyBudget
from serve.inputs import open_image, decode_opened
img = open("/tmp/serve-cost/imgs/d03_3.jpg", "rb").read()
req = httpx.Request("POST", "http://h/classify", files={"image": ("digit.jpg", img, "image/jpeg")})
body = req.read(); headers = Headers(headers={"content-type": req.headers["content-type"], "content-length": str(len(body))})
g = UploadGuard(None, rules={}, max_file_bytes=10**7)
rule = UploadRule("image", 1, 10**7)
async def main(n):
    async def receive(): return {"type": "http.request", "body": body, "more_body": False}
    t = time.process_time()
    for _ in range(n):
        r = BodyReader(receive, limit=10**7, budget=BodyBudget(), keep=False)
        f = await g._check_form(headers, r, rule); await f.close()
    print("form parse us", 1e6 * (time.process_time() - t) / n)
    t = time.process_time()
    for _ in range(n):
        im = open_image(img, max_bytes=10**7, max_pixels=10**7)
    print("open_image us", 1e6 * (time.process_time() - t) / n)
    t = time.process_time()
    for _ in range(n):
        im = decode_opened(open_image(img, max_bytes=10**7, max_pixels=10**7))
    print("open+decode us", 1e6 * (time.process_time() - t) / n)
    from serve.inputs import Preprocessing
    pre = Preprocessing(32, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    t = time.process_time()
    for _ in range(n): pre(im)
    print("preprocess us", 1e6 * (time.process_time() - t) / n)
asyncio.run(main(5000))
