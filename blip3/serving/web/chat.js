// The blip3 chat page: a conversation with the server's model over its OpenAI-compatible API.
// Every turn sends the whole history (images as data: URLs) with `stream: true` and shows the answer
// as its server-sent events arrive. Model output is only ever set as text, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  model: null,       // the id /v1/models reports
  history: [],       // OpenAI messages sent so far: {role, content}
  attached: [],      // data: URLs waiting to go with the next user message
  controller: null,  // AbortController of the answer being streamed
};

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || response.statusText;
  } catch (e) {
    return `HTTP ${response.status} ${response.statusText}`;
  }
}

async function loadModel() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) throw new Error(await errorMessage(response));
  const body = await response.json();
  state.model = body.data[0].id;
  $("model-name").textContent = state.model;
}

function addMessage(role, text, images) {
  const box = document.createElement("div");
  box.className = "message " + role;
  const label = document.createElement("div");
  label.className = "role";
  label.textContent = role;
  box.append(label);
  for (const url of images || []) {
    const img = document.createElement("img");
    img.src = url;
    img.alt = "attached image";
    box.append(img);
  }
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  box.append(body);
  $("messages").append(box);
  box.scrollIntoView({ block: "end" });
  return box;
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function attach(files) {
  for (const file of files) state.attached.push(await readAsDataURL(file));
  $("image-input").value = "";
  showAttachments();
}

function showAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  state.attached.forEach((url, index) => {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = url;
    img.alt = "image to send";
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = "Remove";
    remove.onclick = () => { state.attached.splice(index, 1); showAttachments(); };
    figure.append(img, remove);
    box.append(figure);
  });
}

// Server-sent events: "data: {json}" blocks separated by blank lines, ending with "data: [DONE]".
async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

async function send(text) {
  const content = state.attached.map((url) => ({ type: "image_url", image_url: { url } }));
  if (text) content.push({ type: "text", text });
  const images = state.attached;
  state.attached = [];
  showAttachments();
  addMessage("user", text, images);
  state.history.push({ role: "user", content });

  const box = addMessage("assistant", "");
  const textBox = box.querySelector(".text");
  box.dataset.state = "streaming";
  box.dataset.chunks = "0";
  state.controller = new AbortController();
  setBusy(true);
  let answer = "";
  try {
    if (!state.model) await loadModel();
    const request = {
      model: state.model,
      messages: state.history,
      stream: true,
      max_tokens: Number($("max-tokens").value) || 256,
      temperature: Number($("temperature").value) || 0,
    };
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(request), signal: state.controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const event of sseData(response)) {
      if (event.error) throw new Error(event.error.message);
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      if (choice.delta && choice.delta.content) {
        answer += choice.delta.content;
        textBox.textContent = answer;
        box.dataset.chunks = String(Number(box.dataset.chunks) + 1);
        box.scrollIntoView({ block: "end" });
      }
      if (choice.finish_reason) box.dataset.finishReason = choice.finish_reason;
    }
    state.history.push({ role: "assistant", content: answer });
    box.dataset.state = "done";
  } catch (error) {
    state.history.pop();  // the question goes unanswered: take it back out of the history
    box.classList.add("error");
    textBox.textContent = answer + (answer ? "\n" : "") + (error.name === "AbortError" ? "(stopped)" : "Error: " + error.message);
    box.dataset.state = "error";
  } finally {
    state.controller = null;
    setBusy(false);
  }
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.history = [];
  state.attached = [];
  showAttachments();
  $("messages").replaceChildren();
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = sessionStorage.getItem("blip3-api-key") || "";
  $("api-key").addEventListener("change", () => { sessionStorage.setItem("blip3-api-key", $("api-key").value); loadModel().catch(() => {}); });
  $("image-input").addEventListener("change", (e) => attach(e.target.files));
  $("new-chat").addEventListener("click", newChat);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if ((!text && !state.attached.length) || state.controller) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  loadModel().catch((error) => { $("model-name").textContent = "(" + error.message + ")"; });
});
