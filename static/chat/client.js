// A small client for the chat protocol (docs/protocol.md), used by the chat page.
//
// One socket for every joined room. On a drop it reconnects with exponential backoff and
// full jitter, re-joins each room with `since` (the last message id it saw), and resends
// unacknowledged messages with the same client_id, which the server answers with the
// original ack instead of posting twice. It answers the server's `ping` with `pong`.

const TERMINAL_CLOSE_CODES = new Set([4001, 4003]); // unauthorized, banned: do not reconnect

export class ChatClient extends EventTarget {
  constructor({ url, baseDelay = 500, maxDelay = 20000 } = {}) {
    super();
    this.url = url ?? defaultUrl();
    this.baseDelay = baseDelay;
    this.maxDelay = maxDelay;
    this.rooms = new Map(); // room -> { lastId }
    this.outbox = new Map(); // client_id -> message frame, until acked
    this.attempt = 0;
    this.socket = null;
    this.state = "idle";
    this.stopped = false;
  }

  connect() {
    this.stopped = false;
    this._open();
  }

  close() {
    this.stopped = true;
    if (this.socket) this.socket.close(1000);
  }

  join(room) {
    if (!this.rooms.has(room)) this.rooms.set(room, { lastId: null });
    this._send(this._joinFrame(room));
  }

  leave(room) {
    this.rooms.delete(room);
    this._send({ type: "leave", room });
  }

  post(room, body) {
    const frame = { type: "message", room, body, client_id: newClientId() };
    this.outbox.set(frame.client_id, frame);
    this._send(frame);
    return frame.client_id;
  }

  typing(room) {
    this._send({ type: "typing", room });
  }

  history(room, before, limit = 50) {
    this._send({ type: "history", room, before, limit });
  }

  _joinFrame(room) {
    const { lastId } = this.rooms.get(room);
    return lastId == null ? { type: "join", room } : { type: "join", room, since: lastId };
  }

  _open() {
    this._setState(this.attempt === 0 ? "connecting" : "reconnecting");
    const socket = new WebSocket(this.url, ["chat.json"]);
    this.socket = socket;
    socket.onopen = () => {
      this.attempt = 0;
      this._setState("open");
      for (const room of this.rooms.keys()) this._send(this._joinFrame(room));
    };
    socket.onmessage = (event) => {
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      this._handle(frame);
    };
    socket.onclose = (event) => {
      if (this.socket !== socket) return;
      this.socket = null;
      if (this.stopped) return this._setState("closed");
      if (TERMINAL_CLOSE_CODES.has(event.code)) {
        this._setState("closed");
        this._emit("terminated", { code: event.code, reason: event.reason });
        return;
      }
      this._scheduleReconnect();
    };
  }

  _scheduleReconnect() {
    // Full jitter: a random delay up to the capped exponential step spreads a mass reconnect.
    const step = Math.min(this.maxDelay, this.baseDelay * 2 ** this.attempt);
    const delay = Math.random() * step;
    this.attempt += 1;
    this._setState("reconnecting");
    setTimeout(() => this._open(), delay);
  }

  _handle(frame) {
    switch (frame.type) {
      case "batch":
        for (const inner of frame.messages) this._handle(inner);
        return;
      case "ping":
        this._send({ type: "pong", n: frame.n });
        return;
      case "joined": {
        const room = this.rooms.get(frame.room);
        for (const message of frame.history) this._seen(message);
        this._emit("joined", frame);
        // Resend what the server has not acknowledged; duplicates are answered, not posted.
        if (room) for (const pending of this.outbox.values()) {
          if (pending.room === frame.room) this._send(pending);
        }
        return;
      }
      case "message":
        if (!this._seen(frame)) return;
        this._emit("message", frame);
        return;
      case "ack":
        this.outbox.delete(frame.client_id);
        this._emit("ack", frame);
        return;
      default:
        this._emit(frame.type, frame);
    }
  }

  // Track the last id per room; false for a message already seen (never shown twice).
  _seen(message) {
    const room = this.rooms.get(message.room);
    if (!room) return true;
    if (room.lastId != null && message.id <= room.lastId) return false;
    room.lastId = message.id;
    return true;
  }

  _send(frame) {
    if (this.socket && this.socket.readyState === WebSocket.OPEN) {
      this.socket.send(JSON.stringify(frame));
      return true;
    }
    return false;
  }

  _setState(state) {
    this.state = state;
    this._emit("state", { state });
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }
}

function defaultUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/ws/chat/`;
}

function newClientId() {
  return crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`;
}
