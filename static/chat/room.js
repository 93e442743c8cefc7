// The room page: renders what ChatClient reports. Every user string enters the DOM as text.
import { ChatClient } from "./client.js";

const root = document.getElementById("chat");
const room = root.dataset.room;
const me = root.dataset.user;
const list = document.getElementById("messages");
const status = document.getElementById("status");
const online = document.getElementById("online");
const composer = document.getElementById("composer");
const shown = new Set();

const client = new ChatClient();

function render(message) {
  if (shown.has(message.id)) return;
  shown.add(message.id);
  const item = document.createElement("li");
  item.dataset.id = String(message.id);
  const who = document.createElement("span");
  who.className = "author";
  who.textContent = message.user;
  const when = document.createElement("time");
  when.dateTime = new Date(message.ts).toISOString();
  when.textContent = new Date(message.ts).toLocaleTimeString();
  const body = document.createElement("span");
  body.className = "body";
  body.textContent = message.body;
  if (me && message.body.includes(`@${me}`)) item.classList.add("mention");
  item.append(when, " ", who, " ", body);
  list.append(item);
  list.scrollTop = list.scrollHeight;
}

client.addEventListener("state", (e) => {
  const labels = { connecting: "connecting…", open: "connected", reconnecting: "reconnecting…", closed: "disconnected" };
  status.textContent = labels[e.detail.state] ?? e.detail.state;
  status.dataset.state = e.detail.state;
});
client.addEventListener("joined", (e) => {
  for (const message of e.detail.history) render(message);
  online.textContent = `${e.detail.online} online`;
});
client.addEventListener("message", (e) => render(e.detail));
client.addEventListener("presence", (e) => {
  online.textContent = `${e.detail.online} online`;
});
client.addEventListener("delete", (e) => {
  list.querySelector(`li[data-id="${CSS.escape(String(e.detail.id))}"]`)?.remove();
});
client.addEventListener("error", (e) => {
  status.textContent = `error: ${e.detail.detail}`;
});

client.connect();
client.join(room);

if (composer) {
  const input = document.getElementById("body");
  composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const body = input.value.trim();
    if (!body) return;
    client.post(room, body);
    input.value = "";
  });
  input.addEventListener("input", () => client.typing(room));
}
