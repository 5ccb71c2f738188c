// The page: a search form -> POST /v1/plans; the ranked plans; for the chosen one its memory, breakdown, pipeline
// timeline (POST /v1/estimates/timeline), error band and exports; the GPU-count sweep (POST /v1/scaling); jobs and
// validations with their loss curves and live output.

import { ApiError, get, post, setToken, token } from "./api.js";
import { breakdownChart, errorBand, lineChart, memoryChart, sweepChart, timelineChart } from "./charts.js";
import { bytes, dollars, seconds } from "./svg.js";

const $ = (selector) => document.querySelector(selector);
const EXPORT_TARGETS = [["megatron", "Megatron-LM arguments"], ["deepspeed", "DeepSpeed config"],
  ["torchtitan", "torchtitan TOML"], ["accelerate", "Accelerate YAML"], ["request", "the contract request"]];
const FINAL_STATES = new Set(["SUCCEEDED", "FAILED", "CANCELLED"]);
const JOB_POLL_MS = 2000;

const state = { search: null, chosenRank: 1, logStream: null, jobTimer: null };

// ============================================================================================== the form

async function loadCatalog() {
  const [models, gpus] = await Promise.all([get("/v1/catalog/models"), get("/v1/catalog/gpus")]);
  $("#model-preset").replaceChildren(...models.map((m) => new Option(`${m.name} (${(m.params / 1e9).toFixed(1)} B)`, m.name)));
  $("#gpu").replaceChildren(...gpus.map((g) => new Option(g.name, g.name)));
  $("#model-preset").value = models.some((m) => m.name === "llama3-8b") ? "llama3-8b" : models[0].name;
  $("#gpu").value = gpus.some((g) => g.name === "h100-sxm") ? "h100-sxm" : gpus[0].name;
}

function number(selector) {
  return Number($(selector).value);
}

// The model as the request takes it: a preset by name, or a pasted config resolved to a ModelSpec by the
// service (a Hugging Face config.json is converted there, as the CLI's --model does).
async function chosenModel() {
  if (document.querySelector("input[name=model-source]:checked").value === "preset") {
    return { name: $("#model-preset").value };
  }
  let pasted;
  try {
    pasted = JSON.parse($("#model-json").value);
  } catch (error) {
    throw new Error(`model: the pasted text is not JSON (${error.message})`);
  }
  const resolved = await post("/v1/models/resolve", pasted);
  $("#model-info").textContent = `${resolved.spec.name || "pasted model"}: ${(resolved.params / 1e9).toFixed(2)} B parameters, `
    + `${resolved.spec.num_layers} layers, hidden ${resolved.spec.hidden_size}`;
  return resolved.spec;
}

async function searchRequest() {
  const training = { seq_len: number("#seq-len"), global_batch_size: number("#global-batch") };
  if ($("#precision").value) training.precision = $("#precision").value;
  if ($("#framework").value) training.framework = $("#framework").value;
  return {
    model: await chosenModel(),
    training,
    cluster: { gpu: $("#gpu").value, num_nodes: number("#num-nodes"), gpus_per_node: number("#gpus-per-node") },
    search: { top_k: number("#top-k") },
  };
}

function showError(error) {
  $("#error").hidden = false;
  $("#error").textContent = error.message;
}

async function onSearch(event) {
  event.preventDefault();
  $("#error").hidden = true;
  $("#search-button").disabled = true;
  $("#search-status").textContent = "searching…";
  try {
    const request = await searchRequest();
    const answer = await post("/v1/plans", request);
    state.search = answer;
    showResults(answer);
    $("#search-status").textContent = `done: search ${answer.id}`;
    loadSweep(request);
  } catch (error) {
    $("#search-status").textContent = "";
    showError(error);
  } finally {
    $("#search-button").disabled = false;
  }
}

// ========================================================================================== the results

function layoutText(plan) {
  const axes = ["dp", "tp", "pp", "cp"].map((axis) => `${axis}${plan[axis]}`);
  if ((plan.ep || 1) > 1) axes.push(`ep${plan.ep}`);
  if (plan.virtual_stages > 1) axes.push(`v${plan.virtual_stages}`);
  return axes.join(" ");
}

function costPerStep(stepTime, gpus) {
  return (stepTime * gpus * number("#price")) / 3600;
}

