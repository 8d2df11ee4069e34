-- wrk script: POST the bench chat request with the auth header from the environment, and print
-- one JSON line of figures (latency in microseconds) for bench/run.py to read.
-- BENCH_DELAY_MS paces each connection: before each request it waits a random time with that
-- mean (exponential, so arrivals are Poisson-like), for latency at a chosen offered rate.
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
wrk.headers["Content-Type"] = "application/json"
if os.getenv("BENCH_AUTH") and os.getenv("BENCH_AUTH") ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. os.getenv("BENCH_AUTH")
end

local pause = tonumber(os.getenv("BENCH_DELAY_MS") or "")
if pause and pause > 0 then
  init = function(args)
    math.randomseed(math.floor(os.clock() * 1e9) + tonumber(tostring({}):match("0x(%x+)"), 16))
  end
  delay = function()
    return math.floor(-pause * math.log(1 - math.random()))
  end
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"p50":%d,"p95":%d,"p99":%d,"max":%d,' ..
    '"mean":%.1f,"errors_connect":%d,"errors_read":%d,"errors_write":%d,"errors_status":%d,' ..
    '"errors_timeout":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), latency.max, latency.mean, e.connect, e.read, e.write, e.status,
    e.timeout))
end
