// The public HTTP API, as any client would call it: JSON requests, OpenAI-style error bodies, and
// server-sent events for streamed chat completions.

export class ApiError extends Error {
  constructor(status, code, message, param) {
    super(message);
    this.status = status; // HTTP status, or 0 when the service could not be reached
    this.code = code;
    this.param = param;
  }

  // A readable one-liner: "422 invalid_value: description #0 is empty".
  describe() {
    if (this.status === 0) return `The service could not be reached: ${this.message}`;
    return `${this.status} ${this.code || "error"}: ${this.message}`;
  }

  static async from(resp) {
    let body = null;
    try {
      body = await resp.json();
    } catch (_) {
      // not JSON: fall back to the status line
    }
    const err = body && body.error;
    if (err && err.message) return new ApiError(resp.status, err.code || err.type, err.message, err.param);
    if (body && body.detail) {
      const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      return new ApiError(resp.status, "error", detail, null);
    }
    return new ApiError(resp.status, "http_error", resp.statusText || "the request failed", null);
  }
}

async function send(method, path, body, headers = {}) {
  const init = { method, headers: { Accept: "application/json", ...headers } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, "network", e.message || String(e), null);
  }
  if (!resp.ok) throw await ApiError.from(resp);
  return resp;
}

export function authHeaders(key) {
  return key ? { Authorization: `Bearer ${key}` } : {};
}

export async function getJSON(path) {
  return (await send("GET", path)).json();
}

export async function postJSON(path, body, headers = {}) {
  return (await send("POST", path, body, headers)).json();
}

export async function del(path, headers = {}) {
  return (await send("DELETE", path, undefined, headers)).json();
}

// Yields each `data:` payload of an event stream, parsed; stops at [DONE].
async function* events(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, end);
      buf = buf.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

// Streams one chat completion; calls onText(piece) as pieces arrive. Resolves to the finish reason.
export async function streamChat(model, content, maxTokens, onText) {
  const body = { model, messages: [{ role: "user", content }], max_tokens: maxTokens, stream: true };
  const resp = await send("POST", "/v1/chat/completions", body, { Accept: "text/event-stream" });
  let finish = null;
  for await (const chunk of events(resp)) {
    if (chunk.error) throw new ApiError(resp.status, chunk.error.code, chunk.error.message, chunk.error.param);
    const choice = chunk.choices && chunk.choices[0];
    if (!choice) continue;
    if (choice.delta && choice.delta.content) onText(choice.delta.content);
    if (choice.finish_reason) finish = choice.finish_reason;
  }
  return finish;
}

// The values of a request-body property in the OpenAPI schema, or null when the endpoint has no such
// property (so the page offers only what this service accepts).
export function schemaEnum(openapi, path, method, property) {
  const op = openapi.paths && openapi.paths[path] && openapi.paths[path][method];
  const content = op && op.requestBody && op.requestBody.content && op.requestBody.content["application/json"];
  let schema = content && content.schema;
  const resolve = (s) => {
    if (s && s.$ref) return s.$ref.split("/").slice(1).reduce((o, k) => (o ? o[k] : undefined), openapi);
    return s;
  };
  schema = resolve(schema);
  const prop = schema && schema.properties && resolve(schema.properties[property]);
  if (!prop) return null;
  const values = [];
  const walk = (s) => {
    s = resolve(s);
    if (!s) return;
    if (Array.isArray(s.enum)) values.push(...s.enum.filter((v) => v !== null));
    if (s.const !== undefined && s.const !== null) values.push(s.const);
    for (const k of ["anyOf", "oneOf", "allOf"]) if (Array.isArray(s[k])) s[k].forEach(walk);
  };
  walk(prop);
  return [...new Set(values)];
}