function showResults(answer) {
  const { result } = answer;
  $("#results").hidden = false;
  const counts = result.counts || {};
  $("#search-summary").textContent = result.plans.length
    ? `${result.plans.length} best of ${counts.fits ?? "?"} plans that fit (${counts.enumerated ?? "?"} considered) on `
      + `${answer.num_gpus} GPUs. ${(result.explanation?.summary || []).join("; ")}.`
    : `No plan fits on ${answer.num_gpus} GPUs.`;
  const rows = result.plans.map((ranked) => planRow(ranked, answer.num_gpus));
  $("#plans tbody").replaceChildren(...rows);
  $("#rejections ul").replaceChildren(...(result.rejected || []).map((r) => {
    const item = document.createElement("li");
    item.textContent = `${r.count} × ${r.code}: ${r.example}`;
    return item;
  }));
  $("#plan-detail").hidden = !result.plans.length;
  if (result.plans.length) choosePlan(1);
}

function planRow(ranked, gpus) {
  const { plan, estimate } = ranked;
  const row = document.createElement("tr");
  row.dataset.rank = ranked.rank;
  const cells = [ranked.rank, layoutText(plan), plan.zero_stage, plan.micro_batch_size, plan.recompute, plan.schedule,
    seconds(estimate.step_time_s), Math.round(estimate.tokens_per_s).toLocaleString("en"),
    `${(estimate.mfu * 100).toFixed(1)}%`, bytes(estimate.memory.peak_bytes),
    dollars(costPerStep(estimate.step_time_s, gpus))];
  row.replaceChildren(...cells.map((value) => {
    const cell = document.createElement("td");
    cell.textContent = value;
    return cell;
  }));
  row.addEventListener("click", () => choosePlan(ranked.rank));
  return row;
}

async function choosePlan(rank) {
  state.chosenRank = rank;
  const { request, result, id } = state.search;
  const ranked = result.plans[rank - 1];
  for (const row of document.querySelectorAll("#plans tbody tr")) row.classList.toggle("chosen", row.dataset.rank == rank);
  $("#plan-title").textContent = `Plan ${rank}: ${layoutText(ranked.plan)} · ZeRO-${ranked.plan.zero_stage} · `
    + `${ranked.plan.schedule} · ${seconds(ranked.estimate.step_time_s)} per step`;
  memoryChart($("#memory-chart"), ranked.estimate.memory, result.memory_limit_bytes);
  breakdownChart($("#breakdown-chart"), ranked.estimate.breakdown, ranked.estimate.step_time_s);
  errorBand($("#error-band"), ranked.estimate);
  showExports(id, rank);
  const { search: _ignored, ...estimateRequest } = request;
  try {
    timelineChart($("#timeline-chart"), await post("/v1/estimates/timeline", { ...estimateRequest, plan: ranked.plan }));
  } catch (error) {
    $("#timeline-chart").textContent = `no timeline: ${error.message}`;
  }
}

// Links to GET /v1/plans/{id}/export (the file itself: raw=true) for the chosen rank. A click fetches it first, so
// a stack that cannot express the plan (422, with the planner's reason) is said here rather than downloaded.
function showExports(planId, rank) {
  $("#export-status").textContent = "";
  $("#exports").replaceChildren(...EXPORT_TARGETS.map(([target, label]) => {
    const item = document.createElement("li");
    const link = document.createElement("a");
    link.href = `/v1/plans/${planId}/export?to=${target}&rank=${rank}&raw=true`;
    link.textContent = label;
    link.dataset.target = target;
    link.addEventListener("click", (event) => {
      event.preventDefault();
      download(link.href, label);
    });
    item.append(link);
    return item;
  }));
}

async function download(url, label) {
  const response = await fetch(url, { headers: token() ? { Authorization: `Bearer ${token()}` } : {} });
  if (!response.ok) {
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    $("#export-status").textContent = `${label}: ${new ApiError(response.status, body).message}`;
    return;
  }
  const disposition = response.headers.get("Content-Disposition") || "";
  const filename = (disposition.match(/filename="([^"]+)"/) || [])[1] || "export";
  const saver = document.createElement("a");
  saver.href = URL.createObjectURL(await response.blob());
  saver.download = filename;
  saver.click();
  URL.revokeObjectURL(saver.href);
  $("#export-status").textContent = `${label}: saved as ${filename}`;
}

async function loadSweep(request) {
  $("#scaling-status").textContent = "searching other GPU counts…";
  try {
    const { points } = await post("/v1/scaling", request);
    sweepChart($("#scaling-time-chart"), points, (p) => p.best.step_time_s, seconds);
    sweepChart($("#scaling-cost-chart"), points, (p) => costPerStep(p.best.step_time_s, p.num_gpus), dollars);
    const missing = points.filter((p) => !p.best).map((p) => p.num_gpus);
    $("#scaling-status").textContent = missing.length ? `no plan fits on ${missing.join(", ")} GPUs` : "";
  } catch (error) {
    $("#scaling-status").textContent = `sweep failed: ${error.message}`;
  }
}

