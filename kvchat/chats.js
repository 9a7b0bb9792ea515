() => {
  // kvchat's chat list, kept in this browser (localStorage), with the chat each tab has open kept
  // per tab (sessionStorage: it survives a reload of that tab, and each tab has its own).
  //
  // Every write gives the chat a new random revision. A tab remembers the revision it last read or
  // wrote, and the turns it last showed. When it saves new turns and the stored chat has moved on
  // since (another tab added a turn, or cleared the chat and began again), neither is overwritten:
  // this tab's version becomes a new chat and the tab says so. A tab that only looked saves nothing.
  // No tab ever drops another's turn.
  //
  // Where the browser refuses storage, the list lives in this tab's memory and the tab says so.
  // Every function below `window.kvchat` returns the values of its Gradio outputs, as a list.
  const LIBRARY = "kvchat-chats";
  const OPEN = "kvchat-open";
  const LEGACY = "kvchat-conversation";  // the single saved conversation of kvchat before the list
  const TITLE_CHARS = 48;

  let problem = "";
  let problemSaid = false;
  const inMemory = {};  // what storage would hold, when the browser refuses it
  const storage = (area) => ({
    get(key) {
      try {
        return window[area].getItem(key);
      } catch (err) {
        return key in inMemory ? inMemory[key] : null;
      }
    },
    set(key, value) {
      try {
        window[area].setItem(key, value);
      } catch (err) {
        inMemory[key] = value;
        if (!problemSaid) {  // said once per tab
          problem = "This browser would not store your chats (its storage is full or disabled): they are kept in this tab only.";
          problemSaid = true;
        }
      }
    },
    remove(key) {
      try {
        window[area].removeItem(key);
      } catch (err) { /* nothing to forget */ }
    },
  });
  const local = storage("localStorage");
  const session = storage("sessionStorage");

  const newId = () => {
    const bytes = crypto.getRandomValues(new Uint8Array(12));  // randomUUID needs a secure context
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  };
  const read = () => {
    try {
      const library = JSON.parse(local.get(LIBRARY) || "null");
      if (library && typeof library === "object" && library.chats && typeof library.chats === "object") {
        return library;
      }
    } catch (err) { /* unreadable: a fresh list; the bad value is replaced at the next save */ }
    return { visitor: "", chats: {} };
  };
  const write = (library) => local.set(LIBRARY, JSON.stringify(library));
  const opened = () => {
    try {
      const open = JSON.parse(session.get(OPEN) || "null");
      if (open && typeof open.id === "string") return open;
    } catch (err) { /* a new tab */ }
    return null;
  };

  const textOf = (message) => {
    const content = message && message.content;
    if (typeof content === "string") return content;
    if (Array.isArray(content)) return content.map((part) => (part && part.text) || "").join("");
    return "";
  };
  // Turns as the model sees them (badges are UI only; statuses never reach the list any more)
  const isTurn = (m) => m && (m.role === "user" || m.role === "assistant") && !(m.metadata && m.metadata.title);
  const turns = (history) => JSON.stringify((history || []).filter(isTurn).map((m) => [m.role, textOf(m)]));
  const extendsTurns = (longer, shorter) => {
    const [l, s] = [turns(longer), turns(shorter)];
    return l.slice(0, s.length - 1) === s.slice(0, -1);  // the same JSON array, with more after it
  };
  const autoTitle = (history) => {
    const first = (history || []).find((m) => isTurn(m) && m.role === "user");
    const line = first ? textOf(first).trim().split("\n")[0].trim() : "";
    if (!line) return "New chat";
    return line.length > TITLE_CHARS ? line.slice(0, TITLE_CHARS - 1).trimEnd() + "…" : line;
  };
  const newest = (library) =>
    Object.entries(library.chats).sort(([, a], [, b]) => (b.updated_ms || 0) - (a.updated_ms || 0));

  const SOON_MS = 1000;
  let soon = null;
  let latest = null;

  // What this tab last showed of its chat: `store` writes only what the tab itself changed.
  let seen = { id: "", turns: turns([]) };
  const setOpened = (id, rev, history) => {
    session.set(OPEN, JSON.stringify({ id, rev }));
    seen = { id, turns: turns(history) };
  };

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
    problem = "";
    return out;
  };

  // Store `history` (and the system prompt it was written under) as the open chat's.
  const store = (history, system) => {
    const library = read();
    let open = opened();
    if (!open) {
      open = { id: newId(), rev: "" };
      setOpened(open.id, "", []);
    }
    const stored = library.chats[open.id];
    if (open.id === seen.id && turns(history) === seen.turns) {  // this tab changed no turn
      if (stored && typeof system === "string" && stored.system !== system && stored.rev === open.rev) {
        stored.system = system;
        write(library);
      }
      return;
    }
    const moved = stored && stored.rev !== open.rev;  // written elsewhere since this tab read it
    if (turns(history) === turns([])) {  // an empty chat is not listed: a cleared one leaves the list
      if (stored && !moved) {
        delete library.chats[open.id];
        write(library);
      }
      setOpened(open.id, "", []);
      return;
    }
    const now = Date.now();
    const rev = newId();
    if (moved && !extendsTurns(history, stored.history)) {
      const id = newId();
      const title = `${stored.title} (2)`;
      library.chats[id] = { title, titled: true, history, system, rev, updated_ms: now };
      write(library);
      setOpened(id, rev, history);
      notes.push(`This chat changed in another tab after this tab opened it, so this tab's version is kept as a new chat: “${title}”.`);
      return;
    }
    const chat = stored || { title: "", titled: false };
    Object.assign(chat, { history, rev, updated_ms: now });
    if (typeof system === "string") chat.system = system;
    if (!chat.titled) chat.title = autoTitle(history);
    library.chats[open.id] = chat;
    write(library);
    setOpened(open.id, rev, history);
  };

  // Open chat `id` in this tab: its messages, and its system prompt (else the one on screen).
  const show = (id, system) => {
    const chat = read().chats[id];
    setOpened(id, chat ? chat.rev : "", chat ? chat.history : []);
    return [chat ? chat.history : [], chat && typeof chat.system === "string" ? chat.system : system];
  };

  window.kvchat = {
    // On page load: this browser's visitor id (with the chat's id it names the engine session, so a
    // chat continues warm after a reload) and the chat this tab had open, else the newest, else a new one.
    boot(legacy, system) {
      const library = read();
      legacy = legacy && typeof legacy === "object" ? legacy : {};
      if (!library.visitor) {
        library.visitor = typeof legacy.visitor === "string" && legacy.visitor ? legacy.visitor : newId();
        write(library);
      }
      if (!Object.keys(library.chats).length && Array.isArray(legacy.history) && turns(legacy.history) !== turns([])) {
        library.chats[newId()] = {
          title: autoTitle(legacy.history), titled: false, history: legacy.history, rev: newId(), updated_ms: Date.now(),
        };
        write(library);
      }
      local.remove(LEGACY);
      const open = opened();
      const id = open ? open.id : (newest(library)[0] || [newId()])[0];
      return [...show(id, system), index(), library.visitor];
    },
    save(history, system) {
      clearTimeout(soon);
      soon = null;
      store(history, system);
      return [index()];
    },
    // While a reply streams: store what is on screen at most once per SOON_MS, so a reload or a
    // closed tab keeps the words written so far.
    saveSoon(history, system) {
      const open = opened();
      latest = { history, system, id: open ? open.id : "" };
      if (!soon) {
        soon = setTimeout(() => {
          soon = null;
          const now = opened();
          if (now && now.id === latest.id) store(latest.history, latest.system);  // the same chat is on screen
        }, SOON_MS);
      }
    },
    newChat(history, system) {
      clearTimeout(soon);
      soon = null;
      store(history, system);
      show(newId(), system);
      return [[], system, index()];
    },
    open(id, history, system) {
      clearTimeout(soon);
      soon = null;
      store(history, system);
      return [...show(id, system), index()];
    },
    rename(title, history, system) {
      clearTimeout(soon);
      soon = null;
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
      clearTimeout(soon);
      soon = null;
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
