// A finished job's result: the evaluation report (scikit-learn / seqeval table shape:
// one row per label or entity type, average rows, scalars, confusion matrix), the
// training figures, and whatever else the result holds.

import { compactJson, fmtNumber, h } from "./dom.js";

const COLUMNS = ["precision", "recall", "f1-score", "support"];
const AVERAGES = ["micro avg", "macro avg", "weighted avg"];

function isRow(value) {
  return value && typeof value === "object" && !Array.isArray(value) && "f1-score" in value;
}

function keyValues(object, id) {
  const rows = Object.entries(object).map(([name, value]) =>
    h(
      "tr",
      {},
      h("th", {}, name),
      h("td", { class: "num" }, typeof value === "object" ? compactJson(value) : fmtNumber(value)),
    ),
  );
  return h("table", { class: "kv", id }, h("tbody", {}, rows));
}

function perClassTable(report, title) {
  const names = Object.keys(report).filter((k) => isRow(report[k]) && !AVERAGES.includes(k));
  const averages = AVERAGES.filter((k) => isRow(report[k]));
  const line = (name, cls) =>
    h(
      "tr",
      { class: cls },
      h("th", {}, name),
      COLUMNS.map((c) => h("td", { class: "num" }, fmtNumber(report[name][c]))),
    );
  return h(
    "table",
    { class: "report", id: "eval-report" },
    h("caption", {}, title),
    h("thead", {}, h("tr", {}, h("th", {}, ""), COLUMNS.map((c) => h("th", {}, c)))),
    h("tbody", {}, names.map((n) => line(n, "")), averages.map((n) => line(n, "avg"))),
  );
}

function confusionMatrix(labels, matrix) {
  const max = Math.max(1, ...matrix.flat());
  const head = h(
    "tr",
    {},
    h("th", { class: "corner" }, "true ↓ / predicted →"),
    labels.map((l) => h("th", {}, l)),
  );
  const rows = matrix.map((row, i) =>
    h(
      "tr",
      {},
      h("th", {}, labels[i] ?? String(i)),
      row.map((n, j) =>
        h(
          "td",
          { class: `num heat${Math.round((n / max) * 5)}${i === j ? " diag" : ""}` },
          fmtNumber(n),
        ),
      ),
    ),
  );
  return h(
    "table",
    { class: "confusion", id: "confusion-matrix" },
    h("caption", {}, "Confusion matrix"),
    h("thead", {}, head),
    h("tbody", {}, rows),
  );
}

/** The result section's content, or null when the job has no result yet. */
export function resultView(job) {
  const result = job.result;
  if (!result || typeof result !== "object") return null;
  const parts = [];
  const evalReport = result.eval;
  if (evalReport && typeof evalReport === "object") {
    const task = result.task || (job.spec && job.spec.task) || "";
    const scalars = {};
    for (const [name, value] of Object.entries(evalReport)) {
      if (typeof value === "number" || value === null) scalars[name] = value;
    }
    parts.push(h("h3", {}, "Evaluation"));
    if (Object.keys(scalars).length) parts.push(keyValues(scalars, "eval-scalars"));
    if (Object.values(evalReport).some(isRow)) {
      const title =
        task === "token_classification"
          ? "Entities (seqeval, entity level)"
          : "Classification report";
      parts.push(perClassTable(evalReport, title));
    }
    if (Array.isArray(evalReport.confusion_matrix) && Array.isArray(evalReport.labels)) {
      parts.push(confusionMatrix(evalReport.labels, evalReport.confusion_matrix));
    }
  }
  if (result.train && typeof result.train === "object") {
    parts.push(h("h3", {}, "Training"), keyValues(result.train, "train-figures"));
  }
  const rest = {};
  for (const [name, value] of Object.entries(result)) {
    if (name !== "eval" && name !== "train") rest[name] = value;
  }
  if (Object.keys(rest).length) parts.push(h("h3", {}, "Result"), keyValues(rest, "result-rest"));
  return parts;
}
