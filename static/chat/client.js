// A small client for the chat protocol (docs/protocol.md), used by the chat page. It is
// also the protocol by example: every frame the page sends or reads passes through here.
//
//   const client = new ChatClient();
//   client.addEventListener("message", (e) => show(e.detail));
//   client.connect();
//   client.join("lobby");
//   client.post("lobby", "gg");
//
// - One socket carries every joined room.
// - A dropped socket is reopened with exponential backoff and full jitter (a random delay
//   up to min(cap, base * 2^attempt)), so a restarted server is not stampeded by every
//   page at once (RFC 6455 section 7.2.3). Close codes 4001 (unauthorized) and 4003
//   (banned) end the session; every other close means "reconnect with since". A server
//   that restarts on purpose says when to come back (`reconnect {retry_ms}`, close 4012);
//   a close reason carrying JSON such as {"retry_ms": 5000} is honoured the same way.
// - Each room is re-joined with `since`, the highest message id seen in it, so the server
//   replays what was missed; duplicates are dropped by id (a set per room), never by
//   comparing with the highest id, since ids from two server processes can arrive out of
//   order. A `resync {room}` (the server lost events in a broker outage) re-joins the same
//   way on the open socket.
// - Messages wait in an outbox until the server acknowledges them. After a reconnect they
//   are resent with the same client_id; the server answers a resend with the original
//   ack (duplicate: true) instead of posting twice. Moderator commands ("/delete 42") have
//   no such protection, so one whose answer was lost with the socket is reported, not resent.
// - A room a moderator removed this user from (`error banned` + `left`) is not re-joined
//   automatically before the sanction's `expires_ms`.
// - The server's `ping` is answered with a `pong` echoing its `n`: the server uses pongs
//   both as a heartbeat and to know how much this client has read (flow control). A
//   server silent for two heartbeats is taken for gone.
// - `batch` frames are unpacked in order, so the page only ever sees single events.
//
// Events (CustomEvent, the frame or a small object in `detail`): state, reconnecting,
// hello, joined, message, ack, failed, history, typing, presence, delete, clear, room,
// left, notice, reconnect, error, terminated, outbox.

export const CLOSE_UNAUTHORIZED = 4001;
export const CLOSE_BANNED = 4003;
export const CLOSE_RESTARTING = 4012;
export const CLOSE_FLOOD = 4029;
const TERMINAL_CLOSE_CODES = new Set([CLOSE_UNAUTHORIZED, CLOSE_BANNED]);

// Error codes that say "not now" rather than "no": the message stays in the outbox.
const RETRYABLE_POST_ERRORS = new Set(["not_joined"]);

// A connection that lived this long counts as healthy: the next drop starts backoff afresh.
const HEALTHY_AFTER_MS = 5000;

// Message ids remembered per room to drop duplicates. Ids are unique but do not arrive in
// id order across server processes, so duplicates are found by id, not by "<= last id".
const SEEN_LIMIT = 5000;

export class ChatClient extends EventTarget {
  constructor({
    url = defaultUrl(),
    baseDelay = 500,
    maxDelay = 20000,
    typingInterval = 3000,
  } = {}) {
    super();
    this.url = url;
    this.baseDelay = baseDelay;
    this.maxDelay = maxDelay;
    this.typingInterval = typingInterval;
    this.rooms = new Map(); // room -> { lastId, seen, joined, typedAt, blockedUntil }
    this.outbox = new Map(); // client_id -> message frame, in posting order, until acked
    this.commandsSent = new Set(); // client_ids of commands sent on the current socket
    this.state = "idle";
    this.user = null;
    this.moderator = false;
    this.hello = null;
    this.attempt = 0;
    this.socket = null;
    this.stopped = true;
    this.retryTimer = null;
    this.retryAt = 0;
    this.watchdog = null;
    this.lastFrameAt = 0;
    this.retryMs = null; // from a `reconnect` frame: when to come back after the close
    this.bannedUntil = null; // from `error banned` without a room: when a timeout ends
    this.helloAt = 0; // when the current connection said hello; 0 while there is none
    this.everConnected = false;
    this._onOnline = () => this.retryNow();
    this._onOffline = () => this._drop("offline");
    this._onVisible = () => {
      if (document.visibilityState === "visible") this.retryNow();
    };
  }

  // --- public API -------------------------------------------------------------------------

  connect() {
    if (!this.stopped) return;
    this.stopped = false;
    if (typeof window !== "undefined") {
      window.addEventListener("online", this._onOnline);
      window.addEventListener("offline", this._onOffline);
      document.addEventListener("visibilitychange", this._onVisible);
    }
    this._open();
  }

