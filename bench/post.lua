-- wrk script: POSTs webhooks and prints a JSON summary.
-- Usage: wrk ... -s post.lua URL -- BODIES_FILE THREADS
--    or: wrk ... -s post.lua URL -- unique:PREFIX THREADS
-- With a bodies file of "signature<TAB>body" lines, each thread cycles
-- through its own share of them (pre-signed, so that job ids differ). With
-- unique:PREFIX, every request is a new job id PREFIX-THREAD-N, unsigned
-- (the gateway then runs with verify.required = false: the HMAC is ~0.6 us
-- of a durable webhook's ~75): what a dedupe window of hours sees.

local counter = 0
function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
end

local UNIQUE_BODY = '{"data":{"job_id":"%s-%d-%d","callback_url":"https://gw.example.com/results?tenant=acme","is_error":false,'
  .. '"result":{"policy_categories":[{"name":"ARMS_AMMO","description":"Arms & Ammunition","risk_level":"HIGH"},'
  .. '{"name":"HATE_SPEECH","description":"Hate speech","risk_level":"LOW"}],"metadata":{"width":720,"height":480,'
  .. '"fps":30,"duration":11.6,"seconds_processed":11},"url":"https://cdn.example.com/videos/2026/11/30/clip-%d.mp4"}}}'
local JSON = { ["Content-Type"] = "application/json" }

local requests, n, i, unique = {}, 0, 0, nil
function init(args)
  if args[1]:sub(1, 7) == "unique:" then
    unique = args[1]:sub(8)
    return
  end
  local path, threads = args[1], tonumber(args[2])
  local k = 0
  for line in io.lines(path) do
    if k % threads == tid then
      local sig, body = line:match("^([^\t]*)\t(.*)$")
      local headers = { ["Content-Type"] = "application/json" }
      if sig ~= "" then headers["X-Hub-Signature-256"] = sig end
      n = n + 1
      requests[n] = wrk.format("POST", nil, headers, body)
    end
    k = k + 1
  end
end

function request()
  i = i + 1
  if unique then
    return wrk.format("POST", nil, JSON, string.format(UNIQUE_BODY, unique, tid, i, i))
  end
  return requests[(i - 1) % n + 1]
end

function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    '\nRESULT {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9), latency.max))
end
