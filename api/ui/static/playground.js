// The playground (#/playground): chat with a model that can chat (an installed base model
// whose tokenizer has a chat template, or a fine-tuned causal LM from the registry), each
// answer streamed as the worker decodes it and linked to its generation job. Compare puts
// two models side by side: the same message goes to both at once, and each pane keeps its
// own conversation (its model's answers). The conversations live as long as the tab, so a
// job's page and back loses nothing; leaving the page stops the answers still streaming.

import { getJson } from "./api.js";
import { streamChat } from "./chat.js";
import { h, replace } from "./dom.js";

const PANES = 2;
const session = {
  compare: false,
  maxTokens: 128,
  temperature: 0.7,
  panes: Array.from({ length: PANES }, () => ({ model: "", turns: [] })),
};

async function registeredModels() {
  const rows = [];
  let cursor = "";
  for (;;) {
    const page = await getJson("/v1/models", { limit: 100, cursor });
    rows.push(...page.data);
    if (!page.has_more || !page.next_cursor) return rows;
    cursor = page.next_cursor;
  }
}

async function chatModels() {
  const [installed, registered] = await Promise.all([
    getJson("/v1/models/installed"),
    registeredModels(),
  ]);
  return {
    base: installed.data.filter((m) => m.chat_template).map((m) => m.id),
    withoutTemplate: installed.data.filter((m) => !m.chat_template).length,
    tuned: registered.filter((m) => m.task === "causal_lm"),
  };
}

/** Keep the panes' models when they are still there; otherwise the newest fine-tuned
 * model's base on the left and that model on the right (the before/after comparison). */
function pickDefaults(models) {
  const ids = [...models.base, ...models.tuned.map((m) => m.id)];
  for (const pane of session.panes) if (!ids.includes(pane.model)) pane.model = "";
  const [left, right] = session.panes;
  const tuned = models.tuned[0];
  if (!left.model)
    left.model = tuned && ids.includes(tuned.base_model) ? tuned.base_model : ids[0] || "";
  if (!right.model) {
    right.model =
      tuned && tuned.id !== left.model
        ? tuned.id
        : ids.find((id) => id !== left.model) || left.model;
  }
}

function modelSelect(models, pane) {
  const option = (id, label) => h("option", { value: id, selected: id === pane.model }, label);
  const groups = [];
  if (models.base.length) {
    groups.push(
      h(
        "optgroup",
        { label: "installed" },
        models.base.map((id) => option(id, id)),
      ),
    );
  }
  if (models.tuned.length) {
    const options = models.tuned.map((m) => option(m.id, `${m.id} (from ${m.base_model})`));
    groups.push(h("optgroup", { label: "fine-tuned" }, options));
  }
  return h(
    "select",
    {
      class: "model",
      name: "model",
      onchange: (event) => {
        pane.model = event.target.value;
      },
    },
    groups,
  );
}

function turnMeta(turn) {
  const parts = [];
  if (turn.jobId) {
    parts.push(
      h("a", { class: "job-link", href: `#/jobs/${encodeURIComponent(turn.jobId)}` }, turn.jobId),
    );
  }
  if (turn.state === "streaming") parts.push(turn.jobId ? "streaming…" : "starting…");
  if (turn.state === "done") parts.push(`finished: ${turn.finishReason || "?"}`);
  if (turn.state === "stopped") parts.push("stopped");
  if (turn.state === "error") parts.push(h("span", { class: "error msg-error" }, turn.error));
  return parts.map((part, i) => (i ? [" · ", part] : part));
}

/** A turn's element and the function that redraws it from the turn. */
function turnView(turn) {
  const text = h("div", { class: "msg-text" });
  if (turn.role === "user") {
    text.textContent = turn.content;
    return {
      node: h("div", { class: "msg user" }, h("div", { class: "msg-role" }, "you"), text),
      update() {},
    };
  }
  const meta = h("div", { class: "msg-meta muted" });
  const node = h(
    "div",
    { class: "msg assistant" },
    h("div", { class: "msg-role" }, turn.model),
    text,
    meta,
  );
  const update = () => {
    text.textContent = turn.content;
    node.dataset.state = turn.state;
    node.dataset.jobId = turn.jobId || "";
    replace(meta, turnMeta(turn));
  };
  update();
  return { node, update };
}

/** The conversation as the API takes it: every message, and the answers that have text
 * and were not cut short by an error. */
function messagesOf(turns) {
  return turns
    .filter(
      (t) => t.role === "user" || (t.content && (t.state === "done" || t.state === "stopped")),
    )
    .map((t) => ({ role: t.role, content: t.content }));
}

