// The room page: renders what ChatClient reports and sends what the player types.
//
// Every string that came from a user (names, bodies, server details) enters the DOM
// through textContent or as a text node, never as HTML; the Content-Security-Policy header
// forbids inline script as a second wall.
import { ChatClient } from "./client.js";

const HISTORY_PAGE = 50;
const TYPING_SHOWN_MS = 4500;
const GROUP_WITHIN_MS = 5 * 60 * 1000;
const NEAR_BOTTOM_PX = 80;
const TOAST_MS = 5000;

const $ = (id) => document.getElementById(id);
const root = $("chat");
const room = root.dataset.room;
const me = root.dataset.user || null;
const maxBody = Number(root.dataset.maxBody) || 500;

const scroller = $("scroller");
const list = $("messages");
const older = $("older");
const conn = $("conn");
const connText = $("conn-text");
const banner = $("banner");
const bannerText = $("banner-text");
const retryButton = $("retry");
const onlineCount = $("online-count");
const slowModeChip = $("slow-mode");
const typingLine = $("typing");
const jump = $("jump");
const toasts = $("toasts");
const menu = $("modmenu");
const composer = $("composer");
const input = $("body");
const counter = $("counter");
const sendButton = $("send");

const client = new ChatClient();
const baseTitle = document.title;

let moreOlder = true;
let loadingOlder = false;
let unreadHidden = 0;
let unreadBelow = 0;
let roomRules = { slow_mode: 0, read_only: false };
let slowUntil = 0;
let countdown = null;
let removed = false;
const typers = new Map(); // username -> timer

// --- time --------------------------------------------------------------------------------

const timeOfDay = new Intl.DateTimeFormat(undefined, { hour: "numeric", minute: "2-digit" });
const dayAndTime = new Intl.DateTimeFormat(undefined, {
  month: "short",
  day: "numeric",
  hour: "numeric",
  minute: "2-digit",
});
const fullTime = new Intl.DateTimeFormat(undefined, { dateStyle: "full", timeStyle: "medium" });

function sameDay(a, b) {
  return (
    a.getFullYear() === b.getFullYear() &&
    a.getMonth() === b.getMonth() &&
    a.getDate() === b.getDate()
  );
}

// Wire timestamps are UTC milliseconds; the viewer sees their own local time.
function setTime(el, ts) {
  const when = new Date(ts);
  el.dateTime = when.toISOString();
  el.textContent = (sameDay(when, new Date()) ? timeOfDay : dayAndTime).format(when);
  el.title = fullTime.format(when);
}

// --- rendering ---------------------------------------------------------------------------

function hue(name) {
  let h = 0;
  for (const ch of name) h = (h * 31 + ch.codePointAt(0)) >>> 0;
  return `hue-${h % 8}`;
}

const mentionPattern = me
  ? new RegExp(`(^|[^\\w@])(@${me.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")})(?![\\w])`, "giu")
  : null;

// The body as text nodes, with the viewer's own @mentions wrapped in <mark>.
function fillBody(el, body) {
  el.replaceChildren();
  if (!mentionPattern) {
    el.textContent = body;
    return false;
  }
  let last = 0;
  let mentioned = false;
  mentionPattern.lastIndex = 0;
  for (const match of body.matchAll(mentionPattern)) {
    const start = match.index + match[1].length;
    el.append(document.createTextNode(body.slice(last, start)));
    const mark = document.createElement("mark");
    mark.className = "mention";
    mark.textContent = match[2];
    el.append(mark);
    last = start + match[2].length;
    mentioned = true;
  }
  el.append(document.createTextNode(body.slice(last)));
  return mentioned;
}

function buildItem(message) {
  const item = document.createElement("li");
  item.className = "msg";
  item.dataset.user = message.user;
  item.dataset.ts = String(message.ts);
  if (message.id != null) item.dataset.id = String(message.id);
  if (message.client_id) item.dataset.clientId = message.client_id;
  if (me && message.user === me) item.classList.add("own");

  const avatar = document.createElement("span");
  avatar.className = `avatar ${hue(message.user)}`;
  avatar.setAttribute("aria-hidden", "true");
  avatar.textContent = [...message.user][0]?.toUpperCase() ?? "?";

  const main = document.createElement("div");
  main.className = "msg-main";
  const meta = document.createElement("div");
  meta.className = "msg-meta";
  const author = document.createElement("span");
  author.className = `author ${hue(message.user)}`;
  author.textContent = message.user;
  const when = document.createElement("time");
  setTime(when, message.ts);
  meta.append(author, when);
  const body = document.createElement("p");
  body.className = "body";
  if (fillBody(body, message.body)) item.classList.add("mentions-me");
  main.append(meta, body);

  const tools = document.createElement("button");
  tools.type = "button";
  tools.className = "mod-toggle";
  tools.setAttribute("aria-label", "Moderate this message");
  tools.setAttribute("aria-haspopup", "menu");
  tools.textContent = "⋯";

  item.append(avatar, main, tools);
  return item;
}

