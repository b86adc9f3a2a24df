-- POST <path> with a JSON body read from a file; every "__N__" in it becomes a counter so that
-- each created resource is distinct.
-- Usage: wrk ... -s create.lua <url> -- <body-file> <path, e.g. /fhir/Patient>

dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")

local template = ""
local path = "/"
local counter = 0
local tag = ""

function init(args)
  local f = assert(io.open(args[1], "rb"))
  template = f:read("*a")
  f:close()
  path = args[2] or path
  tag = string.format("%x", os.time())
  wrk.headers["Accept"] = "application/fhir+json"
  wrk.headers["Content-Type"] = "application/fhir+json"
end

function request()
  counter = counter + 1
  local body = template:gsub("__N__", tag .. "-" .. counter)
  return wrk.format("POST", path, nil, body)
end
