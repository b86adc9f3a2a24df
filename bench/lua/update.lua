-- PUT <prefix><id> with that id's JSON body, for an id drawn at random from a file of
-- "<id>\t<body>" lines; every "__N__" in the body becomes a counter so that each update
-- really changes the resource.
-- Usage: wrk ... -s update.lua <url> -- <bodies-file> <path-prefix, e.g. /fhir/Patient/>

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")

local ids = {}
local bodies = {}
local prefix = "/"
local counter = 0

function init(args)
  for line in io.lines(args[1]) do
    local id, body = line:match("^([^\t]+)\t(.*)$")
    if id then
      ids[#ids + 1] = id
      bodies[#bodies + 1] = body
    end
  end
  prefix = args[2] or prefix
  math.randomseed(os.time())
  wrk.headers["Accept"] = "application/fhir+json"
  wrk.headers["Content-Type"] = "application/fhir+json"
end

function request()
  local i = math.random(#ids)
  counter = counter + 1
  local body = bodies[i]:gsub("__N__", tostring(counter))
  return wrk.format("PUT", prefix .. ids[i], nil, body)
end
