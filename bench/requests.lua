-- wrk script for bench/run.sh and bench/soak.sh: sends, in turn, the raw
-- HTTP/1.1 requests of the file named by WRK_REQUESTS (bench/bodies.py
-- writes it: distinct signed webhooks, one after another), from a table
-- built once (wrk2's advice: request() must not build requests), and
-- prints one RESULT line with wrk's own CPU per request.
--
--   WRK_REQUESTS=/tmp/gather.http wrk -t1 -c32 -d10s -s bench/requests.lua http://127.0.0.1:8080

local path = assert(os.getenv("WRK_REQUESTS"), "WRK_REQUESTS names the requests file")
local file = assert(io.open(path, "rb"))
local data = file:read("*a")
file:close()

-- Each request: a head up to its blank line, then Content-Length bytes.
local requests, at = {}, 1
while at <= #data do
    local blank = assert(data:find("\r\n\r\n", at, true), "a request without its blank line")
    local length = tonumber(data:sub(at, blank):lower():match("\r\ncontent%-length: *(%d+)"))
    assert(length, "a request without Content-Length")
    requests[#requests + 1] = data:sub(at, blank + 3 + length)
    at = blank + 4 + length
end
assert(#requests > 0, "no requests in " .. path)

local turn = 0
function request()
    turn = turn % #requests + 1
    return requests[turn]
end

function done(summary, latency)
    local e = summary.errors
    io.write(string.format(
        "RESULT requests=%d rps=%.0f p50_us=%d p99_us=%d non2xx=%d sockerr=%d wrk_cpu_us_per_req=%.2f\n",
        summary.requests, summary.requests / (summary.duration / 1e6),
        latency:percentile(50), latency:percentile(99), e.status,
        e.connect + e.read + e.write + e.timeout, os.clock() * 1e6 / summary.requests))
end
