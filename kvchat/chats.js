() => {
  // kvchat's chat list, kept in this browser (localStorage), with the chat each tab has open kept
  // per tab (sessionStorage: it survives a reload of that tab, and each tab has its own).
  //
  // A tab remembers the revision of its chat it last read or wrote. When it saves and the stored
  // chat has moved on since (another tab added a turn), neither is overwritten: this tab's version
  // becomes a new chat and the tab says so. No tab ever drops another's turn.
  //
  // Every function returns the values of its Gradio outputs, as a list.
  const LIBRARY = "kvchat-chats";
  const OPEN = "kvchat-open";
  const LEGACY = "kvchat-conversation";  // the single saved conversation of kvchat before the list
  const TITLE_CHARS = 48;

  const newId = () => {
    const bytes = crypto.getRandomValues(new Uint8Array(12));  // randomUUID needs a secure context
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  };
  const read = () => {
    try {
      const library = JSON.parse(localStorage.getItem(LIBRARY) || "null");
      if (library && typeof library === "object" && library.chats && typeof library.chats === "object") {
        return library;
      }
    } catch (err) { /* unreadable: start a fresh list below; the bad value is left alone until a save */ }
    return { visitor: "", chats: {} };
  };
  let problem = "";
  const write = (library) => {
    try {
      localStorage.setItem(LIBRARY, JSON.stringify(library));
      problem = "";
    } catch (err) {
      problem = "This browser would not store the chat (its storage is full or disabled): it is kept in this tab only.";
    }
  };
  const opened = () => {
    try {
      const open = JSON.parse(sessionStorage.getItem(OPEN) || "null");
      if (open && typeof open.id === "string") return open;
    } catch (err) { /* a new tab */ }
    return null;
  };
  const setOpened = (id, rev) => sessionStorage.setItem(OPEN, JSON.stringify({ id, rev }));

  const textOf = (message) => {
    const content = message && message.content;
    if (typeof content === "string") return content;
    if (Array.isArray(content)) return content.map((part) => (part && part.text) || "").join("");
    return "";
  };
  const isTurn = (m) => m && (m.role === "user" || m.role === "assistant") && !(m.metadata && m.metadata.title);
  const turns = (history) => (history || []).filter(isTurn).map((m) => [m.role, textOf(m)]);
  const sameTurns = (a, b) => JSON.stringify(turns(a)) === JSON.stringify(turns(b));
  const extendsTurns = (longer, shorter) => {
    const [l, s] = [turns(longer), turns(shorter)];
    return s.length <= l.length && JSON.stringify(l.slice(0, s.length)) === JSON.stringify(s);
  };
  const autoTitle = (history) => {
    const first = (history || []).find((m) => isTurn(m) && m.role === "user");
    const line = first ? textOf(first).trim().split("\n")[0].trim() : "";
    if (!line) return "New chat";
    return line.length > TITLE_CHARS ? line.slice(0, TITLE_CHARS - 1).trimEnd() + "…" : line;
  };
  const newest = (library) =>
    Object.entries(library.chats).sort(([, a], [, b]) => (b.updated_ms || 0) - (a.updated_ms || 0));

  let notes = [];
  const index = () => {
    const library = read();
    const open = opened();
    const chat = open && library.chats[open.id];
    const out = {
      open: open ? open.id : "",
      title: chat ? chat.title : "",
      chats: newest(library).map(([id, c]) => ({ id, title: c.title || "New chat" })),
      notes: problem ? notes.concat([problem]) : notes,
    };
    notes = [];
    return out;
  };

  // Store `history` (and the system prompt it was written under) as the open chat's; the rule
  // above decides where it goes.
  const store = (history, system) => {
    const library = read();
    let open = opened();
    if (!open) {
      open = { id: newId(), rev: 0 };
      setOpened(open.id, 0);
    }
    const stored = library.chats[open.id];
    if (!turns(history).length) {  // an empty chat is not listed; a cleared one leaves the list
      if (stored && (stored.rev === open.rev || sameTurns(stored.history, []))) {
        delete library.chats[open.id];
        write(library);
      }
      return;
    }
    if (stored && sameTurns(stored.history, history) && stored.history.length === history.length) {
      if (typeof system === "string" && stored.system !== system) {
        stored.system = system;
        write(library);
      }
      setOpened(open.id, stored.rev);
      return;
    }
    const now = Date.now();
    if (stored && stored.rev !== open.rev && !extendsTurns(history, stored.history)) {
      const id = newId();
      const title = `${stored.title} (2)`;
      library.chats[id] = { title, titled: true, history, system, rev: 1, updated_ms: now };
      write(library);
      setOpened(id, 1);
      notes.push(`This chat changed in another tab after this tab opened it, so this tab's version is kept as a new chat: “${title}”.`);
      return;
    }
    const chat = stored || { title: "", titled: false, rev: 0, created_ms: now };
    chat.history = history;
    if (typeof system === "string") chat.system = system;
    chat.rev = (chat.rev || 0) + 1;
    chat.updated_ms = now;
    if (!chat.titled) chat.title = autoTitle(history);
    library.chats[open.id] = chat;
    write(library);
    setOpened(open.id, chat.rev);
  };

  // Open chat `id` in this tab: its messages, and its system prompt (else the one on screen).
  const show = (id, system) => {
    const chat = read().chats[id];
    setOpened(id, chat ? chat.rev : 0);
    return [chat ? chat.history : [], chat && typeof chat.system === "string" ? chat.system : system];
  };

  window.kvchat = {
    // On page load: this browser's visitor id (it names the engine session, so a chat continues
    // warm after a reload) and the chat this tab had open, else the newest, else a new one.
    boot(legacy, system) {
      const library = read();
      legacy = legacy && typeof legacy === "object" ? legacy : {};
      if (!library.visitor) {
        library.visitor = typeof legacy.visitor === "string" && legacy.visitor ? legacy.visitor : newId();
        write(library);
      }
      if (!Object.keys(library.chats).length && Array.isArray(legacy.history) && turns(legacy.history).length) {
        const now = Date.now();
        library.chats[newId()] = {
          title: autoTitle(legacy.history), titled: false, history: legacy.history, rev: 1, updated_ms: now,
        };
        write(library);
      }
      if (!problem) localStorage.removeItem(LEGACY);
      const open = opened();
      let id = open && library.chats[open.id] ? open.id : "";
      if (!id && !open) id = (newest(library)[0] || [""])[0];
      return [...show(id || (open ? open.id : newId()), system), index(), library.visitor];
    },
    save(history, system) {
      store(history, system);
      return [index()];
    },
    newChat(history, system) {
      store(history, system);
      show(newId(), system);
      return [[], system, index()];
    },
    open(id, history, system) {
      store(history, system);
      return [...show(id, system), index()];
    },
    rename(title, history, system) {
      store(history, system);
      const library = read();
      const open = opened();
      const chat = open && library.chats[open.id];
      title = (title || "").trim().slice(0, 200);
      if (chat) {
        chat.title = title || autoTitle(chat.history);
        chat.titled = Boolean(title);
        write(library);
      } else if (title) {
        notes.push("Send a first message before naming this chat.");
      }
      return [index()];
    },
    remove(system) {
      const library = read();
      const open = opened();
      if (open) delete library.chats[open.id];
      write(library);
      const next = newest(library)[0];
      return [...show(next ? next[0] : newId(), system), index()];
    },
    refresh() {
      return [index()];
    },
  };
  // Another tab changed the list: show it here too (a hidden button runs `refresh`).
  window.addEventListener("storage", (event) => {
    if (event.key === LIBRARY) document.querySelector("#kvchat-refresh")?.click();
  });
}