// A message continues the previous one when the same author wrote it shortly after.
function regroup(item) {
  if (!item || !item.classList.contains("msg")) return;
  const prev = item.previousElementSibling;
  const continues =
    prev?.classList.contains("msg") &&
    prev.dataset.user === item.dataset.user &&
    Math.abs(Number(item.dataset.ts) - Number(prev.dataset.ts)) < GROUP_WITHIN_MS;
  item.classList.toggle("cont", Boolean(continues));
}

function itemById(id) {
  return list.querySelector(`li[data-id="${CSS.escape(String(id))}"]`);
}

function itemByClientId(clientId) {
  return list.querySelector(`li[data-client-id="${CSS.escape(String(clientId))}"]`);
}

// Place an item with an id in id order, above the viewer's own unsent messages.
function placeById(item, id) {
  let after = list.lastElementChild;
  while (after && (after.dataset.id == null || Number(after.dataset.id) > id)) {
    after = after.previousElementSibling;
  }
  if (after) after.after(item);
  else list.prepend(item);
  regroup(item);
  regroup(item.nextElementSibling);
}

function nearBottom() {
  return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < NEAR_BOTTOM_PX;
}

function toBottom() {
  scroller.scrollTop = scroller.scrollHeight;
  unreadBelow = 0;
  jump.hidden = true;
}

// Show one message; false if it is already on the page.
function show(message) {
  if (itemById(message.id)) return false;
  const mine = me && message.user === me;
  const pending = mine && message.client_id ? itemByClientId(message.client_id) : null;
  if (pending) {
    settleItem(pending, message.id, message.ts);
    return false;
  }
  placeById(buildItem(message), message.id);
  return true;
}

function settleItem(item, id, ts) {
  item.classList.remove("pending", "failed");
  item.querySelector(".msg-status")?.remove();
  item.dataset.id = String(id);
  if (ts != null) {
    item.dataset.ts = String(ts);
    setTime(item.querySelector("time"), ts);
  }
  placeById(item, id);
}

function showLive(message) {
  const stick = nearBottom();
  if (!show(message)) return;
  stopTyping(message.user);
  const mine = me && message.user === me;
  if (stick || mine) toBottom();
  else {
    unreadBelow += 1;
    jump.textContent = `${unreadBelow} new message${unreadBelow === 1 ? "" : "s"} ↓`;
    jump.hidden = false;
  }
  if (document.hidden && !mine) {
    unreadHidden += 1;
    updateTitle();
  }
}

function showOwnPending(clientId, body) {
  const item = buildItem({ user: me, body, ts: Date.now(), client_id: clientId });
  item.classList.add("pending");
  const status = document.createElement("span");
  status.className = "msg-status";
  status.textContent = "sending…";
  item.querySelector(".msg-meta").append(status);
  list.append(item);
  regroup(item);
  toBottom();
}

function markFailed(item, detail, clientId, body) {
  item.classList.remove("pending");
  item.classList.add("failed");
  const status = item.querySelector(".msg-status") ?? document.createElement("span");
  status.className = "msg-status";
  status.replaceChildren();
  const why = document.createElement("span");
  why.textContent = `Not sent: ${detail}`;
  const retry = document.createElement("button");
  retry.type = "button";
  retry.className = "link";
  retry.textContent = "Retry";
  retry.addEventListener("click", () => {
    status.textContent = "sending…";
    item.classList.replace("failed", "pending");
    client.post(room, body, clientId);
  });
  const discard = document.createElement("button");
  discard.type = "button";
  discard.className = "link";
  discard.textContent = "Discard";
  discard.addEventListener("click", () => removeItem(item));
  status.append(why, " · ", retry, " · ", discard);
  if (!status.parentNode) item.querySelector(".msg-meta").append(status);
}

