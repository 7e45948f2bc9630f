// The chat page of `elm serve`: streams answers from /v1/chat/completions (Server-Sent Events
// read from fetch's body stream), with a stop button that aborts the request (the server then
// cancels its work).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "elm-api-key";

const history = [];  // {role, content} of the conversation so far, without the system prompt
let controller = null;  // the AbortController of the answer being streamed, if any

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error?.message || response.statusText;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

async function loadModels() {
  const select = $("model");
  const shown = $("models-error");
  const previous = select.value;
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await errorText(response));
    const { data } = await response.json();
    select.replaceChildren(...data.map((model) => {
      const label = model.parent ? `${model.id} (adapter on ${model.parent})` : model.id;
      return new Option(label, model.id);
    }));
    if (data.some((model) => model.id === previous)) select.value = previous;
    shown.hidden = true;
  } catch (error) {
    select.replaceChildren();
    shown.textContent = `Models: ${error.message}`;
    shown.hidden = false;
  }
}

function addMessage(role, text) {
  const item = document.createElement("div");
  item.className = `message ${role}`;
  const who = document.createElement("div");
  who.className = "role";
  who.textContent = role;
  const content = document.createElement("div");
  content.className = "content";
  content.textContent = text;
  item.append(who, content);
  $("messages").append(item);
  item.scrollIntoView({ block: "end" });
  return content;
}

function setBusy(busy) {
  document.body.dataset.busy = busy ? "true" : "false";
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("prompt").disabled = busy;
  $("new-chat").disabled = busy;
  if (!busy) $("prompt").focus();
}

// Yields the `data:` payload of each Server-Sent Event in the body of RESPONSE.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    const blocks = buffer.split(/\r?\n\r?\n/);
    buffer = blocks.pop();
    for (const block of blocks) {
      const data = block.split(/\r?\n/).filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart()).join("\n");
      if (data) yield data;
    }
  }
}

function request(messages) {
  const body = { model: $("model").value || undefined, messages, stream: true,
                 temperature: Number($("temperature").value) };
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  return body;
}

async function send(text) {
  const system = $("system").value.trim();
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...history,
                    { role: "user", content: text }];
  addMessage("user", text);
  history.push({ role: "user", content: text });
  const content = addMessage("assistant", "");
  content.classList.add("streaming");
  controller = new AbortController();
  setBusy(true);
  $("status").textContent = "";
  let answer = "";
  let finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request(messages)),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const data of events(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices[0];
      if (!choice) continue;
      answer += choice.delta?.content ?? "";
      content.textContent = answer;
      content.scrollIntoView({ block: "end" });
      finish = choice.finish_reason ?? finish;
    }
    $("status").textContent = finish === "length" ? "Stopped at the token limit." : "";
  } catch (error) {
    if (error.name === "AbortError") {
      $("status").textContent = "Stopped.";
    } else {
      content.parentElement.classList.add("failed");
      $("status").textContent = `Error: ${error.message}`;
    }
  } finally {
    content.classList.remove("streaming");
    if (answer) {
      history.push({ role: "assistant", content: answer });
    } else {
      history.pop();  // a turn without an answer is not sent again
      if (!content.parentElement.classList.contains("failed")) content.parentElement.remove();
    }
    controller = null;
    setBusy(false);
  }
}

function init() {
  $("api-key").value = sessionStorage.getItem(KEY_STORE) ?? "";
  $("api-key").addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
    loadModels();
  });
  $("temperature").addEventListener("input", () => {
    $("temperature-value").value = $("temperature").value;
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => controller?.abort());
  $("new-chat").addEventListener("click", () => {
    history.length = 0;
    $("messages").replaceChildren();
    $("status").textContent = "";
  });
  setBusy(false);
  loadModels();
}

init();