  close() {
    this.stopped = true;
    clearTimeout(this.retryTimer);
    this._stopWatchdog();
    if (typeof window !== "undefined") {
      window.removeEventListener("online", this._onOnline);
      window.removeEventListener("offline", this._onOffline);
      document.removeEventListener("visibilitychange", this._onVisible);
    }
    const socket = this.socket;
    this.socket = null;
    if (socket) socket.close(1000);
    this._setState("disconnected");
  }

  // Skip the rest of the backoff wait (the network came back, the tab became visible).
  retryNow() {
    if (this.stopped || this.socket || this.retryTimer === null) return;
    clearTimeout(this.retryTimer);
    this.retryTimer = null;
    this._open();
  }

  join(room) {
    if (!this.rooms.has(room)) {
      this.rooms.set(room, {
        lastId: null, // the highest message id seen live or in joined.history: `since`
        seen: new Set(),
        joined: false,
        typedAt: 0,
        blockedUntil: 0, // removed by a moderator: no automatic re-join before this time
      });
    }
    this.rooms.get(room).blockedUntil = 0; // an explicit join is the caller's decision
    if (this.state === "connected") this._send(this._joinFrame(room));
  }

  leave(room) {
    this.rooms.delete(room);
    for (const [clientId, frame] of this.outbox) {
      if (frame.room === room) this.outbox.delete(clientId);
    }
    this._send({ type: "leave", room });
  }

  // Queue a message (or a moderator command such as "/delete 42") and send it when the
  // room is joined. Returns its client_id, which the ack and the echoed message carry.
  post(room, body, clientId = newClientId()) {
    const frame = { type: "message", room, body, client_id: clientId };
    this.outbox.set(clientId, frame);
    this._emitOutbox();
    if (this.rooms.get(room)?.joined) this._send(frame);
    return clientId;
  }

  // Drop a message the server refused, or that the user no longer wants sent.
  discard(clientId) {
    if (this.outbox.delete(clientId)) this._emitOutbox();
  }

  // At most one typing frame per room per typingInterval: the others only need a hint.
  typing(room) {
    const state = this.rooms.get(room);
    if (!state?.joined || !this.user) return;
    const now = Date.now();
    if (now - state.typedAt < this.typingInterval) return;
    state.typedAt = now;
    this._send({ type: "typing", room });
  }

  // Ask for older messages; the answer is a `history` event.
  history(room, before, limit = 50) {
    const frame = { type: "history", room, limit };
    if (before != null) frame.before = before;
    return this._send(frame);
  }

  // Messages posted in `room` still waiting for the server's ack.
  pending(room) {
    return [...this.outbox.values()].filter((frame) => frame.room === room);
  }

  // --- connection -------------------------------------------------------------------------

