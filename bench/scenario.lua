-- wrk script for every scenario of bench/run.py:
--   wrk ... -s bench/scenario.lua URL -- <scenario> <argument> <email prefix>
-- get:    GET /api/v1/users/<random id in 1..argument>
-- path:   GET <argument> (a fixed page)
-- create: POST /api/v1/users with an email unique to this run, target, thread and request;
--         with argument 1, also an Idempotency-Key as unique
-- done() prints one line of JSON that run.py reads.

local threads = {}
local next_thread = 1

function setup(thread)
   thread:set("thread_id", next_thread)
   next_thread = next_thread + 1
   table.insert(threads, thread)
end

local scenario, argument, prefix
local counter = 0
local fixed

function init(args)
   scenario, argument, prefix = args[1], args[2], args[3]
   math.randomseed(os.time() * 1000 + thread_id)
   if scenario == "path" then
      fixed = wrk.format("GET", argument)
   elseif scenario == "create" then
      wrk.headers["Content-Type"] = "application/json"
   end
   argument = tonumber(argument)
end

function request()
   if scenario == "get" then
      return wrk.format("GET", "/api/v1/users/" .. math.random(1, argument))
   elseif scenario == "create" then
      counter = counter + 1
      local body = string.format('{"email":"%s-%d-%d@bench.example.com","name":"Bench User %d"}',
                                 prefix, thread_id, counter, counter)
      if argument == 1 then
         wrk.headers["Idempotency-Key"] = string.format("%s-%d-%d", prefix, thread_id, counter)
      end
      return wrk.format("POST", "/api/v1/users", nil, body)
   end
   return fixed
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,' ..
      '"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
      summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(99), latency.max))
end
