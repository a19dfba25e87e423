// One job: status and progress (queue place while queued), the loss / learning-rate
// and evaluation charts from its metrics, the result and eval report, checkpoints,
// events and outputs. Polls while the job is live; metrics and events are read
// incrementally (`after`), so each poll only fetches what is new.

import { getAllAfter, getJson } from "./api.js";
import { lineChart } from "./charts.js";
import {
  compactJson,
  fmtDuration,
  fmtNumber,
  fmtTime,
  h,
  progressBar,
  replace,
  statusBadge,
} from "./dom.js";
import { resultView } from "./report.js";

const POLL_MS = 2000;
const TERMINAL = new Set(["succeeded", "failed", "cancelled", "expired"]);
const LOSS_SERIES = [
  { name: "train_loss", label: "train loss", axis: "left" },
  { name: "eval_loss", label: "eval loss", axis: "left" },
  { name: "learning_rate", label: "learning rate", axis: "right" },
];
// A DPO job's per-step figures, under TRL's names: the rewards (beta times the log-ratio
// of policy to reference) on the left, the share of pairs ranked right on the right.
const REWARD_SERIES = [
  { name: "rewards/chosen", label: "chosen", axis: "left" },
  { name: "rewards/rejected", label: "rejected", axis: "left" },
  { name: "rewards/margins", label: "margin", axis: "left" },
  { name: "rewards/accuracies", label: "accuracy", axis: "right" },
];

// A reinforcement job's per-step figures, under TRL's names: the grader's mean score of the
// sampled completions (and its spread) on the left, their mean length in tokens on the right.
const GRADER_SERIES = [
  { name: "rewards/grader/mean", label: "grader mean", axis: "left" },
  { name: "rewards/grader/std", label: "grader std", axis: "left" },
  { name: "completions/mean_length", label: "completion length", axis: "right" },
];

function section(id, title) {
  const body = h("div", { class: "section-body" });
  return { node: h("section", { id }, h("h2", {}, title), body), body };
}

function statusView(job) {
  const detail = job.progress_detail || {};
  const facts = [
    ["status", statusBadge(job.status)],
    ["kind", job.kind],
    ["attempts", `${job.attempts} of ${job.max_attempts}`],
    ["priority", String(job.priority)],
    ["created", fmtTime(job.created_at)],
    ["started", fmtTime(job.started_at)],
    ["finished", fmtTime(job.finished_at)],
  ];
  if (job.started_at) {
    const end = job.finished_at ? new Date(job.finished_at) : new Date();
    facts.push(["run time", fmtDuration((end - new Date(job.started_at)) / 1000)]);
  }
  if (job.cancel_requested && !TERMINAL.has(job.status)) facts.push(["cancel", "requested"]);
  const list = h(
    "dl",
    { class: "facts" },
    facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
  );
  const progress = [h("div", { class: "bigbar" }, progressBar(job.progress))];
  const bits = [];
  if (detail.step !== undefined) {
    bits.push(`step ${fmtNumber(detail.step)} of ${fmtNumber(detail.total_steps)}`);
  }
  if (detail.epoch !== undefined && detail.epoch !== null) bits.push(`epoch ${fmtNumber(detail.epoch)}`);
  if (detail.loss !== undefined && detail.loss !== null) bits.push(`loss ${fmtNumber(detail.loss)}`);
  if (detail.eta_s !== undefined && detail.eta_s !== null && !TERMINAL.has(job.status)) {
    bits.push(`ETA ${fmtDuration(detail.eta_s)}`);
  }
  // A finished job's last progress report can lag its end; its result has the final figures.
  if (bits.length && job.status !== "succeeded") {
    const prefix = TERMINAL.has(job.status) ? "last reported: " : "";
    progress.push(h("p", { id: "progress-detail" }, prefix + bits.join(" · ")));
  }
  if (job.queue) {
    progress.push(
      h(
        "p",
        { id: "queue-place" },
        `queued: position ${job.queue.position} of ${job.queue.depth} on queue ${job.queue.name}`,
      ),
    );
  }
  const parts = [list, ...progress];
  const metadata = Object.entries(job.metadata || {});
  if (metadata.length) {
    parts.push(
      h(
        "table",
        { class: "kv", id: "job-metadata" },
        h("caption", {}, "Metadata"),
        h(
          "tbody",
          {},
          metadata.map(([k, v]) =>
            h("tr", {}, h("th", {}, k), h("td", {}, typeof v === "string" ? v : compactJson(v))),
          ),
        ),
      ),
    );
  }
  if (job.error) {
    parts.push(
      h(
        "p",
        { class: "error" },
        h("strong", {}, job.error.type),
        job.error.message ? `: ${job.error.message}` : "",
      ),
    );
  }
  return parts;
}