  _open() {
    this.retryTimer = null;
    this._setState(this.everConnected || this.attempt > 0 ? "reconnecting" : "connecting");
    let socket;
    try {
      socket = new WebSocket(this.url, ["chat.json"]);
    } catch (error) {
      this._emit("error", { code: "bad_url", detail: String(error) });
      this._scheduleReconnect(null);
      return;
    }
    this.socket = socket;
    this.lastFrameAt = Date.now();
    socket.onmessage = (event) => {
      if (this.socket !== socket) return;
      this.lastFrameAt = Date.now();
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return; // not ours to interpret; the server only sends JSON on this subprotocol
      }
      this._handle(frame);
    };
    socket.onclose = (event) => {
      if (this.socket !== socket) return;
      this._closed(event.code, event.reason);
    };
  }

  _closed(code, reason) {
    this.socket = null;
    this._stopWatchdog();
    for (const state of this.rooms.values()) state.joined = false;
    // Backoff grows across failed attempts; only a connection that stayed up resets it.
    if (this.helloAt && Date.now() - this.helloAt > HEALTHY_AFTER_MS) this.attempt = 0;
    this.helloAt = 0;
    if (this.stopped) {
      this._setState("disconnected");
      return;
    }
    if (TERMINAL_CLOSE_CODES.has(code)) {
      this.stopped = true;
      this._setState("disconnected");
      const until = code === CLOSE_BANNED ? this.bannedUntil : null;
      this.bannedUntil = null;
      this._emit("terminated", {
        code,
        reason,
        why: code === CLOSE_BANNED ? "banned" : "unauthorized",
        expires_ms: until,
      });
      // A timeout, unlike a ban, ends: come back once it has.
      if (until != null) setTimeout(() => this.connect(), Math.max(0, until - Date.now()) + 1000);
      return;
    }
    this._abandonCommands();
    // A flooding client waits a while before trying again.
    if (code === CLOSE_FLOOD) this.attempt = Math.max(this.attempt, 4);
    const hint = this.retryMs ?? retryHint(reason);
    this.retryMs = null;
    this._scheduleReconnect(hint);
    // A server restarting on purpose (4012) is no failure: the backoff starts afresh.
    if (code === CLOSE_RESTARTING && hint != null) this.attempt = 0;
  }

  // Give up on the current socket at once (dead network, silent server) and reconnect.
  _drop(why) {
    const socket = this.socket;
    if (!socket) return;
    socket.onclose = null;
    socket.onmessage = null;
    try {
      socket.close(4000, why);
    } catch {
      // already closing
    }
    this._closed(1006, "");
  }

  _scheduleReconnect(hintMs) {
    const step = Math.min(this.maxDelay, this.baseDelay * 2 ** this.attempt);
    let delay = Math.random() * step; // full jitter
    if (hintMs != null) delay = hintMs + Math.random() * Math.min(step, hintMs);
    this.attempt += 1;
    this.retryAt = Date.now() + delay;
    this._setState("reconnecting");
    this._emit("reconnecting", { delay, at: this.retryAt, attempt: this.attempt });
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this._open(), delay);
  }

  // Browsers expose no WebSocket ping: a server silent for two heartbeats is presumed gone.
  _startWatchdog(heartbeatMs) {
    this._stopWatchdog();
    const limit = 2 * heartbeatMs + 5000;
    this.watchdog = setInterval(
      () => {
        if (Date.now() - this.lastFrameAt > limit) this._drop("heartbeat");
      },
      Math.max(1000, heartbeatMs / 2),
    );
  }

  _stopWatchdog() {
    clearInterval(this.watchdog);
    this.watchdog = null;
  }

  // --- frames -----------------------------------------------------------------------------

  _joinFrame(room, sinceAtMost = null) {
    let since = this.rooms.get(room).lastId;
    if (since != null && Number.isInteger(sinceAtMost)) since = Math.min(since, sinceAtMost);
    return since == null ? { type: "join", room } : { type: "join", room, since };
  }

  _handle(frame) {
    switch (frame.type) {
      case "batch":
        for (const inner of frame.messages ?? []) this._handle(inner);
        return;
      case "ping":
        this._send({ type: "pong", n: frame.n });
        return;
      case "pong":
        return;
      case "hello":
        this._hello(frame);
        return;
      case "joined":
        this._joined(frame);
        return;
      case "message":
        if (!this._seen(frame)) return;
        this._settle(frame);
        this._emit("message", frame);
        return;
      case "ack":
        this._acked(frame);
        return;
      case "error":
        this._error(frame);
        return;
      case "resync": {
        // The server may have lost events of this room (a broker outage): re-join it on
        // this same socket; the answer is an ordinary `joined`.
        // The server names the last id it is sure we got; messages after it that we did
        // see come again and are dropped as duplicates.
        const state = this.rooms.get(frame.room);
        if (state?.joined) this._send(this._joinFrame(frame.room, frame.since));
        return;
      }
      case "reconnect":
        this.retryMs = Number.isFinite(frame.retry_ms) ? frame.retry_ms : null;
        this._emit("reconnect", frame);
        return;
      case "left": {
        // Also sent unasked when a moderator takes this user out of the room.
        const state = this.rooms.get(frame.room);
        if (state) state.joined = false;
        this._emit("left", frame);
        return;
      }
      case "notice":
        // The answer to a moderator command settles it like an ack.
        if (frame.ref != null && this.outbox.delete(frame.ref)) this._emitOutbox();
        this._emit("notice", frame);
        return;
      default:
        this._emit(frame.type, frame);
    }
  }

  _hello(frame) {
    this.hello = frame;
    this.user = frame.user ?? null;
    this.moderator = frame.moderator === true;
    this.helloAt = Date.now();
    this.everConnected = true;
    this._startWatchdog(frame.heartbeat_ms || 30000);
    this._setState("connected");
    this._emit("hello", frame);
    const now = Date.now();
    for (const [room, state] of this.rooms) {
      if (state.blockedUntil <= now) this._send(this._joinFrame(room));
    }
  }

  _joined(frame) {
    const state = this.rooms.get(frame.room);
    if (!state) return;
    const resumed = state.lastId != null;
    state.joined = true;
    if (frame.gap) {
      // Too much was missed to replay: the page starts the room afresh from this history.
      state.lastId = null;
      state.seen.clear();
    }
    const history = (frame.history ?? []).filter((message) => this._seen(message));
    if (state.lastId == null) state.lastId = 0; // an empty room: recover from its start
    for (const message of history) this._settle(message);
    this._emit("joined", { ...frame, history, resumed: resumed && !frame.gap });
    // Messages we showed before the drop that a moderator removed while we were away.
    for (const id of frame.deleted ?? []) this._emit("delete", { type: "delete", room: frame.room, id });
    // Resend what the server has not acknowledged, oldest first; a message that did get
    // through is answered with its original ack, not posted again.
    for (const pending of this.outbox.values()) {
      if (pending.room === frame.room) this._send(pending);
    }
  }

  // A message of ours that came back (live or in recovered history) needs no resend.
  _settle(message) {
    if (message.client_id == null || message.user !== this.user) return;
    if (this.outbox.delete(message.client_id)) this._emitOutbox();
  }

  _acked(frame) {
    if (frame.client_id != null && this.outbox.delete(frame.client_id)) this._emitOutbox();
    this._emit("ack", frame);
  }

  _error(frame) {
    if (frame.code === "banned" && frame.ref == null) {
      // Banned everywhere (a 4003 close follows): a timeout ends at expires_ms.
      this.bannedUntil = Number.isFinite(frame.expires_ms) ? frame.expires_ms : null;
    }
    const pending = frame.ref != null ? this.outbox.get(frame.ref) : undefined;
    if (pending) {
      if (frame.code === "unavailable" && frame.id != null) {
        // Stored, but live delivery is down: it is posted, the room gets it on reconnect.
        this._acked({ type: "ack", room: pending.room, client_id: frame.ref, id: frame.id });
        return;
      }
      if (!RETRYABLE_POST_ERRORS.has(frame.code)) {
        this.outbox.delete(frame.ref);
        this._emitOutbox();
        this._emit("failed", { ...frame, client_id: frame.ref, frame: pending });
        return;
      }
    }
    const room = frame.ref != null ? this.rooms.get(frame.ref) : undefined;
    if (room && frame.code === "banned") {
      // Taken out of the room (a `left` follows): no re-join before the sanction ends.
      room.blockedUntil = Number.isFinite(frame.expires_ms) ? frame.expires_ms : Infinity;
    }
    if (room && !room.joined && frame.code === "unavailable") {
      // The server could not join us just now: try that room again shortly.
      setTimeout(() => {
        if (this.state === "connected" && this.rooms.get(frame.ref) === room && !room.joined) {
          this._send(this._joinFrame(frame.ref));
        }
      }, 1000 + Math.random() * 2000);
    }
    this._emit("error", frame);
  }

  // False for a message already seen (never reported twice); tracks `since` per room.
  _seen(message) {
    const state = this.rooms.get(message.room);
    if (!state) return true;
    if (state.seen.has(message.id)) return false;
    state.seen.add(message.id);
    if (state.seen.size > SEEN_LIMIT) state.seen.delete(state.seen.values().next().value);
    if (state.lastId == null || message.id > state.lastId) state.lastId = message.id;
    return true;
  }

  _send(frame) {
    const socket = this.socket;
    if (socket && socket.readyState === WebSocket.OPEN) {
      socket.send(JSON.stringify(frame));
      if (frame.type === "message" && isCommand(frame.body)) this.commandsSent.add(frame.client_id);
      return true;
    }
    return false;
  }

  // Moderator commands carry no duplicate protection on the server: one that was sent but
  // not answered when the socket dropped is not resent (it may have run); the page is told.
  _abandonCommands() {
    for (const clientId of this.commandsSent) {
      const frame = this.outbox.get(clientId);
      if (!frame) continue;
      this.outbox.delete(clientId);
      this._emit("failed", {
        code: "unconfirmed",
        detail: "the connection dropped before the server answered; check before retrying",
        client_id: clientId,
        frame,
      });
    }
    this.commandsSent.clear();
    this._emitOutbox();
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this._emit("state", { state });
  }

  _emitOutbox() {
    this._emit("outbox", { size: this.outbox.size });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

// In-chat moderator commands ("/delete 42", "/ban name") travel as message bodies. Only
// these words are commands (chat/commands.py); any other "/word" is ordinary chat.
const COMMANDS = /^\/(delete|timeout|ban|unban|slow|readonly|clear)(\s|$)/i;
export function isCommand(body) {
  return COMMANDS.test(body.trim());
}

// The earliest retry a server asked for in a close reason, e.g. '{"retry_ms": 5000}'.
export function retryHint(reason) {
  if (!reason || !reason.includes("{")) return null;
  try {
    const value = JSON.parse(reason.slice(reason.indexOf("{")));
    const ms = Number(value?.retry_ms);
    return Number.isFinite(ms) && ms >= 0 ? Math.min(ms, 10 * 60 * 1000) : null;
  } catch {
    return null;
  }
}

function defaultUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/ws/chat/`;
}

function newClientId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
