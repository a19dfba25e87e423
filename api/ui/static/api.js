// The /v1 API as seen from the page: a Bearer key when the user gave one
// (kept in sessionStorage, so it ends with the tab), typed errors from the error body.

const KEY_NAME = "modelyard.apiKey";
const ROOT = new URL("../", document.baseURI); // the page is <root>/ui/

export class ApiError extends Error {
  constructor(status, type, message) {
    super(message);
    this.status = status;
    this.type = type;
  }
}

export function apiKey() {
  try {
    return sessionStorage.getItem(KEY_NAME) || "";
  } catch {
    return "";
  }
}

export function setApiKey(value) {
  if (value) sessionStorage.setItem(KEY_NAME, value);
  else sessionStorage.removeItem(KEY_NAME);
}

function url(path, params) {
  const target = new URL(path.replace(/^\//, ""), ROOT);
  for (const [name, value] of Object.entries(params || {})) {
    if (value === null || value === undefined || value === "") continue;
    for (const item of Array.isArray(value) ? value : [value]) {
      target.searchParams.append(name, String(item));
    }
  }
  return target;
}

function headers(accept) {
  const sent = { Accept: accept };
  const key = apiKey();
  if (key) sent.Authorization = `Bearer ${key}`;
  return sent;
}

/** The API's typed error from a refusal's body (or its status line when it has none). */
async function errorOf(resp) {
  let type = "http_error";
  let message = `${resp.status} ${resp.statusText}`;
  try {
    const body = await resp.json();
    if (body && body.error) {
      type = String(body.error.type || type);
      message = String(body.error.message || message);
    }
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(resp.status, type, message);
}

/** GET a JSON document; throws ApiError with the API's typed error. */
export async function getJson(path, params) {
  let resp;
  try {
    const sent = headers("application/json");
    resp = await fetch(url(path, params), { headers: sent, cache: "no-store" });
  } catch (err) {
    throw new ApiError(0, "network_error", `the API did not answer (${err.message})`);
  }
  if (!resp.ok) throw await errorOf(resp);
  return resp.json();
}

/** POST a JSON body to a route that answers server-sent events; the Response, whose body
 * the caller reads. Throws ApiError for a refusal; an abort through `signal` rejects
 * with the fetch's AbortError. */
export async function postForEvents(path, body, signal) {
  const sent = { ...headers("text/event-stream"), "Content-Type": "application/json" };
  let resp;
  try {
    resp = await fetch(url(path), {
      method: "POST",
      headers: sent,
      body: JSON.stringify(body),
      cache: "no-store",
      signal,
    });
  } catch (err) {
    if (signal && signal.aborted) throw err;
    throw new ApiError(0, "network_error", `the API did not answer (${err.message})`);
  }
  if (!resp.ok) throw await errorOf(resp);
  return resp;
}

/** Every page of a list that pages with `after` + `has_more` + `last_id` (metrics, events). */
export async function getAllAfter(path, params, after) {
  const rows = [];
  let cursor = after || 0;
  for (;;) {
    const page = await getJson(path, { ...params, after: cursor });
    rows.push(...page.data);
    if (page.last_id !== null && page.last_id !== undefined) cursor = page.last_id;
    if (!page.has_more) return { rows, last: cursor };
  }
}

export async function uiConfig() {
  const resp = await fetch(new URL("config.json", document.baseURI), { cache: "no-store" });
  if (!resp.ok) return { flower_url: "", statuses: [], kinds: [] };
  return resp.json();
}
