// TokenOpen console: copy buttons, confirm-before-submit, tabs, expandable log rows,
// table labels for phones, closing the account menu. No inline scripts anywhere (CSP).
(function () {
  "use strict";

  function copyText(text) {
    // The Clipboard API needs a secure context; plain-http LAN installs fall back to a selection.
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text);
    }
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "sr-only";
    document.body.appendChild(area);
    area.select();
    var ok = document.execCommand("copy");
    document.body.removeChild(area);
    return ok ? Promise.resolve() : Promise.reject(new Error("copy refused"));
  }

  // Screen readers hear "Copied …" through the page's one polite live region.
  function announce(text) {
    var region = document.getElementById("live-status");
    if (!region) return;
    region.textContent = "";
    setTimeout(function () { region.textContent = text; }, 30);
  }

  function copyFrom(button) {
    var text = button.getAttribute("data-copy");
    if (text === null) {
      var pre = button.parentElement.querySelector("pre");
      if (!pre) return;
      text = pre.textContent.trim();
    }
    var label = button.textContent;
    copyText(text).then(function () {
      button.textContent = "Copied";
      button.classList.add("copied");
      announce(button.getAttribute("data-copied") || "Copied");
    }, function () {
      button.textContent = "Select and copy";
      announce("Copying failed; select the text and copy it");
    });
    setTimeout(function () { button.textContent = label; button.classList.remove("copied"); }, 1600);
  }

  // A log row's Details button shows the row after it (error, channel, tokens, cost, TTFT).
  function toggleDetail(button) {
    var row = document.getElementById(button.getAttribute("aria-controls"));
    if (!row) return;
    var open = button.getAttribute("aria-expanded") !== "true";
    button.setAttribute("aria-expanded", open ? "true" : "false");
    row.hidden = !open;
  }

  // Tabs (role=tablist): one panel shown at a time; without JavaScript every panel shows.
  function selectTab(tab) {
    var list = tab.closest("[role=tablist]");
    list.querySelectorAll("[role=tab]").forEach(function (other) {
      var selected = other === tab;
      other.setAttribute("aria-selected", selected ? "true" : "false");
      other.tabIndex = selected ? 0 : -1;
      var panel = document.getElementById(other.getAttribute("aria-controls"));
      if (panel) panel.hidden = !selected;
    });
  }

  document.querySelectorAll("[role=tablist]").forEach(function (list) {
    var tabs = list.querySelectorAll("[role=tab]");
    if (!tabs.length) return;
    list.hidden = false;
    var chosen = list.querySelector("[role=tab][aria-selected=true]") || tabs[0];
    selectTab(chosen);
    list.addEventListener("keydown", function (event) {
      var items = Array.prototype.slice.call(tabs);
      var at = items.indexOf(document.activeElement);
      if (at < 0) return;
      var next = null;
      if (event.key === "ArrowRight") next = items[(at + 1) % items.length];
      if (event.key === "ArrowLeft") next = items[(at - 1 + items.length) % items.length];
      if (event.key === "Home") next = items[0];
      if (event.key === "End") next = items[items.length - 1];
      if (next) { event.preventDefault(); selectTab(next); next.focus(); }
    });
  });

  // Phones show tables as stacked rows; each cell is labelled with its column's header.
  document.querySelectorAll("table.table").forEach(function (table) {
    var heads = Array.prototype.map.call(table.querySelectorAll("thead th"), function (th) {
      return th.textContent.trim();
    });
    if (!heads.length) return;
    table.classList.add("stack");
    table.querySelectorAll("tbody tr").forEach(function (tr) {
      var column = 0;
      Array.prototype.forEach.call(tr.children, function (cell) {
        if (heads[column] && !cell.hasAttribute("data-label")) {
          cell.setAttribute("data-label", heads[column]);
        }
        column += cell.colSpan || 1;
      });
    });
  });

  document.addEventListener("click", function (event) {
    var button = event.target.closest(".copy");
    if (button) { copyFrom(button); return; }
    var toggle = event.target.closest("[data-toggle-detail]");
    if (toggle) { toggleDetail(toggle); return; }
    var tab = event.target.closest("[role=tab]");
    if (tab) { event.preventDefault(); selectTab(tab); return; }
    // A click outside an open account menu closes it.
    document.querySelectorAll("details.account-menu[open]").forEach(function (menu) {
      if (!menu.contains(event.target)) menu.removeAttribute("open");
    });
  });

  // A page that showed a secret from a POST swaps its history entry for a plain GET URL,
  // so reloading it neither resubmits the form nor shows the secret again.
  var replace = document.querySelector("[data-replace-url]");
  if (replace && window.history && history.replaceState) {
    history.replaceState(null, "", replace.getAttribute("data-replace-url"));
  }

  document.addEventListener("submit", function (event) {
    var question = event.target.getAttribute("data-confirm");
    if (question && !window.confirm(question)) event.preventDefault();
  });
})();
