// One streamed chat completion (`POST /v1/chat/completions` with `stream: true`): its job
// id from the `Modelyard-Job-Id` header, then the text of choice 0 as its chunks arrive.
// A refusal and a mid-stream error event both throw ApiError; aborting `signal` closes
// the connection, which makes the server cancel the job.

import { ApiError, postForEvents } from "./api.js";
import { eventStream } from "./sse.js";

const JOB_ID_HEADER = "Modelyard-Job-Id";

function parsed(data, status) {
  try {
    return JSON.parse(data);
  } catch {
    const start = data.slice(0, 80);
    throw new ApiError(status, "bad_stream", `the stream sent something not JSON: ${start}`);
  }
}

/**
 * Streams the answer to `request` (model, messages, max_tokens, temperature).
 * onStart(jobId) is called once the job exists, onText(text) for each piece of the answer.
 * Resolves to { jobId, finishReason } after `data: [DONE]`.
 */
export async function streamChat(request, { signal, onStart, onText }) {
  const resp = await postForEvents("/v1/chat/completions", { ...request, stream: true }, signal);
  let jobId = resp.headers.get(JOB_ID_HEADER) || "";
  if (jobId) onStart(jobId);
  let finishReason = null;
  for await (const data of eventStream(resp.body)) {
    if (data === "[DONE]") return { jobId, finishReason };
    const chunk = parsed(data, resp.status);
    if (chunk.error) {
      const error = chunk.error;
      throw new ApiError(resp.status, String(error.type || "error"), String(error.message || ""));
    }
    if (!jobId && typeof chunk.id === "string") {
      jobId = chunk.id.replace(/^chatcmpl-/, "");
      onStart(jobId);
    }
    for (const choice of chunk.choices || []) {
      if (choice.index !== 0) continue;
      const text = choice.delta && choice.delta.content;
      if (text) onText(text);
      if (choice.finish_reason) finishReason = choice.finish_reason;
    }
  }
  throw new ApiError(resp.status, "stream_ended", "the answer's stream ended before [DONE]");
}