export function showPlayground(ctx) {
  let controller = null;
  let streaming = 0;
  let models = { base: [], withoutTemplate: 0, tuned: [] };
  const root = h("div", { id: "playground" });
  const panes = h("div", { class: "panes" });
  const paneViews = [];

  const input = h("textarea", {
    id: "playground-input",
    name: "message",
    rows: "3",
    placeholder: "Message (Enter sends, Shift+Enter is a new line)",
    required: true,
  });
  const send = h("button", { type: "submit", id: "playground-send" }, "Send");
  const stop = h("button", { type: "button", id: "playground-stop", disabled: true }, "Stop");
  const clear = h("button", { type: "button", id: "playground-clear" }, "New chat");
  const compare = h("input", {
    type: "checkbox",
    id: "playground-compare",
    checked: session.compare,
  });
  const maxTokens = h("input", {
    type: "number",
    id: "playground-max-tokens",
    min: "1",
    max: "4096",
    step: "1",
    required: true,
    value: String(session.maxTokens),
  });
  const temperature = h("input", {
    type: "number",
    id: "playground-temperature",
    min: "0",
    max: "2",
    step: "0.1",
    required: true,
    value: String(session.temperature),
  });
  const form = h(
    "form",
    { class: "composer", autocomplete: "off" },
    h(
      "div",
      { class: "playground-controls" },
      h("label", {}, compare, " Compare two models"),
      h("label", {}, "max tokens ", maxTokens),
      h("label", {}, "temperature ", temperature),
      clear,
    ),
    h("div", { class: "composer-row" }, input, send, stop),
  );

  function setBusy(delta) {
    streaming += delta;
    send.disabled = streaming > 0;
    clear.disabled = streaming > 0;
    stop.disabled = streaming === 0;
    root.dataset.streaming = String(streaming);
  }

  function drawPanes() {
    panes.classList.toggle("compare", session.compare);
    paneViews.length = 0;
    const nodes = session.panes.map((pane, index) => {
      const log = h("div", { class: "chat-log" });
      for (const turn of pane.turns) log.append(turnView(turn).node);
      const node = h(
        "section",
        { class: "pane", id: `pane-${index}`, hidden: index > 0 && !session.compare },
        h(
          "div",
          { class: "pane-head" },
          models.base.length || models.tuned.length ? modelSelect(models, pane) : "",
        ),
        log,
      );
      paneViews.push({ node, log });
      return node;
    });
    replace(panes, nodes);
  }

  async function answer(pane, view, signal) {
    const turn = {
      role: "assistant",
      model: pane.model,
      content: "",
      jobId: "",
      state: "streaming",
    };
    const messages = messagesOf(pane.turns);
    pane.turns.push(turn);
    const shown = turnView(turn);
    view.log.append(shown.node);
    view.node.dataset.state = "streaming";
    const redraw = () => {
      shown.update();
      view.log.scrollTop = view.log.scrollHeight;
    };
    redraw();
    try {
      const done = await streamChat(
        {
          model: pane.model,
          messages,
          max_tokens: session.maxTokens,
          temperature: session.temperature,
        },
        {
          signal,
          onStart: (jobId) => {
            turn.jobId = jobId;
            redraw();
          },
          onText: (text) => {
            turn.content += text;
            redraw();
          },
        },
      );
      turn.state = "done";
      turn.finishReason = done.finishReason;
    } catch (err) {
      if (signal.aborted) {
        turn.state = "stopped";
      } else {
        turn.state = "error";
        turn.error =
          err && err.type ? `${err.type}: ${err.message}` : String((err && err.message) || err);
      }
    }
    redraw();
    view.node.dataset.state = turn.state;
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const content = input.value;
    if (!content.trim() || streaming) return;
    session.maxTokens = Number.parseInt(maxTokens.value, 10);
    session.temperature = Number.parseFloat(temperature.value);
    input.value = "";
    controller = new AbortController();
    const active = session.panes.slice(0, session.compare ? 2 : 1);
    active.forEach((pane, index) => {
      if (!pane.model) return;
      pane.turns.push({ role: "user", content });
      paneViews[index].log.append(turnView({ role: "user", content }).node);
      setBusy(1);
      answer(pane, paneViews[index], controller.signal).finally(() => setBusy(-1));
    });
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  stop.addEventListener("click", () => controller && controller.abort());
  clear.addEventListener("click", () => {
    for (const pane of session.panes) pane.turns = [];
    drawPanes();
  });
  compare.addEventListener("change", () => {
    session.compare = compare.checked;
    panes.classList.toggle("compare", session.compare);
    paneViews.forEach((view, index) => {
      view.node.hidden = index > 0 && !session.compare;
    });
  });

  const note = h("p", { class: "muted", id: "playground-note" }, "Loading models…");
  replace(ctx.view, h("h1", {}, "Playground"), root);
  replace(root, note, panes, form);
  setBusy(0);
  drawPanes();

  let left = false;
  chatModels()
    .then((found) => {
      if (left) return;
      models = found;
      pickDefaults(models);
      const count = models.base.length + models.tuned.length;
      const skipped = models.withoutTemplate
        ? ` (${models.withoutTemplate} installed without a chat template not listed)`
        : "";
      replace(
        note,
        count
          ? `Each answer is a generation job; ${count} models can chat${skipped}.`
          : "No model can chat yet: install one with a chat template under the data dir's " +
              `models/, or fine-tune a causal LM${skipped}.`,
      );
      send.disabled = !count;
      drawPanes();
      root.dataset.loaded = "true";
    })
    .catch((err) => ctx.onError(err));

  return () => {
    left = true;
    if (controller) controller.abort();
  };
}
