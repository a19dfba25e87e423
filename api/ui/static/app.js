// Entry point: the header (API key, Flower link), hash routing between the job list
// (#/?status=&kind=), a job's page (#/jobs/<id>), the monitors (#/monitors,
// #/monitors/<id>) and the playground (#/playground), and one place for API errors.

import { ApiError, apiKey, setApiKey, uiConfig } from "./api.js";
import { replace } from "./dom.js";
import { showJob } from "./job.js";
import { showJobs } from "./jobs.js";
import { showMonitor, showMonitors } from "./monitors.js";
import { showPlayground } from "./playground.js";

const state = { config: { flower_url: "", statuses: [], kinds: [] }, stop: null };

export function reportError(err) {
  const banner = document.getElementById("banner");
  if (!err) {
    banner.hidden = true;
    banner.replaceChildren();
    return;
  }
  let text = err instanceof ApiError ? `${err.type}: ${err.message}` : String(err.message || err);
  if (err instanceof ApiError && err.status === 401) {
    text = apiKey()
      ? `The API refused this key (${err.message}). Enter another one above.`
      : "The API needs a key: enter it in the API key field above.";
  }
  replace(banner, text);
  banner.hidden = false;
}

function showKeyState() {
  document.getElementById("key-state").textContent = apiKey() ? "key set for this tab" : "no key";
}

function route() {
  showKeyState();
  if (state.stop) state.stop();
  state.stop = null;
  reportError(null);
  const view = document.getElementById("view");
  const hash = window.location.hash.replace(/^#/, "") || "/";
  const [path, query] = hash.split("?");
  const match = path.match(/^\/jobs\/([^/]+)$/);
  const monitor = path.match(/^\/monitors\/([^/]+)$/);
  const ctx = { view, config: state.config, onError: reportError };
  if (match) {
    state.stop = showJob(ctx, decodeURIComponent(match[1]));
  } else if (monitor) {
    state.stop = showMonitor(ctx, decodeURIComponent(monitor[1]));
  } else if (path === "/monitors") {
    state.stop = showMonitors(ctx);
  } else if (path === "/playground") {
    state.stop = showPlayground(ctx);
  } else {
    state.stop = showJobs(ctx, new URLSearchParams(query || ""));
  }
}

function setupKey() {
  const form = document.getElementById("key-form");
  const input = document.getElementById("api-key");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setApiKey(input.value.trim());
    input.value = "";
    route();
  });
  document.getElementById("key-clear").addEventListener("click", () => {
    setApiKey("");
    input.value = "";
    route();
  });
}

async function main() {
  setupKey();
  try {
    state.config = await uiConfig();
  } catch {
    // the dashboard still works without its config: no Flower link, free-text filters
  }
  const flower = document.getElementById("flower-link");
  if (/^https?:\/\//i.test(state.config.flower_url || "")) {
    flower.setAttribute("href", state.config.flower_url);
    flower.hidden = false;
  }
  window.addEventListener("hashchange", route);
  route();
}

main();
