// Server-sent events read from a fetch body (a ReadableStream of bytes), for routes that
// are POSTed to (EventSource only GETs): the data of each event, as text.

/** The data of one event's lines (`data:` lines joined by newlines); null without any. */
function eventData(lines) {
  const data = [];
  for (const line of lines) {
    if (line.startsWith("data:")) data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
  }
  return data.length ? data.join("\n") : null;
}

/** Yields each event's data; comments (`: keepalive`) and events without data are skipped. */
export async function* eventStream(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let lines = [];
  let finished = false;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, end).replace(/\r$/, "");
        buffer = buffer.slice(end + 1);
        if (line) {
          lines.push(line);
          continue;
        }
        const data = eventData(lines);
        lines = [];
        if (data !== null) yield data;
      }
      if (done) {
        finished = true;
        if (buffer) lines.push(buffer);
        const data = eventData(lines);
        if (data !== null) yield data;
        return;
      }
    }
  } finally {
    if (!finished) reader.cancel().catch(() => {});
  }
}
