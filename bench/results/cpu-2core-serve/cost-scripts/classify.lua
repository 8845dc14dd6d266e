-- wrk: POST /classify with one 32x32 JPEG in multipart field "image" (body built once)
local f = assert(io.open(os.getenv("WRK_IMAGE") or "/tmp/serve-cost/imgs/d00_0.jpg", "rb"))
local data = f:read("*a")
f:close()
local boundary = "----wrkboundary7MA4YWxkTrZu0gW"
wrk.method = "POST"
wrk.path = "/classify"
wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
wrk.body = "--" .. boundary .. "\r\n"
  .. "Content-Disposition: form-data; name=\"image\"; filename=\"digit.jpg\"\r\n"
  .. "Content-Type: image/jpeg\r\n\r\n" .. data .. "\r\n--" .. boundary .. "--\r\n"
local codes = {}
response = function(status, headers, body)
  codes[status] = (codes[status] or 0) + 1
end
done = function(summary, latency, requests)
  -- response() runs per thread; wrk only reports non-2xx counts in its summary
  io.write(string.format("non2xx=%d errors(connect=%d read=%d write=%d timeout=%d)\n",
    summary.errors.status, summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.timeout))
end