function removeItem(item) {
  if (menu.parentNode === item) closeMenu();
  const next = item.nextElementSibling;
  item.remove();
  regroup(next);
}

function clearMessages() {
  closeMenu();
  for (const item of [...list.children]) {
    if (!item.classList.contains("pending")) item.remove();
  }
}

function systemLine(text) {
  const item = document.createElement("li");
  item.className = "system";
  item.textContent = text;
  list.append(item);
}

// --- scrolling back ----------------------------------------------------------------------

function oldestId() {
  const first = list.querySelector("li[data-id]");
  return first ? Number(first.dataset.id) : null;
}

function setOlder(state) {
  older.dataset.state = state;
  older.textContent =
    state === "end" ? `This is the beginning of #${room}.` : "Loading older messages…";
}

function loadOlder() {
  if (!moreOlder || loadingOlder || client.state !== "connected") return;
  const before = oldestId();
  if (before == null) return;
  loadingOlder = client.history(room, before, HISTORY_PAGE);
  if (loadingOlder) setOlder("loading");
}

function olderVisible() {
  const box = scroller.getBoundingClientRect();
  const mark = older.getBoundingClientRect();
  return mark.bottom >= box.top && mark.top <= box.bottom;
}

new IntersectionObserver(
  (entries) => {
    if (entries.some((entry) => entry.isIntersecting)) loadOlder();
  },
  { root: scroller, rootMargin: "200px 0px 0px 0px" },
).observe(older);

// --- typing ------------------------------------------------------------------------------

function renderTyping() {
  const names = [...typers.keys()];
  let text = "";
  if (names.length === 1) text = `${names[0]} is typing…`;
  else if (names.length === 2) text = `${names[0]} and ${names[1]} are typing…`;
  else if (names.length > 2) text = `${names[0]}, ${names[1]} and ${names.length - 2} more are typing…`;
  typingLine.textContent = text;
}

function startTyping(user) {
  clearTimeout(typers.get(user));
  typers.set(
    user,
    setTimeout(() => stopTyping(user), TYPING_SHOWN_MS),
  );
  renderTyping();
}

function stopTypingAll() {
  for (const user of [...typers.keys()]) stopTyping(user);
}

function stopTyping(user) {
  if (!typers.has(user)) return;
  clearTimeout(typers.get(user));
  typers.delete(user);
  renderTyping();
}

// --- status, title, toasts ---------------------------------------------------------------

const STATE_TEXT = {
  idle: "Connecting…",
  connecting: "Connecting…",
  connected: "Connected",
  reconnecting: "Reconnecting…",
  disconnected: "Disconnected",
};

function setConnection(state) {
  conn.dataset.state = state;
  connText.textContent = STATE_TEXT[state] ?? state;
  root.dataset.connection = state;
  if (state === "connected") {
    stopCountdown();
    setBannerHidden(true);
  }
  updateComposer();
}

function stopCountdown() {
  clearInterval(countdown);
  countdown = null;
}

function showReconnecting(at) {
  stopCountdown();
  const tick = () => {
    const seconds = Math.ceil((at - Date.now()) / 1000);
    bannerText.textContent =
      seconds > 0
        ? `Connection lost. Reconnecting in ${seconds} s…`
        : "Connection lost. Reconnecting…";
  };
  tick();
  countdown = setInterval(tick, 500);
  retryButton.hidden = false;
  banner.dataset.kind = "warn";
  setBannerHidden(false);
}

// The banner takes room from the message list: keep a reader who was at the bottom there.
function setBannerHidden(hidden) {
  if (banner.hidden === hidden) return;
  const stick = nearBottom();
  banner.hidden = hidden;
  if (stick) toBottom();
}

function showBanner(text, kind = "error") {
  stopCountdown();
  bannerText.textContent = text;
  retryButton.hidden = true;
  banner.dataset.kind = kind;
  setBannerHidden(false);
}

function updateTitle() {
  document.title = unreadHidden > 0 ? `(${unreadHidden}) ${baseTitle}` : baseTitle;
}

function toast(text, kind = "info") {
  const item = document.createElement("p");
  item.className = `toast ${kind}`;
  item.textContent = text;
  toasts.append(item);
  setTimeout(() => item.remove(), TOAST_MS);
}

// --- composer ----------------------------------------------------------------------------

