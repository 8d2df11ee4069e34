// TokenOpen console: copy buttons, confirm-before-submit, closing the account menu.
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
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    var ok = document.execCommand("copy");
    document.body.removeChild(area);
    return ok ? Promise.resolve() : Promise.reject(new Error("copy refused"));
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest(".copy");
    if (button) {
      var pre = button.parentElement.querySelector("pre");
      if (!pre) return;
      var label = button.textContent;
      copyText(pre.textContent.trim()).then(function () {
        button.textContent = "Copied";
        button.classList.add("copied");
      }, function () {
        button.textContent = "Select and copy";
      });
      setTimeout(function () { button.textContent = label; button.classList.remove("copied"); }, 1600);
      return;
    }
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
