// Live updates: each server-sent event refetches the server-rendered fragment it concerns.
"use strict";
(function () {
  var live = document.querySelector("[data-live]");
  if (!live || !("EventSource" in window)) {
    return;
  }
  var log = document.querySelector("[data-events-log]");
  var busy = false;
  var again = false;

  function refresh() {
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    fetch(live.dataset.fragment, { credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        if (response.status === 404) {
          var gone = document.createElement("p");
          gone.className = "error";
          gone.setAttribute("role", "alert");
          gone.textContent = "This connection no longer exists.";
          live.replaceChildren(gone);
          return null;
        }
        return response.ok ? response.text() : null;
      })
      .then(function (html) {
        if (html !== null) {
          // Server-rendered and escaped by the console's templates.
          live.innerHTML = html;
        }
      })
      .catch(function () {})
      .then(function () {
        busy = false;
        if (again) {
          again = false;
          refresh();
        }
      });
  }

  function note(text) {
    if (!log) {
      return;
    }
    var item = document.createElement("li");
    item.textContent = text;
    log.insertBefore(item, log.firstChild);
    while (log.children.length > 50) {
      log.removeChild(log.lastChild);
    }
  }

  function describe(data) {
    // The server writes the line, in the page's one time format.
    if (data.line) {
      return data.line;
    }
    var when = data.at ? new Date(data.at).toLocaleTimeString() : "";
    var words = [when, data.kind ? data.kind.replace(/_/g, " ") : "change"];
    if (data.status) {
      words.push("→ " + data.status);
    }
    if (data.message) {
      words.push("(" + data.message + ")");
    }
    return words.join(" ").trim();
  }

  var source = new EventSource(live.dataset.events);
  // Anything missed between rendering the page and subscribing is picked up here.
  source.addEventListener("open", function () {
    live.dataset.stream = "open";
    refresh();
  });
  source.addEventListener("error", function () {
    live.dataset.stream = "closed";
  });
  source.addEventListener("change", function (event) {
    var data = {};
    try {
      data = JSON.parse(event.data);
    } catch (ignored) {
      data = {};
    }
    note(describe(data));
    refresh();
  });
  source.addEventListener("resync", function () {
    note("resynchronised");
    refresh();
  });
  window.addEventListener("pagehide", function () {
    source.close();
  });
})();
