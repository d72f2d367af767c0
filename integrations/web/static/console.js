// After a form is sent, focus goes to the note saying what it did ("Saved.", or the error):
// read out at once, and the next Tab goes on from there rather than from the page's top.
"use strict";
(function () {
  var outcome = document.querySelector("[data-outcome]");
  if (outcome) {
    outcome.focus();
  }
})();

// Live updates: each server-sent event refetches the server-rendered fragment it concerns.
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
          followStored();
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

  // The setup form follows the stored values the fragment carries: the notes under secret
  // fields, and the value of every field the operator has not edited since it was shown.
  function followStored() {
    var stored = live.querySelector("[data-stored]");
    if (!stored) {
      return;
    }
    Array.prototype.forEach.call(stored.querySelectorAll("[data-field]"), function (entry) {
      var key = entry.dataset.field;
      var value = entry.dataset.value || "";
      var hint = document.getElementById("hint-" + key);
      var input = document.getElementById("field-" + key);
      if (hint) {
        hint.textContent = entry.dataset.note || "";
        hint.hidden = !entry.dataset.note;
      }
      if (!input) {
        return;
      }
      if ("required" in input.dataset) {
        input.required = !entry.dataset.note;
      }
      if (input.tagName === "SELECT") {
        var untouched = Array.prototype.every.call(input.options, function (option) {
          return option.selected === option.defaultSelected;
        });
        Array.prototype.forEach.call(input.options, function (option) {
          option.defaultSelected = option.value === value;
          if (untouched) {
            option.selected = option.value === value;
          }
        });
      } else {
        var unedited = input.value === input.defaultValue;
        input.defaultValue = value;
        if (unedited) {
          input.value = value;
        }
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
