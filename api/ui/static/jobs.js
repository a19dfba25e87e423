// The job list: filters by status and kind, newest first, refreshed every few seconds
// while on the first page; older pages through the API's cursor.

import { getJson } from "./api.js";
import { fmtTime, h, progressBar, replace, statusBadge } from "./dom.js";

const REFRESH_MS = 3000;
const PAGE_SIZE = 50;

function summary(job) {
  const spec = job.spec || {};
  if (job.kind === "finetune") {
    return [spec.task, spec.method, spec.base_model].filter(Boolean).join(" · ");
  }
  if (spec.model) return String(spec.model);
  return "";
}

function select(name, label, values, current, onChange) {
  const options = [h("option", { value: "" }, `any ${label}`)];
  for (const value of values) {
    options.push(h("option", { value, selected: value === current }, value));
  }
  return h("label", {}, `${label} `, h("select", { name, onchange: onChange }, options));
}

function hashFor(params) {
  const query = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) if (value) query.set(name, value);
  const text = query.toString();
  return text ? `#/?${text}` : "#/";
}

export function showJobs(ctx, params) {
  const status = params.get("status") || "";
  const kind = params.get("kind") || "";
  const cursor = params.get("cursor") || "";
  let timer = null;
  let stopped = false;

  const onFilter = () => {
    const form = ctx.view.querySelector("form.filters");
    window.location.hash = hashFor({
      status: form.elements.status.value,
      kind: form.elements.kind.value,
    });
  };
  const filters = h(
    "form",
    { class: "filters", onsubmit: (e) => e.preventDefault() },
    select("status", "status", ctx.config.statuses || [], status, onFilter),
    select("kind", "kind", ctx.config.kinds || [], kind, onFilter),
    h("span", { class: "muted live" }, cursor ? "older page (not refreshed)" : "live"),
  );
  const body = h("tbody");
  const more = h("p", { class: "pager" });
  const table = h(
    "table",
    { class: "jobs", id: "jobs-table" },
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        ["job", "kind", "status", "progress", "what", "created", "finished"].map((c) =>
          h("th", {}, c),
        ),
      ),
    ),
    body,
  );
  replace(ctx.view, h("h1", {}, "Jobs"), filters, table, more);

  async function load() {
    try {
      const page = await getJson("/v1/jobs", { status, kind, cursor, limit: PAGE_SIZE });
      ctx.onError(null);
      if (stopped) return;
      const rows = page.data.map((job) =>
        h(
          "tr",
          { "data-job": job.id },
          h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.id)),
          h("td", {}, job.kind),
          h("td", {}, statusBadge(job.status), job.cancel_requested ? " (cancelling)" : ""),
          h("td", {}, progressBar(job.progress)),
          h("td", { class: "what" }, summary(job)),
          h("td", {}, fmtTime(job.created_at)),
          h("td", {}, fmtTime(job.finished_at)),
        ),
      );
      if (!rows.length) {
        rows.push(h("tr", {}, h("td", { colspan: "7", class: "muted" }, "No jobs.")));
      }
      replace(body, rows);
      replace(
        more,
        cursor ? h("a", { href: hashFor({ status, kind }) }, "← newest") : "",
        cursor && page.next_cursor ? " · " : "",
        page.next_cursor
          ? h("a", { href: hashFor({ status, kind, cursor: page.next_cursor }) }, "older →")
          : "",
      );
    } catch (err) {
      ctx.onError(err);
    }
    if (!stopped && !cursor) timer = setTimeout(load, REFRESH_MS);
  }
  load();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
