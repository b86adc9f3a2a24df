-- GET <prefix><id> with an id drawn at random from a file of ids (one per line).
-- Usage: wrk ... -s read.lua <url> -- <ids-file> <path-prefix, e.g. /fhir/Patient/>

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")

local ids = {}
local prefix = "/"

function init(args)
  for line in io.lines(args[1]) do
    if line ~= "" then ids[#ids + 1] = line end
  end
  prefix = args[2] or prefix
  math.randomseed(os.time())
  wrk.headers["Accept"] = "application/fhir+json"
end

function request()
  return wrk.format("GET", prefix .. ids[math.random(#ids)])
end
