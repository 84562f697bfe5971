-- wrk script: POST one photo to /v1/scan as multipart/form-data, as a store's app does.
--   wrk -t2 -c16 -d30s --timeout 60s -s bench/scan.lua http://127.0.0.1:8080/v1/scan -- [photo] [task] [api-key]
-- Defaults: shelf.jpg, product_scan, no key. wrk's own 2 s timeout is shorter than a scan
-- on a busy CPU engine: give --timeout, or slow answers show up only as "timeout" errors. wrk reports non-2xx answers (429 under
-- overload) on its "Non-2xx or 3xx responses" line; done() below splits them by status.

local boundary = "scanner-gateway-wrk-boundary"
statuses = {}  -- global: done() reads each thread's copy through thread:get
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local path, task, key = args[1] or "shelf.jpg", args[2] or "product_scan", args[3]
  local file = assert(io.open(path, "rb"), "cannot open " .. path .. " (make one: scanner-gateway sample-photo shelf.jpg)")
  local photo = file:read("*a")
  file:close()
  wrk.method = "POST"
  wrk.body = table.concat({
    "--" .. boundary,
    'Content-Disposition: form-data; name="task"', "", task,
    "--" .. boundary,
    'Content-Disposition: form-data; name="image"; filename="' .. path:match("[^/]+$") .. '"',
    "Content-Type: application/octet-stream", "", photo,
    "--" .. boundary .. "--", "",
  }, "\r\n")
  wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
  if key then wrk.headers["Authorization"] = "Bearer " .. key end
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    local counts = thread:get("statuses")
    for status, n in pairs(counts) do total[status] = (total[status] or 0) + n end
  end
  local keys = {}
  for status in pairs(total) do table.insert(keys, status) end
  table.sort(keys)
  io.write("status mix:")
  for _, status in ipairs(keys) do io.write(string.format(" %d x%d", status, total[status])) end
  io.write("\n")
end