function metricSeries(points) {
  const byName = new Map();
  for (const m of points) {
    if (!byName.has(m.name)) byName.set(m.name, []);
    byName.get(m.name).push({ x: m.step, y: m.value });
  }
  return byName;
}

function chartsView(byName) {
  const loss = lineChart({
    id: "loss",
    title: "Loss and learning rate",
    xLabel: "step",
    leftLabel: "loss",
    rightLabel: "learning rate",
    series: LOSS_SERIES.map((sr) => ({ ...sr, points: byName.get(sr.name) || [] })),
  });
  const evalNames = [...byName.keys()].filter((n) => n.startsWith("eval_") && n !== "eval_loss");
  const evalChart = lineChart({
    id: "eval",
    title: "Evaluation metrics",
    xLabel: "step",
    leftLabel: "value",
    empty: "No evaluation metrics besides the loss (yet).",
    series: evalNames.sort().map((name) => ({
      name,
      label: name.replace(/^eval_/, ""),
      axis: "left",
      points: byName.get(name),
    })),
  });
  const latest = [...byName.entries()].map(([name, pts]) => {
    const last = pts[pts.length - 1];
    return h(
      "tr",
      {},
      h("th", {}, name),
      h("td", { class: "num" }, fmtNumber(pts.length)),
      h("td", { class: "num" }, fmtNumber(last.x)),
      h("td", { class: "num" }, fmtNumber(last.y)),
    );
  });
  const table = latest.length
    ? h(
        "table",
        { class: "latest" },
        h("thead", {}, h("tr", {}, ["metric", "points", "last step", "last value"].map((c) => h("th", {}, c)))),
        h("tbody", {}, latest),
      )
    : "";
  const charts = [loss, evalChart];
  if (REWARD_SERIES.some((sr) => byName.has(sr.name))) {
    charts.push(
      lineChart({
        id: "rewards",
        title: "Preference rewards",
        xLabel: "step",
        leftLabel: "reward",
        rightLabel: "accuracy",
        series: REWARD_SERIES.map((sr) => ({ ...sr, points: byName.get(sr.name) || [] })),
      }),
    );
  }
  if (byName.has(GRADER_SERIES[0].name)) {
    charts.push(
      lineChart({
        id: "grader",
        title: "Grader score",
        xLabel: "step",
        leftLabel: "score",
        rightLabel: "tokens",
        series: GRADER_SERIES.map((sr) => ({ ...sr, points: byName.get(sr.name) || [] })),
      }),
    );
  }
  return [h("div", { class: "charts" }, ...charts), table];
}

function checkpointsView(rows) {
  if (!rows.length) return h("p", { class: "muted" }, "No checkpoints.");
  return h(
    "table",
    { id: "checkpoints-table" },
    h("thead", {}, h("tr", {}, ["step", "saved", "metrics"].map((c) => h("th", {}, c)))),
    h(
      "tbody",
      {},
      rows.map((c) =>
        h(
          "tr",
          {},
          h("td", { class: "num" }, fmtNumber(c.step)),
          h("td", { class: "nowrap" }, fmtTime(c.created_at)),
          h(
            "td",
            { class: "mono" },
            Object.entries(c.metrics || {})
              .map(([k, v]) => `${k} ${typeof v === "number" ? fmtNumber(v) : compactJson(v)}`)
              .join(" · "),
          ),
        ),
      ),
    ),
  );
}

function eventRow(e) {
  return h(
    "tr",
    { class: `ev-${String(e.type).replace(/[^a-z_]/g, "")}` },
    h("td", { class: "num" }, String(e.id)),
    h("td", { class: "nowrap" }, fmtTime(e.created_at)),
    h("td", { class: "nowrap" }, e.type),
    h("td", {}, e.message),
    h("td", { class: "mono" }, compactJson(e.data)),
  );
}

