-- Argo CD health check for FineTuneJob (finetune.dev/v1alpha1).
-- Install it under resource.customizations.health.finetune.dev_FineTuneJob in argocd-cm
-- (docs/examples.md, "GitOps with Argo CD"). Tested by tests/integration/test_argocd_health.py
-- against statuses written to and read back from a real API server.
--
--   Healthy      the job succeeded: its adapter is in S3
--   Progressing  waiting, queued, starting, training or restarting (a spec change not yet seen too)
--   Suspended    runPolicy.suspend is true: pods stopped after a final checkpoint
--   Degraded     failed or cancelled: status.reason and status.message say why and what to do
hs = {}

local function condition(status, type)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type then
      return c
    end
  end
  return nil
end

local function detail(status)
  local parts = {}
  if status.progress ~= nil and status.progress.step ~= nil and status.progress.step > 0 then
    local step = "step " .. string.format("%d", status.progress.step)
    if status.progress.totalSteps ~= nil then
      step = step .. "/" .. string.format("%d", status.progress.totalSteps)
    end
    table.insert(parts, step)
  end
  if status.restarts ~= nil and status.restarts.total ~= nil and status.restarts.total > 0 then
    table.insert(parts, string.format("%d", status.restarts.total) .. " restart(s)")
  end
  if #parts == 0 then
    return ""
  end
  return " (" .. table.concat(parts, ", ") .. ")"
end

local function explain(status, default)
  local text = status.message
  if text == nil or text == "" then
    text = default
  end
  if status.reason ~= nil and status.reason ~= "" then
    return status.reason .. ": " .. text
  end
  return text
end

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick up the FineTuneJob"
  return hs
end

local generation = obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to act on the latest spec (generation " .. string.format("%d", generation) .. ")"
  return hs
end

local phase = status.phase
if phase == "Succeeded" then
  hs.status = "Healthy"
  local adapter = ""
  if status.output ~= nil and status.output.adapterUri ~= nil then
    adapter = ": adapter at " .. status.output.adapterUri
  end
  hs.message = "Training succeeded" .. adapter
elseif phase == "Failed" or phase == "Cancelled" then
  hs.status = "Degraded"
  hs.message = explain(status, "Training " .. string.lower(phase)) .. detail(status)
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = explain(status, "Suspended by runPolicy.suspend") .. detail(status)
else
  -- Pending, Queued, Initializing, Running, Restarting; or a phase newer than this script.
  local stalled = condition(status, "Stalled")
  if stalled ~= nil and stalled.status == "True" then
    hs.status = "Degraded"
    hs.message = explain(status, stalled.message or "Stalled")
  else
    hs.status = "Progressing"
    hs.message = phase .. detail(status)
    if status.message ~= nil and status.message ~= "" then
      hs.message = hs.message .. ": " .. status.message
    end
  end
end
return hs
