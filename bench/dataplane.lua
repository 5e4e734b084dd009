-- wrk script for bench/dataplane.py: only a `done` hook, so wrk keeps its pre-built request and never calls Lua
-- per request. It prints one line, "CANAL-BENCH {json}", with the run's totals and its latency percentile
-- spectrum (microseconds, from wrk's own histogram), so the bench can plot whole distributions, not 4 numbers.

local function percentiles()
  local ps = {}
  for p = 1, 99 do ps[#ps + 1] = p end
  for i = 1, 9 do ps[#ps + 1] = 99 + i / 10 end
  for i = 1, 9 do ps[#ps + 1] = 99.9 + i / 100 end
  ps[#ps + 1] = 99.995
  ps[#ps + 1] = 99.999
  return ps
end

done = function(summary, latency, requests)
  local e = summary.errors
  local spectrum = {}
  for _, p in ipairs(percentiles()) do
    spectrum[#spectrum + 1] = string.format("[%.3f, %d]", p, latency:percentile(p))
  end
  io.write(string.format(
    'CANAL-BENCH {"requests": %d, "duration_us": %d, "bytes": %d, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
      .. '"min_us": %d, "max_us": %d, "mean_us": %.3f, "percentiles": [%s]}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.max, latency.mean, table.concat(spectrum, ", ")))
end