// ================================================================================================= jobs

async function startJob() {
  $("#run-status").textContent = "starting…";
  try {
    const job = await post("/v1/jobs", { plan_id: state.search.id, plan_rank: state.chosenRank, steps: number("#job-steps") });
    $("#run-status").textContent = `job ${job.id}: ${job.state}`;
    await refreshJobs();
    showJob(job);
  } catch (error) {
    $("#run-status").textContent = error.message;
  }
}

async function refreshJobs() {
  const [jobs, validations] = await Promise.all([get("/v1/jobs?limit=20"), get("/v1/validations?limit=20")]);
  const all = [...jobs.jobs, ...validations.validations].sort((a, b) => (a.created < b.created ? 1 : -1));
  $("#job-table tbody").replaceChildren(...all.map(jobRow));
}

function jobRow(job) {
  const row = document.createElement("tr");
  row.dataset.id = job.id;
  const progress = job.kind === "train" ? `${job.steps_done}/${job.steps ?? "?"} steps` : `${job.runs_started ?? 0} runs`;
  const measured = job.measured_run
    ? `${seconds(job.measured_run.predicted_step_time_s)} vs ${seconds(job.measured_run.measured_step_time_s)}` : "";
  row.replaceChildren(...[job.id, job.kind, job.state, job.created, progress, measured].map((value) => {
    const cell = document.createElement("td");
    cell.textContent = value ?? "";
    return cell;
  }));
  row.addEventListener("click", () => showJob(job));
  return row;
}

// A job's detail: its loss curve (polled while it runs) and its output, followed live by server-sent events.
function showJob(job) {
  $("#job-detail").hidden = false;
  $("#job-title").textContent = `${job.kind} job ${job.id}`;
  clearInterval(state.jobTimer);
  const update = job.kind === "validate" ? () => showValidation(job.id) : () => showLoss(job.id);
  // The poll may last have run before the final steps were written: redraw once more when the job ends.
  followLogs(job.id, update);
  update();
  state.jobTimer = setInterval(update, JOB_POLL_MS);
}

async function showLoss(jobId) {
  const metrics = await get(`/v1/jobs/${jobId}/metrics`);
  const steps = metrics.steps.filter((s) => Number.isFinite(s.loss));
  lineChart($("#loss-chart"), steps.map((s) => s.step), steps.map((s) => s.loss), "step");
  $("#job-title").textContent = `training job ${jobId}: ${metrics.state}`;
  $("#validation-plot").hidden = true;
  if (FINAL_STATES.has(metrics.state)) stopPolling();
}

// A validation has no single loss curve: its chart is each run's measured step time over its predicted one.
async function showValidation(id) {
  const validation = await get(`/v1/validations/${id}`);
  const runs = validation.measured_runs;
  lineChart($("#loss-chart"), runs.map((_, i) => i + 1), runs.map((r) => r.measured_step_time_s / r.predicted_step_time_s),
    "run (measured / predicted step time)");
  $("#job-title").textContent = `validation ${id}: ${validation.state}`;
  if (validation.state === "SUCCEEDED") {
    $("#validation-plot").src = `/v1/validations/${id}/plot`;
    $("#validation-plot").hidden = false;
  }
  if (FINAL_STATES.has(validation.state)) stopPolling();
}

function stopPolling() {
  clearInterval(state.jobTimer);
  refreshJobs();
}

function followLogs(jobId, onEnd) {
  if (state.logStream) state.logStream.close();
  $("#job-log").textContent = "";
  const stream = new EventSource(`/v1/jobs/${jobId}/logs?follow=true`);
  stream.onmessage = (event) => {
    $("#job-log").textContent += `${event.data}\n`;
    $("#job-log").scrollTop = $("#job-log").scrollHeight;
  };
  stream.addEventListener("end", (event) => {
    $("#job-log").textContent += `[${JSON.parse(event.data).state}]\n`;
    stream.close();
    onEnd();
  });
  state.logStream = stream;
}

// ================================================================================================ start

function start() {
  $("#token").value = token();
  $("#token").addEventListener("change", (event) => setToken(event.target.value));
  $("#search-form").addEventListener("submit", onSearch);
  $("#run-job").addEventListener("click", startJob);
  $("#refresh-jobs").addEventListener("click", refreshJobs);
  $("#model-json").addEventListener("focus", () => { document.querySelector("input[value=json]").checked = true; });
  loadCatalog().catch(showError);
  refreshJobs().catch(showError);
}

start();