function updateComposer() {
  if (!input) return;
  const readOnly = roomRules.read_only && !client.moderator;
  input.disabled = readOnly || removed;
  input.placeholder = removed
    ? "You can't post here right now"
    : readOnly
      ? "This room is read-only"
      : `Message #${room}`;
  const waiting = Date.now() < slowUntil && !client.moderator;
  sendButton.disabled = input.disabled || waiting;
}

function updateCounter() {
  const left = maxBody - input.value.length;
  counter.hidden = left > 50;
  counter.textContent = String(left);
  counter.classList.toggle("over", left < 0);
}

function applyRules(frame) {
  roomRules = { slow_mode: frame.slow_mode ?? 0, read_only: frame.read_only === true };
  slowModeChip.hidden = !(roomRules.slow_mode > 0) && !roomRules.read_only;
  slowModeChip.textContent = roomRules.read_only
    ? "read-only"
    : `slow mode · ${roomRules.slow_mode} s`;
  updateComposer();
}

if (composer) {
  composer.addEventListener("submit", (event) => {
    event.preventDefault();
    const body = input.value.trim();
    if (!body || sendButton.disabled) return;
    const clientId = client.post(room, body);
    // Commands (/delete, /timeout, ...) are answered by the server, not shown as messages.
    if (!body.startsWith("/")) showOwnPending(clientId, body);
    input.value = "";
    updateCounter();
    if (roomRules.slow_mode > 0 && !client.moderator) {
      slowUntil = Date.now() + roomRules.slow_mode * 1000;
      updateComposer();
      setTimeout(updateComposer, roomRules.slow_mode * 1000 + 50);
    }
  });
  input.addEventListener("input", () => {
    updateCounter();
    if (input.value.trim() && !input.value.startsWith("/")) client.typing(room);
  });
}

// --- moderation --------------------------------------------------------------------------

let menuTarget = null;
let banArmed = false;

function openMenu(item) {
  menuTarget = item;
  banArmed = false;
  const own = item.dataset.user === me;
  menu.querySelector('[data-action="timeout"]').hidden = own;
  const ban = menu.querySelector('[data-action="ban"]');
  ban.hidden = own;
  ban.textContent = "Ban";
  item.append(menu);
  menu.hidden = false;
  menu.querySelector("button:not([hidden])")?.focus();
}

function closeMenu() {
  menu.hidden = true;
  menuTarget = null;
  root.append(menu);
}

list.addEventListener("click", (event) => {
  const toggle = event.target.closest(".mod-toggle");
  if (!toggle || !client.moderator) return;
  const item = toggle.closest("li.msg");
  if (menuTarget === item) closeMenu();
  else if (item?.dataset.id) openMenu(item);
});

menu.addEventListener("click", (event) => {
  const action = event.target.closest("button")?.dataset.action;
  const item = menuTarget;
  if (!action || !item) return;
  const user = item.dataset.user;
  if (action === "ban" && !banArmed) {
    banArmed = true;
    event.target.textContent = `Really ban ${user}?`;
    return;
  }
  const command = {
    delete: `/delete ${item.dataset.id}`,
    timeout: `/timeout ${user} 600`,
    ban: `/ban ${user}`,
  }[action];
  client.post(room, command);
  closeMenu();
});

document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && !menu.hidden) closeMenu();
});
document.addEventListener("click", (event) => {
  if (!menu.hidden && !event.target.closest(".modmenu, .mod-toggle")) closeMenu();
});

// --- client events -----------------------------------------------------------------------

