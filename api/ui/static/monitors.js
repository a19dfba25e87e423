// Sentiment monitors: the list (#/monitors) and a monitor's page (#/monitors/<id>) with
// its negative share over time (one vertex per evaluation) against the alert threshold,
// the current window's shares per label, and its alerts. Refreshed every few seconds.

import { getJson } from "./api.js";
import { lineChart } from "./charts.js";
import { fmtNumber, fmtTime, h, replace, statusBadge } from "./dom.js";

const REFRESH_MS = 3000;

function windowText(mon) {
  return mon.window.items ? `last ${mon.window.items} items` : `last ${mon.window.seconds} s`;
}

function ruleText(mon) {
  const parts = [];
  if (mon.rule.share_above !== null) parts.push(`share > ${fmtNumber(mon.rule.share_above)}`);
  if (mon.rule.rise_above !== null) parts.push(`rise ≥ ${fmtNumber(mon.rule.rise_above)}`);
  return `${parts.join(" or ")} (min ${mon.rule.min_items} items)`;
}

function poller(ctx, load) {
  let timer = null;
  let stopped = false;
  async function tick() {
    try {
      await load(() => stopped);
      if (!stopped) ctx.onError(null);
    } catch (err) {
      ctx.onError(err);
    }
    if (!stopped) timer = setTimeout(tick, REFRESH_MS);
  }
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

export function showMonitors(ctx) {
  const body = h("tbody");
  replace(
    ctx.view,
    h("h1", {}, "Monitors"),
    h(
      "table",
      { id: "monitors-table" },
      h("thead", {}, h("tr", {}, ["monitor", "name", "state", "model", "window", "alert when"].map((c) => h("th", {}, c)))),
      body,
    ),
  );
  return poller(ctx, async (stopped) => {
    const page = await getJson("/v1/monitors", { limit: 100 });
    if (stopped()) return;
    const rows = page.data.map((mon) =>
      h(
        "tr",
        { "data-monitor": mon.id },
        h("td", {}, h("a", { href: `#/monitors/${encodeURIComponent(mon.id)}` }, mon.id)),
        h("td", {}, mon.name),
        h("td", {}, statusBadge(mon.state)),
        h("td", {}, mon.model),
        h("td", {}, windowText(mon)),
        h("td", {}, ruleText(mon)),
      ),
    );
    if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: "6", class: "muted" }, "No monitors.")));
    replace(body, rows);
  });
}

function shareChart(mon) {
  const history = mon.history || [];
  const series = [
    {
      name: "negative_share",
      label: `${mon.negative_label} share`,
      points: history.map((st, i) => ({ x: i + 1, y: st.negative_share })),
    },
  ];
  if (mon.rule.share_above !== null && history.length) {
    series.push({
      name: "threshold",
      label: `threshold ${fmtNumber(mon.rule.share_above)}`,
      points: [
        { x: 1, y: mon.rule.share_above },
        { x: Math.max(history.length, 2), y: mon.rule.share_above },
      ],
    });
  }
  return lineChart({
    id: "monitor-share",
    title: "Negative share per evaluation",
    series,
    xLabel: "evaluation",
    leftLabel: "share",
    leftDomain: [0, 1],
    empty: "No evaluation yet: post items and wait for their predict job.",
  });
}

function sharesTable(mon) {
  const current = mon.current;
  if (!current) return h("p", { class: "muted" }, "No window yet.");
  return h(
    "table",
    { id: "monitor-shares" },
    h("thead", {}, h("tr", {}, h("th", {}, "label"), h("th", {}, "share"))),
    h(
      "tbody",
      {},
      mon.labels.map((label) =>
        h("tr", {}, h("td", {}, label), h("td", { class: "num" }, fmtNumber(current.shares[label] || 0))),
      ),
    ),
  );
}

function alertsTable(alerts) {
  const rows = alerts.map((a) =>
    h(
      "tr",
      { "data-alert": a.id },
      h("td", {}, fmtTime(a.created_at)),
      h("td", { class: "num" }, fmtNumber(a.negative_share)),
      h("td", {}, a.reason),
      h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(a.job_id)}` }, a.job_id)),
    ),
  );
  if (!rows.length) rows.push(h("tr", {}, h("td", { colspan: "4", class: "muted" }, "No alerts.")));
  return h(
    "table",
    { id: "monitor-alerts" },
    h("thead", {}, h("tr", {}, ["time", "share", "reason", "job"].map((c) => h("th", {}, c)))),
    h("tbody", {}, rows),
  );
}

export function showMonitor(ctx, monitorId) {
  const root = h("div", { id: "monitor-page", "data-monitor": monitorId });
  replace(ctx.view, h("p", {}, h("a", { href: "#/monitors" }, "← all monitors")), root);
  const path = `/v1/monitors/${encodeURIComponent(monitorId)}`;
  return poller(ctx, async (stopped) => {
    const [mon, alerts] = await Promise.all([getJson(path), getJson(`${path}/alerts`, { limit: 100 })]);
    if (stopped()) return;
    replace(
      root,
      h("h1", {}, "Monitor ", h("code", {}, mon.name), " ", statusBadge(mon.state)),
      h(
        "p",
        {},
        `${mon.model} · negative label ${mon.negative_label} · ${windowText(mon)} · alert when ${ruleText(mon)} · `,
        `${mon.items.classified} of ${mon.items.posted} items classified`,
      ),
      shareChart(mon),
      h("h2", {}, "Current window"),
      sharesTable(mon),
      h("h2", {}, "Alerts"),
      alertsTable(alerts.data),
    );
    root.dataset.state = mon.state;
    root.dataset.evaluations = String((mon.history || []).length);
    root.dataset.loaded = "true";
  });
}
