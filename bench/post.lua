-- wrk script: POSTs pre-signed webhooks, each thread cycling through its own
-- share of a file of "signature<TAB>body" lines, so that job ids differ
-- (durable mode would otherwise only see duplicates). Prints a JSON summary.
-- Usage: wrk ... -s post.lua URL -- BODIES_FILE THREADS

local counter = 0
function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
end

local requests, n, i = {}, 0, 0
function init(args)
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
  i = i % n + 1
  return requests[i]
end

function done(summary, latency, _)
  local e = summary.errors
  io.write(string.format(
    '\nRESULT {"requests":%d,"duration_us":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,"status_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9), latency.max))
end
