// The service's JSON API, as the page calls it: the token (if the user gave one) on every request, and errors
// turned into one readable message from the service's common error body.

const TOKEN_KEY = "paraplan.token";

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(value) {
  if (value.trim()) sessionStorage.setItem(TOKEN_KEY, value.trim());
  else sessionStorage.removeItem(TOKEN_KEY);
}

export class ApiError extends Error {
  constructor(status, body) {
    super(describeError(status, body));
    this.status = status;
    this.body = body;
  }
}

// `{"error": {"kind", "message", "fields": [{field, message}], "violations": [...]}}` -> lines a person reads.
function describeError(status, body) {
  const error = body && body.error;
  if (!error) return `the server answered ${status}`;
  const lines = [error.message];
  for (const field of error.fields || []) lines.push(`  ${field.field}: ${field.message}`);
  for (const violation of error.violations || []) lines.push(`  ${violation.message || JSON.stringify(violation)}`);
  return lines.join("\n");
}

export async function call(method, path, body) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (token()) headers.Authorization = `Bearer ${token()}`;
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!response.ok) throw new ApiError(response.status, data);
  return data;
}

export const get = (path) => call("GET", path);
export const post = (path, body) => call("POST", path, body);