function outputsView(rows) {
  if (!rows.length) return h("p", { class: "muted" }, "No outputs.");
  return h(
    "table",
    { id: "outputs-table" },
    h(
      "thead",
      {},
      h("tr", {}, ["prompt", "seq", "text", "finish", "tokens in/out", "data"].map((c) => h("th", {}, c))),
    ),
    h(
      "tbody",
      {},
      rows.map((o) =>
        h(
          "tr",
          {},
          h("td", { class: "num" }, String(o.prompt_index)),
          h("td", { class: "num" }, String(o.sequence_index)),
          h("td", { class: "text" }, o.text),
          h("td", {}, o.finish_reason),
          h("td", { class: "num" }, `${o.prompt_tokens} / ${o.completion_tokens}`),
          h("td", { class: "mono" }, compactJson(o.data)),
        ),
      ),
    ),
  );
}

export function showJob(ctx, jobId) {
  let timer = null;
  let stopped = false;
  let metricsAfter = 0;
  let eventsAfter = 0;
  const metrics = [];
  let outputsLoaded = false;

  const title = h("h1", {}, "Job ", h("code", {}, jobId));
  const status = section("status", "Status");
  const charts = section("metrics", "Metrics");
  const result = section("result", "Result");
  const checkpoints = section("checkpoints", "Checkpoints");
  const outputs = section("outputs", "Outputs");
  const events = section("events", "Events");
  const spec = section("spec", "Spec");
  const eventBody = h("tbody");
  replace(
    events.body,
    h(
      "table",
      { id: "events-table" },
      h("thead", {}, h("tr", {}, ["id", "time", "type", "message", "data"].map((c) => h("th", {}, c)))),
      eventBody,
    ),
  );
  const root = h(
    "div",
    { class: "job", id: "job-page", "data-job": jobId },
    h("p", {}, h("a", { href: "#/" }, "← all jobs")),
    title,
    status.node,
    charts.node,
    result.node,
    checkpoints.node,
    outputs.node,
    events.node,
    spec.node,
  );
  replace(ctx.view, root);

  async function poll(first) {
    let job;
    try {
      job = await getJson(`/v1/jobs/${encodeURIComponent(jobId)}`);
      const done = TERMINAL.has(job.status); // read first: what follows then is complete
      const [newMetrics, newEvents, cps] = await Promise.all([
        getAllAfter(`/v1/jobs/${encodeURIComponent(jobId)}/metrics`, { limit: 5000 }, metricsAfter),
        getAllAfter(`/v1/jobs/${encodeURIComponent(jobId)}/events`, { limit: 500 }, eventsAfter),
        getJson(`/v1/jobs/${encodeURIComponent(jobId)}/checkpoints`),
      ]);
      if (stopped) return;
      ctx.onError(null);
      replace(status.body, statusView(job));
      if (first) replace(spec.body, h("pre", { class: "mono" }, JSON.stringify(job.spec, null, 2)));
      metricsAfter = newMetrics.last;
      eventsAfter = newEvents.last;
      if (first || newMetrics.rows.length) {
        metrics.push(...newMetrics.rows);
        replace(charts.body, chartsView(metricSeries(metrics)));
      }
      eventBody.append(...newEvents.rows.map(eventRow));
      replace(checkpoints.body, checkpointsView(cps.data));
      replace(result.body, resultView(job) || h("p", { class: "muted" }, "No result yet."));
      if (done && !outputsLoaded) {
        const out = await getJson(`/v1/jobs/${encodeURIComponent(jobId)}/outputs`);
        replace(outputs.body, outputsView(out.data));
        outputsLoaded = true;
      } else if (!done) {
        replace(outputs.body, h("p", { class: "muted" }, "Outputs appear when the job ends."));
      }
      root.dataset.status = job.status;
      root.dataset.metricPoints = String(metrics.length);
      root.dataset.loaded = done ? "complete" : "live";
      if (done) return;
    } catch (err) {
      ctx.onError(err);
    }
    if (!stopped) timer = setTimeout(() => poll(false), POLL_MS);
  }
  poll(true);
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
