-- wrk script for benches/compare.sh and benches/outage.sh:
-- GET /voicebiometrics/contacts/+1555NNNNNNN/consent over a working set of contacts. Headers
-- (API key, Bearer token) come from wrk's own -H options, so every target gets byte-for-byte
-- the same request shape apart from that header.
--
--   wrk ... -s compare.lua URL -- run  <working_set> <threads>
--     each request picks a contact uniformly at random from the working set;
--   wrk -t1 ... -s compare.lua URL -- warm <working_set> 1
--     asks for contacts 0, 1, 2, ... in turn, each once (a cache warm-up), and exits as soon
--     as all have been answered (non2xx then counts every answer outside 200..299);
--   wrk ... -s compare.lua URL -- outage <working_set> <threads>
--     as run, and also counts the answers that were 2xx and those marked stale
--     (x-cache-status: STALE, as both consent-proxy and nginx's $upstream_cache_status say, or
--     nginx's UPDATING: stale while another request revalidates).
--
-- done() prints one machine-readable line:
--   RESULT requests=N duration_us=N rps=F p50_us=N p99_us=N non2xx=N connect=N read=N write=N timeout=N
-- (non2xx is wrk's errors.status: answers with a status >= 400), with answered=N stale=N at the
-- end in outage mode.

local next_thread = 0
local wrk_threads = {}

function setup(thread)
   thread:set("thread_id", next_thread)
   next_thread = next_thread + 1
   table.insert(wrk_threads, thread)
end

local mode, working_set, threads
local prefix, suffix
local counter = 0

function init(args)
   mode = args[1] or "run"
   working_set = tonumber(args[2] or "10000")
   threads = tonumber(args[3] or "1")
   -- Split one formatted request around a placeholder, so a request costs one
   -- string.format and a concatenation instead of a wrk.format table walk.
   local template = wrk.format("GET", "/voicebiometrics/contacts/+1555@@@@@@@/consent")
   local at = string.find(template, "@@@@@@@", 1, true)
   prefix = string.sub(template, 1, at - 1)
   suffix = string.sub(template, at + 7)
   math.randomseed(os.time() * 1000 + (thread_id or 0))
   if mode == "outage" then
      -- Globals, so that done() can read them from each thread.
      answered_count, stale_count = 0, 0
      response = function(status, headers, body)
         if status >= 200 and status <= 299 then
            answered_count = answered_count + 1
         end
         local cache = headers["x-cache-status"] or headers["X-Cache-Status"]
         if cache == "STALE" or cache == "UPDATING" then
            stale_count = stale_count + 1
         end
      end
   end
   if mode == "warm" then
      -- One thread (compare.sh runs the warm pass with -t1): stop the whole process once
      -- every contact has been answered, because wrk itself would idle until -d is over.
      -- A margin of repeats keeps a slow answer of the first pass from being cut off.
      local quota = working_set + 256
      local answered, bad = 0, 0
      local started = os.time()
      response = function(status, headers, body)
         answered = answered + 1
         if status < 200 or status > 299 then
            bad = bad + 1
         end
         if answered >= quota then
            local seconds = math.max(os.time() - started, 1)
            io.write(string.format(
               "RESULT requests=%d duration_us=%d rps=%.1f p50_us=0 p99_us=0 non2xx=%d connect=0 read=0 write=0 timeout=0\n",
               answered, seconds * 1000000, answered / seconds, bad))
            io.flush()
            os.exit(0)
         end
      end
   end
end

function request()
   local id
   if mode == "warm" then
      id = counter % working_set
      counter = counter + 1
   else
      id = math.random(0, working_set - 1)
   end
   return prefix .. string.format("%07d", id) .. suffix
end

function done(summary, latency, requests)
   local e = summary.errors
   local counts = ""
   if wrk_threads[1] and wrk_threads[1]:get("answered_count") then
      local answered, stale = 0, 0
      for _, thread in ipairs(wrk_threads) do
         answered = answered + thread:get("answered_count")
         stale = stale + thread:get("stale_count")
      end
      counts = string.format(" answered=%d stale=%d", answered, stale)
   end
   io.write(string.format(
      "RESULT requests=%d duration_us=%d rps=%.1f p50_us=%d p99_us=%d non2xx=%d connect=%d read=%d write=%d timeout=%d%s\n",
      summary.requests, summary.duration,
      summary.requests / (summary.duration / 1e6),
      latency:percentile(50), latency:percentile(99),
      e.status, e.connect, e.read, e.write, e.timeout, counts))
end
