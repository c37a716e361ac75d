-- wrk script for the scale scenario: every request a new job id, unsigned
-- (the gateway runs with verify.required = false there: the scenario
-- measures the spool, not HMAC).
local counter = 0
function setup(thread)
  thread:set("tid", counter)
  counter = counter + 1
end

local n = 0
function request()
  n = n + 1
  local body = string.format(
    '{"data":{"job_id":"scale-%d-%d","callback_url":"https://gw.example.com/results?tenant=acme","is_error":false,'
      .. '"result":{"policy_categories":[{"name":"ARMS_AMMO","description":"Arms & Ammunition","risk_level":"HIGH"},'
      .. '{"name":"HATE_SPEECH","description":"Hate speech","risk_level":"LOW"}],"metadata":{"width":720,"height":480,'
      .. '"fps":30,"duration":11.6,"seconds_processed":11},"url":"https://cdn.example.com/videos/2026/11/30/clip-%d.mp4"}}}',
    tid, n, n)
  return wrk.format("POST", nil, { ["Content-Type"] = "application/json" }, body)
end