client.addEventListener("state", (e) => setConnection(e.detail.state));
client.addEventListener("reconnecting", (e) => showReconnecting(e.detail.at));
client.addEventListener("hello", (e) => {
  root.classList.toggle("is-mod", client.moderator);
  if (e.detail.limits?.body) input?.setAttribute("maxlength", String(e.detail.limits.body));
  updateComposer();
});
client.addEventListener("joined", (e) => {
  const frame = e.detail;
  if (frame.room !== room) return;
  removed = false;
  const stick = nearBottom();
  if (!frame.resumed) {
    // A first join, or a gap too long to replay: start from the newest page.
    clearMessages();
    moreOlder = frame.more ?? frame.history.length > 0;
    loadingOlder = false;
    if (frame.gap) systemLine("You were away for a while; scroll up for older messages.");
  }
  let added = 0;
  for (const message of frame.history) if (show(message)) added += 1;
  onlineCount.textContent = `${frame.online} online`;
  applyRules(frame);
  setOlder(moreOlder ? "idle" : "end");
  if (!frame.resumed || stick) toBottom();
  if (document.hidden && frame.resumed && added) {
    unreadHidden += added;
    updateTitle();
  }
  if (moreOlder && olderVisible()) loadOlder();
});
client.addEventListener("message", (e) => {
  if (e.detail.room === room) showLive(e.detail);
});
client.addEventListener("ack", (e) => {
  const item = e.detail.client_id ? itemByClientId(e.detail.client_id) : null;
  if (!item || item.dataset.id === String(e.detail.id)) return;
  const existing = itemById(e.detail.id);
  if (existing && existing !== item) removeItem(item);
  else settleItem(item, e.detail.id, e.detail.ts);
});
client.addEventListener("failed", (e) => {
  const { client_id: clientId, detail, frame } = e.detail;
  const item = itemByClientId(clientId);
  if (item) markFailed(item, detail, clientId, frame.body);
  else toast(detail, "error");
});
client.addEventListener("history", (e) => {
  const frame = e.detail;
  if (frame.room !== room) return;
  const fromBottom = scroller.scrollHeight - scroller.scrollTop;
  for (const message of frame.messages) show(message);
  scroller.scrollTop = scroller.scrollHeight - fromBottom;
  moreOlder = frame.more === true;
  loadingOlder = false;
  setOlder(moreOlder ? "idle" : "end");
  if (moreOlder && olderVisible()) requestAnimationFrame(loadOlder);
});
client.addEventListener("typing", (e) => {
  if (e.detail.room === room && e.detail.user !== me) startTyping(e.detail.user);
});
client.addEventListener("presence", (e) => {
  if (e.detail.room === room) onlineCount.textContent = `${e.detail.online} online`;
});
client.addEventListener("delete", (e) => {
  if (e.detail.room !== room) return;
  const item = itemById(e.detail.id);
  if (item) removeItem(item);
});
client.addEventListener("clear", (e) => {
  if (e.detail.room !== room) return;
  clearMessages();
  systemLine("A moderator cleared the chat.");
});
client.addEventListener("room", (e) => {
  if (e.detail.room === room) applyRules(e.detail);
});
client.addEventListener("notice", (e) => {
  if (e.detail.room == null || e.detail.room === room) toast(e.detail.detail);
});
client.addEventListener("error", (e) => {
  const frame = e.detail;
  if (frame.code === "banned" && (frame.ref == null || frame.ref === room)) {
    showBanner(frame.detail);
    if (frame.ref === room) {
      removed = true; // refused at join, or taken out: nothing can be posted here for now
      updateComposer();
      if (frame.expires_ms) rejoinAt(frame.expires_ms);
    }
    return;
  }
  if (frame.ref === room && ["unknown_room", "forbidden", "auth_required"].includes(frame.code)) {
    showBanner(frame.detail);
    return;
  }
  if (frame.detail) toast(frame.detail, "error");
});
client.addEventListener("left", (e) => {
  if (e.detail.room !== room) return;
  removed = true; // a moderator took this player out of the room
  stopTypingAll();
  updateComposer();
});

// A timeout ends by itself: come back into the room when it does.
let rejoinTimer = null;
function rejoinAt(expiresMs) {
  clearTimeout(rejoinTimer);
  rejoinTimer = setTimeout(
    () => {
      setBannerHidden(true);
      client.join(room);
    },
    Math.max(0, expiresMs - Date.now()) + 1000,
  );
}
client.addEventListener("terminated", (e) => {
  const { why, expires_ms: until } = e.detail;
  if (why === "banned" && until) {
    const when = new Date(until).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    showBanner(`You are timed out until ${when}; the chat comes back by itself then.`);
    return;
  }
  showBanner(
    why === "banned"
      ? "You are banned from this chat."
      : "Your session ended. Log in again to keep chatting.",
  );
});

// --- page wiring -------------------------------------------------------------------------

retryButton.addEventListener("click", () => client.retryNow());
jump.addEventListener("click", toBottom);
scroller.addEventListener("scroll", () => {
  if (nearBottom() && !jump.hidden) {
    unreadBelow = 0;
    jump.hidden = true;
  }
});
document.addEventListener("visibilitychange", () => {
  if (!document.hidden) {
    unreadHidden = 0;
    updateTitle();
  }
});

// For tests and curious players: the client is reachable from the devtools console.
window.chatClient = client;

setOlder("idle");
client.connect();
client.join(room);
