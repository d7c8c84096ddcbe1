// prefl label: one comparison at a time. Every text is shown with textContent, never parsed
// as HTML. A decision is sent as JSON; the next item appears only once the server answers,
// which it does after the decision is on disk.
"use strict";
(() => {
  const token = document.querySelector('meta[name="prefl-token"]').content;
  const auth = token ? { "X-Prefl-Token": token } : {};
  const $ = (id) => document.getElementById(id);
  let state = null;
  let busy = false;

  function turn(role, content) {
    const box = document.createElement("div");
    box.className = "turn";
    const who = document.createElement("div");
    who.className = "role";
    who.textContent = role;
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = content;
    box.append(who, body);
    return box;
  }

  function render(s) {
    state = s;
    const item = s.item;
    $("progress").textContent = item
      ? `${s.decided + 1} of ${s.total}`
      : `${s.decided} of ${s.total}, all decided`;
    $("tally").textContent =
      `(${s.left + s.right} pairs, ${s.tie} ties, ${s.skip} skipped)`;
    $("undo").disabled = s.decided === 0;
    for (const id of ["left", "right", "tie", "skip"]) $(id).disabled = !item;
    $("item").hidden = !item;
    $("done").hidden = Boolean(item);
    if (!item) return;
    const prompt = $("prompt");
    prompt.replaceChildren();
    if (typeof item.prompt === "string") {
      prompt.append(turn("prompt", item.prompt));
    } else {
      for (const m of item.prompt) prompt.append(turn(m.role, m.content));
    }
    $("left-text").textContent = item.left;
    $("right-text").textContent = item.right;
    window.scrollTo(0, 0);
  }

  async function call(path, body) {
    if (busy) return;
    busy = true;
    document.body.classList.add("busy");
    $("status").textContent = "";
    try {
      const init = body === undefined
        ? { headers: auth }
        : {
            method: "POST",
            headers: { ...auth, "Content-Type": "application/json" },
            body: JSON.stringify(body),
          };
      const response = await fetch(path, init);
      const data = await response.json();
      if (!response.ok) $("status").textContent = data.error || response.statusText;
      if (data.total !== undefined) render(data);
    } catch (err) {
      $("status").textContent = `not saved, try again: ${err}`;
    } finally {
      busy = false;
      document.body.classList.remove("busy");
    }
  }

  const decide = (decision) => {
    if (state && state.item) call("/api/decide", { id: state.item.id, decision });
  };
  const undo = () => call("/api/undo", {});
  const keys = {
    ArrowLeft: () => decide("left"),
    1: () => decide("left"),
    ArrowRight: () => decide("right"),
    2: () => decide("right"),
    ArrowDown: () => decide("tie"),
    t: () => decide("tie"),
    s: () => decide("skip"),
    u: undo,
    Backspace: undo,
  };
  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const action = keys[event.key.length === 1 ? event.key.toLowerCase() : event.key];
    if (!action) return;
    event.preventDefault();
    action();
  });
  for (const d of ["left", "right", "tie", "skip"]) $(d).addEventListener("click", () => decide(d));
  $("undo").addEventListener("click", undo);
  call("/api/state");
})();
